"""Two processes on localhost with jax.distributed (CPU collectives) train like one process,
and a preemption notice to one of them stops both at one step."""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import xla_flags

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_worker(args, device_count, **kwargs):
  env = dict(os.environ, XLA_FLAGS=xla_flags(device_count))
  return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)


def result_of(output):
  lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
  assert lines, output[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_two_processes_match_one_process():
  address = f"127.0.0.1:{free_port()}"
  workers = [run_worker([address, "2", str(i)], device_count=1) for i in range(2)]
  outputs = [worker.communicate(timeout=300)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  distributed = result_of(outputs[0])
  assert (distributed["processes"], distributed["devices"]) == (2, 2)
  reference_worker = run_worker(["reference", "2"], device_count=2)
  reference = result_of(reference_worker.communicate(timeout=300)[0])
  assert (reference["processes"], reference["devices"]) == (1, 2)
  np.testing.assert_allclose(distributed["losses"], reference["losses"], rtol=1e-5)
  np.testing.assert_allclose(distributed["checksum"], reference["checksum"], rtol=1e-5)


def tiny_run_flags(model_dir, train_steps, period):
  """A quickstart run of the tiny model, batched per input as runs/paper.gin does (so that
  several hosts split each batch of inputs); checkpoints and validation every `period`
  steps, the loss of every step logged."""
  return ["--gin_file=quickstart.gin", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={train_steps}", "--gin.BATCH_SIZE=8",
          f"--gin.CHECKPOINT_PERIOD={period}", f"--gin.EVAL_PERIOD={period}",
          "--gin.train.eval_max_examples=8", "--gin.train.final_eval_max_examples=8",
          "--gin.train.eval_batch_size=8", "--gin.T5Config.emb_dim=32",
          "--gin.T5Config.mlp_dim=64", "--gin.T5Config.head_dim=8",
          "--gin.train.batching='per_input'", "--gin.train.log_period=1"]


def start_dsbs_train(flags, outputs=(subprocess.PIPE, subprocess.PIPE)):
  """`dsbs train` as processes 0 and 1 of one run, each writing its output to `outputs[i]`."""
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  return [subprocess.Popen(
      [sys.executable, "-m", "dsbs_jax.cli", "train", f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}", *flags], env=env, stdout=output,
      stderr=subprocess.STDOUT, text=True) for i, output in enumerate(outputs)]


def finish(processes, timeout=600):
  outputs = [process.communicate(timeout=timeout)[0] for process in processes]
  return [process.returncode for process in processes], outputs


def train_losses(model_dir):
  with open(model_dir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  return [(row["step"], row["loss"]) for row in rows if row["kind"] == "train"]


@pytest.mark.slow
def test_dsbs_train_runs_as_two_processes(tmp_path):
  """The whole loop (input shards, checkpoints, evaluation, outputs) under jax.distributed."""
  model_dir = tmp_path / "two_hosts"
  codes, outputs = finish(start_dsbs_train(tiny_run_flags(model_dir, train_steps=4, period=2)))
  assert codes == [0, 0], [output[-3000:] for output in outputs]
  assert "on 2 device(s), mesh {'data': 2, 'model': 1}" in outputs[0]
  assert sorted(os.listdir(model_dir / "checkpoints")) == ["2", "4"]
  results = json.loads((model_dir / "results.json").read_text())
  assert "accuracy" in results["test"]
  assert len((model_dir / "predictions.jsonl").read_text().splitlines()) == 8
  # Each step: the 8 inputs of a batch, with both of their tasks, split over the hosts.
  with open(model_dir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert {(row["label_examples"], row["rationale_examples"]) for row in rows
          if row["kind"] == "train"} == {(8, 8)}


@pytest.mark.slow
def test_sigterm_to_one_host_stops_every_host_at_one_step(tmp_path):
  """A preemption notice (SIGTERM) to process 1 alone: both save the step they agree on and
  stop; resumed, the run trains on bit for bit as one never interrupted."""
  model_dir, reference_dir = tmp_path / "preempted", tmp_path / "reference"
  def flags(model_dir, train_steps):
    return tiny_run_flags(model_dir, train_steps, period=1000)
  with open(tmp_path / "process_0.log", "w") as log:  # a file: no pipe left unread fills
    processes = start_dsbs_train(flags(model_dir, 1000), outputs=(log, subprocess.PIPE))
  seen = []
  for line in processes[1].stdout:  # the step loop runs once a progress line is out
    seen.append(line)
    if line.startswith("step 1/1000"):
      break
  processes[1].send_signal(signal.SIGTERM)
  codes, rest = finish(processes)
  outputs = [(tmp_path / "process_0.log").read_text(), "".join(seen) + rest[1]]
  assert codes == [143, 143], [output[-3000:] for output in outputs]
  stopped_at = [re.findall(r"preemption notice .* at step (\d+): checkpoint saved", output)
                for output in outputs]
  assert stopped_at[0] == stopped_at[1] and len(stopped_at[0]) == 1, stopped_at
  step = int(stopped_at[0][0])
  assert os.listdir(model_dir / "checkpoints") == [str(step)]

  # Resumed, and side by side a run never interrupted, each two steps past the stop (which
  # steps that is depends on how fast the notice spread).
  runs = start_dsbs_train(flags(model_dir, step + 2)) + start_dsbs_train(
      flags(reference_dir, step + 2))
  codes, outputs = finish(runs)
  assert codes == [0, 0, 0, 0], [output[-3000:] for output in outputs]
  expected = train_losses(reference_dir)
  assert [logged for logged, _ in expected] == list(range(1, step + 3))
  assert train_losses(model_dir) == expected
