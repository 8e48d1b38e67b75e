"""`dsbs compile`: does this run fit on that slice? Compiles a run's real steps ahead of time
for a target it need not have (a TPU slice through libtpu, NVIDIA GPUs through JAX's CUDA
plugin, or N CPU devices) and reports, per chip, what the compiler says.

The run is the one `dsbs train` would start with the same gin flags: the network (resolved
for the target's platform: layers scanned and XLA's dense backward on accelerators), the
optimizer, the parallelism and mesh, the batch, microbatches, rematerialization and feature
lengths. For each step (train, eval, decode) the report holds the HBM needed per chip
(arguments, outputs less what they alias, temporaries, code) against the chip's data-sheet
capacity, the collectives in the compiled program (count and bytes per kind, each loop body
counted as many times as it runs), the compiler's FLOP and byte counts (XLA counts a loop
body once), the lower and compile seconds, and a roofline lower bound on the step's time
with the best MFU it allows (the slowest of: model FLOPs against the data-sheet peak
FLOP/s; every argument and output crossing HBM once against the data-sheet bandwidth; what
each chip must send for the collectives against its links' data-sheet rate). A train step
that does not fit is compiled again with one knob changed at a time (more microbatches,
full rematerialization, FSDP, twice the chips) and the report says which of them fit.

This module compiles and reports; it must not run steps, read data or write checkpoints.
"""
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp

from dsbs_jax import command_flags
from dsbs_jax import encoder_decoder
from dsbs_jax import flops
from dsbs_jax import gin_utils
from dsbs_jax import gpu_runtime
from dsbs_jax import partitioning
from dsbs_jax import per_input_batches
from dsbs_jax import storage
from dsbs_jax import targets
from dsbs_jax import train
from dsbs_jax import tpu_runtime
from dsbs_jax import trainer as trainer_lib
from dsbs_jax.models import t5

STEPS = command_flags.COMPILE_STEPS
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Features of a packed training batch (input_pipeline's converter), all int32.
ENCODER_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                    "decoder_segment_ids", "decoder_positions", "decoder_task_ids")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
                "c64": 8, "c128": 16}
_ARRAY_TYPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
# A send of a collective's cross-slice part (its recv, of the same data, is not counted).
_ACROSS_SLICES = re.compile(r"=\s\((?P<type>\w+\[[\d,]*\])[^=]*?\ssend\(.*?"
                            r"_xla_megascale_transfer_type=\"(?P<kind>\w+)\"")
_COLLECTIVE_OP = re.compile(r"=\s(?P<type>.*?)\s(?P<kind>" + "|".join(COLLECTIVES)
                            + r")(?:-start)?\(")
_COMPILER_OUT_OF_MEMORY = re.compile(
    r"RESOURCE_EXHAUSTED: .*temporaries \((?P<needed>[\d.]+)G\) exceeds available HBM "
    r"\((?P<available>[\d.]+)G\)")
