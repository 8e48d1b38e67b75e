"""Tests for dsbs_jax.records: the paper's subsampling rule, train inputs joined in the
teacher's order (and refused when misaligned), bad input lines named, missing files named."""
import json
import math

import numpy as np
import pytest

from conftest import SMALL_TRAIN
from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import records
from dsbs_jax import text_files

SPECS = {spec.name: spec for spec in datasets.BENCHMARKS}


def test_subsample_matches_paper_split_rule():
  kept = records.subsample(list(range(10)), 0.25, seed=0)
  permutation = np.random.default_rng(0).permutation(10)
  assert kept == list(permutation[math.ceil(0.75 * 10):])
  assert records.subsample(list(range(10)), 1.0, seed=0) == list(range(10))


def test_missing_nli_train_inputs_say_what_to_set():
  with pytest.raises(records.MissingTrainInputsError, match=r"TaskOptions.train_inputs = \{'esnli'"):
    records.records_for(SPECS["esnli"], "train", distillation.TaskOptions())


def test_joined_train_inputs_follow_the_teacher_order(small_nli_dir):
  root, inputs = small_nli_dir
  options = distillation.TaskOptions(rationales_dir=root, train_inputs=inputs)
  joined = records.records_for(SPECS["anli1"], "train", options)
  assert len(joined) == SMALL_TRAIN
  assert joined[0].id == "anli1-train-00000"
  assert joined[0].input == "premise 0</s>hypothesis 0"
  teacher = records.read_split(root, "anli1", "train")
  assert [r.teacher_output for r in joined] == [r.teacher_output for r in teacher]


def test_misaligned_train_inputs_are_refused(small_nli_dir, tmp_path):
  root, inputs = small_nli_dir
  lines = open(inputs["anli1"]).read().splitlines()
  shuffled = tmp_path / "shuffled.json"
  # Rotate the labels against the examples: about chance-level agreement remains.
  with open(shuffled, "w") as f:
    for line in lines:
      f.write(json.dumps(dict(json.loads(line), label=(json.loads(line)["label"] + 1) % 3)) + "\n")
  options = distillation.TaskOptions(rationales_dir=root, train_inputs={"anli1": str(shuffled)})
  with pytest.raises(ValueError, match="misaligned"):
    records.records_for(SPECS["anli1"], "train", options)


def test_train_inputs_of_wrong_length_are_refused(small_nli_dir, tmp_path):
  root, inputs = small_nli_dir
  short = tmp_path / "short.json"
  short.write_text("\n".join(open(inputs["anli1"]).read().splitlines()[:10]) + "\n")
  options = distillation.TaskOptions(rationales_dir=root, train_inputs={"anli1": str(short)})
  with pytest.raises(ValueError, match=r"10 examples, but the teacher outputs .* cover 300"):
    records.records_for(SPECS["anli1"], "train", options)


@pytest.mark.parametrize("line,message", [
    ('{"premise": "p", "hypothesis": "h", "label": 7}', "label 7 is not 0, 1 or 2"),
    ('{"premise": "p", "hypothesis": "h", "label": 1.5}', "'label' must be 0, 1, 2 or a label name"),
    ('{"premise": "p", "label": 0}', "field 'hypothesis' missing"),
    ('{"premise": "p", "hypothesis": "h"', "not valid JSON"),
])
def test_bad_train_input_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "inputs.json"
  path.write_text('{"premise": "p", "hypothesis": "h", "label": "neutral"}\n' + line + "\n")
  with pytest.raises(text_files.TextFileError, match=f"inputs.json:2: {message}"):
    records.read_train_inputs(str(path))


def test_training_records_are_filtered_then_subsampled():
  options = distillation.TaskOptions(drop_parse_failures=True, train_fraction=0.5)
  kept = records.records_for(SPECS["svamp"], "train", options)
  parsed = [r for r in records.read_split(options.rationales_dir, "svamp", "train")
            if r.parse_error is None]
  assert kept == records.subsample(parsed, 0.5, seed=0)
  # Evaluation splits are never filtered or subsampled.
  assert records.records_for(SPECS["svamp"], "test", options) == list(
      records.read_split(options.rationales_dir, "svamp", "test"))


def test_missing_rationales_dir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="run tools/convert_release.py"):
    records.records_for(SPECS["cqa"], "test", distillation.TaskOptions(rationales_dir=str(tmp_path)))

