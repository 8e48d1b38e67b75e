"""Tests for dsbs_jax.periodic_actions: when an action is due, the time left, the progress
report's refusal of non-finite metrics, the best step kept on validation, and the stop
requests of one host and of several."""
import signal

import jax
from jax.experimental import multihost_utils
import numpy as np
import pytest

from dsbs_jax import periodic_actions
from dsbs_jax import run_dir
from dsbs_jax import trainer as trainer_lib


class RecordingCheckpointer:
  """The parts of TrainCheckpointer the best step uses, recorded."""

  def __init__(self):
    self.calls = []

  def wait(self):
    self.calls.append("wait")

  def keep_step(self, step):
    self.calls.append(("keep", step))


def test_an_action_is_due_every_period_and_at_the_last_step():
  action = periodic_actions.PeriodicAction(period=4, last_step=10)
  assert [step for step in range(1, 11) if action.due(step)] == [4, 8, 10]


def test_time_left_counts_validations_and_the_final_evaluation(monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(periodic_actions.time, "time", lambda: now[0])
  remaining = periodic_actions.RemainingTime(start_step=0, train_steps=100, eval_period=30,
                                             validation_examples=10, final_examples=40)
  assert [remaining.validations_after(step) for step in (0, 30, 95, 100)] == [4, 3, 1, 0]
  now[0] += 20.0  # 10 steps at 0.5 steps/s: 90 steps, 180 s, to go
  assert remaining(10) == "3m00s+eval"  # decoding not yet timed
  remaining.add_evaluation(seconds=5.0, examples=10)  # 0.5 s per decoded example
  now[0] += 5.0
  # 180 s of training, 4 validations of 10 examples and 40 final examples at 0.5 s each.
  assert remaining(10) == "3m40s"
  assert remaining(100) == "0m20s"  # the final evaluation, not 0m00s


def test_the_progress_report_sums_a_window_and_refuses_non_finite_metrics(tmp_path):
  log = run_dir.RunDir(tmp_path).metrics_log(0)
  lines = []
  report = periodic_actions.ProgressReport(
      2, 4, log, periodic_actions.RemainingTime(0, 4, 4, 1, 1), step_flops=1.0,
      peak_flops=1.0, print_fn=lines.append)
  batch = {"encoder_input_tokens": np.array([[5, 6, 0]])}
  step_metrics = lambda loss_sum: {
      "loss_sum": np.float32(loss_sum), "z_loss_sum": np.float32(0), "loss_normalizer": np.float32(1),
      "examples": np.float32(1), "tokens": np.float32(2), "correct_tokens": np.float32(1),
      "grad_norm": np.float32(0.5)}
  report.add(batch, step_metrics(2.0))
  report.add(batch, step_metrics(4.0))
  report(2)
  [row] = run_dir.RunDir(tmp_path).metrics()
  assert (row["step"], row["kind"], row["loss"], row["examples"]) == (2, "train", 3.0, 2.0)
  assert row["grad_norm"] == 0.5 and lines[0].startswith("step 2/4 | loss 3.0000")
  report.restart()
  report.add(batch, step_metrics(np.nan))
  with pytest.raises(trainer_lib.NonFiniteLossError, match="at step 3: loss_sum=nan"):
    report(3)
  log.close()


def test_the_best_step_is_kept_only_when_beaten_and_forgotten_past_a_restore(tmp_path):
  run = run_dir.RunDir(tmp_path)
  checkpointer = RecordingCheckpointer()
  best = periodic_actions.BestStep(run)
  best.offer(2, 0.3, checkpointer)
  best.offer(4, 0.3, checkpointer)  # a tie goes to the later step
  best.offer(6, 0.5, checkpointer)
  best.offer(8, 0.4, checkpointer)  # worse: kept out
  assert run.best() == {"step": 6, "validation_accuracy": 0.5}
  # best_step.json is written only once the checkpoint it names is on disk.
  assert checkpointer.calls == ["wait", ("keep", 2), "wait", ("keep", 4), "wait", ("keep", 6)]
  resumed = periodic_actions.BestStep(run)  # a restarted run keeps the best it had
  assert (resumed.step, resumed.accuracy) == (6, 0.5)
  resumed.forget_if_after(6, checkpointer)
  assert run.best_step() == 6
  resumed.forget_if_after(4, checkpointer)
  assert resumed.step is None and run.best() is None and checkpointer.calls[-1] == ("keep", None)


def test_one_host_stops_after_the_step_a_signal_came_in():
  before = signal.getsignal(signal.SIGTERM)
  with periodic_actions.StopRequests() as stop:
    assert stop.requested() is None
    signal.raise_signal(signal.SIGTERM)
    assert stop.requested() == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before


def test_several_hosts_leave_sigterm_to_jax_and_stop_at_its_sync_point(monkeypatch):
  checks, notices = [], []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda count: checks.append(count) or count == 3)
  jax_handler = lambda signum, frame: notices.append(signum)  # stands in for JAX's C handler
  previous = signal.signal(signal.SIGTERM, jax_handler)
  try:
    with periodic_actions.StopRequests() as stop:
      assert signal.getsignal(signal.SIGTERM) is jax_handler  # a Python one would hide notices
      signal.raise_signal(signal.SIGINT)  # Ctrl-C on this host: a notice to all of them
      assert notices == [signal.SIGTERM]
      assert stop.requested() is None and stop.requested() is None
      assert "preemption notice" in stop.requested()
  finally:
    signal.signal(signal.SIGTERM, previous)
  # Counted in calls, the same on every host whatever step a restored run starts at.
  assert checks == [1, 2, 3]
