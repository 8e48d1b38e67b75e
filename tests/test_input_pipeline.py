"""Tests for dsbs_jax.input_pipeline: packed training batches carry each token's task, resume
at the next batch and split over hosts; evaluation batches hold every example once, padded
with masked rows; unknown names and empty splits are named."""
import dataclasses

import gin
import numpy as np
import pytest
import seqio

from dsbs_jax import custom_tasks
from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import input_pipeline
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources

LENGTHS = {"inputs": 256, "targets": 128}
LABEL, RATIONALE = distillation.TASK_IDS["label"], distillation.TASK_IDS["rationale"]
datasets.register_all()


@pytest.mark.parametrize("name,expected_ids", [
    ("cqa_dsbs_teacher", {0, LABEL, RATIONALE}),
    ("svamp_dsbs_gold", {0, LABEL, RATIONALE}),
    ("svamp_rationale", {0, RATIONALE}),
    ("svamp_distill", {0, LABEL})])
def test_training_batches_mark_each_target_token_with_its_task(name, expected_ids):
  batch = next(input_pipeline.train_batches(name, LENGTHS, 8, seed=0))
  task_ids = batch["decoder_task_ids"]
  np.testing.assert_array_equal(task_ids > 0, batch["decoder_loss_weights"] > 0)
  assert set(np.unique(task_ids)) == expected_ids
  # One task per packed example: the id is constant within each decoder segment.
  for row_ids, row_segments in zip(task_ids, batch["decoder_segment_ids"]):
    for segment in set(row_segments[row_segments > 0]):
      assert len(set(row_ids[row_segments == segment])) == 1


def test_a_resumed_pipeline_continues_with_the_next_batch():
  lengths = {"inputs": 64, "targets": 32}
  batches = input_pipeline.train_batches("svamp_dsbs_teacher", lengths, 4, seed=3)
  third = [next(batches) for _ in range(3)][-1]
  resumed = next(input_pipeline.train_batches("svamp_dsbs_teacher", lengths, 4, seed=3,
                                              skip_batches=2))
  for key, value in third.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_each_host_reads_its_share_of_a_batch():
  shards = [seqio.ShardInfo(index, 2) for index in range(2)]
  rows = [next(input_pipeline.train_batches("svamp_distill", LENGTHS, 8, seed=0, shard_info=shard))
          for shard in shards]
  assert [row["encoder_input_tokens"].shape[0] for row in rows] == [4, 4]
  assert not np.array_equal(rows[0]["encoder_input_tokens"], rows[1]["encoder_input_tokens"])
  with pytest.raises(ValueError, match="BATCH_SIZE=7 does not divide over 2"):
    input_pipeline.train_batches("svamp_distill", LENGTHS, 7, seed=0, shard_info=shards[0])


def test_eval_batches_hold_every_example_once_with_masked_filler_rows():
  test_split = records.read_split(str(resources.RATIONALES_DIR), "svamp", "test")
  batches = list(input_pipeline.eval_batches("svamp_label_gold", "test", LENGTHS, batch_size=64))
  ids = [i for batch in batches for i, valid in zip(batch.ids, batch.valid) if valid]
  assert ids == [r.id for r in test_split]
  last = batches[-1]
  filler = ~last.valid
  assert filler.any() and not last.features["encoder_input_tokens"][filler].any()
  assert not last.features["decoder_loss_weights"][filler].any()
  np.testing.assert_array_equal(last.features["decoder_input_tokens"][:, 1:],
                                last.features["decoder_target_tokens"][:, :-1])
  assert last.inputs[0].startswith("[label] ")
  assert [batch.ids[0] for batch in input_pipeline.eval_batches(
      "svamp_label_gold", "test", LENGTHS, batch_size=4, max_examples=6)] == [
          test_split[0].id, test_split[4].id]


def test_split_sizes_count_every_task_of_a_mixture():
  sizes = input_pipeline.split_sizes("svamp_dsbs_teacher")
  assert set(sizes) == {"svamp_label_teacher", "svamp_rationale"}
  assert sizes["svamp_label_teacher"] == sizes["svamp_rationale"]
  assert sizes["svamp_label_teacher"]["train"] == 720


def test_inputs_longer_than_the_feature_lengths_are_counted_per_task_and_split(tmp_path):
  svamp = records.read_split(str(resources.RATIONALES_DIR), "svamp", "train")[:40]
  long_ids = {f"m{i:02}" for i in range(0, 40, 4)}
  written = [dataclasses.replace(record, id=f"m{i:02}", input=(
      "a very long question " * 1000 if f"m{i:02}" in long_ids else record.input))
             for i, record in enumerate(svamp)]
  rationales.write_records(str(tmp_path / "long.jsonl"), written)
  custom_tasks.register_custom_dataset("truncating", str(tmp_path / "long.jsonl"),
                                       metric="equation")
  expected = {}
  for split, file_name in (("train", "train"), ("validation", "valid"), ("test", "test")):
    layout = rationales.read_records(str(tmp_path / "truncating" / f"{file_name}.jsonl"))
    if sum(record.id in long_ids for record in layout):
      expected[split] = sum(record.id in long_ids for record in layout)
  assert sum(expected.values()) == 10
  lengths = {"inputs": 64, "targets": 100_000}  # no target is cut
  assert input_pipeline.truncated_counts("truncating_dsbs_teacher", lengths) == {
      "truncating_label_teacher": {"inputs": expected},
      "truncating_rationale": {"inputs": expected}}


def test_an_unknown_mixture_is_named_with_the_closest():
  with pytest.raises(input_pipeline.TaskDataError, match="'cqa_dsbs': no such task or mixture; "
                                                         "did you mean 'cqa_dsbs_gold'.* `dsbs "
                                                         "tasks` lists them"):
    input_pipeline.mixture_or_task("cqa_dsbs")


def test_the_hint_for_an_unknown_mixture_names_the_gin_flags_when_gin_registers_datasets():
  gin.parse_config("register_custom_datasets.datasets = [{'name': 'hinted', "
                   "'rationales_file': 'records.jsonl'}]")
  with pytest.raises(input_pipeline.TaskDataError,
                     match="`dsbs tasks` with this run's --gin_file and --gin flags lists them"):
    input_pipeline.mixture_or_task("hinted_dsbs")
