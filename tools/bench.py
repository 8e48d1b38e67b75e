"""Benchmarks this project's training step and greedy decoding side by side with the paper's
PyTorch trainer (tools/bench_torch.py): one run, one machine, the same student config, the
same weights at the start and the same CommonsenseQA examples (PaLM's labels and rationales).

    python tools/bench.py --config small --dtype float32 --out bench.jsonl
    python tools/bench.py --quick            # tiny config, 2 steps: a smoke test

How things are counted:
- An original example is one training record whose label-task and rationale-task targets
  a step processes. The mixture (cqa_dsbs_teacher, alpha 0.5) samples the two tasks'
  examples apart and packs them, so a step holds (label segments + rationale segments) / 2
  original examples. The PyTorch side gets the very segments of each packed batch,
  unpacked: its label pass the label segments (`predict: ` inputs), its rationale pass the
  rationale segments (`explain: ` inputs), each padded to the longest in its batch. Both
  sides thus do the same examples, step by step, with the same truncation.
- tokens: non-padding input and target tokens of those segments.
- Model FLOPs: dsbs_jax.flops.train_step_flops of every segment at its own lengths, summed
  (the same on both sides); executed FLOPs: the same count for the shapes as run (packed
  rows; padded batches), padding and attention across packed segments included.
- MFU: model FLOP/s over the fastest float32 4096^2 matmul measured in this run through
  numpy, torch and jax (all three are reported).
- Timed steps follow warmup steps and run on batches read and collated beforehand; the
  input pipeline and the collator are timed apart.

Every measurement is one JSON line (--out) with both sides and their ratios
(dsbs_jax / paper_torch); a table goes to stdout. This tool must not define model, loss,
data-loading or FLOP code of its own: it drives dsbs_jax's modules and bench_torch.
"""
from dsbs_jax import host_allocator

if __name__ == "__main__":  # before the heavy imports below: both sides run tuned
  host_allocator.reexec_with_tuned_allocator()

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from dsbs_jax import convert
from dsbs_jax import data
from dsbs_jax import flops
from dsbs_jax import infer
from dsbs_jax import input_pipeline
from dsbs_jax import partitioning
from dsbs_jax import resources
from dsbs_jax import trainer as trainer_lib
from dsbs_jax.models import t5

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_torch  # noqa: E402  (a sibling file; tools/ is not a package)

MIXTURE = "cqa_dsbs_teacher"
ALPHA = 0.5  # the mixture's default rates; TaskPrefixStep weighs its passes the same
GIN_MODELS = {"tiny": resources.GIN_MODELS_DIR / "t5_1_1_tiny.gin",
              "small": resources.GIN_MODELS_DIR / "t5_1_1_small.gin"}
TINY_VOCAB_SIZE = 8000  # the shipped vocabulary's; T5 v1.1 small keeps its 32128
PROBE_ROWS = 16  # packed rows read to learn how many segments a row holds
SIDES = ("dsbs_jax", "paper_torch")
RATIO_KEYS = ("examples_per_sec", "tokens_per_sec", "step_time_sec", "mfu")
QUICK = {"config": "tiny", "steps": 2, "warmup": 1, "batch_size": 8, "decode_length": 8,
         "peak_size": 512, "peak_repeats": 2}

Segment = bench_torch.Segment


@dataclasses.dataclass
class Batch:
  """One step's packed rows and the same examples unpacked, per task."""
  features: dict[str, np.ndarray]
  label_segments: list[Segment]
  rationale_segments: list[Segment]

  @property
  def segments(self) -> list[Segment]:
    return self.label_segments + self.rationale_segments

  @property
  def examples(self) -> float:
    return len(self.segments) / 2

  @property
  def tokens(self) -> int:
    return sum(len(inputs) + len(targets) for inputs, targets in self.segments)


def model_config(name: str, dtype: str) -> t5.T5Config:
  config = convert.config_from_gin(GIN_MODELS[name])
  changes = {"dtype": dtype}
  if name == "tiny":
    changes["vocab_size"] = TINY_VOCAB_SIZE
  return dataclasses.replace(config, **changes)


