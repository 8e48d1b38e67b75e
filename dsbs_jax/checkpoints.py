"""This project's on-disk model format: DIR/params (an orbax checkpoint of the parameter
tree, T5X layout) and DIR/config.json (the T5Config).

Importers of other formats live in convert.py; this module must not know them.
"""
import pathlib
from typing import Any, Union

import orbax.checkpoint as ocp

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
  config_path = pathlib.Path(directory).absolute() / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"no model config at {config_path}")
  try:
    return t5.T5Config.from_json(config_path.read_text())
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