# A collective's groups: explicit ({{0,1},{2,3}}: the first group's size) or in iota form
# ([groups,size]<=[...]).
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?:\d+,)*(?P<size>\d+)\]<=")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_WHILE_BODY = re.compile(r"\swhile\(.*\bbody=%?(?P<body>[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"')
_CALLED = re.compile(r"\b(?:calls|to_apply|branch_computations)=\{?(?P<names>%?[\w.\-]+"
                     r"(?:,\s*%?[\w.\-]+)*)\}?")


class CompileError(ValueError):
  """A run that cannot be compiled as configured (e.g. a batch that does not divide)."""


USER_ERRORS = (targets.TargetError, CompileError, tpu_runtime.TpuRuntimeError,
               gpu_runtime.GpuRuntimeError)


@dataclasses.dataclass(frozen=True)
class RunShape:
  """What of a run decides its compiled steps, as gin sets it for `dsbs train`."""
  config: Any  # t5.T5Config
  batch_size: int
  input_length: int
  target_length: int
  eval_batch_size: int
  decode_length: int
  parallelism: str
  mesh_shape: tuple
  num_microbatches: int
  train_steps: int
  # Per-input batches (train.batching): batch_size counts rows, two per input (both tasks,
  # the worst case), padded to the full lengths (the longest a batch can need).
  per_input: bool = False

  def describe(self) -> str:
    config = self.config
    rows = " rows (2 per input)" if self.per_input else ""
    return (f"{config.num_encoder_layers}+{config.num_decoder_layers} layers, "
            f"emb {config.emb_dim}, mlp {config.mlp_dim}, {config.dtype}; "
            f"{self.parallelism} mesh {self.mesh_shape}, batch {self.batch_size}{rows} x "
            f"{self.input_length}/{self.target_length}, microbatches {self.num_microbatches}, "
            f"layers {'scanned' if config.scan_layers else 'unrolled'}, "
            f"remat {config.remat_policy}")


def _bound(configurable, name: str):
  """A gin binding of `configurable`, or its function's default."""
  bindings = gin.get_bindings(configurable)
  if name in bindings:
    return bindings[name]
  return inspect.signature(configurable).parameters[name].default


def run_shape_from_gin(platform: str) -> RunShape:
  """The run gin describes, its network resolved for `platform`."""
  # The model gin file's network: a run from INITIAL_CHECKPOINT_PATH must match it anyway
  # (dsbs train refuses one that does not), and the checkpoint need not be reachable here.
  with gin_utils.as_config_errors(ValueError, TypeError, configurable="T5Config"):
    config = for_platform(t5.T5Config(), platform)
  lengths = _bound(train.train, "task_feature_lengths")
  batch_size = _bound(train.train, "batch_size")
  if not isinstance(lengths, dict) or not isinstance(batch_size, int):
    raise CompileError("the gin files set no TASK_FEATURE_LENGTHS or BATCH_SIZE: include "
                       "runs/train.gin (or a file that includes it)")
  train_steps = _bound(train.train, "train_steps")
  per_input = _bound(train.train, "batching") == "per_input"
  return RunShape(
      config=config, batch_size=batch_size * (2 if per_input else 1), per_input=per_input,
      input_length=lengths["inputs"],
      target_length=lengths["targets"],
      eval_batch_size=_bound(train.train, "eval_batch_size"),
      decode_length=min(_bound(train.train, "eval_decode_length"), lengths["targets"]),
      parallelism=_bound(partitioning.make_partitioner, "parallelism"),
      mesh_shape=tuple(_bound(partitioning.make_partitioner, "mesh_shape")),
      num_microbatches=_bound(trainer_lib.Trainer, "num_microbatches"),
      train_steps=train_steps if isinstance(train_steps, int) else 1)


def for_platform(config, platform: str):
  """`config` with the execution choices left to the backend made for `platform` (the
  compiling host's backend is not the target's)."""
  on_cpu = platform == "cpu"
  return dataclasses.replace(
      config,
      scan_layers=(not on_cpu) if config.scan_layers is None else config.scan_layers,
      dense_backward=(("materialized" if on_cpu else "xla") if config.dense_backward == "auto"
                      else config.dense_backward))


# ------------------------------------------------------------------------------
# What the compiled program says.
# ------------------------------------------------------------------------------
def array_bytes(type_text: str) -> int:
  """Bytes of the largest array in an HLO type (`f32[8,128]{1,0}`, or a tuple of them)."""
  sizes = [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]
           for dtype, dims in _ARRAY_TYPE.findall(type_text)]
  return max(sizes, default=0)


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], Optional[str]]:
  """{computation name: its instruction lines}, and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    if current is None:
      match = _COMPUTATION.match(stripped)
      if match and not stripped.startswith("HloModule"):
        current = match["name"]
        computations[current] = []
        if stripped.startswith("ENTRY"):
          entry = current
    elif stripped == "}":
      current = None
    else:
      computations[current].append(stripped)
  return computations, entry


def group_size(line: str, num_devices: int) -> int:
  """How many devices take part in each group of the collective on this HLO line (all of
  them when it names no groups)."""
  if match := _IOTA_GROUPS.search(line):
    return int(match["size"])
  if (match := _EXPLICIT_GROUPS.search(line)) and match["first"]:
    return len(match["first"].split(","))
  return num_devices


def sent_per_result_byte(kind: str, group: int) -> float:
  """Bytes each device of a group of `group` must send for one collective, per byte of its
  result on a device (bandwidth-optimal algorithms: a ring's)."""
  share = (group - 1) / group
  return {"all-reduce": 2 * share, "all-gather": share, "reduce-scatter": group - 1,
          "all-to-all": share}.get(kind, 1.0)


def collectives(hlo_text: str, num_devices: int = 2) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes", "sent_bytes"}} of the collectives a compiled program runs per
  call, on a mesh of `num_devices`.

  A collective inside a loop counts once per iteration when XLA knows the trip count
  (scanned layers, microbatches); `bytes` adds up each one's largest result array,
  `sent_bytes` what each device must send for it (`sent_per_result_byte`, by its group's
  size).
  Over several slices, XLA compiles each collective's part that crosses the data-center
  network into transfers of the Megascale runtime: counted apart, as "<kind> across slices".
  """
  computations, entry = _computations(hlo_text)
  totals = {}

  def add(kind: str, array_type: str, times: int, sent_per_result: float):
    total = totals.setdefault(kind, {"count": 0, "bytes": 0, "sent_bytes": 0})
    size = array_bytes(array_type)
    total["count"] += times
    total["bytes"] += times * size
    total["sent_bytes"] += int(times * sent_per_result * size)

  def visit(name: str, times: int, seen: tuple):
    for line in computations.get(name, ()):
      if match := _COLLECTIVE_OP.search(line):
        add(match["kind"], match["type"], times,
            sent_per_result_byte(match["kind"], group_size(line, num_devices)))
      if match := _ACROSS_SLICES.search(line):
        add(f"{match['kind'].lower().replace('_', '-')} across slices", match["type"], times,
            1.0)
      if match := _WHILE_BODY.search(line):
        trips = _TRIP_COUNT.search(line)
        if match["body"] not in seen:
          visit(match["body"], times * (int(trips["n"]) if trips else 1), seen + (name,))
      for called in _CALLED.finditer(line):
        for callee in re.split(r",\s*", called["names"]):
          callee = callee.lstrip("%")
          if callee not in seen:
            visit(callee, times, seen + (name,))

  if entry is not None:
    visit(entry, 1, ())
  return totals


@dataclasses.dataclass
class StepReport:
  """What the compiler says of one step on one chip."""
  step: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  lower_seconds: float
  compile_seconds: float
  xla_flops: float
  xla_bytes_accessed: float
  collectives: dict
  model_flops: float  # per chip, as dsbs_jax.flops counts them (train and eval only)
  # The TPU compiler's own refusal when the temporaries alone exceed its HBM (then only
  # temp_bytes is known, from its message): the step does not fit.
  out_of_memory: str = ""

  @property
  def hbm_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  def fits(self, capacity: Optional[int]) -> Optional[bool]:
    if self.out_of_memory:
      return False
    return None if capacity is None else self.hbm_bytes <= capacity

  def roofline(self, sheet: Optional[targets.DataSheet]) -> Optional[dict]:
    """The step's lower bound on time and the best MFU it allows, from data-sheet peaks: the
    slowest of the model's FLOPs at peak, every argument and output crossing HBM once, and
    what each chip must send for the collectives at its links' full rate (within a slice
    or host, and, where the data sheet gives it, over the network between slices)."""
    if sheet is None or not self.model_flops:
      return None
    across = sum(value.get("sent_bytes", 0) for kind, value in self.collectives.items()
                 if kind.endswith(" across slices"))
    within = sum(value.get("sent_bytes", 0) for value in self.collectives.values()) - across
    times = {"compute": self.model_flops / sheet.peak_flops,
             "memory": (self.argument_bytes + self.output_bytes) / sheet.hbm_bytes_per_second,
             "interconnect": (within / sheet.interconnect_bytes_per_second
                              if sheet.interconnect_bytes_per_second else 0.0)
                             + (across / sheet.network_bytes_per_second
                                if sheet.network_bytes_per_second else 0.0)}
    bound = max(times, key=times.get)
    return {"seconds": times[bound], "bound": bound,
            "best_mfu": times["compute"] / times[bound], "times": times}

  def to_json(self, sheet: Optional[targets.DataSheet], capacity: Optional[int]) -> dict:
    values = dataclasses.asdict(self)
    values["hbm_bytes"] = self.hbm_bytes
    if capacity is not None:
      values["hbm_capacity_bytes"] = capacity
    values["fits"] = self.fits(capacity)
    values["roofline"] = self.roofline(sheet)
    return values


def analyze(step: str, lowered, lower_seconds: float, model_flops: float,
            num_devices: int = 2) -> StepReport:
  """Compiles `lowered` and reads the compiler's memory and cost analyses and HLO."""
  start = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    needed = _COMPILER_OUT_OF_MEMORY.search(str(error))
    if not needed:
      raise
    return StepReport(
        step=step, argument_bytes=0, output_bytes=0, alias_bytes=0,
        temp_bytes=int(float(needed["needed"]) * targets.GIB), code_bytes=0,
        lower_seconds=lower_seconds, compile_seconds=time.time() - start, xla_flops=0.0,
        xla_bytes_accessed=0.0, collectives={}, model_flops=model_flops,
        out_of_memory=f"the TPU compiler refused it: its temporaries alone need "
                      f"{needed['needed']} GiB, {needed['available']} GiB is available")
  compile_seconds = time.time() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return StepReport(
      step=step, argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
      lower_seconds=lower_seconds, compile_seconds=compile_seconds,
      xla_flops=float(cost.get("flops", 0.0)),
      xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      collectives=collectives(compiled.as_text(), num_devices), model_flops=model_flops)


