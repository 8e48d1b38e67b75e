"""Tests of `dsbs rationales` (dsbs_jax.teacher_command): `generate --dataset` reads the
shipped inputs and the default prompt; `stats` reproduces rationales/README.md's figures;
neither loads TensorFlow. Bad command lines are in test_cli.py's tables."""
import json
import os

import pytest

from conftest import modules_loaded_by
from dsbs_jax import cli
from fake_teacher import FakeTeacher, KEY_ENV, SHIPPED, assert_matches_shipped, shipped


def test_dataset_flag_reads_shipped_inputs_and_default_prompt(key_env, tmp_path):
  records = shipped("svamp", "validation")
  with FakeTeacher({"svamp": records}) as fake:
    args = ["rationales", "generate", "--dataset", "svamp", "--split", "validation", "--teacher", fake.url,
            "--model", "m", "--out", str(tmp_path / "out.jsonl"), "--api_key_env", KEY_ENV]
    assert cli.main(args) == 0
  assert_matches_shipped(tmp_path / "out.jsonl", records)


@pytest.mark.parametrize("dataset, split, file_name", [("svamp", "test", "svamp/test.jsonl"),
                                                       ("svamp", "train", "svamp/train.jsonl"),
                                                       ("cqa", "valid", "cqa/valid.jsonl")])
def test_stats_reproduce_the_readme_figures(dataset, split, file_name, capsys):
  with open(os.path.join(SHIPPED, "README.md"), encoding="utf-8") as f:
    row = next(line for line in f if line.startswith(f"| {dataset} | {split} |"))
  cells = [c.strip() for c in row.strip().strip("|").split("|")]
  examples, failures, empty, accuracy = cells[3], cells[5], cells[6], cells[7]
  assert cli.main(["rationales", "stats", os.path.join(SHIPPED, file_name)]) == 0
  output = capsys.readouterr().out
  summary = json.loads(output.strip().splitlines()[-1])
  assert f"{summary['records']:,}" == examples
  assert f"{summary['parse_failures']:,}" == failures and f"{summary['empty_rationales']:,}" == empty
  assert f"{summary['teacher_accuracy']:.2%}" == accuracy and accuracy in output


def test_stage_1_runs_without_tensorflow():
  stats = f"cli.main(['rationales', 'stats', {os.path.join(SHIPPED, 'svamp', 'test.jsonl')!r}])"
  assert modules_loaded_by(f"from dsbs_jax import cli\n{stats}", ("tensorflow",)) == []
