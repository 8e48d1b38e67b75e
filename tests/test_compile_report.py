"""`dsbs compile`: the run's real steps compiled for a multi-host TPU slice that is not here
(libtpu's topology of v5p:2x2x2, 8 chips on 2 hosts) and for CPU devices; what the report
says checked against what the project computes itself."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbs_jax import cli
from dsbs_jax import compile_report
from dsbs_jax import flops
from dsbs_jax import gin_utils
from dsbs_jax import partitioning
from dsbs_jax import targets
from dsbs_jax import trainer as trainer_lib
from dsbs_jax.models import t5

# Dimensions that are whole TPU tiles (multiples of 128 on the minor axis), so that the
# compiler's per-chip bytes can be compared with unpadded shard sizes.
TILED_TINY = dict(vocab_size=256, emb_dim=128, num_heads=2, head_dim=64, mlp_dim=256,
                  num_encoder_layers=2, num_decoder_layers=2, mlp_activations=("gelu", "linear"),
                  dropout_rate=0.0, dtype="bfloat16")
TOPOLOGY = "v5p:2x2x2"


def run_shape(parallelism, mesh_shape, **changes):
  config = compile_report.for_platform(t5.T5Config(**TILED_TINY), "tpu")
  values = dict(config=config, batch_size=16, input_length=128, target_length=128,
                eval_batch_size=16, decode_length=8, parallelism=parallelism,
                mesh_shape=mesh_shape, num_microbatches=1, train_steps=10)
  values.update(changes)
  return compile_report.RunShape(**values)


@pytest.fixture(scope="module")
def tpu_devices():
  return targets.target_devices(targets.parse_target(TOPOLOGY))


def shard_bytes(abstract_tree) -> int:
  """Bytes one device holds of arrays with shardings (ShapeDtypeStructs)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(abstract_tree))


