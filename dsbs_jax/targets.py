"""The hardware a run can be compiled for without having it, and the chips' data sheets.

A target is named as `dsbs compile --topology` takes it: a TPU slice in libtpu's
`<generation>:<chips per axis>` form (`v5e:2x4`, `v5p:4x4x4`, `v4:2x2x4`, `v6e:4x4`), N such
slices joined over the data-center network as `<N>x<slice>` (`2xv5e:16x16`, multislice),
NVIDIA GPUs as `<gpu>:<GPUs per host>` or `<gpu>:<hosts>x<GPUs per host>` (`h100:8`,
`h200:2x8`, `a100:8`), or `cpu:N`, N simulated CPU devices. `target_devices` returns the
devices a mesh is built on: for a TPU from libtpu's description of the topology, for GPUs
from the CUDA plugin's, given a target configuration written here from NVIDIA's data sheets
(`gpu_target_config`); every host's devices, with their process indices, so that
`jit(...).lower(...).compile()` runs the TPU or GPU compiler for hardware that is not there.
The data sheets give each chip's HBM, peak dense bfloat16 FLOP/s and HBM bandwidth as the
vendors publish them (Google Cloud TPU and NVIDIA documentation): capacity to check a fit
against and peaks for a roofline, not measurements.

This module must not build models, meshes or steps.
"""
import dataclasses
import math
import re
from typing import Optional

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class DataSheet:
  name: str  # as people call the chip
  hbm_bytes: int
  peak_flops: float  # dense bfloat16, per chip
  hbm_bytes_per_second: float
  # What one chip can send at once over all its links to the others of its slice or host
  # (TPU ICI, NVIDIA NVLink: half the bidirectional figure), and over the data-center
  # network to other slices (None where the vendor gives no per-chip figure).
  interconnect_bytes_per_second: Optional[float] = None
  network_bytes_per_second: Optional[float] = None


# Keyed by JAX's device_kind: v5e chips report "TPU v5 lite", v6e "TPU v6 lite", v5p "TPU v5p"
# (and "TPU v5" in libtpu's topology descriptions). Interconnect: v5e 400 GB/s, v5p 1,200 and
# v6e 800 bidirectional ICI per chip; v4 from its pod's all-reduce bandwidth (1.1 PB/s over
# 4,096 chips), as v5e's and v6e's pod figures give half their per-chip ones; NVLink 900 GB/s
# (H100, H200) and 600 (A100) both ways. Network: v5p 50 Gbit/s per chip, v5e 2 x 100 Gbit/s
# per host of 8 chips.
_V5P = DataSheet("TPU v5p", 95 * GIB, 459e12, 2765e9, 600e9, 50e9 / 8)
DATA_SHEETS = {
    "TPU v4": DataSheet("TPU v4", 32 * GIB, 275e12, 1228e9, 1.1e15 / 4096),
    "TPU v5 lite": DataSheet("TPU v5e", 16 * GIB, 197e12, 819e9, 200e9, 200e9 / 8 / 8),
    "TPU v5": _V5P,  # as libtpu's topologies say
    "TPU v5p": _V5P,
    "TPU v6 lite": DataSheet("TPU v6e", 32 * GIB, 918e12, 1640e9, 400e9),
    "NVIDIA H100 80GB HBM3": DataSheet("NVIDIA H100 SXM", 80 * 10 ** 9, 989e12, 3350e9, 450e9),
    "NVIDIA H200": DataSheet("NVIDIA H200", 141 * 10 ** 9, 989e12, 4800e9, 450e9),
    "NVIDIA A100-SXM4-80GB": DataSheet("NVIDIA A100 80GB", 80 * 10 ** 9, 312e12, 2039e9, 300e9),
    "NVIDIA A100-SXM4-40GB": DataSheet("NVIDIA A100 40GB", 40 * 10 ** 9, 312e12, 1555e9, 300e9),
}
# The generations `--topology` names, and the device_kind each one's chips report.
TPU_GENERATIONS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
# Generations whose chips are two devices each (no megacore mode): meshes and the per-chip
# figures here assume a device per chip.
TWO_DEVICES_PER_CHIP = ("v2", "v3")
# Slices of up to this many chips of these generations are one host of that many chips on
# Cloud TPU (v5litepod-8, v6e-8); larger ones are hosts of 4 (libtpu's default for all).
SINGLE_HOST_CHIPS = {"v5e": 8, "v6e": 8}
_TOPOLOGY = re.compile(
    r"^(?:(?P<slices>\d+)x)?(?P<generation>v\d+[a-z]*):(?P<shape>\d+(x\d+){1,2})$")
