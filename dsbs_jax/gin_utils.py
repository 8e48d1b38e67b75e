"""Gin flags shared by every `dsbs` subcommand: --gin_file, --gin.NAME=VALUE, --gin_search_path.

T5X-style: `--gin.TRAIN_STEPS=100` binds a macro or a parameter. Errors name the file or
flag that caused them, in one line; a macro that no gin file or binding uses is an error
naming the closest one that is used. Nothing here knows what is being configured.
"""
import argparse
import contextlib
import difflib
import io
import os
import tokenize

import gin

from dsbs_jax import resources
from dsbs_jax import storage
from dsbs_jax import text_files

GIN_FLAG_HELP = (
    "--gin.NAME=VALUE binds a macro (e.g. --gin.TRAIN_STEPS=2000) or a parameter\n"
    "(e.g. --gin.T5Config.emb_dim=256) after every --gin_file, in order. VALUE is a gin\n"
    "literal, so strings take quotes: --gin.MODEL_DIR=\"'/tmp/run'\".")
# Errors gin raises for a file or binding it cannot parse or apply.
_PARSE_ERRORS = (ValueError, SyntaxError, KeyError, TypeError, ImportError, tokenize.TokenError)
_LITERAL_HINT = " (VALUE is a gin literal: quote strings, e.g. --gin.MODEL_DIR=\"'/tmp/run'\")"
_search_paths_added = set()


class GinConfigError(ValueError):
  """A gin file, binding or configured value that cannot be used; the message names it."""


def _gin_file_text(path: str) -> io.StringIO:
  return io.StringIO(text_files.read_text(path))


def _is_gin_file(path: str) -> bool:
  try:
    return storage.path(path).is_file()
  except storage.StorageError:  # a scheme storage.py does not take: not a file here
    return False


# Gin files (includes too) are read as text_files reads text, from a disk or a URL: a
# byte-order mark skipped, bytes that are not UTF-8 named by line. gin's
# register_file_reader would append this reader after its own plain `open`, which then
# always wins.
gin.config._FILE_READERS.insert(  # pylint: disable=protected-access
    0, (_gin_file_text, _is_gin_file))


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("gin configuration", GIN_FLAG_HELP)
  group.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                     help="gin file to parse (repeatable); looked up as given, then in "
                          "--gin_search_path folders and the shipped gin/ folder")
  group.add_argument("--gin_search_path", action="append", default=[], metavar="DIR",
                     help="folder in which to look for gin files and their includes (repeatable)")


def split_gin_bindings(argv: list[str]) -> tuple[list[str], list[str]]:
  """Takes T5X-style `--gin.NAME=VALUE` flags out of argv; returns (other args, bindings)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      key_value = arg[len("--gin."):]
      if "=" not in key_value:
        raise GinConfigError(f"flag {arg!r}: expected --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=100")
      bindings.append(key_value.replace("=", " = ", 1))
    else:
      rest.append(arg)
  return rest, bindings


def _summary(error: Exception) -> str:
  """Gin's message without the echo of the offending text, keeping where it is in a file."""
  lines = [line.strip() for line in str(error).strip().splitlines()] or [type(error).__name__]
  return "; ".join([lines[0], *(line for line in lines[1:] if line.startswith("In file"))])


def _flag(binding: str) -> str:
  return "--gin." + binding.replace(" = ", "=", 1)


def parse_gin(gin_files: list[str], bindings: list[str], search_paths: list[str] = ()) -> None:
  """Parses files then bindings into gin's global config, wrapping errors with their origin.

  Raises GinConfigError for a binding of a macro that nothing parsed uses.
  """
  search = [*search_paths, str(resources.GIN_DIR), os.getcwd()]
  for path in search:
    if path not in _search_paths_added:  # gin keeps every path it is given, repeats included
      _search_paths_added.add(path)
      gin.add_config_file_search_path(path)
  for gin_file in gin_files:
    try:
      gin.parse_config_file(gin_file)
    except (IOError, OSError):
      places = ", ".join(dict.fromkeys(["the current folder", *search]))
      raise GinConfigError(f"--gin_file={gin_file}: no such gin file (looked in {places})") from None
    except _PARSE_ERRORS as e:
      raise GinConfigError(f"--gin_file={gin_file}: {_summary(e)}") from None
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except _PARSE_ERRORS as e:
      message = _summary(e)
      if "malformed node" in message:  # Python's literal parser, naming an AST node
        message = f"{binding.split(' = ', 1)[1]} is not a gin literal"
      hint = _LITERAL_HINT if "literal" in message or "parse" in message.lower() else ""
      raise GinConfigError(f"{_flag(binding)}: {message}{hint}") from None
  check_macros_used(bindings)


def macros_in_use() -> set[str]:
  """The macros that some binding in gin's config refers to as %NAME."""
  config = gin.config._CONFIG  # pylint: disable=protected-access  (gin has no public view)
  macro = gin.config.get_configurable(gin.config.macro)
  return {"/".join(ref.scopes) for ref in gin.config.iterate_references(config, to=macro)}


def check_macros_used(bindings: list[str]) -> None:
  """Raises GinConfigError for a `NAME = VALUE` binding whose macro nothing refers to."""
  used = macros_in_use()
  for binding in bindings:
    name = binding.split(" = ", 1)[0].strip()
    if "." in name or "/" in name or name in used:
      continue
    known = sorted(used)
    closest = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    suggestion = (f"; did you mean {closest[0]}?" if closest else
                  f"; the macros in use are {', '.join(known)}" if known else
                  "; no gin file in use takes macros: bind the parameter itself, e.g. "
                  "--gin.TaskOptions.alpha=0.3 for ALPHA")
    raise GinConfigError(f"{_flag(binding)}: no gin file or binding uses the macro "
                         f"{name}{suggestion}")


@contextlib.contextmanager
def as_config_errors(*error_types: type, configurable: str = ""):
  """Reports an error of `error_types` (default ValueError) raised while gin-configured
  objects are built (an unknown optimizer, a mesh that does not fit the devices) as a
  GinConfigError: a user's setting at fault, named by the message (prefixed with
  `configurable` when given)."""
  try:
    yield
  except GinConfigError:
    raise
  except error_types or (ValueError,) as e:
    raise GinConfigError(f"{configurable}: {e}" if configurable else str(e)) from e


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
