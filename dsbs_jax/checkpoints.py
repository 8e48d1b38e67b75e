"""Checkpoints on disk: the model format and the training checkpoints.

Model format (converted and exported students): DIR/params (an orbax checkpoint of the
parameter tree, T5X layout, its layers apart: `layers_0`, `layers_1`, ...) and
DIR/config.json (the T5Config). Training checkpoints: a folder of <step>/ checkpoints
(MODEL_DIR/checkpoints, which run_dir.py names) with the train state and the input
pipeline's position, its layers in the layout of the run that wrote it (stacked when it
scanned them, see t5.params_in_layout); a run restoring it in the other layout gets it
converted.

Importers of other formats live in convert.py, and the rest of MODEL_DIR in run_dir.py;
this module must not know them.
"""
import contextlib
import dataclasses
import errno
import functools
import os
from typing import Any, Optional, Sequence, Union

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as preservation

from dsbs_jax import storage
from dsbs_jax import text_files
from dsbs_jax.models import t5

PathLike = Union[str, os.PathLike]
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
  """A checkpoint or model that cannot be read or does not fit; the message names it."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (a full disk); the earlier ones are intact."""


def _megabytes(size: int) -> str:
  return f"{size / 2**20:,.1f} MB"


def _is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is ENOSPC; orbax and tensorstore
  report it only in their messages (tensorstore's `os_error_code='28'`)."""
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def save_model(directory: PathLike, params: Any, config: t5.T5Config) -> None:
  """Writes params (in either layout; stored per layer) and config under `directory`,
  replacing a model already there."""
  directory = storage.path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, t5.params_in_layout(params, stacked=False),
                      force=True)
    checkpointer.wait_until_finished()
  storage.write_atomically(directory / CONFIG_FILE, (config.to_json() + "\n").encode())


def load_config(directory: PathLike) -> t5.T5Config:
  """The network of `directory`, set to run as suits this machine: how the run that wrote
  it ran (scanned layers, rematerialization, attention kernel) is not replayed."""
  config_path = storage.path(directory) / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"no model config at {config_path}")
  values = text_files.read_json(config_path)
  if not isinstance(values, dict):
    raise CheckpointError(f"{config_path}: not a T5 model config (expected a JSON object, got "
                          f"{type(values).__name__})")
  # Every field that decides the network must be there; a default would be a guess.
  missing = [field.name for field in dataclasses.fields(t5.T5Config)
             if field.name not in values and field.name not in t5.EXECUTION_FIELDS]
  if missing:
    raise CheckpointError(f"{config_path}: not a T5 model config (no field {missing[0]!r}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})")
  try:
    return t5.T5Config.from_dict({name: value for name, value in values.items()
                                  if name not in t5.EXECUTION_FIELDS})
  except (ValueError, TypeError) as error:  # a field of the wrong type or out of range
    first_line = str(error).splitlines()[0]  # the next ones are gin's, naming T5Config
    raise CheckpointError(f"{config_path}: not a T5 model config ({first_line})") from error


def _shapes_by_path(tree: Any) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in leaves}


def _per_layer_param_shapes(config: t5.T5Config) -> Any:
  """The parameter shapes of a model directory: per layer, however `config` runs."""
  return t5.param_shapes(dataclasses.replace(config, scan_layers=False))


def _check_param_shapes(stored_params: Any, expected_params: Any, stored_path: PathLike,
                        config_path: PathLike) -> None:
  """Raises CheckpointError unless `stored_params` (arrays or their metadata) have the shapes
  of `expected_params` (which `config_path` gives), naming the first parameters that differ."""
  stored, expected = _shapes_by_path(stored_params), _shapes_by_path(expected_params)
  if not set(stored) & set(expected):
    raise CheckpointError(f"{stored_path}: holds none of a T5's parameters; is it a T5 "
                          "checkpoint (a `dsbs convert` output), or damaged?")
  differences = [f"{name}: {stored.get(name, 'missing')} stored, {expected.get(name, 'none')} "
                 "in the config" for name in sorted(set(stored) | set(expected))
                 if stored.get(name) != expected.get(name)]
  if differences:
    shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more"
                                           if len(differences) > 4 else "")
    raise CheckpointError(f"{stored_path} does not match {config_path}: {shown}")


def check_params(directory: PathLike) -> t5.T5Config:
  """The config of a model directory whose parameters have the config's shapes, read from
  the checkpoint's metadata without loading arrays; CheckpointError otherwise."""
  directory = storage.path(directory)
  config = load_config(directory)
  params_path = directory / PARAMS_DIR
  if not params_path.is_dir():
    raise FileNotFoundError(f"no parameters at {params_path}")
  try:
    with ocp.StandardCheckpointer() as reader:
      stored = reader.metadata(params_path).item_metadata
  except Exception as error:  # orbax raises many kinds; all mean no readable checkpoint here
    # Its message, which pastes in tensorstore specs and bound methods, is the cause (--verbose).
    raise CheckpointError(f"{params_path}: not a readable parameter checkpoint; is it damaged "
                          "or incomplete?") from error
  _check_param_shapes(stored, _per_layer_param_shapes(config), params_path,
                      directory / CONFIG_FILE)
  return config


