"""Benchmarks this project's training step and greedy decoding side by side with the paper's
PyTorch trainer (tools/bench_torch.py): one run, one machine, the same student config, the
same weights at the start and the same CommonsenseQA examples (PaLM's labels and rationales).

    python tools/bench.py --config small --dtype float32 --out bench.jsonl
    python tools/bench.py --quick            # tiny config, 2 steps: a smoke test
    # Accelerators without TensorFlow: pack the batches where SeqIO runs, time them there.
    python tools/bench.py --write_batches cqa.npz --batch_size 256 --steps 5 --warmup 2
    python tools/bench.py --batches cqa.npz --config base,large --dtype bfloat16 \\
        --variants "scan_layers=True;scan_layers=True,attention_implementation=cudnn"

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
- MFU: model FLOP/s over the device's peak in the run's dtype: an accelerator's data
  sheet figure (dsbs_jax.flops), or on CPUs the fastest 4096^2 matmul measured in this run
  through numpy, torch and jax (all are reported).
- Startup: seconds from building the trainer to the end of its first step (parameters
  placed, step compiled and run), per variant of how the network runs (--variants).
- Timed steps follow warmup steps and run on batches read and collated beforehand; the
  input pipeline and the collator are timed apart. On a GPU the PyTorch side runs first
  and empties its cache, and JAX allocates as it goes instead of preallocating.

Every measurement is one JSON line (--out) with both sides and their ratios
(dsbs_jax / paper_torch); a table goes to stdout. This tool must not define model, loss,
data-loading or FLOP code of its own: it drives dsbs_jax's modules and bench_torch.
"""
import os

from dsbs_jax import host_allocator
from dsbs_jax import tpu_runtime

if __name__ == "__main__":  # before the heavy imports below: both sides run tuned
  host_allocator.reexec_with_tuned_allocator()
  tpu_runtime.keep_off_hosts_without_chips()  # no libtpu chatter or lock on a CPU or GPU host
  # The PyTorch side shares the accelerator: JAX takes memory as it needs it.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import collections
import dataclasses
import glob
import json
import math
import platform
import re
import sys
import tempfile
import time
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsbs_jax import convert
from dsbs_jax import decoding
from dsbs_jax import distillation
from dsbs_jax import encoder_decoder
from dsbs_jax import flops
from dsbs_jax import partitioning
from dsbs_jax import resources
from dsbs_jax import trainer as trainer_lib
from dsbs_jax.models import t5

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_torch  # noqa: E402  (a sibling file; tools/ is not a package)

MIXTURE = "cqa_dsbs_teacher"
# The label-task weight the mixture's rates follow (TaskOptions' default, which the benchmark
# does not change); TaskPrefixStep weighs its two passes the same.
ALPHA = distillation.TaskOptions.alpha
CONFIGS = ("tiny", "small", "base", "large", "xl")
TINY_VOCAB_SIZE = 8000  # the shipped vocabulary's; the public sizes keep T5's 32128
PROBE_ROWS = 16  # packed rows read to learn how many segments a row holds
SIDES = ("dsbs_jax", "paper_torch")
RATIO_KEYS = ("examples_per_sec", "tokens_per_sec", "step_time_sec", "mfu")
QUICK = {"config": "tiny", "steps": 2, "warmup": 1, "batch_size": 8, "decode_length": 8,
         "peak_size": 512, "peak_repeats": 2}
BATCHES_FORMAT = "dsbs_bench_batches/1"

Segment = bench_torch.Segment


@dataclasses.dataclass
class Batch:
  """One step's packed rows and the same examples unpacked, per task."""
  features: dict[str, np.ndarray]
  label_segments: list[Segment]
  rationale_segments: list[Segment]

  @classmethod
  def of(cls, features: dict[str, np.ndarray]) -> "Batch":
    return cls(features, *unpack(features))

  @property
  def segments(self) -> list[Segment]:
    return self.label_segments + self.rationale_segments

  @property
  def examples(self) -> float:
    return len(self.segments) / 2

  @property
  def tokens(self) -> int:
    return sum(len(inputs) + len(targets) for inputs, targets in self.segments)


