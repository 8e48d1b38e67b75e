"""SIGINT and SIGTERM at any moment of a command: where it was, and how to go on.

`cli.main` makes SIGTERM raise `Stopped` (`sigterm_raising`), a KeyboardInterrupt as
Ctrl-C's is, so that both unwind through the same `finally` blocks (locks released,
checkpoints closed, temporary files removed) and end as one line from `stopped_line`.
Commands name what they are doing with `phase("compiling the train step", resume="...")`;
the line names the innermost phase the signal interrupted and that phase's way to go on.
The training loop catches the signals itself, to checkpoint first
(periodic_actions.StopRequests). In a multi-host run jax.distributed.initialize installs
JAX's own SIGTERM handler over this one, so from then on SIGTERM raises nothing there.

This module must not print, and holds no command's knowledge: phases come from the commands.
"""
import _thread
import contextlib
import signal
import sys
import threading
from typing import Optional

RESUME_DEFAULT = "rerun the same command"
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report
REDELIVERY_DELAY_S = 0.01

_where = {"phase": None, "resume": RESUME_DEFAULT}


class Stopped(KeyboardInterrupt):
  """SIGTERM arrived (SIGINT raises a plain KeyboardInterrupt)."""


def _raise_stopped(signum, frame):
  del signum, frame
  raise Stopped()


def _redelivering(previous_hook):
  """An unraisable-exception hook that delivers a stop again when Python swallowed it.

  A signal's exception is raised wherever the main thread is, and inside a garbage
  collector callback (JAX registers one) or a `__del__` Python reports it and carries on:
  the stop would be lost. Re-sending the signal, from another thread a moment later (from
  this one it would strike inside the same callback), raises it again once that code
  returned.
  """
  def hook(unraisable):
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
      signum = signal.SIGTERM if isinstance(unraisable.exc_value, Stopped) else signal.SIGINT
      threading.Timer(REDELIVERY_DELAY_S, _thread.interrupt_main, (signum,)).start()
      return
    previous_hook(unraisable)
  return hook


@contextlib.contextmanager
def sigterm_raising():
  """Within the block, SIGTERM raises `Stopped` in the main thread (and neither it nor
  SIGINT's KeyboardInterrupt is lost in a callback); phases start afresh."""
  _where.update(phase=None, resume=RESUME_DEFAULT)
  previous = signal.signal(signal.SIGTERM, _raise_stopped)
  previous_hook = sys.unraisablehook
  sys.unraisablehook = _redelivering(previous_hook)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    sys.unraisablehook = previous_hook


def signal_name(error: KeyboardInterrupt) -> str:
  return "SIGTERM" if isinstance(error, Stopped) else "SIGINT"


@contextlib.contextmanager
def phase(description: str, resume: Optional[str] = None):
  """Marks the block as `description` (and, with `resume`, how to go on from a stop in it).

  A block that raises leaves its phase in place, so that the stop is reported where it
  struck, not where the unwinding passed.
  """
  before = dict(_where)
  _where["phase"] = description
  if resume is not None:
    _where["resume"] = resume
  yield
  _where.update(before)


def stopped_line(error: KeyboardInterrupt) -> str:
  """'stopped by SIGINT while PHASE; RESUME' ('stopped by SIGINT; RESUME' outside phases)."""
  where = f" while {_where['phase']}" if _where["phase"] else ""
  return f"stopped by {signal_name(error)}{where}; {_where['resume']}"
