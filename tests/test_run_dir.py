"""Tests for dsbs_jax.run_dir: MODEL_DIR's files written and read back, identical files left
untouched, a folder that does not fit a run refused naming every difference, malformed
files named, what a resumed run logs again dropped, and runs read without TensorFlow."""
import dataclasses
import glob
import json
import os
import pathlib

import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from conftest import modules_loaded_by
from dsbs_jax import folder_lock
from dsbs_jax import gin_utils
from dsbs_jax import resources
from dsbs_jax import run_dir

SPEC = run_dir.RunSpec("cqa_dsbs_teacher", 64, 32, "[label] ", "[rationale] ")
VOCABULARY = str(resources.VOCABULARY_FILE)


def tensorboard_steps(model_dir):
  """{tag: sorted steps, repeats included} over every event file of the run (the files' names
  order them only within a second: TF numbers its writers 9, 10, ... in text)."""
  steps = {}
  for path in sorted(glob.glob(os.path.join(model_dir, "tensorboard", "*tfevents*"))):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        steps.setdefault(value.tag, []).append(event.step)
  return {tag: sorted(tag_steps) for tag, tag_steps in steps.items()}


@pytest.fixture
def written(tmp_path, tiny_config):
  run = run_dir.RunDir(tmp_path / "run")
  run.write_run_files(tiny_config, SPEC, VOCABULARY)
  return run


def test_run_files_read_back_and_identical_ones_are_left_untouched(written, tiny_config):
  assert written.spec() == SPEC
  assert written.config() == tiny_config
  assert written.vocabulary_file().read_bytes() == pathlib.Path(VOCABULARY).read_bytes()
  assert written.tokenization(SPEC) == {
      "vocabulary_path": str(written.vocabulary_path), "vocabulary_extra_ids": 0,
      "label_prefix": "[label] ", "rationale_prefix": "[rationale] "}
  times = {path: os.stat(path).st_mtime_ns for path in written.path.iterdir()}
  written.write_run_files(tiny_config, SPEC, VOCABULARY)
  assert {path: os.stat(path).st_mtime_ns for path in written.path.iterdir()} == times


def test_a_folder_that_fits_the_run_is_taken_whatever_the_run_time_fields(written, tiny_config):
  changed = dataclasses.replace(tiny_config, dropout_rate=0.3, dtype="bfloat16", scan_layers=True,
                                remat_policy="full")
  written.check_fits(changed, SPEC, VOCABULARY)
  assert set(run_dir.RUN_TIME_CONFIG_FIELDS) >= {"dropout_rate", "dtype", "scan_layers"}


def test_a_folder_of_another_run_is_refused_naming_every_difference(written, tiny_config, tmp_path):
  (written.checkpoints_dir / "6").mkdir(parents=True)  # it trained: its settings bind
  other_vocabulary = tmp_path / "other.model"
  other_vocabulary.write_bytes(b"not the same")
  before = {path.name: path.read_bytes() for path in written.path.iterdir() if path.is_file()}
  with pytest.raises(run_dir.ModelDirMismatchError) as refused:
    written.check_fits(dataclasses.replace(tiny_config, emb_dim=64),
                       dataclasses.replace(SPEC, input_length=128, label_prefix="predict: "),
                       str(other_vocabulary))
  message = str(refused.value)
  for fragment in ("T5Config.emb_dim is 32 in config.json, 64 now",
                   "TASK_FEATURE_LENGTHS['inputs'] is 64 in run.json, 128 now",
                   "TaskOptions.label_prefix is '[label] ' in run.json, 'predict: ' now",
                   f"VOCABULARY {other_vocabulary} is not the vocabulary.model there",
                   "nothing in it was changed"):
    assert fragment in message, fragment
  assert {path.name: path.read_bytes() for path in written.path.iterdir()
          if path.is_file()} == before
  with pytest.raises(run_dir.ModelDirMismatchError, match="BATCH_SIZE is 8 in checkpoints/6, 4 now"):
    written.check_input_state({"batch_size": 8}, {"batch_size": 4}, 6)
  # A per-input run's checkpoints (train.batching) refuse the mixture's batches, whose
  # input state, as every run's before per-input batching, has no "batching".
  with pytest.raises(run_dir.ModelDirMismatchError,
                     match="train.batching is 'per_input' in checkpoints/6, None now"):
    written.check_input_state({"batch_size": 8, "batching": "per_input"}, {"batch_size": 8}, 6)