_CPU = re.compile(r"^cpu:(?P<count>\d+)$")
_GPU = re.compile(r"^(?P<gpu>[a-z]\d+(?:-\d+gb)?):(?:(?P<hosts>\d+)x)?(?P<per_host>\d+)$")
# The most GPUs a host joins by NVLink (an HGX / DGX board).
MAX_GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class GpuArchitecture:
  """What XLA's GPU compiler needs to know of a GPU it cannot query (its target
  configuration), from NVIDIA's data sheets and the CUDA programming guide's tables."""
  device_kind: str  # as the driver names the GPU (the DATA_SHEETS key)
  compute_capability: tuple
  multiprocessors: int
  boost_clock_ghz: float
  l2_cache_bytes: int
  shared_memory_per_multiprocessor: int
  shared_memory_per_block_optin: int
  fp32_cores_per_multiprocessor: int


KIB, MIB = 1024, 1024 ** 2
_HOPPER = dict(compute_capability=(9, 0), multiprocessors=132, boost_clock_ghz=1.98,
               l2_cache_bytes=50 * MIB, shared_memory_per_multiprocessor=228 * KIB,
               shared_memory_per_block_optin=227 * KIB, fp32_cores_per_multiprocessor=128)
_AMPERE = dict(compute_capability=(8, 0), multiprocessors=108, boost_clock_ghz=1.41,
               l2_cache_bytes=40 * MIB, shared_memory_per_multiprocessor=164 * KIB,
               shared_memory_per_block_optin=163 * KIB, fp32_cores_per_multiprocessor=64)
# The GPUs `--topology` names: H100 and H200 SXM (Hopper), A100 SXM4 80 GB and 40 GB (Ampere).
GPUS = {
    "h100": GpuArchitecture("NVIDIA H100 80GB HBM3", **_HOPPER),
    "h200": GpuArchitecture("NVIDIA H200", **_HOPPER),
    "a100": GpuArchitecture("NVIDIA A100-SXM4-80GB", **_AMPERE),
    "a100-40gb": GpuArchitecture("NVIDIA A100-SXM4-40GB", **_AMPERE),
}