def unpack(features: dict[str, np.ndarray]) -> tuple[list[Segment], list[Segment]]:
  """(label segments, rationale segments) of packed rows."""
  by_task = {data.TASK_IDS["label"]: [], data.TASK_IDS["rationale"]: []}
  for row in range(features["decoder_segment_ids"].shape[0]):
    encoder_ids = features["encoder_segment_ids"][row]
    decoder_ids = features["decoder_segment_ids"][row]
    for segment in range(1, int(decoder_ids.max()) + 1):
      in_targets = decoder_ids == segment
      task = int(features["decoder_task_ids"][row][in_targets][0])
      by_task[task].append((features["encoder_input_tokens"][row][encoder_ids == segment],
                            features["decoder_target_tokens"][row][in_targets]))
  return by_task[data.TASK_IDS["label"]], by_task[data.TASK_IDS["rationale"]]


def segment_count(features: dict[str, np.ndarray]) -> int:
  return int(features["decoder_segment_ids"].max(axis=1).sum())


def stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}


def read_batches(lengths: dict, examples_per_step: int, num_steps: int, num_devices: int,
                 seed: int) -> tuple[list[Batch], int, dict]:
  """(batches, packed rows per step, input-pipeline timing) from the training pipeline.

  Rows are read one at a time and stacked: the same rows as a pipeline batching that many.
  The rows per step hold `examples_per_step` on average, rounded up to whole devices.
  """
  rows: Iterator[dict] = input_pipeline.train_batches(MIXTURE, lengths, 1, seed)
  read = [next(rows)]  # the first row pays for reading and tokenizing the records
  start = time.perf_counter()
  read += [next(rows) for _ in range(PROBE_ROWS - 1)]
  segments_per_row = sum(segment_count(row) for row in read) / len(read)
  rows_per_step = num_devices * math.ceil(
      2 * examples_per_step / segments_per_row / num_devices)
  while len(read) < rows_per_step * num_steps:
    read.append(next(rows))
  seconds = time.perf_counter() - start
  del rows  # stops tf.data's prefetching, which would compete with the timed steps
  batches = []
  for step in range(num_steps):
    features = stack(read[step * rows_per_step:(step + 1) * rows_per_step])
    batches.append(Batch(features, *unpack(features)))
  examples_timed = sum(segment_count(row) for row in read[1:]) / 2
  return batches, rows_per_step, {"rows_per_sec": (len(read) - 1) / seconds,
                                  "examples_per_sec": examples_timed / seconds}


def model_flops(config: t5.T5Config, segments: Sequence[Segment]) -> int:
  """Training FLOPs of the examples at their own lengths."""
  return sum(flops.train_step_flops(config, 1, len(inputs), len(targets))
             for inputs, targets in segments)


def rates(batches: Sequence[Batch], seconds: float, model_flops_per_step: float,
          executed_flops_per_step: float, peak: float) -> dict:
  steps = len(batches)
  return {
      "examples_per_sec": sum(b.examples for b in batches) / seconds,
      "tokens_per_sec": sum(b.tokens for b in batches) / seconds,
      "step_time_sec": seconds / steps,
      "model_flops_per_step": model_flops_per_step,
      "executed_flops_per_step": executed_flops_per_step,
      "mfu": model_flops_per_step * steps / seconds / peak,
      "mfu_executed": executed_flops_per_step * steps / seconds / peak,
  }


def train_dsbs_jax(config: t5.T5Config, params, batches: Sequence[Batch], warmup: int,
                   peak: float) -> dict:
  """This project's jitted, sharded train step (AdamW as the paper's) on packed batches."""
  partitioner = partitioning.make_partitioner("data", (-1, 1))
  optimizer, schedule = trainer_lib.make_optimizer("adamw", total_steps=len(batches))
  trainer = trainer_lib.Trainer(config, partitioner, optimizer, schedule)
  state = trainer.state_from_params(params)
  rng = jax.random.key(0)

  def run(steps):
    nonlocal state
    counted = []
    for batch in steps:
      state, metrics = trainer.train_step(state, trainer.shard_batch(batch.features), rng)
      counted.append(metrics["examples"])
    return jax.block_until_ready(counted)

  run(batches[:warmup])
  timed = batches[warmup:]
  start = time.perf_counter()
  counted = run(timed)
  seconds = time.perf_counter() - start
  features = timed[0].features
  executed = flops.train_step_flops(config, *features["encoder_input_tokens"].shape,
                                    features["decoder_target_tokens"].shape[1])
  mean_model_flops = np.mean([model_flops(config, b.segments) for b in timed])
  return dict(rates(timed, seconds, mean_model_flops, executed, peak),
              segments_counted_by_model=float(np.sum(counted)))