def padded_shard_bytes(abstract_tree) -> int:
  """At most what the shards take in TPU layouts: the minor dimension in tiles of 128, the
  one before it in tiles of 8 (32-bit) or 16 (16-bit), vectors and scalars in 512 bytes."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = list(leaf.sharding.shard_shape(leaf.shape))
    itemsize = leaf.dtype.itemsize
    if len(shape) < 2:
      total += math.ceil(math.prod(shape) * itemsize / 512) * 512
      continue
    sublanes = 32 // itemsize
    shape[-1] = math.ceil(shape[-1] / 128) * 128
    shape[-2] = math.ceil(shape[-2] / sublanes) * sublanes
    total += math.prod(shape) * itemsize
  return total


def test_the_topology_has_every_hosts_chips(tpu_devices):
  assert len(tpu_devices) == 8
  assert {device.process_index for device in tpu_devices} == {0, 1}
  assert targets.data_sheet(tpu_devices[0].device_kind).name == "TPU v5p"


@pytest.mark.slow
@pytest.mark.parametrize("parallelism, mesh_shape", [("fsdp", (4, 2)), ("tensor", (4, 2)),
                                                     ("data", (8, 1))])
def test_train_step_compiles_for_a_multi_host_slice_with_the_state_it_shards(
    tpu_devices, parallelism, mesh_shape):
  shape = run_shape(parallelism, mesh_shape)
  report, = compile_report.compile_steps(shape, tpu_devices, ("train",))
  partitioner = partitioning.make_partitioner(parallelism, mesh_shape, devices=tpu_devices)
  optimizer, _ = trainer_lib.make_optimizer(total_steps=10)
  state = trainer_lib.Trainer(shape.config, partitioner, optimizer).abstract_state()
  batch = compile_report.batch_shapes(16, 128, 128, partitioner.batch_sharding)
  for unused in ("encoder_positions", "decoder_positions"):  # jit drops what T5 ignores
    del batch[unused]
  # The compiler's arguments are this chip's shards of the state and the batch, as laid out
  # in TPU tiles (which pad the many small arrays: norms' scales, Adafactor's statistics).
  assert shard_bytes((state, batch)) <= report.argument_bytes <= padded_shard_bytes(
      (state, batch)) + 512
  # The new state is written over the old one.
  assert report.alias_bytes >= shard_bytes(state)
  full_params = shard_bytes(jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=partitioner.sharding()),
      state.params))
  if parallelism == "data":  # parameters whole on every chip, gradients summed over all
    assert shard_bytes(state.params) == full_params
    assert report.collectives["all-reduce"]["count"] >= 1
    assert "all-gather" not in report.collectives
  else:  # parameters split, and gathered for use
    assert shard_bytes(state.params) < full_params / 1.9
    assert report.collectives["all-gather"]["count"] >= 1
  assert report.model_flops == flops.train_step_flops(shape.config, 16, 128, 128) / 8


@pytest.mark.slow
def test_train_step_compiles_for_tpu_v4_one_device_a_chip():
  """v4 as Cloud TPU runs it (megacore): 8 devices on v4:2x2x2, which mesh as 8 chips."""
  devices = targets.target_devices(targets.parse_target("v4:2x2x2"))
  assert targets.data_sheet(devices[0].device_kind).name == "TPU v4"
  report, = compile_report.compile_steps(run_shape("fsdp", (4, 2)), devices, ("train",))
  assert report.fits(targets.data_sheet(devices[0].device_kind).hbm_bytes)
  assert report.collectives["all-gather"]["count"] >= 1


@pytest.mark.slow
def test_a_run_over_two_slices_crosses_them_only_for_data_parallelism():
  target = targets.parse_target("2xv5e:2x2")
  assert (target.num_devices, target.num_slices, target.slice_name) == (8, 2, "v5e:2x2")
  devices = targets.target_devices(target)
  partitioner = partitioning.make_partitioner("fsdp", (4, 2), devices=devices)
  slices = np.vectorize(lambda device: device.slice_index)(partitioner.mesh.devices)
  # 'data' runs across the slices (outermost), 'model' within one.
  assert slices.tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
  report, = compile_report.compile_steps(run_shape("fsdp", (4, 2)), devices, ("train",))
  across = {kind for kind in report.collectives if kind.endswith(" across slices")}
  within = set(report.collectives) - across
  assert "all-reduce across slices" in across and "all-gather" in within
  with pytest.raises(ValueError, match=r"data axis \(1\) must divide over the 2 slices"):
    partitioning.make_partitioner("tensor", (1, 8), devices=devices)


@pytest.mark.slow
def test_decode_step_compiles_for_a_multi_host_slice(tpu_devices):
  shape = run_shape("fsdp", (4, 2))
  report, = compile_report.compile_steps(shape, tpu_devices, ("decode",))
  params = trainer_lib.Trainer(
      shape.config, partitioning.make_partitioner("fsdp", (4, 2), devices=tpu_devices),
      trainer_lib.make_optimizer()[0]).abstract_state().params
  tokens = jax.ShapeDtypeStruct((16, 128), jnp.int32, sharding=jax.sharding.NamedSharding(
      partitioning.make_mesh((4, 2), tpu_devices), jax.sharding.PartitionSpec("data")))
  assert shard_bytes((params, tokens)) <= report.argument_bytes <= padded_shard_bytes(
      (params, tokens))
  assert report.hbm_bytes > report.argument_bytes


def test_the_command_reports_and_tries_knobs_when_a_step_does_not_fit(tmp_path, capfd):
  out = tmp_path / "report.jsonl"
  code = cli.main(["compile", "--topology=cpu:8", "--gin_file=quickstart.gin", "--steps", "train",
                   "--hbm_gib=0.0001", f"--json={out}", "--gin.T5Config.vocab_size=128",
                   "--gin.T5Config.emb_dim=32", "--gin.T5Config.mlp_dim=64",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}",
                   # Left to try: more microbatches (a CPU target has no larger slice).
                   "--gin.REMAT_POLICY='full'", "--gin.PARALLELISM='fsdp'"])
  printed = capfd.readouterr()
  assert code == 1
  assert "target cpu:8: 8 cpu devices on 1 host(s)" in printed.out
  assert "DOES NOT FIT" in printed.out
  tried = [line.split(":")[0].strip() for line in printed.out.splitlines()
           if line.startswith("  ") and "GiB per device" in line]
  # 32 rows over 8 devices: 4 microbatches of one row per device at most.
  assert tried == ["NUM_MICROBATCHES=4"]
  result = json.loads(out.read_text())
  train, = result["steps"]
  assert train["fits"] is False and train["hbm_capacity_bytes"] == int(0.0001 * targets.GIB)
  assert train["hbm_bytes"] == (train["argument_bytes"] + train["output_bytes"]
                                - train["alias_bytes"] + train["temp_bytes"] + train["code_bytes"])
  assert [knob["fits"] for knob in result["knobs"]] == [False]
  assert "TPU" not in printed.err and "E0000" not in printed.err


def test_write_gin_gives_dsbs_train_the_run_that_fits(tmp_path, capfd):
  fits = tmp_path / "fits.gin"
  flags = ["compile", "--topology=cpu:8", "--gin_file=quickstart.gin", "--steps", "train",
           "--gin.T5Config.emb_dim=32", "--gin.T5Config.mlp_dim=64",
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", f"--write_gin={fits}"]
  assert cli.main(flags) == 0
  assert f"wrote {fits}" in capfd.readouterr().out
  gin.clear_config()
  gin_utils.parse_gin([str(fits)], [])
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 32, "targets": 16}
  assert gin.query_parameter("T5Config.emb_dim") == 32
  gin.clear_config()
  # A run that fits nowhere writes nothing.
  fits.unlink()
  assert cli.main([*flags, "--hbm_gib=0.0001", "--no_knobs"]) == 1
  assert "nothing tried fits" in capfd.readouterr().out and not fits.exists()


def test_write_gin_adds_the_first_knob_that_fit():
  shape = run_shape("data", (4, 2), batch_size=64)
  result = {"steps": [{"step": "train", "fits": False}],
            "knobs": [{"change": "NUM_MICROBATCHES=8", "fits": False},
                      {"change": "REMAT_POLICY='full'", "fits": True},
                      {"change": "--topology=v5e:4x4", "fits": True}]}
  text = compile_report.fitting_gin(result, shape, targets.parse_target("v5e:2x4"),
                                    ["models/t5_1_1_base.gin"], ["BATCH_SIZE = 64"])
  assert text.splitlines()[2:] == ["include 'models/t5_1_1_base.gin'", "BATCH_SIZE = 64",
                                   "T5Config.remat_policy = 'full'"]
  assert "with REMAT_POLICY='full' it fits" in text


@pytest.mark.parametrize("topology, message", [
    ("v9:2x2", "unknown TPU generation 'v9'"), ("v5p", "expected a TPU slice"),
    ("cpu:64", "this process has 8 CPU device(s)")])  # the tests' (conftest.py)
def test_a_bad_topology_is_one_line(topology, message, capsys):
  assert cli.main(["compile", f"--topology={topology}", "--gin_file=quickstart.gin"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("dsbs compile: error: --topology=") and message in err
  assert len(err.splitlines()) == 1


def test_knobs_are_tried_most_local_first():
  shape = run_shape("data", (4, 2), batch_size=64)
  variants = compile_report.knob_variants(shape, targets.parse_target("v5e:2x4"))
  assert variants == [
      ("NUM_MICROBATCHES=8", {"NUM_MICROBATCHES": "Trainer.num_microbatches = 8"}, None),
      ("REMAT_POLICY='full'", {"REMAT_POLICY": "T5Config.remat_policy = 'full'"}, None),
      ("PARALLELISM='fsdp'", {"PARALLELISM": "make_partitioner.parallelism = 'fsdp'"}, None),
      ("--topology=v5e:4x4", {"MESH_SHAPE": "make_partitioner.mesh_shape = (-1, 2)"},
       "v5e:4x4")]
  # 12 rows over a data axis of 4: 3 rows each, which no microbatch count divides.
  odd = run_shape("fsdp", (4, 2), batch_size=12, config=dataclasses.replace(
      run_shape("fsdp", (4, 2)).config, remat_policy="full"))
  assert [change for change, _, _ in compile_report.knob_variants(
      odd, targets.parse_target("cpu:8"))] == []


def test_targets_parse_and_grow():
  assert targets.parse_target("v5p:4x4x4") == targets.Target("v5p:4x4x4", "tpu", 64, "v5p",
                                                             (4, 4, 4))
  assert targets.parse_target("cpu:8") == targets.Target("cpu:8", "cpu", 8)
  assert compile_report.larger_slice(targets.parse_target("v5e:2x4")) == "v5e:4x4"
  assert compile_report.larger_slice(targets.parse_target("v5p:2x2x1")) == "v5p:2x2x2"
  assert compile_report.larger_slice(targets.parse_target("cpu:8")) is None


# Cloud TPU's slices as Google Cloud documents them: (--topology, accelerator type, chips,
# hosts). v4 and v5p hosts hold 4 chips; v5e and v6e slices of up to 8 chips are one host.
CLOUD_SLICES = [
    ("v4:2x2x1", "v4-8", 4, 1), ("v4:2x2x2", "v4-16", 8, 2), ("v4:2x2x4", "v4-32", 16, 4),
    ("v4:4x4x4", "v4-128", 64, 16),
    ("v5p:2x2x1", "v5p-8", 4, 1), ("v5p:2x2x2", "v5p-16", 8, 2), ("v5p:4x4x4", "v5p-128", 64, 16),
    ("v5e:1x1", "v5litepod-1", 1, 1), ("v5e:2x2", "v5litepod-4", 4, 1),
    ("v5e:2x4", "v5litepod-8", 8, 1), ("v5e:4x4", "v5litepod-16", 16, 4),
    ("v5e:16x16", "v5litepod-256", 256, 64),
    ("v6e:2x2", "v6e-4", 4, 1), ("v6e:2x4", "v6e-8", 8, 1), ("v6e:4x4", "v6e-16", 16, 4),
    ("v6e:16x16", "v6e-256", 256, 64),
]


@pytest.mark.parametrize("topology,accelerator_type,chips,hosts", CLOUD_SLICES,
                         ids=[row[1] for row in CLOUD_SLICES])
def test_every_generation_has_clouds_chips_and_hosts(topology, accelerator_type, chips, hosts):
  devices = targets.target_devices(targets.parse_target(topology))
  assert len(devices) == chips, accelerator_type
  assert len({device.process_index for device in devices}) == hosts, accelerator_type


@pytest.mark.parametrize("topology", ["v3:2x2", "v2:4x4"])
def test_two_devices_a_chip_are_refused_in_one_line(topology):
  with pytest.raises(targets.TargetError, match="two devices .* compile for v4 or later"):
    targets.parse_target(topology)


def test_execution_left_to_the_backend_is_resolved_for_the_target(tiny_config):
  on_tpu = compile_report.for_platform(tiny_config, "tpu")
  on_cpu = compile_report.for_platform(tiny_config, "cpu")
  assert (on_tpu.scan_layers, on_tpu.dense_backward) == (True, "xla")
  assert (on_cpu.scan_layers, on_cpu.dense_backward) == (False, "materialized")
  chosen = dataclasses.replace(tiny_config, scan_layers=False, dense_backward="materialized")
  assert compile_report.for_platform(chosen, "tpu") == chosen


HLO_WITH_A_LOOP = """\
HloModule train_step

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], bf16[128,256])) -> (s32[], bf16[128,256]) {
  %ag = bf16[128,256]{1,0:T(8,128)(2,1)} all-gather(bf16[64,256]{1,0} %x), dimensions={0}
  %ar-start = f32[8]{0} all-reduce-start(f32[8]{0} %y), to_apply=%add
  %ar-done = f32[8]{0} all-reduce-done(f32[8]{0} %ar-start)
}

