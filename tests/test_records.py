"""Tests for dsbs_jax.records: the paper's subsampling rule (against Hugging Face `datasets`,
which the paper's run.py calls), train inputs joined in the teacher's order (and refused when
misaligned), bad input lines named, missing files named."""
import json
import math

import datasets as hf_datasets
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


PAPER_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)  # the paper's data-size experiments
PAPER_RUNS = range(5)


def paper_train(ids: list, fraction: float, run: int):
  """What the paper's run.py keeps for `--subsample fraction --run run`."""
  train = hf_datasets.Dataset.from_dict({"id": ids})
  return train if fraction >= 1.0 else train.train_test_split(test_size=1.0 - fraction,
                                                                seed=run)["train"]


@pytest.mark.parametrize("size", [16946])  # ANLI R1's train split
def test_subsample_keeps_what_the_papers_train_test_split_keeps(size):
  ids = [str(i) for i in range(size)]
  for fraction in PAPER_FRACTIONS:
    for run in PAPER_RUNS:
      assert (records.subsample(ids, fraction, run)
              == paper_train(ids, fraction, run)["id"]), (fraction, run)


@pytest.mark.parametrize("dataset", ["cqa", "svamp"])
def test_a_carved_validation_split_is_subsampled_and_carved_as_the_paper_does(dataset):
  """run.py subsamples CQA's and SVAMP's whole train split, then carves validation (10%,
  seed 0) from what it kept: both splits follow the fraction and the run."""
  shipped = {split: records.read_split(distillation.TaskOptions().rationales_dir, dataset, split)
             for split in ("train", "validation")}
  original = [r.id for r in records.uncarved(shipped["train"], shipped["validation"],
                                             records.VALID_FRACTION, records.VALID_SEED)]
  for fraction in PAPER_FRACTIONS:
    for run in PAPER_RUNS:
      paper = paper_train(original, fraction, run).train_test_split(test_size=0.1, seed=0)
      options = distillation.TaskOptions(train_fraction=fraction, subsample_seed=run)
      for split, paper_split in (("train", "train"), ("validation", "test")):
        ours = [r.id for r in records.records_for(SPECS[dataset], split, options)]
        assert ours == paper[paper_split]["id"], (split, fraction, run)
  # At fraction 1 that is the carve shipped in rationales/: the original order is right.
  assert [r.id for r in shipped["train"]] == paper_train(original, 1.0, 0).train_test_split(
      test_size=0.1, seed=0)["train"]["id"]


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


def test_training_records_are_subsampled_as_the_paper_does_then_filtered():
  options = distillation.TaskOptions(drop_parse_failures=True, train_fraction=0.5)
  kept = records.records_for(SPECS["svamp"], "train", options)
  paper = records.records_for(SPECS["svamp"], "train",
                              distillation.TaskOptions(train_fraction=0.5))
  assert kept == [r for r in paper if r.parse_error is None] and len(kept) < len(paper)
  # Evaluation splits are never filtered or subsampled.
  assert records.records_for(SPECS["svamp"], "test", options) == list(
      records.read_split(options.rationales_dir, "svamp", "test"))


def test_missing_rationales_dir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="run tools/convert_release.py"):
    records.records_for(SPECS["cqa"], "test", distillation.TaskOptions(rationales_dir=str(tmp_path)))