# ------------------------------------------------------------------------------
# Building and lowering the run's steps for a target.
# ------------------------------------------------------------------------------
def batch_shapes(rows: int, input_length: int, target_length: int, sharding,
                 per_input: bool = False) -> dict:
  """A packed training batch, or a per-input one (per_input_batches.FEATURES), as
  ShapeDtypeStructs with `sharding`."""
  shape = lambda length, dtype=jnp.int32: jax.ShapeDtypeStruct((rows, length), dtype,
                                                               sharding=sharding)
  if per_input:
    return {name: shape(input_length) if name.startswith("encoder") else
            shape(target_length, jnp.float32 if name == "decoder_loss_scales" else jnp.int32)
            for name in per_input_batches.FEATURES}
  return {**{name: shape(input_length) for name in ENCODER_FEATURES},
          **{name: shape(target_length) for name in DECODER_FEATURES}}


def compile_steps(shape: RunShape, devices: list, steps=STEPS) -> list[StepReport]:
  """Lowers and compiles `steps` of the run `shape` describes on a mesh over `devices`."""
  try:
    partitioner = partitioning.make_partitioner(shape.parallelism, shape.mesh_shape,
                                                devices=devices)
    optimizer, learning_rate_fn = trainer_lib.make_optimizer(total_steps=shape.train_steps)
    trainer = trainer_lib.Trainer(shape.config, partitioner, optimizer, learning_rate_fn,
                                  num_microbatches=shape.num_microbatches)
    partitioner.check_batch_size(shape.batch_size, shape.num_microbatches)
    partitioner.check_batch_size(shape.eval_batch_size)
  except ValueError as error:
    raise CompileError(str(error)) from error
  chips = len(devices)
  reports = []
  for step in steps:
    start = time.time()
    if step in ("train", "eval"):
      rows = shape.batch_size if step == "train" else shape.eval_batch_size
      batch = batch_shapes(rows, shape.input_length, shape.target_length,
                            partitioner.batch_sharding, shape.per_input and step == "train")
      forward = flops.forward_flops(shape.config, rows, shape.input_length, shape.target_length)
      model_flops = (3 * forward if step == "train" else forward) / chips
      lowered = (trainer.lower_train_step(batch) if step == "train"
                 else trainer.lower_eval_step(batch))
    else:
      tokens = jax.ShapeDtypeStruct((shape.eval_batch_size, shape.input_length), "int32",
                                    sharding=partitioner.batch_sharding)
      lowered = encoder_decoder.predict_batch.lower(
          trainer.abstract_state().params, shape.config, tokens, shape.decode_length)
      model_flops = 0.0
    reports.append(analyze(step, lowered, time.time() - start, model_flops, chips))
  return reports


