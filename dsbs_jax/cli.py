"""The `dsbs` command: parses the subcommand and hands it to the module that owns it.

Each subcommand lives in its own module, which exposes `add_parser(subparsers)` that
registers the subcommand with a `func(args) -> int` default. Nothing here does work itself.
"""
import argparse
import importlib
import sys

from dsbs_jax import gin_utils
from dsbs_jax import host_allocator
from dsbs_jax import rationales

# Errors that mean bad input rather than a bug: printed as one line naming the file, line
# or flag, without a traceback. Subcommand modules add theirs as `USER_ERRORS`.
BASE_USER_ERRORS = (gin_utils.GinConfigError, rationales.RationaleFileError, FileNotFoundError)

# Subcommand -> module that registers it. Only the module of the subcommand being run is
# imported, so that one subcommand's heavy imports do not slow the others.
SUBCOMMANDS = {
    "tasks": "dsbs_jax.tasks_command",
    "convert": "dsbs_jax.convert",
    "rationales": "dsbs_jax.teacher_command",
    "train": "dsbs_jax.train",
    "eval": "dsbs_jax.infer",
    "predict": "dsbs_jax.infer",
    "export": "dsbs_jax.export",
    "plot": "dsbs_jax.plots",
}


def build_parser(command=None) -> tuple[argparse.ArgumentParser, tuple]:
  """(parser, user error types) for `command`, or for every subcommand when unknown."""
  parser = argparse.ArgumentParser(
      prog="dsbs", description="Distilling step-by-step (Hsieh et al., ACL 2023) in JAX/Flax.",
      epilog="Gin bindings go anywhere after the subcommand as --gin.NAME=VALUE.")
  subparsers = parser.add_subparsers(dest="command", required=True)
  module_names = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else SUBCOMMANDS.values()
  user_errors = BASE_USER_ERRORS
  for module_name in dict.fromkeys(module_names):
    module = importlib.import_module(module_name)
    module.add_parser(subparsers)
    user_errors += getattr(module, "USER_ERRORS", ())
  return parser, user_errors


def main(argv=None) -> int:
  if argv is None:  # a real command line, which can be run again under tuned settings
    host_allocator.reexec_with_tuned_allocator()
  argv, gin_bindings = gin_utils.split_gin_bindings(sys.argv[1:] if argv is None else list(argv))
  parser, user_errors = build_parser(argv[0] if argv else None)
  args = parser.parse_args(argv)
  args.gin_bindings = gin_bindings
  try:
    return args.func(args) or 0
  except user_errors as e:
    print(f"dsbs {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
