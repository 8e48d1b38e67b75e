"""Tests for dsbs_jax.custom_tasks: a record file becomes trainable tasks and mixtures, and
custom datasets named in gin are registered in time for T5X, whose gin files import `tasks`
before the bindings that name them."""
import dataclasses

import gin
import pytest
import seqio

import tasks  # noqa: F401  (imported before the bindings below, as a T5X gin file does)
from dsbs_jax import custom_tasks
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("custom") / "mine.jsonl"
  svamp = records.read_split(str(resources.RATIONALES_DIR), "svamp", "train")[:30]
  rationales.write_records(str(path), [dataclasses.replace(r, id=f"m{i}") for i, r in enumerate(svamp)])
  return path


def custom_binding(name, records_file, metric="equation"):
  return (f"custom_tasks.register_custom_datasets.datasets = [{{'name': '{name}', "
          f"'rationales_file': '{records_file}', 'metric': '{metric}'}}]")


def test_datasets_bound_after_import_tasks_are_registered_when_gin_is_finalized(records_file):
  gin.parse_config("from __gin__ import dynamic_registration\n"
                   "import tasks\nfrom dsbs_jax import custom_tasks\n"
                   + custom_binding("custom_late", records_file))
  assert "custom_late_dsbs_teacher" not in seqio.MixtureRegistry.names()
  gin.finalize()  # what T5X does once its files and flags are parsed
  mixture = seqio.get_mixture_or_task("custom_late_dsbs_teacher")
  assert [task.name for task in mixture.tasks] == ["custom_late_label_teacher", "custom_late_rationale"]
  assert [task.num_input_examples("validation") for task in mixture.tasks] == [3, 3]  # 10% of 30


def test_registering_again_keeps_the_same_and_replaces_another(records_file, tmp_path):
  gin.parse_config(custom_binding("custom_twice", records_file).replace("custom_tasks.", ""))
  first = custom_tasks.register_custom_datasets()
  task = seqio.get_mixture_or_task("custom_twice_label_teacher")
  assert custom_tasks.register_custom_datasets() == first
  assert seqio.get_mixture_or_task("custom_twice_label_teacher") is task
  # Another record file under the same name (a second `dsbs distill` in one process).
  other = tmp_path / "other.jsonl"
  rationales.write_records(str(other), rationales.read_records(str(records_file))[:20])
  gin.bind_parameter("register_custom_datasets.datasets",
                     [{"name": "custom_twice", "rationales_file": str(other)}])
  assert custom_tasks.register_custom_datasets() == first
  replaced = seqio.get_mixture_or_task("custom_twice_label_teacher")
  assert replaced is not task and replaced.num_input_examples("validation") == 2  # 10% of 20
  # A name registered elsewhere (a shipped benchmark) is not replaced.
  with pytest.raises(ValueError, match="cqa.* already registered"):
    custom_tasks.register_custom_dataset("cqa", str(records_file))


def test_custom_dataset_becomes_trainable_mixtures(svamp_records, tmp_path):
  records_file = tmp_path / "mine.jsonl"
  rationales.write_records(str(records_file), [dataclasses.replace(r, id=f"m{i}")
                                               for i, r in enumerate(svamp_records)])
  gin.clear_config()
  try:
    gin.parse_config("register_custom_datasets.datasets = [{'name': 'custom_teacher_test', "
                     f"'rationales_file': '{records_file}', 'metric': 'equation', "
                     f"'layout_dir': '{tmp_path / 'dir'}'}}]")
    names = custom_tasks.register_custom_datasets()
    assert "custom_teacher_test_dsbs_teacher" in names
    assert len(rationales.read_records(str(tmp_path / "dir/custom_teacher_test/valid.jsonl"))) == 3
    mixture = seqio.get_mixture_or_task("custom_teacher_test_dsbs_teacher")
    dataset = mixture.get_dataset({"inputs": 128, "targets": 128}, split="train", shuffle=False,
                                  use_cached=False)
    examples = list(dataset.take(4).as_numpy_iterator())
    assert len(examples) == 4 and all(len(e["inputs"]) and len(e["targets"]) for e in examples)
  finally:
    gin.clear_config()


def test_records_without_gold_labels_train_and_validate_on_the_teachers(cqa_records, tmp_path):
  unlabeled = [dataclasses.replace(r, id=f"u{i:02d}", label=None) for i, r in enumerate(cqa_records)]
  # Written in another order than the ids': the splits must not depend on it.
  rationales.write_records(str(tmp_path / "unlabeled.jsonl"), unlabeled[::-1])
  names = custom_tasks.register_custom_dataset("custom_unlabeled", str(tmp_path / "unlabeled.jsonl"),
                                               layout_dir=str(tmp_path / "dir"))
  assert "custom_unlabeled_dsbs_teacher" in names
  split = lambda name: rationales.read_records(str(tmp_path / "dir/custom_unlabeled" / name))
  valid, test, train = split("valid.jsonl"), split("test.jsonl"), split("train.jsonl")
  assert (len(valid), len(test), len(train)) == (4, 4, 32)  # 10% of 40, then 10% of 36
  _, expected_valid = records.split_records(sorted(r.id for r in unlabeled), 0.1, seed=0)
  assert sorted(r.id for r in valid) == sorted(expected_valid)
  task = seqio.get_mixture_or_task("custom_unlabeled_label_teacher")
  targets = [e["targets_pretokenized"].decode() for e in task.get_dataset(
      {"inputs": 128, "targets": 32}, split="validation", shuffle=False).as_numpy_iterator()]
  assert sorted(targets) == sorted(r.teacher_label for r in valid)
  with pytest.raises(rationales.RationaleFileError, match="has no gold label, which "
                     "custom_unlabeled_label_gold needs; train custom_unlabeled_dsbs_teacher"):
    seqio.get_mixture_or_task("custom_unlabeled_label_gold").get_dataset(
        {"inputs": 128, "targets": 32}, split="train", shuffle=False)


def test_gold_labels_must_be_all_or_none(cqa_records, tmp_path):
  mixed = [cqa_records[0], dataclasses.replace(cqa_records[1], label=None), *cqa_records[2:5]]
  rationales.write_records(str(tmp_path / "mixed.jsonl"), mixed)
  with pytest.raises(rationales.RationaleFileError,
                     match=r"mixed.jsonl: record 2 .* has no gold label, record 1 .* has"):
    custom_tasks.register_custom_dataset("custom_mixed", str(tmp_path / "mixed.jsonl"))