# ------------------------------------------------------------------------------
# Knobs that might make a train step fit, each tried by compiling.
# ------------------------------------------------------------------------------
def knob_variants(shape: RunShape, target: targets.Target) -> list[tuple[str, dict, Optional[str]]]:
  """(what changes, {the macro it replaces: the binding that changes it}, the other target it
  needs or None), most local first; `shape`'s mesh resolved for `target`. Configurables are
  bound rather than macros, so the change holds whatever gin files the run has; a flag that
  binds the macro is dropped (gin refuses a macro that nothing uses any more)."""
  variants = []
  # The most microbatches (up to 8x today's) that split each data-parallel share evenly.
  data_size = max(shape.mesh_shape[0], 1)
  counts = [shape.num_microbatches * factor for factor in (8, 4, 2)
            if shape.batch_size % (data_size * shape.num_microbatches * factor) == 0]
  if counts:
    variants.append((f"NUM_MICROBATCHES={counts[0]}",
                     {"NUM_MICROBATCHES": f"Trainer.num_microbatches = {counts[0]}"}, None))
  if shape.config.remat_policy != "full":
    variants.append(("REMAT_POLICY='full'", {"REMAT_POLICY": "T5Config.remat_policy = 'full'"},
                     None))
  if shape.parallelism != "fsdp":
    variants.append(("PARALLELISM='fsdp'",
                     {"PARALLELISM": "make_partitioner.parallelism = 'fsdp'"}, None))
  larger = larger_slice(target)
  if larger is not None:  # the same model axis, the data axis grown to the larger slice
    variants.append((f"--topology={larger}", {
        "MESH_SHAPE": f"make_partitioner.mesh_shape = (-1, {shape.mesh_shape[1]})"}, larger))
  return variants


