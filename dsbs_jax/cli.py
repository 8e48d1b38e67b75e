"""The `dsbs` command: parses the subcommand and hands it to the module that owns it.

Each subcommand lives in its own module, which exposes `add_parser(subparsers)` that
registers the subcommand with a `func(args) -> int` default. Nothing here does work itself.
"""
import argparse
import importlib
import sys

# Modules imported lazily so that `dsbs --help` stays fast and one broken
# subcommand cannot take the others down.
SUBCOMMAND_MODULES = (
    "dsbs_jax.tasks_command",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dsbs", description=__doc__.splitlines()[0])
  subparsers = parser.add_subparsers(dest="command", required=True)
  for module_name in SUBCOMMAND_MODULES:
    importlib.import_module(module_name).add_parser(subparsers)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args) or 0


if __name__ == "__main__":
  sys.exit(main())
