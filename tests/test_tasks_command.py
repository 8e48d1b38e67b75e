"""Tests for `dsbs tasks`: the listing of every task and mixture and the example printout."""
import dataclasses

from dsbs_jax import cli
from dsbs_jax import distillation
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources


def test_lists_every_task_and_mixture_with_counts(capsys):
  assert cli.main(["tasks"]) == 0
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
  assert len(rows) == 28
  by_name = {row[0]: row for row in rows}
  assert by_name["cqa_label_gold"][1:] == ["task", "8,766", "975", "1,221"]
  assert by_name["cqa_dsbs_teacher"][1:] == ["mixture", "17,532", "1,950", "2,442"]
  assert by_name["esnli_rationale"][2:4] == ["inputs", "missing"]


def test_lists_the_custom_datasets_that_gin_flags_register(tmp_path, capsys):
  records_file = tmp_path / "mine.jsonl"
  svamp = records.read_split(str(resources.RATIONALES_DIR), "svamp", "train")[:40]
  rationales.write_records(str(records_file), [dataclasses.replace(r, id=f"m{i:02}")
                                               for i, r in enumerate(svamp)])
  binding = ("--gin.register_custom_datasets.datasets=[{'name': 'listed', 'rationales_file': "
             f"'{records_file}', 'metric': 'equation'}}]")
  assert cli.main(["tasks", binding]) == 0
  rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
  assert len(rows) == 35  # the 4 benchmarks' 7 tasks and mixtures, then the custom one's
  assert rows["listed_dsbs_teacher"] == ["mixture", "64", "8", "8"]  # 40 = 32 + 4 + 4, twice
  assert cli.main(["tasks", "--dataset", "listed", binding]) == 0
  assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == [
      f"listed_{kind}" for kind in (*distillation.TASK_KINDS, *distillation.MIXTURES)]


def test_train_fraction_from_gin_flag_changes_counts(capsys):
  assert cli.main(["tasks", "--dataset", "svamp", "--gin.TaskOptions.train_fraction=0.5"]) == 0
  rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
  assert rows["svamp_label_gold"][2] == "360"


def test_prints_preprocessed_examples(capsys):
  assert cli.main(["tasks", "--dataset", "esnli", "--examples", "1"]) == 0
  out = capsys.readouterr().out
  assert "[esnli_dsbs_teacher/validation] inputs" in out
  assert distillation.TaskOptions().label_prefix.strip() in out and "</s>" in out


def test_gin_typo_is_a_clear_error(capsys):
  assert cli.main(["tasks", "--gin.TaskOptions.alpa=0.3"]) == 2
  assert "--gin.TaskOptions.alpa=0.3" in capsys.readouterr().err
