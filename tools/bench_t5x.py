"""Times `dsbs train` against real T5X training the same student on the same mixture, on
this machine, in one run: the T5X baseline of the project's CPU target.

T5X is not on the package index: install it beside this project (its repository, with
airio and jestimator, `pip install --no-deps`, then grain==0.2.18, fiddle, chex, jaxtyping,
cached_property and clu) into a virtual environment that also holds this project's
dependencies, and name that environment's python and the T5X checkout:

    python tools/bench_t5x.py --t5x_python ../t5x-venv/bin/python --t5x_dir ../t5x \\
        --config small --dtype bfloat16 --batch_size 8 --steps 40 --rounds 2

Both sides train T5 v1.1 (`--config`) from scratch with Adafactor on `cqa_dsbs_teacher`
through this project's tasks, packed by SeqIO's encoder-decoder feature converter (rows of
--input_length / --target_length tokens; T5X's default converter, which ours extends with
the task ids only), dropout as --dropout, no evaluation, no checkpoints until the
end. T5X runs `t5x.train` with its own `examples/t5/t5_1_1/<config>.gin` and
`configs/runs/pretrain.gin`, unpatched, in a subprocess under the same glibc allocator
settings that `dsbs` gives itself. Each side logs steps/s over windows of --log_period
steps; the first window is dropped and the median of the others counts. Sides alternate
for --rounds rounds. A table and one JSON line per run (and the summary) are printed.

This tool only writes gin files and runs both trainers; it holds no training code and no
T5X code.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dsbs_jax import host_allocator  # noqa: E402

MIXTURE = "cqa_dsbs_teacher"
T5X_STEPS_PER_SECOND = re.compile(r"\[(\d+)\] collection=train .*?timing/steps_per_second=([\d.e+-]+)")
T5X_COMPILE_SECONDS = re.compile(r"timing/compilation_seconds=([\d.e+-]+)")
DSBS_STEPS_PER_SECOND = re.compile(r"^step (\d+)/\d+ \|.*?\| ([\d.]+) steps/s", re.MULTILINE)
DSBS_STARTUP_SECONDS = re.compile(r"first step done ([\d.]+)s after building the trainer")


def t5x_gin(args, model_dir: str) -> str:
  """A T5X run file: T5X's own model and pretraining files, this project's mixture."""
  return f"""from __gin__ import dynamic_registration
include 't5x/examples/t5/t5_1_1/{args.config}.gin'
include 't5x/configs/runs/pretrain.gin'
import __main__ as train_script
import tasks
from dsbs_jax import seqio_tasks
from t5x import models
from t5x import utils
from t5x.examples.t5 import network

MIXTURE_OR_TASK_NAME = '{MIXTURE}'
TASK_FEATURE_LENGTHS = {{'inputs': {args.input_length}, 'targets': {args.target_length}}}
TRAIN_STEPS = {args.steps}
BATCH_SIZE = {args.batch_size}
DROPOUT_RATE = {args.dropout}
MODEL_DIR = '{model_dir}'
USE_CACHED_TASKS = False
RANDOM_SEED = 0
VOCABULARY = @seqio_tasks.OptionsVocabulary()
network.T5Config.dtype = '{args.dtype}'
train_script.train.eval_period = {args.steps}
train_script.train.stats_period = {args.log_period}
train_script.train.train_eval_dataset_cfg = None
utils.SaveCheckpointConfig.period = {args.steps}
"""


def dsbs_gin(args, model_dir: str) -> str:
  """The same run for `dsbs train`."""
  return f"""include 'models/t5_1_1_{args.config}.gin'