class TargetError(ValueError):
  """A --topology that names no target this machine can compile for."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given, e.g. 'v5p:4x4x4'
  platform: str  # 'tpu', 'gpu' or 'cpu'
  num_devices: int
  generation: Optional[str] = None  # TPU: e.g. 'v5p'; GPU: a GPUS key, e.g. 'h100'
  shape: tuple = ()  # TPU: chips per axis of one slice; GPU: (hosts, GPUs per host)
  num_slices: int = 1  # TPU: slices joined over the data-center network

  @property
  def chip(self) -> str:
    """What one device of the target is called in a report: chip, GPU or device."""
    return {"tpu": "chip", "gpu": "GPU"}.get(self.platform, "device")

  @property
  def chips(self) -> str:
    return f"{self.chip}s"

  @property
  def slice_name(self) -> str:
    """One slice, as libtpu names it (the name without the slice count)."""
    return self.name.split("x", 1)[1] if self.num_slices > 1 else self.name

  def libtpu_options(self) -> dict:
    """How Cloud TPU runs this slice, for libtpu's description of it: v4 as one device per
    chip (megacore: its two TensorCores as one, which libtpu describes only when asked),
    and small v5e / v6e slices on one host of all their chips."""
    options = {"num_slices": self.num_slices} if self.num_slices > 1 else {}
    if self.generation == "v4":
      options["chip_config_name"] = "megacore"
    if self.num_devices // self.num_slices <= SINGLE_HOST_CHIPS.get(self.generation, 0):
      options["chips_per_host_bounds"] = (*self.shape, 1)[:3]
    return options


def parse_target(name: str) -> Target:
  """The target `--topology=name` means; TargetError naming the forms otherwise."""
  name = name.strip()
  if match := _CPU.match(name):
    count = int(match["count"])
    if count < 1:
      raise TargetError(f"--topology={name}: a CPU target needs at least one device")
    return Target(name, "cpu", count)
  if match := _TOPOLOGY.match(name):
    generation = match["generation"]
    if generation in TWO_DEVICES_PER_CHIP:
      raise TargetError(f"--topology={name}: TPU {generation} shows each chip as two devices "
                        "(it has no megacore mode), which dsbs's meshes and per-chip figures "
                        "do not model; compile for v4 or later")
    if generation not in TPU_GENERATIONS:
      raise TargetError(f"--topology={name}: unknown TPU generation {generation!r}; "
                        f"known: {', '.join(TPU_GENERATIONS)}")
    shape = tuple(int(size) for size in match["shape"].split("x"))
    slices = int(match["slices"] or 1)
    if slices < 1:
      raise TargetError(f"--topology={name}: a multislice target needs at least one slice")
    return Target(name, "tpu", math.prod(shape) * slices, generation, shape, slices)
  if (match := _GPU.match(name)) and match["gpu"] in GPUS:
    hosts, per_host = int(match["hosts"] or 1), int(match["per_host"])
    if not 1 <= per_host <= MAX_GPUS_PER_HOST or hosts < 1:
      raise TargetError(f"--topology={name}: expected 1 to {MAX_GPUS_PER_HOST} GPUs per host "
                        "and at least one host")
    return Target(name, "gpu", hosts * per_host, match["gpu"], (hosts, per_host))
  raise TargetError(f"--topology={name}: expected a TPU slice as <generation>:<chips per axis> "
                    f"(e.g. v5e:2x4, v5p:4x4x4, v4:2x2x4, v6e:4x4; generations "
                    f"{', '.join(TPU_GENERATIONS)}), N slices of one as <N>x<slice> "
                    f"(2xv5e:16x16), GPUs as <gpu>:<per host> or <gpu>:<hosts>x<per host> "
                    f"(h100:8, h200:2x8; GPUs {', '.join(GPUS)}), or cpu:N")


def gpu_target_config(generation: str) -> str:
  """XLA's GPU target configuration (GpuTargetConfigProto, text form) of one GPU of
  `generation`, for the CUDA plugin to compile for it without it."""
  gpu, sheet = GPUS[generation], DATA_SHEETS[GPUS[generation].device_kind]
  major, minor = gpu.compute_capability
  fields = {
      "threads_per_block_limit": 1024, "threads_per_warp": 32,
      "shared_memory_per_block": 48 * KIB,
      "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin,
      "shared_memory_per_core": gpu.shared_memory_per_multiprocessor,
      "threads_per_core_limit": 2048, "core_count": gpu.multiprocessors,
      "fpus_per_core": gpu.fp32_cores_per_multiprocessor,
      "block_dim_limit_x": 2 ** 31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
      "memory_bandwidth": int(sheet.hbm_bytes_per_second), "l2_cache_size": gpu.l2_cache_bytes,
      "clock_rate_ghz": gpu.boost_clock_ghz, "device_memory_size": sheet.hbm_bytes,
      "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
  }
  info = "\n".join(f"  {key}: {value}" for key, value in fields.items())
  return (f"gpu_device_info {{\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n"
          f"{info}\n}}\nplatform_name: \"CUDA\"\ndnn_version_info {{ major: 9 }}\n"
          f"device_description_str: \"{gpu.device_kind}\"\n")


def target_devices(target: Target) -> list:
  """The devices of `target` to build a mesh on (TPU: every host's chips, without a TPU).

  A CPU target needs N CPU devices in this process: set them before JAX starts
  (`jax.config.update("jax_num_cpu_devices", N)`), as `dsbs compile` does.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if target.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < target.num_devices:
      raise TargetError(f"--topology={target.name}: this process has {len(devices)} CPU "
                        "device(s); set jax_num_cpu_devices before JAX starts")
    return devices[:target.num_devices]
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if target.platform == "gpu":
    from dsbs_jax import gpu_runtime  # pylint: disable=import-outside-toplevel
    gpu_runtime.load_for_compilation()
    hosts, per_host = target.shape
    description = topologies.get_topology_desc(
        platform="cuda", topology=f"1x{hosts}x{per_host}",
        target_config=gpu_target_config(target.generation))
    return list(description.devices)
  from dsbs_jax import tpu_runtime  # pylint: disable=import-outside-toplevel
  tpu_runtime.load_for_compilation()
  try:
    description = topologies.get_topology_desc(topology_name=target.slice_name, platform="tpu",
                                               **target.libtpu_options())
  except Exception as error:  # libtpu's refusal of a shape it does not know
    raise TargetError(f"--topology={target.name}: libtpu cannot describe this slice "
                      f"({str(error).splitlines()[0]})") from error
  return list(description.devices)


def data_sheet(device_kind: str) -> Optional[DataSheet]:
  return DATA_SHEETS.get(device_kind)
