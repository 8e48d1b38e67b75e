"""Argument types shared by `dsbs` subcommands: a bad value is refused while the command line
is parsed, before any work, with a message naming the flag.

Nothing here reads gin flags (gin_utils.py) or runs a command.
"""
import argparse
import sys

STEP_HELP = "checkpoint to use: 'best' (by validation, the default), 'latest' or a step number"


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


class DeprecatedAlias(argparse.Action):
  """An old name of a flag, kept for one release: stores into the new flag's `dest` and warns
  on stderr that it is deprecated."""

  def __call__(self, parser, namespace, values, option_string=None):
    new_flag = "--" + self.dest
    print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the "
          f"next release; use {new_flag}", file=sys.stderr)
    setattr(namespace, self.dest, values)


def checkpoint_step(text: str) -> str:
  """'best', 'latest' or a step number, as --step takes them."""
  if text in ("best", "latest") or text.isdigit():
    return text
  raise argparse.ArgumentTypeError(f"{text!r}: expected 'best', 'latest' or a step number")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
  """--checkpoint MODEL_DIR and --step, as every command that reads a trained run takes them."""
  parser.add_argument("--checkpoint", required=True, metavar="MODEL_DIR",
                      help="MODEL_DIR written by dsbs train")
  parser.add_argument("--step", default="best", type=checkpoint_step, help=STEP_HELP)