def larger_slice(target: targets.Target) -> Optional[str]:
  """The slice with twice the chips (its smallest axis doubled), or GPUs on twice the hosts;
  None for CPU devices."""
  if target.platform == "gpu":
    hosts, per_host = target.shape
    return f"{target.generation}:{2 * hosts}x{per_host}"
  if target.platform != "tpu":
    return None
  generation, dims = target.name.split(":")
  sizes = [int(d) for d in dims.split("x")]
  smallest = sizes.index(min(sizes))
  sizes[smallest] *= 2
  return f"{generation}:{'x'.join(map(str, sizes))}"


# ------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------
def gib(n: float) -> str:
  return f"{n / targets.GIB:.3g}"


def format_step(report: StepReport, sheet: Optional[targets.DataSheet], capacity: Optional[int],
                target: targets.Target) -> list[str]:
  chip = target.chip
  if report.out_of_memory:
    return [f"{report.step}: DOES NOT FIT: {report.out_of_memory} (compiled for "
            f"{report.compile_seconds:.1f}s)"]
  of = "" if capacity is None else f" of {gib(capacity)} GiB"
  fits = {None: "", True: "  fits", False: "  DOES NOT FIT"}[report.fits(capacity)]
  lines = [f"{report.step}: {gib(report.hbm_bytes)} GiB per {chip}{of}{fits}  "
           f"(arguments {gib(report.argument_bytes)}, outputs {gib(report.output_bytes)} less "
           f"{gib(report.alias_bytes)} aliased, temporaries {gib(report.temp_bytes)}, code "
           f"{gib(report.code_bytes)}); lowered in {report.lower_seconds:.1f}s, compiled in "
           f"{report.compile_seconds:.1f}s"]
  if report.collectives:
    lines.append("  collectives per step: " + ", ".join(
        f"{kind} {value['count']} x ({value['bytes'] / 2**20:.1f} MiB in all)"
        for kind, value in report.collectives.items()))
  else:
    lines.append(f"  collectives per step: none (nothing crosses {target.chips})")
  if report.xla_flops or report.xla_bytes_accessed:  # XLA's GPU compiler reports no costs
    lines.append(f"  compiler's count per {chip}: {report.xla_flops:.3g} FLOPs, "
                 f"{report.xla_bytes_accessed:.3g} bytes accessed (loop bodies counted once)")
  roofline = report.roofline(sheet)
  if roofline:
    bound = ("compute-bound" if roofline["bound"] == "compute" else
             f"{'HBM' if roofline['bound'] == 'memory' else 'interconnect'}-bound, so MFU <= "
             f"{roofline['best_mfu']:.0%}")
    times = roofline["times"]
    lines.append(f"  roofline: step >= {roofline['seconds'] * 1e3:.3g} ms, {bound} (compute "
                 f"{times['compute'] * 1e3:.3g} ms, HBM {times['memory'] * 1e3:.3g} ms, "
                 f"interconnect {times['interconnect'] * 1e3:.3g} ms per {chip}, at data-sheet "
                 "peaks)")
  return lines