%cond (p: (s32[], bf16[128,256])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %w = (s32[], bf16[128,256]) while((s32[], bf16[128,256]) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %rs = (f32[256]{0}, f32[1024]{0}) reduce-scatter(f32[1024]{0} %a), to_apply=%add
  ROOT %cp = f32[1024]{0} collective-permute(f32[1024]{0} %a), source_target_pairs={{0,1}}
}
"""


def test_collectives_count_each_loop_iteration():
  # On 8 devices: the all-gather's and reduce-scatter's groups are all 8 (none named), the
  # all-reduce's are pairs; a ring sends (n-1)/n of an all-gather's result, twice that of an
  # all-reduce's, and n-1 results of a reduce-scatter's.
  hlo = HLO_WITH_A_LOOP.replace("to_apply=%add\n  %ar-done",
                                "to_apply=%add, replica_groups=[4,2]<=[8]\n  %ar-done")
  assert compile_report.collectives(hlo, num_devices=8) == {
      "all-gather": {"count": 12, "bytes": 12 * 128 * 256 * 2,
                     "sent_bytes": 12 * 128 * 256 * 2 * 7 // 8},
      "all-reduce": {"count": 12, "bytes": 12 * 8 * 4, "sent_bytes": 12 * 8 * 4},
      "reduce-scatter": {"count": 1, "bytes": 1024 * 4, "sent_bytes": 7 * 1024 * 4},
      "collective-permute": {"count": 1, "bytes": 1024 * 4, "sent_bytes": 1024 * 4}}


@pytest.mark.parametrize("line, size", [
    ("all-reduce(f32[8] %y), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add", 4),
    ("all-gather(f32[8] %y), replica_groups=[2,4]<=[8], dimensions={0}", 4),
    ("all-gather(f32[8] %y), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", 2),
    ("all-reduce(f32[8] %y), replica_groups={}, to_apply=%add", 16)])
def test_a_collectives_group_size_is_read_from_its_replica_groups(line, size):
  assert compile_report.group_size(line, 16) == size


def step_report(**changes):
  values = dict(step="train", argument_bytes=2 * 10 ** 9, output_bytes=10 ** 9,
                alias_bytes=10 ** 9, temp_bytes=5 * 10 ** 8, code_bytes=0, lower_seconds=1,
                compile_seconds=1, xla_flops=0, xla_bytes_accessed=0, collectives={},
                model_flops=1e11)
  return compile_report.StepReport(**{**values, **changes})


def test_roofline_is_the_slowest_of_compute_memory_and_interconnect():
  sheet = targets.DataSheet("chip", 16 * targets.GIB, 1e14, 1e12, 1e11, 1e10)
  report = step_report()
  assert report.hbm_bytes == 2.5 * 10 ** 9
  roofline = report.roofline(sheet)
  assert roofline["bound"] == "memory" and roofline["seconds"] == pytest.approx(3e-3)
  assert roofline["best_mfu"] == pytest.approx(1 / 3)  # 1 ms of products in a 3 ms step
  # 0.3 GB sent within the slice (3 ms at 100 GB/s) and 20 MB across slices (2 ms at 10 GB/s).
  chatty = step_report(collectives={
      "all-reduce": {"count": 2, "bytes": 2 * 10 ** 8, "sent_bytes": 3 * 10 ** 8},
      "all-reduce across slices": {"count": 1, "bytes": 10 ** 7, "sent_bytes": 2 * 10 ** 7}})
  roofline = chatty.roofline(sheet)
  assert roofline["bound"] == "interconnect" and roofline["seconds"] == pytest.approx(5e-3)
  assert roofline["best_mfu"] == pytest.approx(1 / 5)
  # A data sheet without interconnect figures bounds by compute and memory alone.
  assert chatty.roofline(targets.DataSheet("chip", 16 * targets.GIB, 1e14, 1e12))[
      "bound"] == "memory"


class RefusedByTheCompiler:
  """A lowered step whose compilation fails as libtpu's does when temporaries exceed HBM."""

  def compile(self):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (21.98G) exceeds available HBM (15.75G).")


def test_a_step_the_tpu_compiler_refuses_for_memory_does_not_fit():
  report = compile_report.analyze("train", RefusedByTheCompiler(), 1.0, 1e12)
  assert report.fits(None) is False and report.fits(100 * targets.GIB) is False
  assert report.temp_bytes == int(21.98 * targets.GIB)
  line, = compile_report.format_step(report, None, None, targets.parse_target("v5e:2x4"))
  assert "DOES NOT FIT" in line and "21.98 GiB, 15.75 GiB is available" in line
  assert report.to_json(None, None)["fits"] is False


def test_a_knob_whose_compilation_crashes_is_reported_and_the_others_still_tried(monkeypatch):
  import subprocess  # pylint: disable=import-outside-toplevel
  commands = []

  def crash(command, **kwargs):
    commands.append(command)
    return subprocess.CompletedProcess(command, -11, "", "*** SIGSEGV STACK OVERFLOW ***")

  monkeypatch.setattr(compile_report.subprocess, "run", crash)
  printed = []
  tried = compile_report.try_knobs_until_fit(
      run_shape("data", (4, 2), batch_size=64), targets.parse_target("v5e:2x4"),
      ["--gin_file=models/t5_1_1_xxl.gin", "--gin.MESH_SHAPE=(4, 2)"], printed.append)
  assert [knob["error"] for knob in tried] == ["the compiler crashed (SIGSEGV)"] * 4
  assert printed[1] == "  NUM_MICROBATCHES=8: cannot compile: the compiler crashed (SIGSEGV)"
  assert "--gin.Trainer.num_microbatches=8" in commands[0]
  assert "--topology=v5e:4x4" in commands[3] and "--gin_file=models/t5_1_1_xxl.gin" in commands[3]
  # The larger slice's mesh replaces the run's MESH_SHAPE, which the other tries keep.
  assert "--gin.MESH_SHAPE=(4, 2)" not in commands[3] and "--gin.MESH_SHAPE=(4, 2)" in commands[0]
  assert "--gin.make_partitioner.mesh_shape=(-1, 2)" in commands[3]


CRASHING_COMPILER = """\
import os, signal
if os.environ.get("DSBS_COMPILE_IN_A_PROCESS_OF_ITS_OWN"):
  import jax.stages
  jax.stages.Lowered.compile = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGSEGV)
"""


@pytest.mark.slow
def test_a_compiler_crash_is_one_line_naming_the_target(tmp_path):
  # A sitecustomize that makes every compile of the process compiling apart crash, as
  # libtpu's compiler does on its known bug.
  (tmp_path / "sitecustomize.py").write_text(CRASHING_COMPILER)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
      str(tmp_path), os.environ.get("PYTHONPATH")])))
  result = subprocess.run(
      [sys.executable, "-m", "dsbs_jax.cli", "compile", "--topology=v5e:2x2",
       "--gin_file=quickstart.gin", "--steps", "train"],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      "dsbs compile: error: the compiler crashed (SIGSEGV) compiling the train step(s) for "
      "v5e:2x2; no workaround is known: try another REMAT_POLICY, PARALLELISM or MESH_SHAPE"]


