"""Tests for dsbs_jax.text_files, through each reader of a file a user hands to `dsbs`: bytes
that are not UTF-8 are refused naming file, line and byte offset; a byte-order mark is
skipped; a damaged gzip stream and JSON that does not parse are named as such."""
import codecs
import gzip
import json
import os
import re

import gin
import pytest

from dsbs_jax import convert
from dsbs_jax import custom_tasks
from dsbs_jax import gin_utils
from dsbs_jax import infer
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import run_dir
from dsbs_jax import teacher
from dsbs_jax import text_files


def record_line(example_id: str, input_text: str) -> str:
  return json.dumps({"id": example_id, "input": input_text, "label": "y", "teacher_label": "y",
                     "rationale": "r", "teacher_output": "r. So the answer is (a) y."},
                    ensure_ascii=False) + "\n"


RECORDS = record_line("a", "x") + record_line("b", "a café")
SPEC = {"mixture_or_task_name": "cqa_dsbs_teacher", "input_length": 64, "target_length": 64,
        "label_prefix": "predict: ", "rationale_prefix": "a café"}

# (file name, its text with "a café" past its first line, read by, where the read has it).
READERS = [
    ("records.jsonl", RECORDS, rationales.read_records, lambda read: read[1].input),
    ("records.jsonl.gz", RECORDS, rationales.read_records, lambda read: read[1].input),
    ("custom.jsonl", RECORDS, custom_tasks.read_custom_records, lambda read: read[1].input),
    ("inputs.txt", "Where?\na café\n", infer.read_prediction_inputs,
     lambda read: read[1]["input"]),
    ("inputs.jsonl", '{"input": "a"}\n{"input": "a café"}\n', infer.read_prediction_inputs,
     lambda read: read[1]["input"]),
    ("distill_inputs.jsonl", '{"id": "1", "input": "a"}\n{"id": "2", "input": "a café"}\n',
     teacher.read_examples, lambda read: read[1].input),
    ("train_inputs.json", '{"premise": "p", "hypothesis": "h", "label": 0}\n'
     '{"premise": "a café", "hypothesis": "h", "label": 1}\n', records.read_train_inputs,
     lambda read: read[1][0].split(rationales.NLI_SEPARATOR)[0]),
    ("run.json", json.dumps(SPEC, indent=2, ensure_ascii=False),
     lambda path: run_dir.RunDir(os.path.dirname(path)).spec(), lambda read: read.rationale_prefix),
    ("metrics.jsonl", '{"step": 1, "kind": "train"}\n{"step": 2, "kind": "a café"}\n',
     lambda path: run_dir.RunDir(os.path.dirname(path)).metrics(), lambda read: read[1]["kind"]),
    ("config.json", '{"model_type": "t5",\n "note": "a café"}\n',
     text_files.read_json, lambda read: read["note"]),
]


def write(path, data: bytes) -> str:
  if path.name.endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)


@pytest.mark.parametrize("name, text, read, _", READERS, ids=[row[0] for row in READERS])
def test_bytes_that_are_not_utf8_are_named_by_file_line_and_offset(name, text, read, _, tmp_path):
  latin1 = text.encode("latin-1")  # how an editor set to Western European saves "é": 0xe9
  path = write(tmp_path / name, latin1)
  offset = latin1.index(b"\xe9")
  line = latin1.count(b"\n", 0, offset) + 1
  message = f"{path}:{line}: not UTF-8 text (byte 0xe9 at byte offset {offset}"
  with pytest.raises(text_files.TextFileError) as error:
    read(path)
  assert str(error.value).startswith(message), error.value


@pytest.mark.parametrize("name, text, read, read_value", READERS, ids=[row[0] for row in READERS])
def test_a_byte_order_mark_is_skipped(name, text, read, read_value, tmp_path):
  path = write(tmp_path / name, codecs.BOM_UTF8 + text.encode("utf-8"))
  assert read_value(read(path)) == "a café"


def test_the_offset_counts_a_byte_order_mark_and_earlier_lines(tmp_path):
  path = write(tmp_path / "inputs.txt", codecs.BOM_UTF8 + "é\n".encode() + b"ok \xff\n")
  with pytest.raises(text_files.TextFileError, match=r"inputs.txt:2: .* 0xff at byte offset 9\)"):
    text_files.read_text(path)


@pytest.mark.parametrize("data, message", [
    (b"not gzip", "not a readable gzip file after 0 bytes of text"),
    (gzip.compress(b'{"id": 1}\n' * 1000, mtime=0)[:-30], "cut short"),
], ids=["not gzip", "cut short"])  # ids of their own: pytest-xdist's workers must collect alike
def test_a_damaged_gzip_file_is_named(data, message, tmp_path):
  path = tmp_path / "records.jsonl.gz"
  path.write_bytes(data)
  with pytest.raises(text_files.TextFileError, match=f"{path}: .*{message}"):
    rationales.read_records(str(path))


@pytest.mark.parametrize("read, text, message", [
    (lambda path: list(rationales.iter_json_lines(path)), '{"a": 1}\n{"a": "open\n',
     "Invalid control character at column 12"),  # json's message ends in "at" itself
    (text_files.read_json, '{\n"a" 1}\n', "Expecting ':' delimiter at column 5"),
])
def test_json_errors_name_line_and_column(read, text, message, tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text(text)
  with pytest.raises(text_files.TextFileError) as error:
    read(str(path))
  assert str(error.value) == f"{path}:2: not valid JSON ({message})"


def test_gin_files_skip_a_byte_order_mark_and_name_bytes_that_are_not_utf8(tmp_path):
  model = tmp_path / "model.gin"
  model.write_bytes(codecs.BOM_UTF8 + "T5Config.vocab_size = 8  # café\n".encode())
  assert convert.config_from_gin(model, []).vocab_size == 8
  gin_utils.parse_gin([str(model)], [])
  assert gin.query_parameter("T5Config.vocab_size") == 8
  model.write_bytes(b"T5Config.vocab_size = 8\n# caf\xe9\n")
  message = f"{model}:2: not UTF-8 text (byte 0xe9 at byte offset 29)"
  with pytest.raises(text_files.TextFileError, match=re.escape(message)):
    convert.config_from_gin(model, [])
  with pytest.raises(gin_utils.GinConfigError, match=re.escape(message)):
    gin_utils.parse_gin([str(model)], [])
