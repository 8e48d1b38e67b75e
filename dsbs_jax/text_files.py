"""Reading the text files users hand to `dsbs`: record and input JSONL, plain-text inputs,
JSON configs, on a disk or an object store (storage.py opens them). Text is UTF-8, gzipped when the name ends in .gz, and a leading byte-order
mark is skipped, as most JSONL readers do. Bytes that are not UTF-8, a damaged gzip stream
and JSON that does not parse each end as one TextFileError naming the file, the line and
the byte offset or column.

This module must not know what the text means (schemas belong to their readers) or write
files.
"""
import codecs
import gzip
import json
import os
import zlib
from typing import Iterator, Union

from dsbs_jax import storage

PathLike = Union[str, os.PathLike]
# What a gzip stream that was cut short or garbled raises while being read.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


class TextFileError(ValueError):
  """A text file that cannot be read as such; the message names the file and where in it."""


def _open_binary(path: PathLike):
  raw = storage.open_binary(path)
  return gzip.GzipFile(fileobj=raw, mode="rb") if str(path).endswith(".gz") else raw


def _decode(data: bytes, path: PathLike, line_number: int, offset: int) -> str:
  """`data`, which starts at byte `offset` of `path` on line `line_number`, as text."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as error:
    line_number += data.count(b"\n", 0, error.start)
    uncompressed = " of the uncompressed text" if str(path).endswith(".gz") else ""
    raise TextFileError(
        f"{path}:{line_number}: not UTF-8 text (byte 0x{data[error.start]:02x} at byte offset "
        f"{offset + error.start}{uncompressed}); save the file as UTF-8") from None


def _without_bom(data: bytes) -> tuple[bytes, int]:
  """(`data` without a leading byte-order mark, how many bytes that dropped)."""
  if data.startswith(codecs.BOM_UTF8):
    return data[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
  return data, 0


def iter_lines(path: PathLike) -> Iterator[tuple[int, str]]:
  """(line number from 1, line with its newline) for each line of a text file."""
  offset = 0
  if not storage.path(path).exists():
    raise FileNotFoundError(f"{path}: no such file")
  try:
    with _open_binary(path) as f:
      for line_number, raw in enumerate(f, start=1):
        data, skipped = _without_bom(raw) if line_number == 1 else (raw, 0)
        yield line_number, _decode(data, path, line_number, offset + skipped)
        offset += len(raw)
  except _GZIP_ERRORS as error:
    raise TextFileError(f"{path}: not a readable gzip file after {offset} bytes of text "
                        f"({error}); is it damaged or cut short?") from None


def read_text(path: PathLike) -> str:
  """The whole text of a file."""
  return "".join(line for _, line in iter_lines(path))


def _invalid_json(error: json.JSONDecodeError, path: PathLike, line_number: int) -> TextFileError:
  # json's messages for some errors, such as "Unterminated string starting at", end in "at".
  message = error.msg if error.msg.endswith(" at") else f"{error.msg} at"
  return TextFileError(f"{path}:{line_number}: not valid JSON ({message} column {error.colno})")


def parse_json_line(line: str, path: PathLike, line_number: int):
  """The JSON value of line `line_number` of `path`."""
  try:
    return json.loads(line)
  except json.JSONDecodeError as error:
    raise _invalid_json(error, path, line_number) from None


def read_json(path: PathLike):
  """The JSON value a whole file holds."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as error:
    raise _invalid_json(error, path, error.lineno) from None
