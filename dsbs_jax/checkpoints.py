"""Checkpoints on disk: the model format and the training checkpoints.

Model format (converted and exported students): DIR/params (an orbax checkpoint of the
parameter tree, T5X layout) and DIR/config.json (the T5Config). Training checkpoints:
MODEL_DIR/checkpoints/<step>/ with the train state and the input pipeline's position.

Importers of other formats live in convert.py; this module must not know them.
"""
import pathlib
from typing import Any, Optional, Union

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as preservation

from dsbs_jax.models import t5

PathLike = Union[str, pathlib.Path]
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def save_model(directory: PathLike, params: Any, config: t5.T5Config) -> None:
  """Writes params and config under `directory`, replacing a model already there."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
  (directory / CONFIG_FILE).write_text(config.to_json() + "\n")


def load_config(directory: PathLike) -> t5.T5Config:
  """The network of `directory`, set to run as suits this machine: how the run that wrote
  it ran (scanned layers, rematerialization, attention kernel) is not replayed."""
  config_path = pathlib.Path(directory).absolute() / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"no model config at {config_path}")
  try:
    return t5.T5Config.from_json(config_path.read_text()).with_default_execution()
  except ValueError as error:
    raise ValueError(f"{config_path}: {error}") from error


def load_model(directory: PathLike) -> tuple[Any, t5.T5Config]:
  """(params, config) as written by `save_model`; params on the default device."""
  directory = pathlib.Path(directory).absolute()
  config = load_config(directory)
  params_path = directory / PARAMS_DIR
  if not params_path.is_dir():
    raise FileNotFoundError(f"no parameters at {params_path}")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      params = checkpointer.restore(params_path, t5.param_shapes(config))
    except ValueError as error:
      raise ValueError(
          f"{params_path} does not match {directory / CONFIG_FILE}: {error}") from error
  return params, config


# ------------------------------------------------------------------------------
# Training checkpoints: MODEL_DIR/checkpoints/<step>/{state, input}, written by orbax
# asynchronously and atomically (a step folder appears only once complete, so a run
# killed mid-write restores the previous step).
# ------------------------------------------------------------------------------
TRAIN_CHECKPOINTS_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """A training checkpoint that cannot be restored; the message names it."""


class TrainCheckpointer:
  """Keeps the last `keep` checkpoints plus the best one by `best_metric` (if given).

  Each checkpoint holds the train state and the input pipeline's position, so a restored
  run continues with exactly the next batch.
  """

  def __init__(self, model_dir: PathLike, keep: int = 3, best_metric: Optional[str] = None,
               best_mode: str = "max", asynchronous: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = pathlib.Path(model_dir).absolute() / TRAIN_CHECKPOINTS_DIR
    policies = [preservation.LatestN(n=keep)]
    if best_metric:
      sign = 1.0 if best_mode == "max" else -1.0
      policies.append(preservation.BestN(
          get_metric_fn=lambda metrics: sign * metrics[best_metric], n=1,
          keep_checkpoints_without_metrics=False))
    self.best_metric = best_metric
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "input"),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            enable_async_checkpointing=asynchronous))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, input_state: dict, metrics: Optional[dict] = None) -> None:
    """Starts writing step `step`; returns before the write ends when asynchronous."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), input=ocp.args.JsonSave(input_state)),
        metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, input_state) of `step`, placed as `abstract_state`'s shardings say."""
    path = self.directory / str(step)
    if step not in self._manager.all_steps():
      raise CheckpointError(f"{path}: no such checkpoint; available steps: {self.all_steps()}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), input=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many kinds; all mean this step is unusable
      earlier = [s for s in self.all_steps() if s < step]
      hint = (f"; restore an earlier one with --gin.train.restore_step={earlier[-1]}"
              if earlier else "")
      raise CheckpointError(f"{path}: checkpoint is corrupt or incomplete ({error}){hint}") from error
    return restored.state, restored.input

  def delete_after(self, step: int) -> list[int]:
    """Deletes the checkpoints later than `step` (a run restarted from an earlier step)."""
    later = [s for s in self.all_steps() if s > step]
    for later_step in later:
      self._manager.delete(later_step)
    return later

  def restore_on_one_device(self, step: int) -> tuple[Any, dict]:
    """(state, input_state) of `step` on this host's first device, whatever mesh wrote it.

    Restoring with the saved shardings needs the devices that saved them; this serves
    prediction and export on any machine.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      with ocp.StandardCheckpointer() as reader:
        metadata = reader.metadata(self.directory / str(step) / "state").item_metadata
    except Exception:  # pylint: disable=broad-except
      metadata = None  # unreadable or missing: `restore` says which, naming the step
    abstract_state = jax.tree.map(
        lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=device), metadata)
    return self.restore(step, abstract_state)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
