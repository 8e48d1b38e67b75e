"""What a `dsbs` command shows on the terminal besides its own output.

The libraries under the commands print start-up chatter that reads like failure: TensorFlow's
oneDNN and CUDA banners when it loads, XLA's `failed call to cuInit` on machines without a
GPU, gin's `Path not found` while it probes Python packages for gin files, SeqIO's and
orbax's advice through absl, and asyncio's reports of futures that a failed checkpoint read
abandoned. `configure(verbose=False)` sets what must be set before those libraries load and
filters what they log, so that a run's first screen holds only what the user needs;
`--verbose` leaves everything as the libraries print it. `one_line` turns an error into the
single line the commands print.

This module must not import TensorFlow, JAX or anything heavy at import time: it runs before
them.
"""
import contextlib
import importlib
import logging
import os
import sys
import tempfile

# Read by TensorFlow's native code when it loads. Level 2 drops its INFO and WARNING lines
# (the data pipeline's cache advice among them); TensorFlow only feeds data here, so its
# oneDNN kernels (and their banner) are not needed.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
# Python loggers and the starts of messages on them that are probing or advice, not news.
NOISE = {
    "root": ("Path not found: ",),  # gin's search of Python packages for a gin file
    "asyncio": ("Future exception was never retrieved",),  # a failed orbax read's leftovers
    # orbax's background threads logging, with tracebacks, a failed save that the command
    # reports itself as one line (checkpoints.CheckpointWriteError)
    "absl": ("[process=",),
}

_settings = {"verbose": False, "configured": False}


class _DropNoise(logging.Filter):

  def __init__(self, prefixes: tuple):
    super().__init__()
    self._prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._prefixes)


def _drop_closed_event_loop_reports(previous_hook):
  """An unraisable-exception hook that skips tensorstore callbacks into a closed event loop.

  When one array of a checkpoint cannot be read, orbax gives up and closes its event loop
  while the other reads finish; each of their callbacks then fails and is reported.
  """
  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(
        unraisable.exc_value) == "Event loop is closed":
      return
    previous_hook(unraisable)
  return hook


def configure(verbose: bool = False) -> None:
  """Quiets the libraries' chatter unless `verbose`; call before they are imported."""
  _settings["verbose"] = verbose
  if verbose or _settings["configured"]:
    return
  _settings["configured"] = True
  for name, value in QUIET_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
  for logger_name, prefixes in NOISE.items():
    logging.getLogger(None if logger_name == "root" else logger_name).addFilter(_DropNoise(prefixes))
  logging.getLogger("absl").setLevel(logging.ERROR)
  sys.unraisablehook = _drop_closed_event_loop_reports(sys.unraisablehook)


def is_verbose() -> bool:
  return _settings["verbose"]


@contextlib.contextmanager
def native_stderr_held():
  """Holds back what is written to file descriptor 2 meanwhile (native libraries' banners
  included); it is shown only if the block raises, or with --verbose."""
  if _settings["verbose"]:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      sys.stderr.flush()
      os.dup2(saved, 2)
      held.seek(0)
      os.write(2, held.read())
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def quiet_exit() -> None:
  """Drops what native code writes to file descriptor 2 from now on (unless --verbose): a
  command that has printed its last line leaves by it, not by TensorFlow's reports of the
  pipelines its exit tears down half read."""
  if _settings["verbose"]:
    return
  sys.stderr.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)


def leave_now(code: int) -> None:
  """Ends the process with `code` at once, its output flushed, without the interpreter's
  teardown (atexit handlers, finalizers): for a command that has finished its work and its
  clean-up and must not wait on, or crash in, native threads still running."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
      pass
  os._exit(code)  # pylint: disable=protected-access


def import_quietly(module_name: str):
  """Imports a module with its native start-up output held back, and keeps TensorFlow,
  which only feeds data here, off the GPUs (where it would take memory JAX needs)."""
  with native_stderr_held():
    module = importlib.import_module(module_name)
    if "tensorflow" in sys.modules:
      try:
        sys.modules["tensorflow"].config.set_visible_devices([], "GPU")
      except RuntimeError:  # TensorFlow already placed something: too late, and harmless
        pass
  return module


def one_line(error: BaseException) -> str:
  """The error's message on one line, without the line per configurable function that gin
  adds to an error passing through it."""
  lines = [line.strip() for line in str(error).splitlines()
           if line.strip() and not line.strip().startswith("In call to configurable ")]
  return "; ".join(lines) or type(error).__name__