def train_paper_torch(config: t5.T5Config, params, batches: Sequence[Batch], warmup: int,
                      peak: float) -> tuple[dict, dict]:
  """(step figures, collator timing) of the paper's trainer on the same examples."""
  model = bench_torch.hf_model(config, params)
  collate = bench_torch.TaskPrefixCollator(model)
  start = time.perf_counter()
  collated = [collate(b.label_segments, b.rationale_segments) for b in batches]
  collator = {"examples_per_sec": sum(b.examples for b in batches)
                                  / (time.perf_counter() - start)}
  step = bench_torch.TaskPrefixStep(model, ALPHA, len(batches), config.dtype)
  for features in collated[:warmup]:
    step(features)
  start = time.perf_counter()
  for features in collated[warmup:]:
    step(features)
  seconds = time.perf_counter() - start
  timed = batches[warmup:]
  executed = np.mean([sum(flops.train_step_flops(config, *task["input_ids"].shape,
                                                 task["labels"].shape[1])
                          for task in features.values()) for features in collated[warmup:]])
  mean_model_flops = np.mean([model_flops(config, b.segments) for b in timed])
  return rates(timed, seconds, mean_model_flops, executed, peak), collator


def decode_batches(batches: Sequence[Batch], batch_size: int, count: int) -> list[list[Segment]]:
  """`count` batches of label-task segments (reused round-robin when too few)."""
  pool = [segment for b in batches for segment in b.label_segments]
  return [[pool[(i * batch_size + j) % len(pool)] for j in range(batch_size)]
          for i in range(count)]


def timed_decoding(decode, segment_batches: Sequence[list[Segment]]) -> tuple[dict, list]:
  """Figures and ids of `decode(segments) -> ids` over all but the first (warm-up) batch."""
  decode(segment_batches[0])
  start = time.perf_counter()
  ids = [decode(segments) for segments in segment_batches[1:]]
  seconds = time.perf_counter() - start
  examples = sum(len(segments) for segments in segment_batches[1:])
  return {"examples_per_sec": examples / seconds,
          "step_time_sec": seconds / len(ids)}, ids


def decode_dsbs_jax(config: t5.T5Config, params, input_length: int, decode_length: int):
  """This project's cached greedy decoding, inputs trimmed as infer.Predictor trims them."""
  params = jax.device_put(params)

  def decode(segments):
    tokens = np.zeros((len(segments), input_length), np.int32)
    for row, (inputs, _) in enumerate(segments):
      tokens[row, :len(inputs)] = inputs
    return np.asarray(t5.predict_batch(params, config, infer.trim_padding(tokens), decode_length))
  return decode


def numpy_matmul_peak(size: int, repeats: int) -> float:
  """FLOP/s of a float32 [size, size] matmul through numpy, best of `repeats`."""
  x = np.ones((size, size), np.float32)
  return flops.best_matmul_flops(lambda: x @ x, size, repeats)


def matmul_peaks(dtype: str, size: int, repeats: int) -> dict[str, dict[str, float]]:
  """{operand dtype: {library: FLOP/s}}: float32 always, and `dtype` (numpy has no bfloat16)."""
  peaks = {"float32": {"numpy": numpy_matmul_peak(size, repeats),
                       "torch": bench_torch.matmul_peak(size, repeats),
                       "jax": flops.measured_matmul_peak(size, repeats)}}
  if dtype != "float32":
    peaks[dtype] = {"torch": bench_torch.matmul_peak(size, repeats, dtype),
                    "jax": flops.measured_matmul_peak(size, repeats, jnp.dtype(dtype))}
  return peaks


