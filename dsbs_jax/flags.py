"""Argument types shared by `dsbs` subcommands: a bad value is refused while the command line
is parsed, before any work, with a message naming the flag.

Nothing here reads gin flags (gin_utils.py) or runs a command.
"""
import argparse

STEP_HELP = "checkpoint to use: 'best' (by validation, the default), 'latest' or a step number"


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def checkpoint_step(text: str) -> str:
  """'best', 'latest' or a step number, as --step takes them."""
  if text in ("best", "latest") or text.isdigit():
    return text
  raise argparse.ArgumentTypeError(f"{text!r}: expected 'best', 'latest' or a step number")