def _with_resolved_mesh(shape: RunShape, num_devices: int) -> RunShape:
  try:
    mesh_shape = partitioning.resolve_mesh_shape(shape.mesh_shape, num_devices)
  except ValueError as error:
    raise CompileError(f"MESH_SHAPE: {error}") from error
  return dataclasses.replace(shape, mesh_shape=mesh_shape)


def _devices_for(target: targets.Target, capacity: Optional[int]):
  """(devices, data sheet or None, HBM per chip to fit in or None)."""
  devices = targets.target_devices(target)
  sheet = targets.data_sheet(devices[0].device_kind)
  if capacity is None and sheet is not None:
    capacity = sheet.hbm_bytes
  return devices, sheet, capacity


def compile_and_report(shape: RunShape, target: targets.Target, steps,
                       capacity: Optional[int] = None, print_fn=print) -> dict:
  """Compiles, prints the report, and returns it as JSON-ready values. `capacity`: the HBM
  per chip to fit in, instead of the data sheet's."""
  devices, sheet, capacity = _devices_for(target, capacity)
  shape = _with_resolved_mesh(shape, len(devices))
  hosts = len({getattr(d, "process_index", 0) for d in devices})
  sheet_name = sheet.name if sheet else devices[0].device_kind
  slices = f" in {target.num_slices} slices" if target.num_slices > 1 else ""
  print_fn(f"target {target.name}: {len(devices)} {sheet_name} {target.chips} on {hosts} "
           f"host(s){slices}; run: {shape.describe()}")
  reports = compile_steps(shape, devices, steps)
  for report in reports:
    for line in format_step(report, sheet, capacity, target):
      print_fn(line)
  return {"target": target.name, "device_kind": devices[0].device_kind,
          "chips": len(devices), "hosts": hosts, "run": shape.describe(),
          "steps": [report.to_json(sheet, capacity) for report in reports]}


# Set in the processes compile_in_a_process starts: they compile themselves.
IN_A_PROCESS_OF_ITS_OWN = "DSBS_COMPILE_IN_A_PROCESS_OF_ITS_OWN"
# Compiler crashes met here, each with what avoids it: (the platform, what it needs of the
# run, advice).
KNOWN_CRASHES = (
    ("tpu", lambda shape: shape.config.remat_policy == "full" and shape.config.emb_dim >= 1024,
     "libtpu 0.0.42.1's TPU compiler overflows its stack on T5 v1.1 large (at 128 rows), XL "
     "and XXL with REMAT_POLICY='full' (README, 'Known compiler failure'); use "
     "REMAT_POLICY='dots' (it compiled for XXL) or more NUM_MICROBATCHES"),
)