def test_a_known_crash_names_its_workaround(monkeypatch):
  monkeypatch.setattr(compile_report, "compile_in_a_process",
                      lambda *args, **kwargs: (None, "the compiler crashed (SIGSEGV)"))
  xxl = run_shape("fsdp", (16, 4), config=dataclasses.replace(
      run_shape("fsdp", (16, 4)).config, emb_dim=4096, remat_policy="full"))
  with pytest.raises(compile_report.CompileError,
                     match=r"for v5p:4x4x4; known: libtpu .* use REMAT_POLICY='dots'"):
    compile_report.compile_apart(xxl, targets.parse_target("v5p:4x4x4"), ("train",), [])


# NVIDIA GPUs, compiled for through JAX's CUDA plugin without a GPU (the test extra installs it).
def test_gpu_targets_parse_and_grow():
  assert targets.parse_target("h100:8") == targets.Target("h100:8", "gpu", 8, "h100", (1, 8))
  assert targets.parse_target("h200:2x8").num_devices == 16
  assert compile_report.larger_slice(targets.parse_target("a100:8")) == "a100:2x8"
  with pytest.raises(targets.TargetError, match="1 to 8 GPUs per host"):
    targets.parse_target("h100:16")
  with pytest.raises(targets.TargetError, match="GPUs h100, h200, a100, a100-40gb"):
    targets.parse_target("b300:8")


