"""Gin flags shared by every `dsbs` subcommand: --gin_file, --gin.KEY=VALUE, --gin_search_path.

T5X-style: `--gin.TRAIN_STEPS=100` binds a macro or a parameter. Errors name the file or
flag that caused them. Nothing here knows what is being configured.
"""
import argparse
import os

import gin

from dsbs_jax import resources


class GinConfigError(ValueError):
  """A gin file or binding that cannot be applied; the message names it."""


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file to parse (repeatable); searched in --gin_search_path and gin/")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="folder in which to look for gin files and their includes")


def split_gin_bindings(argv: list[str]) -> tuple[list[str], list[str]]:
  """Takes T5X-style `--gin.KEY=VALUE` flags out of argv; returns (other args, bindings)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      key_value = arg[len("--gin."):]
      if "=" not in key_value:
        raise GinConfigError(f"flag {arg!r}: expected --gin.KEY=VALUE")
      bindings.append(key_value.replace("=", " = ", 1))
    else:
      rest.append(arg)
  return rest, bindings


def parse_gin(gin_files: list[str], bindings: list[str], search_paths: list[str] = ()) -> None:
  """Parses files then bindings into gin's global config, wrapping errors with their origin."""
  for path in [*search_paths, str(resources.GIN_DIR), os.getcwd()]:
    gin.add_config_file_search_path(path)
  for gin_file in gin_files:
    try:
      gin.parse_config_file(gin_file)
    except (IOError, OSError) as e:
      raise GinConfigError(f"--gin_file={gin_file}: {e}") from None
    except (ValueError, SyntaxError, KeyError) as e:
      raise GinConfigError(f"--gin_file={gin_file}: {e}") from None
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except (ValueError, SyntaxError, KeyError) as e:
      raise GinConfigError(f"--gin.{binding.replace(' = ', '=', 1)}: {e}") from None


def check_required(configurable: str, values: dict) -> None:
  """Raises GinConfigError naming each value still `gin.REQUIRED`.

  Gin checks REQUIRED defaults itself, but a parameter bound to a macro whose value is
  %gin.REQUIRED (T5X's way of marking a run file's required macros) arrives unchecked.
  """
  missing = [name for name, value in values.items() if value is gin.REQUIRED]
  if missing:
    names = ", ".join(f"{configurable}.{name}" for name in missing)
    raise GinConfigError(f"required but not set: {names}; set the macro the run's gin file "
                         "binds to it (e.g. --gin.MODEL_DIR=\"'/path'\")")
