"""Two processes on localhost with jax.distributed (CPU collectives) train like one process."""
import json
import os
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


@pytest.mark.slow
def test_dsbs_train_runs_as_two_processes(tmp_path):
  """The whole loop (input shards, checkpoints, evaluation, outputs) under jax.distributed."""
  address = f"127.0.0.1:{free_port()}"
  model_dir = tmp_path / "two_hosts"
  flags = ["--gin_file=quickstart.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=4",
           "--gin.BATCH_SIZE=8", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_PERIOD=2",
           "--gin.train.eval_max_examples=8", "--gin.train.final_eval_max_examples=8",
           "--gin.train.eval_batch_size=8", "--gin.T5Config.emb_dim=32",
           "--gin.T5Config.mlp_dim=64", "--gin.T5Config.head_dim=8"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  processes = [subprocess.Popen(
      [sys.executable, "-m", "dsbs_jax.cli", "train", f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}", *flags], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [process.communicate(timeout=600)[0] for process in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  assert "on 2 device(s), mesh {'data': 2, 'model': 1}" in outputs[0]
  assert sorted(os.listdir(model_dir / "checkpoints")) == ["2", "4"]
  results = json.loads((model_dir / "results.json").read_text())
  assert "accuracy" in results["test"]
  assert len((model_dir / "predictions.jsonl").read_text().splitlines()) == 8