def comparison(measurement: str, setup: dict, results: dict[str, dict]) -> dict:
  """One JSON line: both sides' figures and ratio[key] = dsbs_jax / paper_torch."""
  ratio = {key: results["dsbs_jax"][key] / results["paper_torch"][key] for key in RATIO_KEYS
           if key in results["dsbs_jax"] and results["paper_torch"].get(key)}
  return {"measurement": measurement, **setup, **results, "ratio": ratio}


def benchmark(args: argparse.Namespace) -> list[dict]:
  """Every measurement of one run, as JSON-able records."""
  load_average = os.getloadavg()[0]
  config = model_config(args.config, args.dtype)
  label_prefix, rationale_prefix = data.PAPER_PREFIXES
  gin.bind_parameter("TaskOptions.label_prefix", label_prefix)
  gin.bind_parameter("TaskOptions.rationale_prefix", rationale_prefix)
  import tasks  # registers the mixture; after gin, as train.py does
  del tasks

  lengths = {"inputs": args.input_length, "targets": args.target_length}
  num_steps = args.warmup + args.steps
  batches, rows_per_step, pipeline = read_batches(lengths, args.batch_size, num_steps,
                                                  jax.device_count(), args.seed)
  params = jax.device_get(t5.init_params(config, jax.random.key(args.seed)))
  # MFU is against the fastest product in the run's own dtype: a bfloat16 step measured
  # against a float32 peak would look twice as efficient as it is.
  peaks = matmul_peaks(args.dtype, args.peak_size, args.peak_repeats)
  peak = max(peaks[args.dtype].values())
  setup = {"config": args.config, "dtype": args.dtype, "machine": machine(),
           "load_average_1m": load_average, "devices": jax.device_count()}

  # Decoding first: both sides still hold the same, untrained weights.
  segment_batches = decode_batches(batches, args.decode_batch_size or args.batch_size,
                                   args.steps + 1)
  torch_model = bench_torch.hf_model(config, params)
  decoded = {}
  decoding = {}
  decoding["dsbs_jax"], decoded["dsbs_jax"] = timed_decoding(
      decode_dsbs_jax(config, params, args.input_length, args.decode_length), segment_batches)
  decoding["paper_torch"], decoded["paper_torch"] = timed_decoding(
      lambda segments: bench_torch.generate(torch_model, segments, args.decode_length,
                                            args.dtype), segment_batches)
  same = [np.array_equal(a, b) for jax_ids, torch_ids in zip(decoded["dsbs_jax"],
                                                             decoded["paper_torch"])
          for a, b in zip(jax_ids, torch_ids)]
  del torch_model

  training = {"dsbs_jax": train_dsbs_jax(config, params, batches, args.warmup, peak)}
  training["paper_torch"], collator = train_paper_torch(config, params, batches, args.warmup,
                                                        peak)
  train_setup = {"examples_per_step": float(np.mean([b.examples for b in batches[args.warmup:]])),
                 "packed_rows_per_step": rows_per_step, "input_length": args.input_length,
                 "target_length": args.target_length, "steps": args.steps,
                 "warmup": args.warmup, "alpha": ALPHA}
  return [
      {"measurement": "matmul_peak", **setup, "size": args.peak_size,
       "flops_per_sec": peaks, "mfu_reference": f"max {args.dtype}"},
      comparison("train", dict(setup, **train_setup), training),
      comparison("decode", dict(setup, batch_size=len(segment_batches[0]),
                                decode_length=args.decode_length, batches=args.steps,
                                same_greedy_ids=float(np.mean(same))), decoding),
      {"measurement": "data", **setup, "dsbs_jax_input_pipeline": pipeline,
       "paper_torch_collator": collator},
  ]