def compile_in_a_process(topology: str, flags: list, timeout_seconds: Optional[float] = None,
                         show_output: bool = False) -> tuple[Optional[dict], str]:
  """Runs `dsbs compile --topology=... FLAGS --json=...` in a process of its own, so that a
  compiler crash ends only that process: (its JSON report, "") or (None, what stopped it).
  show_output: its report lines go to this process's output as they come (its error
  output, a crash's trace included, is kept back either way)."""
  with tempfile.TemporaryDirectory() as scratch:
    report_path = os.path.join(scratch, "report.jsonl")
    command = [sys.executable, "-m", "dsbs_jax.cli", "compile", f"--topology={topology}",
               f"--json={report_path}", *flags]
    with open(os.path.join(scratch, "stderr"), "w+", encoding="utf-8") as errors:
      try:
        result = subprocess.run(command, stdout=None if show_output else subprocess.PIPE,
                                stderr=errors, text=True, check=False, timeout=timeout_seconds,
                                env=dict(os.environ, **{IN_A_PROCESS_OF_ITS_OWN: "1"}))
      except subprocess.TimeoutExpired:
        return None, f"still compiling after {timeout_seconds / 60:.0f} min"
      errors.seek(0)
      error_lines = errors.read().strip().splitlines()
    if os.path.exists(report_path):
      with open(report_path, encoding="utf-8") as f:
        return json.loads(f.read()), ""
  if result.returncode < 0:
    return None, f"the compiler crashed ({signal.Signals(-result.returncode).name})"
  lines = error_lines or (result.stdout or "").strip().splitlines()
  return None, lines[-1] if lines else f"exit {result.returncode}"


def compile_apart(shape: RunShape, target: targets.Target, steps, run_flags: list) -> dict:
  """compile_and_report's report of `steps` (no knobs), compiled by `dsbs compile` in a
  process of its own, its lines shown as they come; a crash of the compiler is a
  CompileError naming the target and the known way around it, if any."""
  result, error = compile_in_a_process(
      target.name, ["--steps", ",".join(steps), "--no_knobs", *run_flags], show_output=True)
  if result is not None:
    return result
  advice = next((advice for platform, applies, advice in KNOWN_CRASHES
                 if platform == target.platform and applies(shape)), None)
  where = f"compiling the {'/'.join(steps)} step(s) for {target.name}"
  if error.startswith("the compiler crashed"):
    raise CompileError(f"{error} {where}; " + (f"known: {advice}" if advice else
                       "no workaround is known: try another REMAT_POLICY, PARALLELISM or "
                       "MESH_SHAPE"))
  # The process's own one-line error, already naming what it refused.
  raise CompileError(error.removeprefix("dsbs compile: error: "))


def try_knobs_until_fit(shape: RunShape, target: targets.Target, run_flags: list,
                        print_fn) -> list[dict]:
  """Compiles the train step once per knob variant, each in a process of its own (`dsbs
  compile` with `run_flags`, the run's gin flags, and the knob's bindings), so that a
  compiler crash ends only that try; reports which ones fit."""
  print_fn("the train step does not fit; trying one change at a time:")
  tried = []
  for change, bindings, other_target in knob_variants(shape, target):
    kept_flags = [flag for flag in run_flags
                  if not any(flag.startswith(f"--gin.{macro}=") for macro in bindings)]
    result, error = compile_in_a_process(
        other_target or target.name,
        ["--steps", "train", "--no_knobs", *kept_flags,
         *(f"--gin.{binding.replace(' = ', '=', 1)}" for binding in bindings.values())])
    if result is None:
      print_fn(f"  {change}: cannot compile: {error}")
      tried.append({"change": change, "error": error})
      continue
    report = result["steps"][0]
    needs = (f"over {gib(report['hbm_bytes'])} GiB per {target.chip} (the TPU compiler "
             "refused it)" if report["out_of_memory"] else
             f"{gib(report['hbm_bytes'])} GiB per {target.chip}")
    print_fn(f"  {change}: {needs}, {'fits' if report['fits'] else 'does not fit'} "
             f"(compiled in {report['compile_seconds']:.0f}s)")
    tried.append({"change": change, "hbm_bytes": report["hbm_bytes"], "fits": report["fits"],
                  "roofline": report["roofline"]})
  return tried


