"""The `dsbs` command: parses the subcommand and hands it to the module that owns it.

Each subcommand lives in its own module, which exposes `add_parser(subparsers)` that
registers the subcommand with a `func(args) -> int` default. Nothing here does work itself.
"""
import argparse
import importlib
import sys

from dsbs_jax import gin_utils
from dsbs_jax import rationales

USER_ERRORS = (gin_utils.GinConfigError, rationales.RationaleFileError, FileNotFoundError)

# Modules imported lazily so that `dsbs --help` stays fast and one broken
# subcommand cannot take the others down.
SUBCOMMAND_MODULES = (
    "dsbs_jax.tasks_command",
    "dsbs_jax.convert",
    "dsbs_jax.teacher_command",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dsbs", description=__doc__.splitlines()[0])
  subparsers = parser.add_subparsers(dest="command", required=True)
  for module_name in SUBCOMMAND_MODULES:
    importlib.import_module(module_name).add_parser(subparsers)
  return parser


def main(argv=None) -> int:
  argv, gin_bindings = gin_utils.split_gin_bindings(sys.argv[1:] if argv is None else list(argv))
  args = build_parser().parse_args(argv)
  args.gin_bindings = gin_bindings
  try:
    return args.func(args) or 0
  except USER_ERRORS as e:
    # Bad input, not a bug: the message names the file, line or flag; no traceback.
    print(f"dsbs {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
