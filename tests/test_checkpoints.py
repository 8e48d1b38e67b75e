"""Tests for dsbs_jax.checkpoints: the model format round trip (with how the network ran left
out of a loaded config), parameters checked against their config, and training checkpoints
that keep the latest steps and the one named best, restore exactly, and name a step that
cannot be read with the flag that restores the one before it."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbs_jax import checkpoints
from dsbs_jax.models import t5


@pytest.fixture(scope="module")
def params(tiny_config):
  return t5.init_params(tiny_config, jax.random.key(0))


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_model_round_trips_and_forgets_how_it_ran(tmp_path, tiny_config, params):
  ran_scanned = dataclasses.replace(tiny_config, scan_layers=True, remat_policy="full")
  checkpoints.save_model(tmp_path / "model", params, ran_scanned)
  loaded, config = checkpoints.load_model(tmp_path / "model")
  assert_same_tree(loaded, params)
  assert config == tiny_config  # the execution fields are back at their defaults
  assert checkpoints.load_config(tmp_path / "model") == ran_scanned.with_default_execution()


def test_parameters_that_do_not_fit_their_config_are_named(tmp_path, tiny_config, params):
  checkpoints.save_model(tmp_path / "model", params, tiny_config)
  wider = dataclasses.replace(tiny_config, mlp_dim=128)
  (tmp_path / "model" / checkpoints.CONFIG_FILE).write_text(wider.to_json())
  with pytest.raises(checkpoints.CheckpointError, match=r"does not match .*config.json: "
                                                        r"decoder/layers_0/mlp/wi_0/kernel"):
    checkpoints.check_params(tmp_path / "model")
  (tmp_path / "model" / checkpoints.CONFIG_FILE).write_text('{"emb_dim": "wide"')
  with pytest.raises(checkpoints.CheckpointError, match="config.json: not a T5 model config"):
    checkpoints.load_config(tmp_path / "model")
  with pytest.raises(FileNotFoundError, match="no model config"):
    checkpoints.load_config(tmp_path / "nothing")


def test_short_errors_leave_out_tensorstore_specs():
  error = ValueError('NOT_FOUND: no file [tensorstore_spec={"driver": "zarr", ...}]\nmore')
  assert checkpoints.short_error(error) == "NOT_FOUND: no file"
  assert checkpoints.short_error(RuntimeError("x" * 400)).endswith("...")


def state_at(step: int):
  return {"step": jnp.array(step, jnp.int32), "params": {"w": jnp.full((2, 3), float(step))}}


def test_training_checkpoints_keep_the_latest_and_the_named_best(tmp_path):
  checkpointer = checkpoints.TrainCheckpointer(tmp_path / "checkpoints", keep=2)
  try:
    for step in (1, 2, 3, 4, 5):
      checkpointer.save(step, state_at(step), {"seed": step})
      if step == 2:
        checkpointer.wait()
        checkpointer.keep_step(2)  # the best on validation, once its evaluation is done
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 4, 5] and checkpointer.latest_step() == 5
    assert checkpointer.input_state(4) == {"seed": 4}
    state, input_state = checkpointer.restore(2, jax.eval_shape(lambda: state_at(0)))
    assert_same_tree(state, state_at(2))
    assert input_state == {"seed": 2}
    state, _ = checkpointer.restore_on_one_device(5)
    assert_same_tree(state, state_at(5))
    assert checkpointer.delete_after(2) == [4, 5]
    assert checkpointer.all_steps() == [2]
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/3: no such checkpoint; "
                                                          r"available steps: \[2\]"):
      checkpointer.input_state(3)
  finally:
    checkpointer.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupt_checkpoint_is_named_with_the_flag_that_restores_the_one_before(tmp_path):
  checkpointer = checkpoints.TrainCheckpointer(tmp_path / "checkpoints", asynchronous=False)
  try:
    for step in (1, 2):
      checkpointer.save(step, state_at(step), {})
    for data_file in (tmp_path / "checkpoints" / "2" / "state").rglob("d/*"):
      data_file.unlink()
    with pytest.raises(checkpoints.CheckpointError) as refused:
      checkpointer.restore(2, jax.eval_shape(lambda: state_at(0)))
    message = str(refused.value)
    assert "checkpoints/2: checkpoint is corrupt or incomplete" in message
    assert "--gin.train.restore_step=1" in message and "tensorstore_spec" not in message
    with pytest.raises(checkpoints.CheckpointError, match="restore an earlier one with --step 1"):
      checkpointer.restore_on_one_device(2)
  finally:
    checkpointer.close()
