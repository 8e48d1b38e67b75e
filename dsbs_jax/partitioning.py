"""How arrays are laid out over devices: the ('data', 'model') mesh, the logical-axis rules
for data parallelism, tensor parallelism and FSDP, and the shardings they give parameters,
optimizer state and batches.

This module holds tables and sharding helpers only; it must not build networks or
optimizers, nor run training steps.
"""
import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

LogicalRules = tuple[tuple[str, Optional[str]], ...]

# Logical names used by the network (models/layers.py) and where each parallelism puts them.
# Flax applies rules in order and uses a mesh axis at most once per array: under 'fsdp'
# an activation [batch, length, embed] keeps batch on 'data' and leaves embed unsharded,
# while a kernel [embed, mlp] puts embed on 'data' and mlp on 'model'.
# The leading axis of scanned layers' stacked parameters, 'layers', is never sharded: each
# step of the scan reads one layer of every parameter.
_ACTIVATION_RULES = (("batch", "data"), ("length", None), ("relpos_buckets", None))
_STACKED_LAYERS_RULES = (("layers", None),)
_MODEL_PARALLEL_NAMES = ("vocab", "mlp", "heads", "kv", "joined_kv")
LOGICAL_AXIS_RULES: dict[str, LogicalRules] = {
    "data": (_ACTIVATION_RULES + _STACKED_LAYERS_RULES
             + tuple((name, None) for name in _MODEL_PARALLEL_NAMES) + (("embed", None),)),
    "tensor": (_ACTIVATION_RULES + _STACKED_LAYERS_RULES
               + tuple((name, "model") for name in _MODEL_PARALLEL_NAMES) + (("embed", None),)),
    "fsdp": (_ACTIVATION_RULES + _STACKED_LAYERS_RULES
             + tuple((name, "model") for name in _MODEL_PARALLEL_NAMES) + (("embed", "data"),)),
}


