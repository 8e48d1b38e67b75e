"""tools/bench_t5x.py: the gin files of both sides describe the same run, and the logs'
steps/s are read the way each trainer prints them (no T5X needed, nothing timed)."""
import argparse
import pathlib
import sys

import gin
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import bench_t5x  # noqa: E402  (tools/ is not a package)

from dsbs_jax import gin_utils  # noqa: E402
from dsbs_jax.models import t5  # noqa: E402

ARGS = argparse.Namespace(config="small", dtype="bfloat16", batch_size=8, input_length=256,
                          target_length=64, dropout=0.1, steps=40, log_period=10)


def test_the_dsbs_side_trains_the_configured_run(tmp_path):
  gin_file = tmp_path / "run.gin"
  gin_file.write_text(bench_t5x.dsbs_gin(ARGS, str(tmp_path / "model")))
  gin_utils.parse_gin([str(gin_file)], [])
  config = t5.T5Config()
  assert (config.emb_dim, config.num_encoder_layers, config.dtype) == (512, 8, "bfloat16")
  assert gin.query_parameter("%BATCH_SIZE") == 8
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 256, "targets": 64}
  assert gin.query_parameter("%OPTIMIZER") == "adafactor"
  assert gin.query_parameter("%DROPOUT_RATE") == 0.1


def test_the_t5x_side_names_the_same_run():
  text = bench_t5x.t5x_gin(ARGS, "/tmp/model")
  for line in ("include 't5x/examples/t5/t5_1_1/small.gin'",
               "MIXTURE_OR_TASK_NAME = 'cqa_dsbs_teacher'",
               "TASK_FEATURE_LENGTHS = {'inputs': 256, 'targets': 64}", "BATCH_SIZE = 8",
               "DROPOUT_RATE = 0.1", "network.T5Config.dtype = 'bfloat16'",
               "train_script.train.stats_period = 10"):
    assert line in text.splitlines()


def test_steps_per_second_are_read_from_both_logs_without_the_first_window():
  t5x_log = "\n".join(
      f"I1130 logging_writer.py:48] [{step}] collection=train accuracy=0.1, "
      f"timing/steps_per_second={rate}, z_loss=4.8" for step, rate in
      ((10, 0.1), (20, 0.25), (30, 0.24), (40, 0.26)))
  windows = [(int(s), float(r)) for s, r in bench_t5x.T5X_STEPS_PER_SECOND.findall(t5x_log)]
  assert bench_t5x.steady_rate(windows) == pytest.approx(0.25)
  dsbs_log = ("first step done 31.2s after building the trainer (state 4.0s, ...)\n" + "\n".join(
      f"step {step}/40 | loss 7.6 | label 7.5 | lr 1.00e-03 | {rate} steps/s | 10.3 ex/s"
      for step, rate in ((10, 0.2), (20, 0.41), (30, 0.40), (40, 0.42))))
  windows = [(int(s), float(r)) for s, r in bench_t5x.DSBS_STEPS_PER_SECOND.findall(dsbs_log)]
  assert bench_t5x.steady_rate(windows) == pytest.approx(0.41)
  assert bench_t5x.DSBS_STARTUP_SECONDS.findall(dsbs_log) == ["31.2"]
  with pytest.raises(RuntimeError, match="too few logging windows"):
    bench_t5x.steady_rate(windows[:1])