def test_run_files_without_a_checkpoint_bind_no_run(written, tiny_config):
  # A run stopped before its first save: the next run, with other settings, takes the folder.
  (written.checkpoints_dir / "6.orbax-checkpoint-tmp-1").mkdir(parents=True)  # unfinished
  other = dataclasses.replace(tiny_config, emb_dim=64)
  written.check_fits(other, dataclasses.replace(SPEC, label_prefix="predict: "), VOCABULARY)
  written.write_run_files(other, dataclasses.replace(SPEC, label_prefix="predict: "), VOCABULARY)
  assert written.config().emb_dim == 64 and written.spec().label_prefix == "predict: "


def test_a_folder_that_cannot_be_written_is_refused(tmp_path):
  # A lock file that is a folder is named.
  lock = folder_lock.lock_path(tmp_path / "run")
  lock.mkdir(parents=True)
  with pytest.raises(gin_utils.GinConfigError,
                     match=f"cannot write there \\(Is a directory: {lock}\\)"):
    with run_dir.RunDir(tmp_path / "run").writing():
      pass
  (tmp_path / "a_file").write_text("mine")
  with pytest.raises(gin_utils.GinConfigError, match="cannot write there"):
    with run_dir.RunDir(tmp_path / "a_file" / "run").writing():
      pass


def test_a_folder_in_use_is_refused_and_one_made_for_nothing_removed(tmp_path):
  run = run_dir.RunDir(tmp_path / "new" / "run")
  with run.writing():
    assert run.path.is_dir() and "dsbs train" in run.in_use_by()
    with pytest.raises(folder_lock.FolderInUseError, match=r"MODEL_DIR .*run is in use by "
                       r"`dsbs train` \(pid \d+ on "):
      with run_dir.RunDir(run.path).writing():
        pass
  assert not (tmp_path / "new").exists() and run.in_use_by() is None
  with run.writing():
    run.metrics_path.write_text("")
  assert [p.name for p in run.path.iterdir()] == [run_dir.METRICS_FILE]


def test_best_step_and_results_round_trip_and_malformed_ones_are_named(tmp_path):
  run = run_dir.RunDir(tmp_path)
  assert run.best() is None and run.best_step() is None and run.results() is None
  run.write_best({"step": 4, "validation_accuracy": 0.5})
  assert run.best_step() == 4
  run.forget_best()
  assert run.best() is None
  run.best_path.write_text('{"accuracy": 1}')
  with pytest.raises(run_dir.ModelDirError, match="best_step.json: expected"):
    run.best()
  run.write_results({"best_step": 4, "test": {"accuracy": 0.25}})
  assert run.results()["test"] == {"accuracy": 0.25}
  run.results_path.write_text("[1, 2]")
  with pytest.raises(run_dir.ModelDirError, match="results.json: expected a JSON object"):
    run.results()
  run.spec_path.write_text('{"mixture": "cqa"}')
  with pytest.raises(run_dir.ModelDirError, match="run.json: not a run spec"):
    run.spec()


def test_missing_run_files_are_named(tmp_path):
  run = run_dir.RunDir(tmp_path)
  with pytest.raises(FileNotFoundError, match="run.json: not found"):
    run.spec()
  with pytest.raises(FileNotFoundError, match="vocabulary.model: vocabulary missing"):
    run.vocabulary_file()