def standard_logical_axis_rules(parallelism: str = "data") -> LogicalRules:
  """The rules of one parallelism.

  'data': batch over 'data', parameters replicated. 'tensor': also vocab, mlp, heads and
  kv over 'model'. 'fsdp': as 'tensor', plus embed over 'data', so that parameters and
  optimizer state are split over the data-parallel devices too.
  """
  if parallelism not in LOGICAL_AXIS_RULES:
    raise ValueError(f"unknown parallelism {parallelism!r}: expected one of "
                     f"{sorted(LOGICAL_AXIS_RULES)}")
  return LOGICAL_AXIS_RULES[parallelism]


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """(data, model) sizes; one of them may be -1, meaning all the devices left."""
  shape = tuple(int(size) for size in mesh_shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(
      size == 0 or size < -1 for size in shape):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)}: expected (data, model) sizes, "
                     "positive or one of them -1")
  known = math.prod(size for size in shape if size != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh_shape {shape}: {num_devices} devices do not divide by {known}")
    shape = tuple(num_devices // known if size == -1 else size for size in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh_shape {shape} needs {math.prod(shape)} devices, but "
                     f"{num_devices} are available")
  return shape


def make_mesh(mesh_shape: Sequence[int] = (-1, 1),
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: every device of every host).

  Over several TPU slices (multislice: devices with different `slice_index`), 'data' runs
  across the slices, outermost, and 'model' within each, so that only data parallelism
  (gradient reductions, FSDP's gathers) crosses the data-center network, as MaxText's
  hybrid meshes do.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  num_slices = len({getattr(device, "slice_index", 0) for device in devices})
  if num_slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  data, model = shape
  if data % num_slices:
    raise ValueError(f"mesh_shape {shape}: the data axis ({data}) must divide over the "
                     f"{num_slices} slices, which only data parallelism crosses")
  grid = mesh_utils.create_hybrid_device_mesh((data // num_slices, model), (num_slices, 1),
                                              devices)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _mesh_axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[name] for name in names)


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A mesh and the logical-axis rules that map the network's axis names onto it.

  Jitted code that applies the network must be traced under `jax.set_mesh(mesh)` and
  `nn.logical_axis_rules(rules)` for the activations' constraints to take effect.
  """
  mesh: Mesh
  rules: LogicalRules

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape["data"]

  def sharding(self, spec: PartitionSpec = PartitionSpec()) -> NamedSharding:
    """A sharding over the mesh; replicated by default."""
    return NamedSharding(self.mesh, spec)

  @property
  def batch_sharding(self) -> NamedSharding:
    """Every batch feature: dimension 0 over 'data', the rest whole."""
    return self.sharding(PartitionSpec("data"))

  def param_shardings(self, logical_specs, shapes) -> Any:
    """NamedShardings for a tree of parameters from their logical PartitionSpecs.

    `shapes` (arrays or ShapeDtypeStructs) are checked against the mesh: a dimension
    that does not divide by its mesh axes raises a ValueError naming the parameter.
    """
    mesh_specs = nn.logical_to_mesh(logical_specs, self.rules)

    def to_sharding(path, spec, shape_like):
      for size, axes in zip(shape_like.shape, spec):
        divisor = _mesh_axis_size(self.mesh, axes)
        if size % divisor:
          raise ValueError(
              f"parameter {jax.tree_util.keystr(path)} of shape {shape_like.shape}: "
              f"dimension {size} does not divide over mesh axes {axes} of size {divisor} "
              f"(mesh {dict(self.mesh.shape)}, spec {spec}); choose another mesh_shape "
              "or parallelism")
      return self.sharding(spec)

    return jax.tree_util.tree_map_with_path(
        to_sharding, mesh_specs, shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec))

  def opt_state_shardings(self, opt_state_shapes, param_shapes, param_shardings) -> Any:
    """NamedShardings for an optax state, mirroring the parameters it keeps copies of.

    Per-parameter state sits in trees whose paths hold the parameter's own path: after
    it in trainer.per_parameter's state (`encoder/.../kernel/0/mu`), before it in plain
    optax's (`mu/encoder/.../kernel`). A leaf found that way with the parameter's shape
    (Adam's moments, unfactored Adafactor statistics) takes the parameter's sharding,
    whose layer axis, if any, is unsharded. Every other leaf is replicated: step counts,
    hyperparameters, placeholders, and Adafactor's factored row/column statistics, which
    are vectors per matrix ([layers, rows] and [layers, cols] for a stacked one), so
    replicating them costs little memory.
    """
    param_by_path = {
        tuple(path): (tuple(shape_like.shape), sharding)
        for (path, shape_like), sharding in zip(
            jax.tree_util.tree_flatten_with_path(param_shapes)[0],
            jax.tree_util.tree_leaves(param_shardings))}
    replicated = self.sharding()

    def leaf_sharding(path, shape_like):
      for start in range(len(path)):
        for end in range(len(path), start, -1):
          if tuple(path[start:end]) in param_by_path:
            shape, sharding = param_by_path[tuple(path[start:end])]
            return sharding if shape == tuple(shape_like.shape) else replicated
      return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state_shapes)

  def check_batch_size(self, global_batch_size: int, num_microbatches: int = 1) -> None:
    """Raises a ValueError unless every microbatch splits evenly over 'data'."""
    divisor = self.data_parallel_size * num_microbatches
    if global_batch_size % divisor:
      raise ValueError(
          f"global batch size {global_batch_size} does not divide into {num_microbatches} "
          f"microbatch(es) over a data-parallel mesh axis of size "
          f"{self.data_parallel_size}: it must be a multiple of {divisor}")

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays, split over 'data', from this host's part of the batch.

    Each host passes its own rows [per_host_batch, ...]; the global batch is their
    concatenation over hosts (in process order).
    """
    sizes = {np.shape(value)[0] for value in batch.values()}
    if len(sizes) != 1:
      raise ValueError(f"batch features differ in size along dimension 0: {sorted(sizes)}")
    self.check_batch_size(sizes.pop() * jax.process_count())
    return {key: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(value))
            for key, value in batch.items()}


@gin.configurable
def make_partitioner(parallelism: str = "data", mesh_shape: Sequence[int] = (-1, 1),
                     devices: Optional[Sequence[jax.Device]] = None) -> Partitioner:
  """The partitioner of a run: gin binds `parallelism` and `mesh_shape` (data, model)."""
  return Partitioner(make_mesh(mesh_shape, devices), standard_logical_axis_rules(parallelism))