def load_model(directory: PathLike) -> tuple[Any, t5.T5Config]:
  """(params, config) as written by `save_model`; params on the default device, per layer
  (a caller running `config` scanned converts them: t5.params_in_layout)."""
  directory = storage.path(directory)
  config = check_params(directory)
  params_path = directory / PARAMS_DIR
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      params = checkpointer.restore(params_path, _per_layer_param_shapes(config))
    except Exception as error:  # pylint: disable=broad-except
      raise CheckpointError(f"{params_path}: parameters are damaged or incomplete") from error
  return params, config


# ------------------------------------------------------------------------------
# Training checkpoints: <directory>/<step>/{state, input}, written by orbax asynchronously
# and atomically (a step folder appears only once complete, so a run killed mid-write
# restores the previous step).
# ------------------------------------------------------------------------------


@dataclasses.dataclass
class _NamedStep:
  """An orbax preservation policy keeping the one step its owner names, and may rename."""
  step: Optional[int] = None

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    return [info.step == self.step for info in checkpoints]


# The change (commit f7772d4) after which the optimizer state holds one state per parameter
# array (trainer.per_parameter); checkpoints from before it hold one over all of them.
PER_PARAMETER_OPTIMIZER_STATE = "2026-12-02 (commit f7772d4)"


def _same_arrays(stored_metadata, abstract) -> bool:
  """Whether stored array metadata and abstract arrays have the same paths and shapes
  (a named tuple's fields are stored as a dict's keys)."""
  name = lambda key: str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
  shapes = lambda tree: {tuple(map(name, path)): tuple(leaf.shape) for path, leaf in
                         jax.tree_util.tree_flatten_with_path(tree)[0]}
  try:
    return shapes(stored_metadata) == shapes(abstract)
  except AttributeError:  # a leaf without a shape: not array metadata
    return False