def test_predictions_paths_and_runs_found_under_a_folder(tmp_path):
  run = run_dir.RunDir(tmp_path / "a")
  assert run.predictions_path("test").name == "predictions.jsonl"
  assert run.predictions_path("validation").name == "predictions_validation.jsonl"
  assert run.predictions_path("test", step=6).name == "predictions_test_step6.jsonl"
  for name, marker in (("a", run_dir.METRICS_FILE), ("b/c", run_dir.RESULTS_FILE),
                       ("d", run_dir.SPEC_FILE)):
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / marker).write_text("{}")
  assert [found.path for found in run_dir.find_runs(tmp_path)] == [tmp_path / "a", tmp_path / "b/c"]


def test_metrics_rows_and_a_malformed_line_named(tmp_path):
  run = run_dir.RunDir(tmp_path)
  run.metrics_path.write_text('{"step": 1, "kind": "train"}\n\n[1]\n')
  with pytest.raises(run_dir.ModelDirError, match=r"metrics.jsonl:3: expected a JSON object"):
    run.metrics()
  run.metrics_path.write_text('{"step": 1, "kind": "train"}\n')
  assert run.metrics() == [{"step": 1, "kind": "train"}]


def test_a_resumed_run_drops_what_it_logs_again_and_final_rows_only_once_replaced(tmp_path):
  run = run_dir.RunDir(tmp_path)
  rows = [{"step": s, "kind": "train"} for s in (1, 2, 3, 4)] + [
      {"step": 2, "kind": "validation"}, {"step": 4, "kind": "validation"},
      {"step": 2, "kind": "final_test"}]
  run.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows)
                              + '{"step": 5, "ki')  # torn by a kill
  writer = tf.summary.create_file_writer(str(run.tensorboard_dir))
  with writer.as_default():
    for step in (1, 2, 3):
      tf.summary.scalar("train/loss", float(step), step=step)
    tf.summary.scalar("final_test/accuracy", 0.5, step=2)
  writer.close()
  log = run.metrics_log(2)
  steps = lambda: [(r["step"], r["kind"]) for r in run.metrics()]
  assert steps() == [(1, "train"), (2, "train"), (2, "validation"), (2, "final_test")]
  assert tensorboard_steps(str(tmp_path)) == {"train/loss": [1, 2], "final_test/accuracy": [2]}
  log.write(3, "train", {"loss": 3.0})
  log.write_final(3, {"final_validation": {"accuracy": 0.5}, "final_test": {"accuracy": 0.25}})
  log.write(3, "after", {"x": 1.0})
  log.close()
  assert steps() == [(1, "train"), (2, "train"), (2, "validation"), (3, "train"),
                     (3, "final_validation"), (3, "final_test"), (3, "after")]
  assert run.metrics()[-2]["accuracy"] == 0.25
  assert tensorboard_steps(str(tmp_path)) == {
      "train/loss": [1, 2, 3], "final_validation/accuracy": [3], "final_test/accuracy": [3],
      "after/x": [3]}


def test_a_metrics_log_opened_at_a_step_continues_after_it(tmp_path):
  run = run_dir.RunDir(tmp_path)
  log = run.metrics_log(0)
  for step in (1, 2, 3):
    log.write(step, "train", {"loss": float(step)})
  log.close()
  log = run.metrics_log(2)
  log.write(3, "train", {"loss": 0.5})
  log.close()
  assert [(row["step"], row["loss"]) for row in run.metrics()] == [(1, 1.0), (2, 2.0), (3, 0.5)]
  assert tensorboard_steps(str(tmp_path)) == {"train/loss": [1, 2, 3]}
  with open(run.metrics_path, "a") as f:
    f.write("garbled\n{}\n")
  with pytest.raises(run_dir.ModelDirError, match="metrics.jsonl:4: not a JSON line"):
    run.metrics_log(3)


def test_runs_are_read_without_tensorflow():
  # `dsbs plot` reads runs; only writing the TensorBoard log needs TensorFlow.
  assert modules_loaded_by("from dsbs_jax import plots, run_dir", ("tensorflow",)) == []