def model_config(name: str, dtype: str, **execution) -> t5.T5Config:
  config = convert.config_from_gin(resources.GIN_MODELS_DIR / f"t5_1_1_{name}.gin")
  changes = {"dtype": dtype, **execution}
  if name == "tiny":
    changes["vocab_size"] = TINY_VOCAB_SIZE
  return dataclasses.replace(config, **changes)


def parse_variants(text: str) -> list[dict]:
  """'scan_layers=True,remat_policy=full;scan_layers=False' -> T5Config overrides.

  Values are Python literals of the field's type (True, None, 0.0) or bare strings.
  """
  fields = {f.name for f in dataclasses.fields(t5.T5Config)}
  variants = []
  for spec in text.split(";"):
    overrides = {}
    for assignment in filter(None, (part.strip() for part in spec.split(","))):
      name, _, value = assignment.partition("=")
      if name not in fields or not value:
        raise ValueError(f"--variants: {assignment!r} is not T5CONFIG_FIELD=VALUE "
                         f"(fields: {sorted(fields)})")
      literals = {"True": True, "False": False, "None": None}
      if value in literals:
        overrides[name] = literals[value]
      elif re.fullmatch(r"-?\d+(\.\d*)?", value):
        overrides[name] = float(value) if "." in value else int(value)
      else:
        overrides[name] = value
    variants.append(overrides)
  return variants


def unpack(features: dict[str, np.ndarray]) -> tuple[list[Segment], list[Segment]]:
  """(label segments, rationale segments) of packed rows."""
  label, rationale = distillation.TASK_IDS["label"], distillation.TASK_IDS["rationale"]
  by_task = {label: [], rationale: []}
  for row in range(features["decoder_segment_ids"].shape[0]):
    encoder_ids = features["encoder_segment_ids"][row]
    decoder_ids = features["decoder_segment_ids"][row]
    for segment in range(1, int(decoder_ids.max()) + 1):
      in_targets = decoder_ids == segment
      task = int(features["decoder_task_ids"][row][in_targets][0])
      by_task[task].append((features["encoder_input_tokens"][row][encoder_ids == segment],
                            features["decoder_target_tokens"][row][in_targets]))
  return by_task[label], by_task[rationale]


def segment_count(features: dict[str, np.ndarray]) -> int:
  return int(features["decoder_segment_ids"].max(axis=1).sum())


def stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}