def _include_path(name: str, search_paths) -> str:
  """A --gin_file as an include that resolves from anywhere: its absolute path where it is
  a local file (here or in a search path), else as given (gin's folder, a URL)."""
  if storage.is_url(name):
    return name
  for folder in ("", *search_paths):
    candidate = os.path.join(folder, name)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  return name


def fitting_gin(result: dict, shape: RunShape, target: targets.Target, gin_files: list,
                bindings: list, search_paths=()) -> Optional[str]:
  """A gin file for `dsbs train --gin_file=...` that runs what this report found to fit:
  the run's gin files and --gin bindings, plus the first knob that fit, if the run did not;
  None when neither fit."""
  train = next((step for step in result["steps"] if step["step"] == "train"), None)
  if train is None:
    raise CompileError("--write_gin needs the train step (--steps train)")
  knob_bindings, header = [], f"fits on {target.name} as compiled"
  if train["fits"] is False:
    fitting = [knob["change"] for knob in result.get("knobs", []) if knob.get("fits")]
    if not fitting:
      return None
    variants = {change: (knob, other) for change, knob, other in knob_variants(shape, target)}
    knob, other_target = variants[fitting[0]]
    knob_bindings = list(knob.values())
    header = (f"does not fit on {target.name}; with {fitting[0]} it fits"
              + (f" (compiled for {other_target})" if other_target else ""))
  lines = [f"# Written by dsbs compile: the run {header}. Train it with",
           "#   dsbs train --gin_file=<this file>",
           *(f"include '{_include_path(name, search_paths)}'" for name in gin_files),
           *bindings, *knob_bindings]
  return "\n".join(lines) + "\n"


def run(args) -> int:
  storage.check(write=[args.json, args.write_gin])
  target = targets.parse_target(args.topology)
  if target.platform == "cpu":
    try:
      jax.config.update("jax_num_cpu_devices", target.num_devices)
    except RuntimeError:  # JAX already started: its CPU devices must do (target_devices checks)
      pass
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
  shape = run_shape_from_gin(target.platform)
  capacity = None if args.hbm_gib is None else int(args.hbm_gib * targets.GIB)
  run_flags = [*(f"--gin_file={name}" for name in args.gin_file),
               *(f"--gin_search_path={path}" for path in args.gin_search_path),
               *(f"--gin.{binding.replace(' = ', '=', 1)}" for binding in args.gin_bindings),
               *([f"--hbm_gib={args.hbm_gib}"] if args.hbm_gib is not None else [])]
  print_fn = lambda *a: print(*a, flush=True)
  if target.platform != "cpu" and not os.environ.get(IN_A_PROCESS_OF_ITS_OWN):
    # An accelerator's compiler can crash the process it runs in; the report is compiled apart.
    result = compile_apart(shape, target, args.steps, run_flags)
  else:
    result = compile_and_report(shape, target, args.steps, capacity, print_fn)
  resolved = _with_resolved_mesh(shape, target.num_devices)
  train_report = next((step for step in result["steps"] if step["step"] == "train"), None)
  if train_report is not None and train_report["fits"] is False and not args.no_knobs:
    result["knobs"] = try_knobs_until_fit(resolved, target, run_flags, print_fn)
  if args.json:
    with storage.Appender(args.json) as report:
      report.write(json.dumps(result) + "\n")
  if args.write_gin:
    text = fitting_gin(result, resolved, target, args.gin_file, args.gin_bindings,
                       args.gin_search_path)
    if text is None:
      print_fn(f"nothing tried fits: {args.write_gin} not written")
    else:
      storage.write_atomically(args.write_gin, text.encode("utf-8"))
      print_fn(f"wrote {args.write_gin}: dsbs train --gin_file={args.write_gin} runs it")
  return 1 if any(step["fits"] is False for step in result["steps"]) else 0