# Instruction sets that decide which matmul kernels run (bfloat16 arithmetic above all).
MATMUL_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description(cpuinfo_path: str = "/proc/cpuinfo") -> str:
  """'AMD EPYC x2 (avx2, avx512f, avx512_bf16)': the CPU model, count and matmul ISA."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open(cpuinfo_path, encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
  except OSError:  # not Linux: the model from `platform` alone
    pass
  isa = ", ".join(flag for flag in MATMUL_ISA_FLAGS if flag in flags)
  return f"{model} x{os.cpu_count()}" + (f" ({isa})" if isa else "")


def machine() -> str:
  device = jax.devices()[0]
  accelerator = "" if device.platform == "cpu" else f", {device.device_kind}"
  return f"{cpu_description()}, {device.platform}{accelerator}"


def table(records: Sequence[dict]) -> str:
  """The records as a plain-text table."""
  by_name = {record["measurement"]: record for record in records}
  train, decode = by_name["train"], by_name["decode"]
  peak_record = by_name["matmul_peak"]
  lines = [
      f"T5 v1.1 {train['config']}, {train['dtype']}, {train['machine']}, "
      f"load {train['load_average_1m']:.2f}; {train['examples_per_step']:.1f} examples "
      f"({train['packed_rows_per_step']} packed rows) per step, {train['steps']} steps "
      f"after {train['warmup']}",
      f"{'':28}{'dsbs_jax':>14}{'paper_torch':>14}{'ratio':>8}"]
  rows = [("train examples/s", train, "examples_per_sec", "{:.2f}"),
          ("train tokens/s", train, "tokens_per_sec", "{:,.0f}"),
          ("train step time (s)", train, "step_time_sec", "{:.3f}"),
          ("train MFU (model FLOPs)", train, "mfu", "{:.1%}"),
          ("train MFU (executed FLOPs)", train, "mfu_executed", "{:.1%}"),
          ("decode examples/s", decode, "examples_per_sec", "{:.2f}")]
  for title, record, key, fmt in rows:
    ratio = record["ratio"].get(key)
    lines.append(f"{title:28}{fmt.format(record['dsbs_jax'][key]):>14}"
                 f"{fmt.format(record['paper_torch'][key]):>14}"
                 f"{'' if ratio is None else f'{ratio:.2f}x':>8}")
  data_record = by_name["data"]
  lines += [
      f"decoding: batch {decode['batch_size']}, {decode['decode_length']} tokens greedy, "
      f"identical ids on {decode['same_greedy_ids']:.0%} of rows",
      f"model FLOPs per step {train['dsbs_jax']['model_flops_per_step']:.3g}; matmul peaks "
      "(GFLOP/s): " + "; ".join(
          f"{dtype} " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
          for dtype, peaks in peak_record["flops_per_sec"].items())
      + f"; MFU against the {peak_record['mfu_reference']}",
      f"input pipeline {data_record['dsbs_jax_input_pipeline']['examples_per_sec']:.0f} "
      f"examples/s; paper collator {data_record['paper_torch_collator']['examples_per_sec']:.0f}"
      " examples/s"]
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", choices=sorted(GIN_MODELS), default="small")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--batch_size", type=int, default=64,
                      help="original examples per step (each with both tasks)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (and decode batches)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--input_length", type=int, default=256,
                      help="packed input row length (CQA's longest input is 105 tokens)")
  parser.add_argument("--target_length", type=int, default=96,
                      help="packed target row length (CQA's longest target is 74 tokens)")
  parser.add_argument("--decode_length", type=int, default=64,
                      help="greedy tokens (the paper's generation_max_length)")
  parser.add_argument("--decode_batch_size", type=int, default=None,
                      help="default: --batch_size")
  parser.add_argument("--peak_size", type=int, default=4096)
  parser.add_argument("--peak_repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON lines file to append to")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
  args = parser.parse_args(argv)
  if args.quick:
    vars(args).update(QUICK)
  if args.steps < 1 or args.warmup < 1:
    parser.error("--steps and --warmup must be >= 1")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  records = benchmark(args)
  print(table(records))
  lines = "".join(json.dumps(record) + "\n" for record in records)
  print(lines, end="")
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(lines)
  return records


if __name__ == "__main__":
  main()