@pytest.mark.parametrize("gpu", sorted(targets.GPUS))
def test_every_gpu_is_described_as_its_driver_names_it(gpu):
  devices = targets.target_devices(targets.parse_target(f"{gpu}:2x4"))
  assert len(devices) == 8 and {device.process_index for device in devices} == {0, 1}
  sheet = targets.data_sheet(devices[0].device_kind)
  assert sheet is not None and sheet.name.lower().startswith(f"nvidia {gpu.split('-')[0]}")


def test_train_step_compiles_for_gpus_on_two_hosts_with_the_state_it_shards():
  devices = targets.target_devices(targets.parse_target("h100:2x4"))
  shape = run_shape("fsdp", (4, 2))
  report, = compile_report.compile_steps(shape, devices, ("train",))
  partitioner = partitioning.make_partitioner("fsdp", (4, 2), devices=devices)
  state = trainer_lib.Trainer(shape.config, partitioner,
                              trainer_lib.make_optimizer(total_steps=10)[0]).abstract_state()
  # GPU layouts do not pad: the arguments are this GPU's shards of the state and the batch
  # (less the positions, which jit drops as T5 ignores them, and a few scalars).
  batch = compile_report.batch_shapes(16, 128, 128, partitioner.batch_sharding)
  del batch["encoder_positions"], batch["decoder_positions"]
  assert report.argument_bytes == pytest.approx(shard_bytes((state, batch)), abs=512)
  assert report.alias_bytes == pytest.approx(shard_bytes(state), abs=512)
  assert report.collectives["all-gather"]["count"] >= 1
  sheet = targets.data_sheet(devices[0].device_kind)
  assert report.fits(sheet.hbm_bytes) and report.roofline(sheet)["seconds"] > 0


def test_the_command_compiles_for_gpus_apart_and_reports_per_gpu(capfd):
  assert cli.main(["compile", "--topology=h100:8", "--gin_file=quickstart.gin",
                   "--steps", "train"]) == 0
  printed = capfd.readouterr()
  lines = printed.out.splitlines()
  assert lines[0].startswith("target h100:8: 8 NVIDIA H100 SXM GPUs on 1 host(s); run: ")
  assert lines[1].startswith("train: ") and " GiB per GPU of 74.5 GiB  fits" in lines[1]
  assert any(line.startswith("  roofline: step >= ") for line in lines)
  # XLA's GPU compiler counts no FLOPs: the roofline's are the model's own (flops.py).
  assert not any("compiler's count" in line for line in lines)
  assert printed.err == ""