def read_batches(lengths: dict, examples_per_step: int, num_steps: int, num_devices: int,
                 seed: int) -> tuple[list[dict], dict]:
  """(packed features per step, input-pipeline timing) from the training pipeline.

  Rows are read one at a time and stacked: the same rows as a pipeline batching that many.
  The rows per step hold `examples_per_step` on average, rounded up to whole devices.
  Needs TensorFlow and SeqIO; --batches replays what --write_batches saved without them.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from dsbs_jax import datasets  # pylint: disable=g-import-not-at-top
  from dsbs_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  label_prefix, rationale_prefix = distillation.PAPER_PREFIXES
  gin.bind_parameter("TaskOptions.label_prefix", label_prefix)
  gin.bind_parameter("TaskOptions.rationale_prefix", rationale_prefix)
  datasets.register_all()

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
  steps = [stack(read[step * rows_per_step:(step + 1) * rows_per_step])
           for step in range(num_steps)]
  examples_timed = sum(segment_count(row) for row in read[1:]) / 2
  return steps, {"rows_per_sec": (len(read) - 1) / seconds,
                 "examples_per_sec": examples_timed / seconds}


def write_batches(path: str, steps: Sequence[dict], setup: dict) -> None:
  """Saves packed batches and how they were made (one .npz) for --batches."""
  arrays = {f"{step}/{key}": value for step, features in enumerate(steps)
            for key, value in features.items()}
  header = json.dumps({"format": BATCHES_FORMAT, "steps": len(steps), **setup})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez_compressed(path, header=np.array(header), **arrays)


def load_batches(path: str) -> tuple[list[dict], dict]:
  """(packed features per step, setup) as `write_batches` saved them."""
  with np.load(path) as saved:
    setup = json.loads(str(saved["header"]))
    if setup.pop("format", None) != BATCHES_FORMAT:
      raise ValueError(f"{path}: not a batches file of this benchmark ({BATCHES_FORMAT})")
    steps = [{} for _ in range(setup.pop("steps"))]
    for name in saved.files:
      if name != "header":
        step, key = name.split("/", 1)
        steps[int(step)][key] = saved[name]
  return steps, setup


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


def peak_memory_bytes() -> Optional[int]:
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def train_dsbs_jax(config: t5.T5Config, params, batches: Sequence[Batch], warmup: int,
                   peak: float, profile_steps: int = 0) -> dict:
  """This project's jitted, sharded train step (AdamW as the paper's) on packed batches."""
  partitioner = partitioning.make_partitioner("data", (-1, 1))
  optimizer, schedule = trainer_lib.make_optimizer("adamw", total_steps=len(batches))
  rng = jax.random.key(0)
  start = time.perf_counter()
  trainer = trainer_lib.Trainer(config, partitioner, optimizer, schedule)
  state = trainer.state_from_params(params)

  def run(steps):
    nonlocal state
    counted = []
    for batch in steps:
      state, metrics = trainer.train_step(state, trainer.shard_batch(batch.features), rng)
      counted.append(metrics["examples"])
    return jax.block_until_ready(counted)

  run(batches[:1])
  startup = time.perf_counter() - start
  run(batches[1:warmup])
  timed = batches[warmup:]
  start = time.perf_counter()
  counted = run(timed)
  seconds = time.perf_counter() - start
  features = timed[0].features
  executed = flops.train_step_flops(config, *features["encoder_input_tokens"].shape,
                                    features["decoder_target_tokens"].shape[1])
  mean_model_flops = np.mean([model_flops(config, b.segments) for b in timed])
  figures = dict(rates(timed, seconds, mean_model_flops, executed, peak),
                 startup_sec=startup, segments_counted_by_model=float(np.sum(counted)),
                 scan_layers=t5.scans_layers(config), peak_memory_bytes=peak_memory_bytes())
  if profile_steps:
    figures["profile"] = profile(lambda: run(timed[:profile_steps]), profile_steps)
  return figures


def profile(run_steps, num_steps: int, top: int = 25) -> list[dict]:
  """Device time per XLA operation over `num_steps` steps, the `top` largest, each with its
  share of the whole (from a jax.profiler trace; needs no TensorFlow)."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      run_steps()
    trace = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)[0]
    profile_data = jax.profiler.ProfileData.from_file(trace)
  on_device = jax.devices()[0].platform != "cpu"
  per_op, total = collections.Counter(), 0.0
  for plane in profile_data.planes:
    # Accelerators: the device planes' kernel lines; CPUs: XLA's operations on the host.
    if on_device != plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if on_device and "XLA Ops" not in line.name:
        continue
      for event in line.events:
        if not on_device and ("fusion" not in event.name and not event.name.startswith(
            ("wrapped_", "dot", "copy", "transpose", "reduce", "convolution"))):
          continue
        per_op[event.name] += event.duration_ns / 1e6 / num_steps
        total += event.duration_ns / 1e6 / num_steps
  return [{"op": name, "ms_per_step": ms, "share": ms / total if total else 0.0}
          for name, ms in per_op.most_common(top)]


def train_paper_torch(config: t5.T5Config, params, batches: Sequence[Batch], warmup: int,
                      peak: float, device: str) -> tuple[dict, dict]:
  """(step figures, collator timing) of the paper's trainer on the same examples."""
  model_ = bench_torch.hf_model(config, params, device)
  collate = bench_torch.TaskPrefixCollator(model_)
  start = time.perf_counter()
  collated = [collate(b.label_segments, b.rationale_segments) for b in batches]
  collator = {"examples_per_sec": sum(b.examples for b in batches)
                                  / (time.perf_counter() - start)}
  step = bench_torch.TaskPrefixStep(model_, ALPHA, len(batches), config.dtype, device)
  start = time.perf_counter()
  step(collated[0])
  startup = time.perf_counter() - start
  for features in collated[1:warmup]:
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
  return (dict(rates(timed, seconds, mean_model_flops, executed, peak), startup_sec=startup,
               peak_memory_bytes=bench_torch.peak_memory_bytes(device)), collator)


