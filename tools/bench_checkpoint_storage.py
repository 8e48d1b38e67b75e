"""How long a training checkpoint holds up training on an object store, against a local disk,
in one run: the quickstart's train state (gin/quickstart.gin) saved N times to each, through
the project's own TrainCheckpointer (orbax, asynchronous as `dsbs train` saves).

    # Against the Cloud Storage emulator (fake-gcs-server, as the tests run it) or a bucket:
    STORAGE_EMULATOR_HOST=http://127.0.0.1:4443 python tools/bench_checkpoint_storage.py \\
        --url gs://bench-bucket/ckpt --saves 5 --out bench_checkpoints.jsonl

Per store: `blocking_s`, the time `save()` holds the training loop (what a step waits for);
`commit_s`, from the call to the checkpoint being complete and committed (what the
background write takes, transfer included); the state's size. One JSON line per store,
the URL's with its ratios to the local disk's, and a table on stdout. This tool must not
define checkpoint code of its own.
"""
import argparse
import json
import statistics
import tempfile
import time

import gin
import jax

from dsbs_jax import checkpoints
from dsbs_jax import gin_utils
from dsbs_jax import resources
from dsbs_jax import storage
from dsbs_jax import train
from dsbs_jax.models import t5


def quickstart_state():
  """The train state `dsbs train --gin_file=quickstart.gin` checkpoints."""
  gin_utils.parse_gin([str(resources.GIN_DIR / "quickstart.gin")], [])
  config = t5.T5Config()
  trainer, _ = train.build_trainer(config, train_steps=300)
  return trainer.init_state(jax.random.key(0))


def time_saves(directory: str, state, saves: int) -> dict:
  checkpointer = checkpoints.TrainCheckpointer(directory, keep=2)
  blocking, commit = [], []
  try:
    for step in range(1, saves + 1):
      start = time.perf_counter()
      checkpointer.save(step, state, {"step": step})
      blocking.append(time.perf_counter() - start)
      checkpointer.wait()
      commit.append(time.perf_counter() - start)
  finally:
    checkpointer.close()
  return {"blocking_s": statistics.median(blocking), "commit_s": statistics.median(commit),
          "blocking_s_all": blocking, "commit_s_all": commit}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--url", required=True, help="gs://BUCKET/PATH to save to (emptied first)")
  parser.add_argument("--saves", type=int, default=5, help="saves per store; medians reported")
  parser.add_argument("--out", default=None, help="JSON lines file to append to")
  args = parser.parse_args(argv)
  storage.check(write=[args.url])
  state = quickstart_state()
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  with tempfile.TemporaryDirectory() as local:
    results = {"local": time_saves(local, state, args.saves),
               args.url: time_saves(args.url, state, args.saves)}
  baseline = results["local"]
  rows = []
  for store, timing in results.items():
    row = {"measurement": "checkpoint_save", "store": store, "state_bytes": state_bytes,
           "saves": args.saves, **timing, "device": str(jax.devices()[0].device_kind)}
    if store != "local":
      row["blocking_ratio_to_local"] = timing["blocking_s"] / baseline["blocking_s"]
      row["commit_ratio_to_local"] = timing["commit_s"] / baseline["commit_s"]
    rows.append(row)
  print(f"train state of gin/quickstart.gin: {state_bytes / 2**20:.1f} MiB; medians of "
        f"{args.saves} saves")
  print(f"{'store':<40} {'blocking s':>11} {'commit s':>9} {'blocking x':>11} {'commit x':>9}")
  for row in rows:
    ratios = (f"{row['blocking_ratio_to_local']:>11.2f} {row['commit_ratio_to_local']:>9.2f}"
              if "blocking_ratio_to_local" in row else f"{'1.00':>11} {'1.00':>9}")
    print(f"{row['store']:<40} {row['blocking_s']:>11.3f} {row['commit_s']:>9.3f} {ratios}")
  if args.out:
    with storage.Appender(args.out) as out:
      for row in rows:
        out.write(json.dumps(row) + "\n")
  gin.clear_config()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
