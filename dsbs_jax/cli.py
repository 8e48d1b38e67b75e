"""The `dsbs` command: parses the subcommand and hands it to the module that owns it.

Each subcommand lives in its own module, which runs it with a `func(args) -> int`. Its
flags are declared either by that module's `add_parser(subparsers)`, or, for modules that
load JAX, TensorFlow or SeqIO, in command_flags.py, whose parsers name `func` instead; such a
module is imported only once the flags parse, so a bad flag is refused at once. `dsbs
--help` lists the subcommands from the table below without importing them; a command
imports only its own module. A user error (bad input, whose message names the file, flag or
value) ends as one line, `dsbs CMD: error: ...`, with exit code 2, and leaves a traceback
only with --verbose; any other exception is a bug and keeps its traceback. SIGINT and
SIGTERM end a command as one line saying where it stopped and how to go on
(stop_signals.py), with exit code 130 or 143. Nothing here does work itself.
"""
import argparse
import errno
import sys
import traceback

from dsbs_jax import command_flags
from dsbs_jax import console
from dsbs_jax import folder_lock
from dsbs_jax import gin_utils
from dsbs_jax import gpu_runtime
from dsbs_jax import host_allocator
from dsbs_jax import stop_signals
from dsbs_jax import storage
from dsbs_jax import text_files
from dsbs_jax import tpu_runtime

# Errors that mean bad input rather than a bug. Subcommand modules add theirs as `USER_ERRORS`.
BASE_USER_ERRORS = (gin_utils.GinConfigError, text_files.TextFileError, FileNotFoundError,
                    PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
                    folder_lock.FolderInUseError, storage.StorageError)

# Subcommand -> (module that registers it, its line in `dsbs --help`), in the order of work.
SUBCOMMANDS = {
    "rationales": ("dsbs_jax.teacher_command",
                   "ask a teacher LLM for rationales (generate), or summarize record files (stats)"),
    "tasks": ("dsbs_jax.tasks_command",
              "list the SeqIO tasks and mixtures with their examples per split"),
    "convert": ("dsbs_jax.convert", "import a pretrained Hugging Face or T5X T5 checkpoint"),
    "train": ("dsbs_jax.train",
              "train a student as gin files say; rerun the same command to resume"),
    "compile": ("dsbs_jax.compile_report",
                "compile a run's steps for a TPU slice or GPUs (or cpu:N) without them: memory "
                "per chip, fit, collectives, roofline"),
    "eval": ("dsbs_jax.infer", "decode and score a task's split with a trained student"),
    "predict": ("dsbs_jax.infer", "label (and explain) raw inputs with a trained student"),
    "export": ("dsbs_jax.export",
               "export a trained student as a Hugging Face directory or a TF SavedModel"),
    "plot": ("dsbs_jax.plots", "the paper's figures (PNG) from a folder of runs"),
    "distill": ("dsbs_jax.distill",
                "all of it for your own inputs: teacher rationales, training, evaluation, "
                "export and a report, resumable"),
}
EPILOG = ("Run `dsbs COMMAND --help` for a command's flags. Start with\n"
          "  dsbs train --gin_file=quickstart.gin\n"
          "which trains a small student on the shipped CommonsenseQA rationales in minutes.")
VERBOSE_HELP = "show libraries' logs and, for an error, its traceback"


