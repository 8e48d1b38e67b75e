"""The hardware a run can be compiled for without having it, and the chips' data sheets.

A target is named as `dsbs compile --topology` takes it: a TPU slice in libtpu's
`<generation>:<chips per axis>` form (`v5e:2x4`, `v5p:4x4x4`, `v4:2x2x4`, `v6e:4x4`), N such
slices joined over the data-center network as `<N>x<slice>` (`2xv5e:16x16`, multislice),
or `cpu:N`, N simulated CPU devices. `target_devices` returns the devices a mesh is built on;
for a TPU they come from libtpu's description of the topology (every host's chips, with
their process indices), so `jit(...).lower(...).compile()` runs the TPU compiler for a slice
that is not there. The data sheets give each chip's HBM, peak dense bfloat16 FLOP/s and HBM
bandwidth as the vendors publish them (Google Cloud TPU and NVIDIA documentation): capacity
to check a fit against and peaks for a roofline, not measurements.

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


# Keyed by JAX's device_kind: v5e chips report "TPU v5 lite", v6e "TPU v6 lite", v5p "TPU v5p"
# (and "TPU v5" in libtpu's topology descriptions).
DATA_SHEETS = {
    "TPU v4": DataSheet("TPU v4", 32 * GIB, 275e12, 1228e9),
    "TPU v5 lite": DataSheet("TPU v5e", 16 * GIB, 197e12, 819e9),
    "TPU v5": DataSheet("TPU v5p", 95 * GIB, 459e12, 2765e9),  # as libtpu's topologies say
    "TPU v5p": DataSheet("TPU v5p", 95 * GIB, 459e12, 2765e9),
    "TPU v6 lite": DataSheet("TPU v6e", 32 * GIB, 918e12, 1640e9),
    "NVIDIA H100 80GB HBM3": DataSheet("NVIDIA H100 SXM", 80 * 10 ** 9, 989e12, 3350e9),
    "NVIDIA H200": DataSheet("NVIDIA H200", 141 * 10 ** 9, 989e12, 4800e9),
    "NVIDIA A100-SXM4-80GB": DataSheet("NVIDIA A100 80GB", 80 * 10 ** 9, 312e12, 2039e9),
    "NVIDIA A100-SXM4-40GB": DataSheet("NVIDIA A100 40GB", 40 * 10 ** 9, 312e12, 1555e9),
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


class TargetError(ValueError):
  """A --topology that names no target this machine can compile for."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given, e.g. 'v5p:4x4x4'
  platform: str  # 'tpu' or 'cpu'
  num_devices: int
  generation: Optional[str] = None  # TPU: e.g. 'v5p'
  shape: tuple = ()  # TPU: chips per axis of one slice
  num_slices: int = 1  # TPU: slices joined over the data-center network

  @property
  def chips(self) -> str:
    return "chips" if self.platform == "tpu" else "devices"

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
  raise TargetError(f"--topology={name}: expected a TPU slice as <generation>:<chips per axis> "
                    f"(e.g. v5e:2x4, v5p:4x4x4, v4:2x2x4, v6e:4x4; generations "
                    f"{', '.join(TPU_GENERATIONS)}), N slices of one as <N>x<slice> "
                    "(2xv5e:16x16), or cpu:N")


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
  from dsbs_jax import tpu_runtime  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
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