def decode_paper_torch(config: t5.T5Config, params, segment_batches, decode_length: int,
                       device: str) -> tuple[dict, list]:
  """transformers' greedy `generate` from the initial weights, as the paper decodes."""
  model_ = bench_torch.hf_model(config, params, device)
  return timed_decoding(lambda segments: bench_torch.generate(
      model_, segments, decode_length, config.dtype, device), segment_batches)


def decode_batches(batches: Sequence[Batch], batch_size: int, count: int) -> list[list[Segment]]:
  """`count` batches of label-task segments (reused round-robin when too few)."""
  pool = [segment for b in batches for segment in b.label_segments]
  return [[pool[(i * batch_size + j) % len(pool)] for j in range(batch_size)]
          for i in range(count)]


def timed_decoding(decode, segment_batches: Sequence[list[Segment]]) -> tuple[dict, list]:
  """Figures and ids of `decode(segments) -> ids` over all but the first batch, after one
  untimed pass over all of them (each input-length bucket compiles once, untimed)."""
  for segments in segment_batches:
    decode(segments)
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
    return np.asarray(encoder_decoder.predict_batch(
        params, config, decoding.trim_padding(tokens), decode_length))
  return decode


def numpy_matmul_peak(size: int, repeats: int) -> float:
  """FLOP/s of a float32 [size, size] matmul through numpy, best of `repeats`."""
  x = np.ones((size, size), np.float32)
  return flops.best_matmul_flops(lambda: x @ x, size, repeats)


def matmul_peaks(dtype: str, size: int, repeats: int,
                 device: str = "cpu") -> dict[str, dict[str, float]]:
  """{operand dtype: {library: FLOP/s}}: float32 always, and `dtype`; numpy (no
  bfloat16) only on CPUs."""
  peaks = {}
  for operand_dtype in dict.fromkeys(("float32", dtype)):
    peaks[operand_dtype] = {
        "torch": bench_torch.matmul_peak(size, repeats, operand_dtype, device),
        "jax": flops.measured_matmul_peak(size, repeats, jnp.dtype(operand_dtype))}
  if device == "cpu":
    peaks["float32"] = {"numpy": numpy_matmul_peak(size, repeats), **peaks["float32"]}
  return peaks


def mfu_reference(dtype: str, peaks: dict) -> tuple[float, str]:
  """(peak FLOP/s, what it is): an accelerator's data sheet, else the fastest product
  measured in the run's dtype (a bfloat16 step against a float32 peak would look twice
  as efficient as it is)."""
  kind = jax.devices()[0].device_kind
  if kind in flops.KNOWN_PEAK_FLOPS:
    return flops.KNOWN_PEAK_FLOPS[kind], f"{kind} data sheet"
  return max(peaks[dtype].values()), f"max {dtype}"


def comparison(measurement: str, setup: dict, results: dict[str, dict]) -> dict:
  """One JSON line: both sides' figures and ratio[key] = dsbs_jax / paper_torch."""
  ratio = {key: results["dsbs_jax"][key] / results["paper_torch"][key] for key in RATIO_KEYS
           if key in results["dsbs_jax"] and results["paper_torch"].get(key)}
  return {"measurement": measurement, **setup, **results, "ratio": ratio}


def torch_device() -> str:
  """Where the PyTorch side runs: the GPU JAX uses, or the CPU."""
  return "cuda" if jax.devices()[0].platform == "gpu" else "cpu"


def paper_side(run, *args) -> tuple[Optional[dict], Optional[str]]:
  """(result, None), or (None, why) when PyTorch runs out of accelerator memory."""
  try:
    return run(*args), None
  except bench_torch.OUT_OF_MEMORY_ERRORS as error:
    return None, f"out of memory: {str(error).splitlines()[0]}"


