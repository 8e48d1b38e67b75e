"""Tests of `dsbs train`: end to end (a pulse, resume after SIGKILL, NaN stop, corrupt
checkpoints, metrics logged once per step, a checkpoint saved before validating). The
loop's pieces are tested in test_periodic_actions.py and test_run_dir.py.

Runs use gin/quickstart.gin shrunk to a few steps of a very small model (conftest.py).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from conftest import tiny_run_flags
from test_run_dir import tensorboard_steps
from dsbs_jax import checkpoints
from dsbs_jax import cli
from dsbs_jax import infer
from dsbs_jax import run_dir
from dsbs_jax import train
from dsbs_jax.models import t5


def metrics_rows(model_dir):
  return run_dir.RunDir(model_dir).metrics()


def train_losses(model_dir):
  return {r["step"]: r["loss"] for r in metrics_rows(model_dir) if r["kind"] == "train"}


def logged_steps(model_dir, kind="train"):
  """Every step logged as `kind`, repeats included, in file order."""
  return [r["step"] for r in metrics_rows(model_dir) if r["kind"] == kind]


def final_params(model_dir, step):
  """The parameters of `step` as stored, leaves in the per-layer layout's order."""
  checkpointer = run_dir.RunDir(model_dir).checkpointer()
  try:
    state, _ = checkpointer.restore(step, None)
  finally:
    checkpointer.close()
  return jax.tree.leaves(t5.params_in_layout(state["params"], stacked=False))


@pytest.mark.slow
def test_the_read_check_says_how_many_examples_the_feature_lengths_truncate():
  sizes = {"mine_label_teacher": {"train": 1200, "validation": 4},
           "mine_rationale": {"train": 1200, "validation": 4}}
  assert train.read_check_line("mine_dsbs_teacher", sizes, {}) == (
      "mine_dsbs_teacher: every record read and checked (mine_label_teacher: 1,200 train, "
      "4 validation; mine_rationale: 1,200 train, 4 validation)")
  truncated = {"mine_label_teacher": {"inputs": {"train": 3}},
               "mine_rationale": {"inputs": {"train": 3}, "targets": {"train": 1, "validation": 2}}}
  assert train.read_check_line("mine_dsbs_teacher", sizes, truncated).endswith(
      "4 validation); truncated, longer than TASK_FEATURE_LENGTHS: mine_label_teacher inputs "
      "3 train; mine_rationale inputs 3 train; mine_rationale targets 1 train, 2 validation")


def test_a_tiny_run_trains_evaluates_and_writes_its_outputs(uninterrupted):
  losses = train_losses(uninterrupted)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  rows = metrics_rows(uninterrupted)
  first = next(row for row in rows if row["kind"] == "train")
  for key in ("label_loss", "rationale_loss", "learning_rate", "steps_per_sec", "tokens_per_sec",
              "mfu"):
    assert key in first, key
  # Startup: from building the trainer to the end of the first step, which compiles it.
  [startup] = [row for row in rows if row["kind"] == "startup"]
  assert startup["step"] == 1
  assert startup["seconds"] == pytest.approx(startup["state_seconds"]
                                             + startup["first_step_seconds"])
  assert startup["first_step_seconds"] > 0
  results = json.load(open(os.path.join(uninterrupted, "results.json")))
  assert (results["mixture_or_task_name"], results["train_fraction"]) == ("cqa_dsbs_teacher", 1.0)
  assert set(results["test"]) == {"accuracy"} and "majority_baseline_test" in results
  predictions = [json.loads(line) for line in open(os.path.join(uninterrupted, "predictions.jsonl"))]
  assert len(predictions) == 8 and set(predictions[0]) == {"id", "input", "gold", "prediction"}
  for name in ("config.json", "run.json", "vocabulary.model", "config.gin", "learning_curves.png"):
    assert os.path.exists(os.path.join(uninterrupted, name))
  assert os.listdir(os.path.join(uninterrupted, "tensorboard"))


@pytest.mark.slow
def test_predict_labels_raw_inputs(uninterrupted, tmp_path):
  inputs = tmp_path / "inputs.jsonl"
  inputs.write_text('{"id": "a", "input": "Where do fish live?\\nAnswer Choices:\\n(a) sea"}\n')
  output = tmp_path / "out.jsonl"
  assert cli.main(["predict", "--checkpoint", uninterrupted, "--input", str(inputs),
                   "--output", str(output), "--rationale", "--decode_length", "8"]) == 0
  record = json.loads(output.read_text())
  assert record["id"] == "a" and isinstance(record["prediction"], str) and "rationale" in record