include 'runs/train.gin'
MIXTURE_OR_TASK_NAME = '{MIXTURE}'
TASK_FEATURE_LENGTHS = {{'inputs': {args.input_length}, 'targets': {args.target_length}}}
TRAIN_STEPS = {args.steps}
BATCH_SIZE = {args.batch_size}
DROPOUT_RATE = {args.dropout}
MODEL_DIR = '{model_dir}'
OPTIMIZER = 'adafactor'
EVAL_PERIOD = {args.steps}
CHECKPOINT_PERIOD = {args.steps}
T5Config.dtype = '{args.dtype}'
train.log_period = {args.log_period}
train.eval_max_examples = 8
train.final_eval_max_examples = 8
"""


def steady_rate(windows: list[tuple[int, float]]) -> float:
  """The median steps/s of the logged windows after the first (which holds warm-up)."""
  rates = [rate for _, rate in sorted(windows)[1:]]
  if not rates:
    raise RuntimeError(f"too few logging windows to measure: {windows}; raise --steps")
  return statistics.median(rates)


def run_side(side: str, args, workdir: str, index: int) -> dict:
  model_dir = os.path.join(workdir, f"{side}_{index}")
  gin_path = os.path.join(workdir, f"{side}_{index}.gin")
  environment = dict(os.environ, GLIBC_TUNABLES=host_allocator.TUNABLES,
                     PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  if side == "t5x":
    text = t5x_gin(args, model_dir)
    command = [args.t5x_python, "-m", "t5x.train", f"--gin_search_paths={args.t5x_dir}",
               f"--gin_file={gin_path}"]
  else:
    text = dsbs_gin(args, model_dir)
    command = [sys.executable, "-m", "dsbs_jax.cli", "train", f"--gin_file={gin_path}"]
  with open(gin_path, "w", encoding="utf-8") as f:
    f.write(text)
  start = time.time()
  result = subprocess.run(command, env=environment, cwd=workdir, capture_output=True, text=True)
  log = result.stdout + result.stderr
  with open(os.path.join(workdir, f"{side}_{index}.log"), "w", encoding="utf-8") as f:
    f.write(log)
  if result.returncode:
    raise RuntimeError(f"{side} exited with {result.returncode}; log: {f.name}\n{log[-2000:]}")
  if side == "t5x":
    windows = [(int(s), float(r)) for s, r in T5X_STEPS_PER_SECOND.findall(log)]
    startup = [float(x) for x in T5X_COMPILE_SECONDS.findall(log)]
  else:
    windows = [(int(s), float(r)) for s, r in DSBS_STEPS_PER_SECOND.findall(log)]
    startup = [float(x) for x in DSBS_STARTUP_SECONDS.findall(log)]
  return {"side": side, "round": index, "steps_per_sec": steady_rate(windows),
          "windows": windows, "startup_or_compile_sec": startup[0] if startup else None,
          "wall_sec": time.time() - start, "load_average_1m": os.getloadavg()[0]}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--t5x_python", required=True,
                      help="python of a virtual environment with T5X installed")
  parser.add_argument("--t5x_dir", required=True,
                      help="T5X checkout (holds t5x/examples and t5x/configs for gin)")
  parser.add_argument("--config", default="small", choices=("small", "base", "large"))
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--batch_size", type=int, default=8, help="packed rows per step")
  parser.add_argument("--input_length", type=int, default=256)
  parser.add_argument("--target_length", type=int, default=64)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--log_period", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=None, help="JSON lines file to append to")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  runs = []
  with tempfile.TemporaryDirectory() as workdir:
    for index in range(args.rounds):
      for side in ("t5x", "dsbs_jax"):
        runs.append(run_side(side, args, workdir, index))
        print(json.dumps(runs[-1]), flush=True)
  rate = {side: statistics.median(r["steps_per_sec"] for r in runs if r["side"] == side)
          for side in ("t5x", "dsbs_jax")}
  summary = {"measurement": "train_vs_t5x", "config": args.config, "dtype": args.dtype,
             "batch_size": args.batch_size, "input_length": args.input_length,
             "target_length": args.target_length, "dropout": args.dropout,
             "steps_per_sec": rate, "ratio": rate["dsbs_jax"] / rate["t5x"], "runs": runs}
  print(f"T5 v1.1 {args.config} {args.dtype}, {args.batch_size} packed rows of "
        f"{args.input_length}/{args.target_length}, Adafactor, dropout {args.dropout}: "
        f"steps/s T5X {rate['t5x']:.3f}, dsbs_jax {rate['dsbs_jax']:.3f} "
        f"({summary['ratio']:.2f}x; medians of {args.rounds} alternating runs)")
  print(json.dumps(summary))
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(summary) + "\n")
  return summary


if __name__ == "__main__":
  main()
