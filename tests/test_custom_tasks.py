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


def test_registering_again_with_the_same_arguments_keeps_the_first(records_file):
  gin.parse_config(custom_binding("custom_twice", records_file).replace("custom_tasks.", ""))
  first = custom_tasks.register_custom_datasets()
  assert custom_tasks.register_custom_datasets() == first
  gin.bind_parameter("register_custom_datasets.datasets",
                     [{"name": "custom_twice", "rationales_file": str(records_file)}])
  with pytest.raises(ValueError, match="custom_twice.* already registered"):
    custom_tasks.register_custom_datasets()


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