class ArgumentParser(argparse.ArgumentParser):
  """Reports a bad command line in one line, `PROG: error: MESSAGE`, pointing to --help."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _leaf_parsers(parser: argparse.ArgumentParser):
  """`parser` if it runs a command itself, else the parsers of its subcommands, recursively."""
  subparser_actions = [a for a in parser._actions  # pylint: disable=protected-access
                       if isinstance(a, argparse._SubParsersAction)]  # pylint: disable=protected-access
  if not subparser_actions:
    yield parser
  for action in subparser_actions:
    for child in dict.fromkeys(action.choices.values()):
      yield from _leaf_parsers(child)


def command_of(argv: list[str]):
  """The subcommand named in argv (its first argument that is not a flag), if any."""
  return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command=None) -> tuple[argparse.ArgumentParser, tuple]:
  """(parser, user error types) for `command`; only a listing when it names no subcommand."""
  parser = ArgumentParser(
      prog="dsbs", description="Distilling step-by-step (Hsieh et al., ACL 2023) in JAX/Flax.",
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
  subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  if command not in SUBCOMMANDS:
    for name, (_, summary) in SUBCOMMANDS.items():
      subparsers.add_parser(name, help=summary)
    return parser, BASE_USER_ERRORS
  if command in command_flags.PARSERS:
    command_flags.PARSERS[command](subparsers)
    user_errors = BASE_USER_ERRORS  # the module's own join once it is imported (`runner`)
  else:
    module = console.import_quietly(SUBCOMMANDS[command][0])
    module.add_parser(subparsers)
    user_errors = BASE_USER_ERRORS + getattr(module, "USER_ERRORS", ())
  for leaf in _leaf_parsers(subparsers.choices[command]):
    if "--verbose" not in leaf._option_string_actions:  # pylint: disable=protected-access
      leaf.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    leaf.set_defaults(command_name=leaf.prog)
  return parser, user_errors


def runner(args: argparse.Namespace) -> tuple:
  """(the function that runs the parsed command, its user error types), importing its
  module if its flags were declared apart (command_flags.py)."""
  module = (sys.modules[args.func.__module__] if callable(args.func)
            else console.import_quietly(SUBCOMMANDS[args.command][0]))
  func = args.func if callable(args.func) else getattr(module, args.func)
  return func, BASE_USER_ERRORS + getattr(module, "USER_ERRORS", ())


def _is_disk_full(error: Exception) -> bool:
  """A write that found no room: the user's to fix (its message names the file)."""
  return isinstance(error, OSError) and error.errno == errno.ENOSPC


def main(argv=None) -> int:
  if argv is None:  # a real command line: the process is the command's own
    host_allocator.reexec_with_tuned_allocator()  # so it can be run again under tuned settings
    code = main(sys.argv[1:])
    if code in stop_signals.EXIT_CODES.values():
      # Stopped: every `finally` has run and the line is printed. The interpreter's own
      # teardown would now meet what the stop left running in native threads (an XLA
      # compilation, TensorFlow's input pipelines) and could die of a segmentation fault.
      console.leave_now(code)
    if code:
      console.quiet_exit()  # its one line said it all
    return code
  argv = list(argv)
  tpu_runtime.keep_off_hosts_without_chips()
  gpu_runtime.quiet_on_hosts_without_gpus()
  verbose = "--verbose" in argv
  console.configure(verbose)
  command = command_of(argv)
  prog = [f"dsbs {command}" if command in SUBCOMMANDS else "dsbs"]  # named fully once parsed
  user_errors = BASE_USER_ERRORS
  with stop_signals.sigterm_raising():
    try:
      argv, gin_bindings = gin_utils.split_gin_bindings(argv)
      parser, user_errors = build_parser(command)
      args = parser.parse_args(argv)
      prog[0] = args.command_name
      if gin_bindings and not hasattr(args, "gin_file"):
        raise gin_utils.GinConfigError(f"{prog[0]} takes no --gin.NAME=VALUE flags")
      args.gin_bindings = gin_bindings
      func, user_errors = runner(args)
      return func(args) or 0
    except KeyboardInterrupt as stop:  # SIGINT, or SIGTERM (stop_signals)
      if verbose:
        traceback.print_exc()
      print(f"{prog[0]}: {stop_signals.stopped_line(stop)}", file=sys.stderr)
      return stop_signals.EXIT_CODES[stop_signals.signal_name(stop)]
    except Exception as error:  # pylint: disable=broad-except
      if not (isinstance(error, user_errors) or _is_disk_full(error)):
        raise
      if verbose:
        traceback.print_exc()
      print(f"{prog[0]}: error: {console.one_line(error)}", file=sys.stderr)
      return 2


if __name__ == "__main__":
  sys.exit(main())