def benchmark_config(name: str, args: argparse.Namespace, batches: Sequence[Batch],
                     setup: dict, peak: float, deadline: float) -> list[dict]:
  """Every measurement of one model size: training per variant, decoding, collator."""
  device = torch_device()
  config = model_config(name, args.dtype)
  params = jax.device_get(t5.init_params(config, jax.random.key(args.seed)))
  setup = dict(setup, config=name)
  train_setup = {"examples_per_step": float(np.mean([b.examples for b in batches[args.warmup:]])),
                 "packed_rows_per_step": batches[0].features["encoder_input_tokens"].shape[0],
                 "input_length": batches[0].features["encoder_input_tokens"].shape[1],
                 "target_length": batches[0].features["decoder_target_tokens"].shape[1],
                 "steps": args.steps, "warmup": args.warmup, "alpha": ALPHA}
  segment_batches = decode_batches(batches, args.decode_batch_size or args.batch_size,
                                   args.steps + 1)

  # The paper's side first: on a GPU it then hands its memory back before JAX starts.
  if args.jax_only:
    torch_train = torch_decode = None
    torch_train_error = torch_decode_error = "not run (--jax_only)"
  else:
    torch_train, torch_train_error = paper_side(
        train_paper_torch, config, params, batches, args.warmup, peak, device)
    torch_decode, torch_decode_error = paper_side(
        decode_paper_torch, config, params, segment_batches, args.decode_length, device)
    bench_torch.release(device)

  records = []
  decoded_jax = timed_decoding(
      decode_dsbs_jax(config, params, train_setup["input_length"], args.decode_length),
      segment_batches)
  decode_record = {"measurement": "decode", **setup, "batch_size": len(segment_batches[0]),
                   "decode_length": args.decode_length, "batches": args.steps,
                   "dsbs_jax": decoded_jax[0]}
  if torch_decode is None:
    decode_record["paper_torch_error"] = torch_decode_error
  else:
    same = [np.array_equal(a, b) for jax_ids, torch_ids in zip(decoded_jax[1], torch_decode[1])
            for a, b in zip(jax_ids, torch_ids)]
    decode_record = comparison("decode", dict(decode_record, same_greedy_ids=float(np.mean(same))),
                               {"dsbs_jax": decoded_jax[0], "paper_torch": torch_decode[0]})
  records.append(decode_record)

  for index, variant in enumerate(args.variants):
    variant_setup = dict(setup, **train_setup, variant=variant)
    if index and time.time() > deadline:  # the first variant always runs
      records.append({"measurement": "train", **variant_setup,
                      "skipped": "--deadline_minutes reached"})
      continue
    try:
      ours = train_dsbs_jax(dataclasses.replace(config, **variant), params, batches,
                            args.warmup, peak, args.profile_steps if index == 0 else 0)
    except Exception as error:  # pylint: disable=broad-except
      # One variant the backend cannot run (a kernel it lacks, memory) must not cost the
      # rest of a one-shot accelerator run: it is recorded, and the next one goes on.
      records.append({"measurement": "train", **variant_setup,
                      "skipped": f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"})
      continue
    if torch_train is None:
      records.append({"measurement": "train", **variant_setup, "dsbs_jax": ours,
                      "paper_torch_error": torch_train_error})
    else:
      records.append(comparison("train", variant_setup,
                                {"dsbs_jax": ours, "paper_torch": torch_train[0]}))
  if torch_train is not None:
    records.append({"measurement": "data", **setup,
                    "paper_torch_collator": torch_train[1]})
  return records


def benchmark(args: argparse.Namespace) -> list[dict]:
  """Every measurement of one run, as JSON-able records."""
  start = time.time()
  load_average = os.getloadavg()[0]
  if args.batches:
    steps, pipeline = load_batches(args.batches)
    pipeline_setup = pipeline.pop("setup")
  else:
    lengths = {"inputs": args.input_length, "targets": args.target_length}
    steps, timing = read_batches(lengths, args.batch_size, args.warmup + args.steps,
                                 jax.device_count(), args.seed)
    pipeline = {"dsbs_jax_input_pipeline": timing}
    pipeline_setup = {"mixture": MIXTURE, "seed": args.seed, **lengths}
  if len(steps) < args.warmup + args.steps:
    raise ValueError(f"{args.batches}: {len(steps)} batches, but --warmup {args.warmup} "
                     f"and --steps {args.steps} need {args.warmup + args.steps}")
  batches = [Batch.of(features) for features in steps[:args.warmup + args.steps]]
  device = torch_device()
  peaks = matmul_peaks(args.dtype, args.peak_size, args.peak_repeats, device)
  peak, reference = mfu_reference(args.dtype, peaks)
  setup = {"dtype": args.dtype, "machine": machine(), "load_average_1m": load_average,
           "devices": jax.device_count(), "batches_from": pipeline_setup}
  records = [{"measurement": "matmul_peak", **setup, "size": args.peak_size,
              "flops_per_sec": peaks, "mfu_reference": reference, "mfu_peak": peak},
             {"measurement": "data", **setup, **pipeline}]
  deadline = start + 60 * args.deadline_minutes if args.deadline_minutes else float("inf")
  for name in args.config:
    records += benchmark_config(name, args, batches, setup, peak, deadline)
  return records


# Instruction sets that decide which matmul kernels run (bfloat16 arithmetic above all).
MATMUL_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description(cpuinfo_path: str = "/proc/cpuinfo") -> str:
  """'AMD EPYC x2 (avx2, avx512f, avx512_bf16)': the CPU model, count and matmul ISA."""
  model_name, flags = platform.processor() or platform.machine(), set()
  try:
    with open(cpuinfo_path, encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model_name = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
  except OSError:  # not Linux: the model from `platform` alone
    pass
  isa = ", ".join(flag for flag in MATMUL_ISA_FLAGS if flag in flags)
  return f"{model_name} x{os.cpu_count()}" + (f" ({isa})" if isa else "")


def machine() -> str:
  device = jax.devices()[0]
  accelerator = "" if device.platform == "cpu" else f", {device.device_kind}"
  return f"{cpu_description()}, {device.platform}{accelerator}"


def _figure(record: dict, side: str, key: str, fmt: str) -> str:
  figures = record.get(side)
  return fmt.format(figures[key]) if figures and figures.get(key) is not None else "-"


def table(records: Sequence[dict]) -> str:
  """The records as a plain-text table: one block per model size and variant."""
  peak_record = next(r for r in records if r["measurement"] == "matmul_peak")
  lines = [f"{peak_record['dtype']}, {peak_record['machine']}, load "
           f"{peak_record['load_average_1m']:.2f}; matmul peaks (GFLOP/s): " + "; ".join(
               f"{dtype} " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
               for dtype, peaks in peak_record["flops_per_sec"].items())
           + f"; MFU against {peak_record['mfu_reference']} ({peak_record['mfu_peak'] / 1e12:.3g}"
             " TFLOP/s)"]
  rows = [("train examples/s", "examples_per_sec", "{:.2f}"),
          ("train tokens/s", "tokens_per_sec", "{:,.0f}"),
          ("train step time (s)", "step_time_sec", "{:.3f}"),
          ("train MFU (model FLOPs)", "mfu", "{:.1%}"),
          ("train MFU (executed FLOPs)", "mfu_executed", "{:.1%}"),
          ("startup: first step (s)", "startup_sec", "{:.1f}"),
          ("peak memory (GB)", "peak_memory_gb", "{:.1f}")]
  for record in records:
    for side in SIDES:
      if record.get(side) and record[side].get("peak_memory_bytes"):
        record[side]["peak_memory_gb"] = record[side]["peak_memory_bytes"] / 1e9
    if record["measurement"] == "train":
      variant = ", ".join(f"{k}={v}" for k, v in record["variant"].items()) or "defaults"
      lines.append(f"\nT5 v1.1 {record['config']} ({variant}): {record['examples_per_step']:.1f} "
                   f"examples ({record['packed_rows_per_step']} packed rows of "
                   f"{record['input_length']}/{record['target_length']}) per step, "
                   f"{record['steps']} steps after {record['warmup']}")
      if "skipped" in record:
        lines.append(f"  skipped: {record['skipped']}")
        continue
      if "dsbs_jax" in record and "scan_layers" in record["dsbs_jax"]:
        lines[-1] += f"; layers {'scanned' if record['dsbs_jax']['scan_layers'] else 'unrolled'}"
      lines.append(f"{'':28}{'dsbs_jax':>14}{'paper_torch':>14}{'ratio':>8}")
      for title, key, fmt in rows:
        ratio = record.get("ratio", {}).get(key)
        lines.append(f"{title:28}{_figure(record, 'dsbs_jax', key, fmt):>14}"
                     f"{_figure(record, 'paper_torch', key, fmt):>14}"
                     f"{'' if ratio is None else f'{ratio:.2f}x':>8}")
      if "paper_torch_error" in record:
        lines.append(f"  paper_torch: {record['paper_torch_error']}")
      for op in record.get("dsbs_jax", {}).get("profile", [])[:12]:
        lines.append(f"  profile {op['ms_per_step']:9.2f} ms/step {op['share']:6.1%}  {op['op']}")
    elif record["measurement"] == "decode":
      ratio = record.get("ratio", {}).get("examples_per_sec")
      same = record.get("same_greedy_ids")
      lines.append(
          f"\nT5 v1.1 {record['config']} decoding, batch {record['batch_size']}, "
          f"{record['decode_length']} tokens greedy: examples/s dsbs_jax "
          f"{_figure(record, 'dsbs_jax', 'examples_per_sec', '{:.2f}')}, paper_torch "
          f"{_figure(record, 'paper_torch', 'examples_per_sec', '{:.2f}')}"
          + ("" if ratio is None else f" ({ratio:.2f}x)")
          + ("" if same is None else f"; identical ids on {same:.0%} of rows")
          + (f"; paper_torch: {record['paper_torch_error']}" if "paper_torch_error" in record
             else ""))
    elif record["measurement"] == "data":
      if "dsbs_jax_input_pipeline" in record:
        lines.append(f"input pipeline {record['dsbs_jax_input_pipeline']['examples_per_sec']:.0f}"
                     " examples/s")
      if "paper_torch_collator" in record:
        lines.append(f"paper collator ({record['config']}) "
                     f"{record['paper_torch_collator']['examples_per_sec']:.0f} examples/s")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="small",
                      help=f"T5 v1.1 size(s), comma-separated, from {CONFIGS}")
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
  parser.add_argument("--variants", default="",
                      help="how our side runs, one training measurement each: ';'-separated "
                           "lists of T5Config overrides, e.g. 'scan_layers=True;"
                           "scan_layers=False,remat_policy=full' ('' = the defaults)")
  parser.add_argument("--profile_steps", type=int, default=0,
                      help="trace this many steps of the first variant and report the "
                           "operations that take the most time")
  parser.add_argument("--write_batches", default=None,
                      help="only read --warmup + --steps batches through SeqIO and save "
                           "them to this .npz for --batches")
  parser.add_argument("--batches", default=None,
                      help="time these saved batches instead of reading SeqIO (no TensorFlow)")
  parser.add_argument("--jax_only", action="store_true",
                      help="time this project's side only (e.g. again under other XLA_FLAGS)")
  parser.add_argument("--deadline_minutes", type=float, default=None,
                      help="skip the training variants that would start after this long")
  parser.add_argument("--peak_size", type=int, default=4096)
  parser.add_argument("--peak_repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON lines file to append to")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
  args = parser.parse_args(argv)
  if args.quick:
    vars(args).update(QUICK)
  args.config = args.config.split(",")
  unknown = sorted(set(args.config) - set(CONFIGS))
  if unknown:
    parser.error(f"--config {','.join(unknown)}: expected names from {CONFIGS}")
  if args.steps < 1 or args.warmup < 1:
    parser.error("--steps and --warmup must be >= 1")
  if args.write_batches and args.batches:
    parser.error("--write_batches reads through SeqIO; --batches replays a file: pick one")
  try:
    args.variants = parse_variants(args.variants)
  except ValueError as error:
    parser.error(str(error))
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if args.write_batches:
    lengths = {"inputs": args.input_length, "targets": args.target_length}
    steps, timing = read_batches(lengths, args.batch_size, args.warmup + args.steps,
                                 jax.device_count(), args.seed)
    write_batches(args.write_batches, steps, {
        "setup": {"mixture": MIXTURE, "seed": args.seed, "examples_per_step": args.batch_size,
                  **lengths},
        "dsbs_jax_input_pipeline": timing})
    print(f"wrote {len(steps)} batches of {steps[0]['encoder_input_tokens'].shape[0]} packed "
          f"rows to {args.write_batches}")
    return []
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
