"""Tests for dsbs_jax.checkpoints: the model format round trip (with how the network ran left
out of a loaded config, and the layers stored apart), parameters checked against their
config, and training checkpoints that keep the latest steps and the one named best, restore
exactly, resume a run in the other layout of its layers, and name a step that cannot be
read with the flag that restores the one before it."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbs_jax import checkpoints
from dsbs_jax import partitioning
from dsbs_jax import text_files
from dsbs_jax import trainer
from dsbs_jax.models import t5
from test_trainer import factored_adafactor, random_batches


@pytest.fixture(scope="module")
def params(tiny_config):
  return t5.init_params(tiny_config, jax.random.key(0))


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_model_round_trips_and_forgets_how_it_ran(tmp_path, tiny_config, params):
  ran_scanned = dataclasses.replace(tiny_config, scan_layers=True, remat_policy="full")
  # A scanned run's stacked parameters are stored, and load, per layer.
  checkpoints.save_model(tmp_path / "model", t5.params_in_layout(params, stacked=True),
                         ran_scanned)
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
  (tmp_path / "model" / checkpoints.CONFIG_FILE).write_text(
      json.dumps(dict(tiny_config.to_dict(), emb_dim="wide")))
  with pytest.raises(checkpoints.CheckpointError, match="config.json: not a T5 model config "
                                                        r"\(T5Config.emb_dim='wide': expected"):
    checkpoints.load_config(tmp_path / "model")
  (tmp_path / "model" / checkpoints.CONFIG_FILE).write_text('{"emb_dim": "wide"')
  with pytest.raises(text_files.TextFileError, match="config.json:1: not valid JSON"):
    checkpoints.load_config(tmp_path / "model")
  with pytest.raises(FileNotFoundError, match="no model config"):
    checkpoints.load_config(tmp_path / "nothing")


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
    assert str(refused.value) == (f"{tmp_path / 'checkpoints' / '2'}: checkpoint is corrupt or "
                                  "incomplete; restore an earlier one with "
                                  "--gin.train.restore_step=1")  # orbax's text is the cause
    with pytest.raises(checkpoints.CheckpointError, match="restore an earlier one with --step 1"):
      checkpointer.restore_on_one_device(2)
  finally:
    checkpointer.close()


def test_a_run_resumes_with_its_layers_in_the_other_layout(tmp_path, tiny_config):
  # Two steps unrolled, then two scanned from the checkpoint (e.g. a run begun on a CPU
  # resumed on a GPU), then back: the same training as four steps unrolled.
  unrolled = dataclasses.replace(tiny_config, scan_layers=False)
  partitioner = partitioning.make_partitioner("fsdp", (2, 2), jax.devices()[:4])
  trainers = {scan: trainer.Trainer(dataclasses.replace(unrolled, scan_layers=scan), partitioner,
                                    trainer.per_parameter(factored_adafactor()))
              for scan in (False, True)}
  batches = [trainers[False].shard_batch(batch) for batch in random_batches(unrolled, 4, seed=4)]

  def train(scan, state, steps):
    for batch in steps:
      state, _ = trainers[scan].train_step(state, batch, jax.random.key(1))
    return state

  expected = jax.device_get(train(False, trainers[False].init_state(jax.random.key(0)), batches))
  checkpointer = checkpoints.TrainCheckpointer(tmp_path / "checkpoints", asynchronous=False)
  try:
    checkpointer.save(2, train(False, trainers[False].init_state(jax.random.key(0)),
                               batches[:2]), {})
    resumed, _ = checkpointer.restore(2, trainers[True].abstract_state())
    assert t5.holds_stacked_layers(resumed.params)
    assert [leaf.sharding.spec for leaf in jax.tree.leaves(resumed)] == [
        sharding.spec for sharding in jax.tree.leaves(trainers[True].state_shardings)]
    checkpointer.save(4, train(True, resumed, batches[2:]), {})
    final, _ = checkpointer.restore(4, trainers[False].abstract_state())
  finally:
    checkpointer.close()
  assert t5.holds_stacked_layers(final.params) is False
  assert jax.tree.structure(final) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(final), expected)


@pytest.mark.parametrize("written_with", ["one state over all parameters", "another optimizer"])
def test_an_optimizer_state_of_another_layout_is_named_not_called_corrupt(
    tmp_path, tiny_config, params, written_with):
  config = dataclasses.replace(tiny_config, scan_layers=False)
  partitioner = partitioning.make_partitioner("data", (1, 1), jax.devices()[:1])
  optimizer, _ = trainer.make_optimizer("adafactor")
  run = trainer.Trainer(config, partitioner, optimizer)
  # What dsbs-jax wrote before the optimizer state was kept per parameter array.
  old = (factored_adafactor() if written_with == "one state over all parameters"
         else trainer.make_optimizer("adamw", total_steps=10)[0])
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=old.init(params))
  checkpointer = checkpoints.TrainCheckpointer(tmp_path / "checkpoints", asynchronous=False)
  try:
    checkpointer.save(3, state, {})
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"3: its parameters are intact, but its optimizer state is laid out "
                             r"for another optimizer: .* before 2026-12-02 \(commit f7772d4\)"):
      checkpointer.restore(3, run.abstract_state())
  finally:
    checkpointer.close()