class TrainCheckpointer:
  """Keeps the last `keep` checkpoints plus one the caller names with `keep_step` (the best
  on validation, named once its evaluation is done, so a step is saved before evaluating).

  Each checkpoint holds the train state and the input pipeline's position, so a restored
  run continues with exactly the next batch.
  """

  def __init__(self, directory: PathLike, keep: int = 3, keep_step: Optional[int] = None,
               asynchronous: bool = True):
    self.directory = storage.path(directory)
    self._kept = _NamedStep(keep_step)
    self._checkpoint_bytes = None  # (size of one checkpoint on disk, how known), once known
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "input"),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=preservation.AnyPreservationPolicy(
                [preservation.LatestN(n=keep), self._kept]),
            enable_async_checkpointing=asynchronous))

  def keep_step(self, step: Optional[int]) -> None:
    """Keeps `step` besides the latest ones from now on, in place of the step kept before."""
    self._kept.step = step

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, input_state: dict) -> None:
    """Starts writing step `step`; returns before the write ends when asynchronous.

    Refuses to start when the disk has less room than a checkpoint takes (measured on the
    latest one, else estimated from the state's arrays): a CheckpointWriteError saying so,
    as is a disk that fills up during the write (raised here or by `wait`). An object store
    has no such limit to check.
    """
    self.wait()  # orbax would wait for the previous save too; then its size and room are known
    free = storage.free_bytes(self.directory)
    if free is not None and free < (needed := self._size_of_a_checkpoint(state))[0]:
      raise self._write_failed(self.directory / str(step),
                               f"{_megabytes(free)} free on its disk, a checkpoint takes about "
                               f"{_megabytes(needed[0])} ({needed[1]})")
    with self._disk_full_reported():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), input=ocp.args.JsonSave(input_state)), force=True)

  def _size_of_a_checkpoint(self, state: Any) -> tuple[int, str]:
    """(bytes, how they were found): measured on the latest checkpoint, else estimated from
    the state's arrays (orbax's compression makes a written one smaller)."""
    if self._checkpoint_bytes is None:
      latest = self.latest_step()
      if latest is not None:
        self._checkpoint_bytes = (storage.bytes_under(self.directory / str(latest)),
                                  f"as step {latest} took")
      else:  # its arrays, with a tenth more for the metadata around them
        arrays = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
                     if hasattr(x, "dtype"))
        return int(arrays * 1.1), "estimated from the state's arrays"
    return self._checkpoint_bytes

  def _write_failed(self, what: storage.Path, why: str) -> CheckpointWriteError:
    complete = self.all_steps()
    intact = (f"the last complete checkpoint, step {complete[-1]}, is intact" if complete
              else "there is no earlier checkpoint")
    return CheckpointWriteError(f"{what}: not saved: {why}; {intact}. Free some space and "
                                "rerun the same command to resume")

  @contextlib.contextmanager
  def _disk_full_reported(self):
    """Turns a full disk that orbax met in the block (writing this or an earlier
    asynchronous save) into one CheckpointWriteError."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except
      if not _is_disk_full(error):
        raise
      free = _megabytes(storage.free_bytes(self.directory) or 0)
      raise self._write_failed(self.directory, f"the disk is full ({free} free)") from None

  def _check_exists(self, step: int) -> None:
    if step not in self._manager.all_steps():
      raise CheckpointError(f"{self.directory / str(step)}: no such checkpoint; available "
                            f"steps: {self.all_steps()}")

  def _unusable(self, step: int, earlier_step_flag: str) -> CheckpointError:
    """The error for a step that cannot be read; orbax's own, which pastes in tensorstore
    specs and bound methods, is its cause, shown with --verbose."""
    earlier = [s for s in self.all_steps() if s < step]
    hint = f"; restore an earlier one with {earlier_step_flag}{earlier[-1]}" if earlier else ""
    return CheckpointError(f"{self.directory / str(step)}: checkpoint is corrupt or incomplete"
                           f"{hint}")

  def input_state(self, step: int, earlier_step_flag: str = "--gin.train.restore_step=") -> dict:
    """The input pipeline's position saved with `step`, read without the train state."""
    self._check_exists(step)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(input=ocp.args.JsonRestore())).input
    except Exception as error:  # pylint: disable=broad-except
      raise self._unusable(step, earlier_step_flag) from error

  def _state_metadata(self, step: int) -> Optional[Any]:
    """The stored state's tree of array metadata; None if unreadable or missing (then
    `restore` says which, naming the step)."""
    try:
      with ocp.StandardCheckpointer() as reader:
        return reader.metadata(self.directory / str(step) / "state").item_metadata
    except Exception:  # pylint: disable=broad-except
      return None

  def restore(self, step: int, abstract_state: Any,
              earlier_step_flag: str = "--gin.train.restore_step=") -> tuple[Any, dict]:
    """(state, input_state) of `step`, placed as `abstract_state`'s shardings say.

    A state stored with its layers in the other layout than `abstract_state`'s (a run
    resumed with scan_layers changed) is read as stored, converted (t5.params_in_layout)
    and placed. A step that cannot be read is a CheckpointError naming it and, when there
    is one, the flag (`earlier_step_flag` and a number) that restores the step before it.
    """
    self._check_exists(step)
    wanted = None if abstract_state is None else t5.holds_stacked_layers(abstract_state)
    stored = metadata = None
    if wanted is not None:
      metadata = self._state_metadata(step)
      stored = None if metadata is None else t5.holds_stacked_layers(metadata)
    converts = stored is not None and stored != wanted
    as_stored = t5.params_in_layout(abstract_state, stored) if converts else abstract_state
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(as_stored), input=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many kinds; all mean this step is unusable
      if (metadata is not None and _same_arrays(metadata["params"], as_stored.params)
          and not _same_arrays(metadata["opt_state"], as_stored.opt_state)):
        raise CheckpointError(
            f"{self.directory / str(step)}: its parameters are intact, but its optimizer state "
            "is laid out for another optimizer: another OPTIMIZER than this run's, or "
            f"dsbs-jax before {PER_PARAMETER_OPTIMIZER_STATE}, whose optimizer state covered "
            "all parameters at once; dsbs eval, predict and export read its parameters, and "
            "training resumes only with the optimizer and version that wrote it") from error
      raise self._unusable(step, earlier_step_flag) from error
    state = restored.state
    if converts:
      shardings = jax.tree.map(lambda shape: shape.sharding, abstract_state)
      state = jax.jit(functools.partial(t5.params_in_layout, stacked=wanted),
                      out_shardings=shardings)(state)
    return state, restored.input

  def delete_after(self, step: int) -> list[int]:
    """Deletes the checkpoints later than `step` (a run restarted from an earlier step)."""
    later = [s for s in self.all_steps() if s > step]
    for later_step in later:
      self._manager.delete(later_step)
    return later

  def check_fits(self, step: int, config: t5.T5Config, config_path: PathLike) -> None:
    """CheckpointError unless the parameters stored at `step` have the shapes `config` gives
    (checked from metadata, before anything is built or read; a step whose metadata cannot
    be read is left to `restore` to name)."""
    self._check_exists(step)
    metadata = self._state_metadata(step)
    if metadata is not None:
      stacked = bool(t5.holds_stacked_layers(metadata["params"]))
      _check_param_shapes(metadata["params"],
                          t5.param_shapes(dataclasses.replace(config, scan_layers=stacked)),
                          self.directory / str(step), config_path)

  def restore_on_one_device(self, step: int) -> tuple[Any, dict]:
    """(state, input_state) of `step` on this host's first device, whatever mesh wrote it,
    its layers in the layout stored.

    Restoring with the saved shardings needs the devices that saved them; this serves
    prediction and export on any machine.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
        lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=device),
        self._state_metadata(step))
    return self.restore(step, abstract_state, earlier_step_flag="--step ")

  def wait(self) -> None:
    with self._disk_full_reported():
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