def run_in_subprocess(flags, **popen_kwargs):
  return subprocess.Popen([sys.executable, "-m", "dsbs_jax.cli", *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen_kwargs)


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_the_same_result(uninterrupted, tmp_path):
  model_dir = str(tmp_path / "killed")
  process = run_in_subprocess(tiny_run_flags(model_dir))
  steps_dir = os.path.join(model_dir, run_dir.CHECKPOINTS_DIR)
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if os.path.isdir(os.path.join(steps_dir, "4")):
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert os.path.isdir(os.path.join(steps_dir, "2")), "killed before the first checkpoint"
  assert cli.main(tiny_run_flags(model_dir)) == 0
  assert_resumed_like_uninterrupted(model_dir, uninterrupted)


def assert_resumed_like_uninterrupted(model_dir, uninterrupted):
  """A resumed 6-step run (local or gs://) logged each step once, and the steps logged after
  its restore repeat the uninterrupted run's losses and end with its parameters."""
  assert logged_steps(model_dir) == [1, 2, 3, 4, 5, 6]
  resumed, reference = train_losses(model_dir), train_losses(uninterrupted)
  for step, loss in resumed.items():
    np.testing.assert_allclose(loss, reference[step], rtol=1e-5, err_msg=f"step {step}")
  for got, want in zip(final_params(model_dir, 6), final_params(uninterrupted, 6)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path,
                                                                  capsys):
  model_dir = str(tmp_path / "nan")
  shutil.copytree(uninterrupted, model_dir)
  for step in ("4", "6"):  # as a run stopped after its checkpoint of step 2
    shutil.rmtree(os.path.join(model_dir, run_dir.CHECKPOINTS_DIR, step))
  # Step 3's update, at this rate, leaves weights whose squares overflow in step 4's norms.
  assert cli.main(tiny_run_flags(model_dir, train_steps=4,
                                 extra=["--gin.LEARNING_RATE=1e30"])) == 2
  assert "non-finite training metrics at step 4" in capsys.readouterr().err
  checkpointer = run_dir.RunDir(model_dir).checkpointer()
  assert checkpointer.all_steps() == [2]
  checkpointer.close()
  assert all(np.all(np.isfinite(leaf)) for leaf in final_params(model_dir, 2))


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_named_and_the_previous_restores(uninterrupted, tmp_path, capsys):
  model_dir = str(tmp_path / "corrupt")
  shutil.copytree(uninterrupted, model_dir)
  latest = os.path.join(model_dir, run_dir.CHECKPOINTS_DIR, "6")
  for root, _, files in os.walk(os.path.join(latest, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  assert cli.main(tiny_run_flags(model_dir, train_steps=8)) == 2
  err = capsys.readouterr().err
  assert f"{latest}: checkpoint is corrupt or incomplete" in err
  assert "--gin.train.restore_step=4" in err
  gin.clear_config()
  assert cli.main(tiny_run_flags(model_dir, train_steps=8,
                                 extra=["--gin.train.restore_step=4"])) == 0
  assert max(train_losses(model_dir)) == 8


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_validation_result_it_had(uninterrupted, tmp_path):
  model_dir = str(tmp_path / "resumed")
  shutil.copytree(uninterrupted, model_dir)
  best_file = os.path.join(model_dir, run_dir.BEST_FILE)
  # Step 6 (validated at the end of the first run) as unbeatable: a resumed run that forgot
  # it would take its own first validation, at step 8, as the best.
  unbeatable = {"step": 6, "validation_accuracy": 1.0}
  with open(best_file, "w") as f:
    json.dump(unbeatable, f)
  assert cli.main(tiny_run_flags(model_dir, train_steps=8)) == 0
  gin.clear_config()
  assert json.load(open(best_file)) == unbeatable
  assert json.load(open(os.path.join(model_dir, "results.json")))["best_step"] == 6


@pytest.mark.slow
def test_a_half_written_checkpoint_is_never_restored_and_the_rerun_logs_each_step_once(
    uninterrupted, tmp_path):
  model_dir = str(tmp_path / "half_written")
  shutil.copytree(uninterrupted, model_dir)
  steps_dir = os.path.join(model_dir, run_dir.CHECKPOINTS_DIR)
  # What a kill during orbax's write of step 6 leaves (after step 6 was logged and
  # validated): a temporary folder, not "6".
  os.rename(os.path.join(steps_dir, "6"), os.path.join(steps_dir, "6.orbax-checkpoint-tmp-1"))
  for root, _, files in os.walk(os.path.join(steps_dir, "6.orbax-checkpoint-tmp-1")):
    for name in files[:1]:
      open(os.path.join(root, name), "wb").close()
  assert cli.main(tiny_run_flags(model_dir)) == 0
  np.testing.assert_allclose(train_losses(model_dir)[6], train_losses(uninterrupted)[6], rtol=1e-5)
  for got, want in zip(final_params(model_dir, 6), final_params(uninterrupted, 6)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert logged_steps(model_dir) == [1, 2, 3, 4, 5, 6]
  for kind in ("validation", "final_validation", "final_test"):
    assert logged_steps(model_dir, kind) == [6], kind
  by_tag = tensorboard_steps(model_dir)
  assert by_tag["train/loss"] == [1, 2, 3, 4, 5, 6]
  for tag, steps in by_tag.items():
    assert len(steps) == len(set(steps)), (tag, steps)


@pytest.mark.slow
def test_initial_checkpoint_loads_parameters_with_a_fresh_optimizer(uninterrupted, tmp_path, capsys):
  params, config, _ = run_dir.RunDir(uninterrupted).load_params("latest")
  pretrained = str(tmp_path / "pretrained")
  checkpoints.save_model(pretrained, params, config)
  model_dir = str(tmp_path / "finetuned")
  flags = tiny_run_flags(model_dir, train_steps=2,
                         extra=[f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained}'"])
  assert cli.main(flags) == 0
  assert f"initialized from {pretrained}" in capsys.readouterr().out
  # Further training from the trained weights starts well below a fresh model's loss.
  assert train_losses(model_dir)[1] < train_losses(uninterrupted)[1] - 0.1
  gin.clear_config()
  mismatched = tiny_run_flags(str(tmp_path / "mismatch"), train_steps=2,
                              extra=[f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained}'",
                                     "--gin.T5Config.num_decoder_layers=3"])
  capsys.readouterr()
  assert cli.main(mismatched) == 2
  assert "num_decoder_layers: gin 3 vs checkpoint 2" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  model_dir = str(tmp_path / "terminated")
  process = run_in_subprocess(tiny_run_flags(model_dir, train_steps=200, checkpoint_period=100))
  first_log = os.path.join(model_dir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None and not (
      os.path.exists(first_log) and os.path.getsize(first_log)):
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=240)[0]
  assert process.returncode == 143, output[-2000:]  # as every SIGTERM stop
  for chatter in ("oneDNN", "cuInit", "Path not found", "uncached FunctionDataset", "absl"):
    assert chatter not in output, chatter
  stopped_at = int(output.split("SIGTERM at step ")[1].split(":")[0])
  assert 1 <= stopped_at < 200
  checkpointer = run_dir.RunDir(model_dir).checkpointer()
  assert checkpointer.latest_step() == stopped_at
  checkpointer.close()


@pytest.mark.slow
def test_a_failed_validation_keeps_the_checkpoint_of_its_step(tmp_path, monkeypatch):
  def failing_validation(*args, **kwargs):
    raise RuntimeError("validation failed")
  monkeypatch.setattr(infer, "evaluate_split", failing_validation)
  model_dir = str(tmp_path / "failed_validation")
  with pytest.raises(RuntimeError, match="validation failed"):
    cli.main(tiny_run_flags(model_dir, train_steps=2, checkpoint_period=1000,
                            extra=["--gin.EVAL_PERIOD=2"]))
  checkpointer = run_dir.RunDir(model_dir).checkpointer()
  assert checkpointer.all_steps() == [2]
  checkpointer.close()


@pytest.mark.parametrize("has_chips, flags, expected", [
    (True, {}, [()]),  # a Cloud TPU worker: JAX finds the slice's other workers itself
    (False, {}, []),  # one CPU or GPU host
    (True, {"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 1},
     [("host0:1234", 2, 1)])])
def test_jax_distributed_starts_by_itself_on_tpu_workers(monkeypatch, has_chips, flags, expected):
  calls = []
  monkeypatch.setattr(train.tpu_runtime, "has_tpu_chips", lambda: has_chips)
  monkeypatch.setattr(train.jax.distributed, "initialize", lambda *args: calls.append(args))
  monkeypatch.setattr(train.jax.config, "update", lambda *args: None)
  args = argparse.Namespace(**{"coordinator_address": None, "num_processes": None,
                               "process_id": None, **flags})
  train.initialize_distributed(args)
  assert calls == expected
