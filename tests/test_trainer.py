"""Tests of the trainer: schedules and optimizers, sharded steps equal to one device's,
gradient accumulation, bfloat16 activations, evaluation and the non-finite loss guard."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsbs_jax import encoder_decoder
from dsbs_jax import partitioning
from dsbs_jax import trainer
from dsbs_jax.models import t5
from test_encoder_decoder import pack_examples, random_example

BATCH_SIZE = 16


@pytest.fixture(scope="module")
def config(tiny_config):
  # One layer a stack keeps compilation short; dropout is on, so that sharded and
  # unsharded steps also have to draw the same masks.
  return dataclasses.replace(tiny_config, num_encoder_layers=1, num_decoder_layers=1,
                             dropout_rate=0.1)


@pytest.fixture(scope="module")
def initial_params(config):
  """Host parameters shared by the tests that need not create them under their mesh."""
  return jax.tree.map(np.array, jax.jit(t5.init_params, static_argnums=0)(
      config, jax.random.key(0)))


def random_batches(config, num_batches, batch_size=BATCH_SIZE, seed=0):
  """Rows packing a label example (short targets) and a rationale example (long ones)."""
  rng = np.random.default_rng(seed)
  example = lambda task, targets_length: random_example(
      rng, config.vocab_size, task, int(rng.integers(2, 8)), targets_length)
  return [pack_examples([[example(encoder_decoder.LABEL_TASK_ID, int(rng.integers(2, 4))),
                          example(encoder_decoder.RATIONALE_TASK_ID, int(rng.integers(5, 12)))]
                         for _ in range(batch_size)]) for _ in range(num_batches)]


def factored_adafactor():
  # Factors the tiny model's matrices too, so that factored statistics get sharded.
  return optax.adafactor(1e-2, min_dim_size_to_factor=8)


def damped_adamw():
  # A large epsilon makes the update about linear in small gradients, instead of about
  # -lr * sign(g), which blows rounding noise in near-zero gradients up to the step size.
  return optax.adamw(1e-3, eps=1e-3)


def train(config, optimizer, parallelism, mesh_shape, batches, devices=None, params=None,
          **trainer_kwargs):
  """(final state, per-step metrics) after one train step per batch, from `params` or
  from parameters initialized under the mesh."""
  partitioner = partitioning.make_partitioner(parallelism, mesh_shape, devices)
  step_trainer = trainer.Trainer(config, partitioner, optimizer, **trainer_kwargs)
  state = (step_trainer.init_state(jax.random.key(0)) if params is None
           else step_trainer.state_from_params(params))
  history = []
  for batch in batches:
    state, metrics = step_trainer.train_step(state, step_trainer.shard_batch(batch),
                                             jax.random.key(1))
    history.append(jax.device_get(metrics))
  assert step_trainer._jit_train_step._cache_size() == 1
  return state, history


def assert_same_training(actual, expected, rtol=1e-5, atol=1e-6):
  (actual_state, actual_history), (expected_state, expected_history) = actual, expected
  for actual_metrics, expected_metrics in zip(actual_history, expected_history):
    np.testing.assert_allclose(actual_metrics["loss_sum"], expected_metrics["loss_sum"],
                               rtol=rtol)
    np.testing.assert_allclose(actual_metrics["label_loss_sum"],
                               expected_metrics["label_loss_sum"], rtol=rtol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
               jax.device_get(actual_state.params), jax.device_get(expected_state.params))


# ------------------------------------------------------------------------------
# Schedules, optimizers and the guard: no compilation of the network.
# ------------------------------------------------------------------------------
def test_schedules():
  linear = trainer.make_schedule("linear_decay", 1.0, warmup_steps=10, total_steps=110)
  np.testing.assert_allclose([linear(0), linear(5), linear(10), linear(60), linear(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  cosine = trainer.make_schedule("cosine", 2.0, total_steps=100)
  np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [2.0, 1.0, 0.0], atol=1e-6)
  rsqrt = trainer.make_schedule("rsqrt", 0.01, warmup_steps=100)
  np.testing.assert_allclose([rsqrt(100), rsqrt(400)], [0.01, 0.005], rtol=1e-6)
  constant = trainer.make_schedule("constant", 3.0)
  np.testing.assert_allclose([constant(0), constant(10**6)], [3.0, 3.0])


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "linear_decay", "learning_rate": 1.0}, "needs total_steps > warmup_steps"),
    ({"schedule": "cosine", "learning_rate": 1.0, "warmup_steps": 5, "total_steps": 5},
     "needs total_steps > warmup_steps"),
    ({"schedule": "step", "learning_rate": 1.0}, "unknown schedule 'step'")])
def test_schedule_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    trainer.make_schedule(**kwargs)


def test_optimizer_defaults():
  _, adafactor_rate = trainer.make_optimizer("adafactor")
  assert adafactor_rate(0) == adafactor_rate(10**5) == pytest.approx(1e-3)
  _, adamw_rate = trainer.make_optimizer("adamw", total_steps=100)
  np.testing.assert_allclose([adamw_rate(0), adamw_rate(50), adamw_rate(100)],
                             [5e-5, 2.5e-5, 0.0], atol=1e-12)
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
    trainer.make_optimizer("sgd")


def test_adamw_spares_norm_scales_from_weight_decay():
  optimizer, _ = trainer.make_optimizer("adamw", learning_rate=0.1, schedule="constant",
                                        weight_decay=0.5)
  # Stacked layers ([layers, ...] arrays under `layers`) count each layer's dimensions.
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,)),
            "layers": {"kernel": jnp.ones((3, 2, 2)), "scale": jnp.ones((3, 2))}}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  for tree in (updates, updates["layers"]):
    np.testing.assert_allclose(tree["kernel"], -0.05)  # decay only
    np.testing.assert_allclose(tree["scale"], 0.0)


def test_per_parameter_updates_stacked_layers_as_layers_apart():
  # Adafactor factors, clips (RMS over the array) and scales each array: on a stacked
  # array the layers must not mix, so their scales differ on purpose.
  optimizer, _ = trainer.make_optimizer("adafactor", grad_clip_norm=1.0)
  rng = np.random.default_rng(0)
  per_layer = {"encoder": {f"layers_{i}": {
      "kernel": rng.normal(size=(128, 256)).astype(np.float32) * 10.0**i,
      "scale": rng.normal(size=(256,)).astype(np.float32) * 10.0**i} for i in range(3)},
               "embedding": rng.normal(size=(16, 8)).astype(np.float32)}
  grads = jax.tree.map(lambda p: (rng.normal(size=p.shape) * p).astype(np.float32), per_layer)

  def step(params, grads):
    state = optimizer.init(params)
    updates, state = optimizer.update(grads, state, params)
    return updates, optimizer.update(grads, state, params)[1]

  expected_updates, expected_state = jax.jit(step)(per_layer, grads)
  stacked_updates, stacked_state = jax.jit(step)(t5.params_in_layout(per_layer, True),
                                                  t5.params_in_layout(grads, True))
  factored = stacked_state[1]["encoder"]["layers"]["kernel"][0]
  assert factored.v_row.shape == (3, 128) and factored.v_col.shape == (3, 256)
  for got, want in ((stacked_updates, expected_updates), (stacked_state, expected_state)):
    got = t5.params_in_layout(got, stacked=False)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  # The optimizer state converts between layouts as the parameters do, both ways.
  jax.tree.map(np.testing.assert_array_equal,
               t5.params_in_layout(expected_state, stacked=True), stacked_state)


def test_check_finite_names_the_step():
  trainer.check_finite({"loss_sum": np.float32(2.0), "tokens": 3.0}, step=3)
  with pytest.raises(trainer.NonFiniteLossError, match=r"step 12: .*loss_sum=nan"):
    trainer.check_finite({"loss_sum": np.float32("nan"), "tokens": 3.0}, step=12)


# ------------------------------------------------------------------------------
# Steps.
# ------------------------------------------------------------------------------
def test_abstract_state_carries_shapes_and_shardings(config):
  step_trainer = trainer.Trainer(config, partitioning.make_partitioner("fsdp", (4, 2)),
                                 optax.adamw(1e-3))
  abstract = step_trainer.abstract_state()
  embedding = abstract.params["token_embedder"]["embedding"]
  assert embedding.shape == (config.vocab_size, config.emb_dim)
  assert embedding.sharding.spec == jax.P("model", "data")
  assert abstract.opt_state[0].mu["token_embedder"]["embedding"].sharding.spec == jax.P(
      "model", "data")
  assert abstract.step.shape == () and abstract.step.sharding.spec == jax.P()


# ------------------------------------------------------------------------------
def test_nan_parameters_stop_training(config, initial_params):
  partitioner = partitioning.make_partitioner("data", (-1, 1), jax.devices()[:1])
  step_trainer = trainer.Trainer(config, partitioner, optax.adamw(1e-3))
  params = jax.tree.map(np.copy, initial_params)
  params["decoder"]["logits_dense"]["kernel"][0, 0] = np.nan
  state = step_trainer.state_from_params(params)
  batch = step_trainer.shard_batch(random_batches(config, 1, batch_size=2)[0])
  _, metrics = step_trainer.train_step(state, batch, jax.random.key(1))
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 7: .*loss_sum=nan"):
    trainer.check_finite(metrics, step=7)


def test_eval_step_matches_the_model(config, initial_params):
  partitioner = partitioning.make_partitioner("tensor", (2, 4))
  step_trainer = trainer.Trainer(config, partitioner, optax.adamw(1e-3))
  params = jax.device_put(initial_params, step_trainer.param_shardings)
  batch = random_batches(config, 1, batch_size=8)[0]
  metrics = step_trainer.eval_step(params, step_trainer.shard_batch(batch))
  _, expected = encoder_decoder.loss_terms(initial_params, batch, None, config)
  for key, value in expected.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("parallelism, mesh_shape, normalization", [
    ("data", (1, 1), "per_example"),
    pytest.param("fsdp", (2, 2), "per_token", marks=pytest.mark.slow)])
def test_gradient_accumulation_equals_the_full_batch(config, initial_params, parallelism,
                                                     mesh_shape, normalization):
  config = dataclasses.replace(config, dropout_rate=0.0)
  devices = jax.devices()[:np.prod(mesh_shape)]
  batches = random_batches(config, 1, seed=1)
  # SGD's update is the gradient itself, so this compares the accumulated gradients.
  runs = [train(config, optax.sgd(1.0), parallelism, mesh_shape, batches, devices,
                initial_params, num_microbatches=num_microbatches,
                loss_normalization=normalization)
          for num_microbatches in (1, 4)]
  assert_same_training(runs[1], runs[0])
  (_, [accumulated]), (_, [full_batch]) = runs[1], runs[0]
  for key in ("loss_normalizer", "examples", "tokens", "label_examples"):
    assert accumulated[key] == full_batch[key], key
  np.testing.assert_allclose(accumulated["grad_norm"], full_batch["grad_norm"], rtol=1e-5)


def test_bfloat16_activations_keep_float32_parameters(config, initial_params):
  config = dataclasses.replace(config, dtype="bfloat16")
  optimizer, learning_rate_fn = trainer.make_optimizer("adafactor")
  state, history = train(config, optimizer, "tensor", (1, 2), random_batches(config, 1),
                         jax.devices()[:2], initial_params, learning_rate_fn=learning_rate_fn)
  summary = encoder_decoder.summarize_metrics(history[0])
  assert np.isfinite(summary["loss"]) and summary["grad_norm"] > 0
  assert summary["learning_rate"] == pytest.approx(1e-3)
  assert summary["examples"] == 2 * BATCH_SIZE
  assert int(state.step) == 1
  assert state.params["token_embedder"]["embedding"].sharding.spec == jax.P("model", None)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


@pytest.fixture(scope="module")
def one_device_runs(config):
  """Three steps on a single device, per optimizer."""
  batches = random_batches(config, 3, seed=2)
  single = jax.devices()[:1]
  return batches, {
      "adafactor": train(config, factored_adafactor(), "data", (1, 1), batches, single),
      "adamw": train(config, damped_adamw(), "data", (1, 1), batches, single)}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_name, parallelism, mesh_shape", [
    ("adafactor", "data", (8, 1)), ("adafactor", "tensor", (4, 2)),
    ("adafactor", "tensor", (2, 4)), ("adafactor", "fsdp", (8, 1)),
    ("adafactor", "fsdp", (4, 2)), ("adamw", "fsdp", (4, 2))])
def test_sharded_training_equals_one_device(config, one_device_runs, optimizer_name,
                                            parallelism, mesh_shape):
  batches, expected = one_device_runs
  optimizer = factored_adafactor() if optimizer_name == "adafactor" else damped_adamw()
  actual = train(config, optimizer, parallelism, mesh_shape, batches)
  assert_same_training(actual, expected[optimizer_name])


@pytest.mark.parametrize("parallelism, mesh_shape", [
    ("fsdp", (2, 2)), pytest.param("tensor", (4, 2), marks=pytest.mark.slow)])
def test_scanned_layers_train_as_unrolled_ones(tiny_config, parallelism, mesh_shape):
  # The scanned run keeps parameters and optimizer state stacked, sharded under the mesh;
  # per_parameter's Adafactor factors, clips and scales each layer's arrays apart.
  unrolled = dataclasses.replace(tiny_config, scan_layers=False)
  batches = random_batches(unrolled, 2, seed=3)
  optimizer = trainer.per_parameter(factored_adafactor())
  expected = train(unrolled, optimizer, "data", (1, 1), batches, jax.devices()[:1])
  devices = jax.devices()[:np.prod(mesh_shape)]
  actual_state, actual_history = train(dataclasses.replace(unrolled, scan_layers=True),
                                       optimizer, parallelism, mesh_shape, batches, devices)
  assert t5.holds_stacked_layers(actual_state.params)
  as_unrolled = t5.params_in_layout(jax.device_get(actual_state), stacked=False)
  assert_same_training((as_unrolled, actual_history), expected)
  expected_opt_state = jax.device_get(expected[0].opt_state)
  assert jax.tree.structure(as_unrolled.opt_state) == jax.tree.structure(expected_opt_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               as_unrolled.opt_state, expected_opt_state)


def test_a_scanned_step_reads_stacked_parameters_without_copying_them(tiny_config):
  # Before the train state kept scanned layers stacked, each step stacked every layer's
  # parameters (one concatenate per array) and sliced the gradients apart again.
  config = dataclasses.replace(tiny_config, num_encoder_layers=3, num_decoder_layers=3,
                               scan_layers=True)
  partitioner = partitioning.make_partitioner("data", (1, 1), jax.devices()[:1])
  step_trainer = trainer.Trainer(config, partitioner, trainer.make_optimizer("adafactor")[0])
  abstract = step_trainer.abstract_state()
  batch = step_trainer.shard_batch(random_batches(config, 1, batch_size=2)[0])
  with jax.set_mesh(partitioner.mesh), nn.logical_axis_rules(partitioner.rules):
    lowered = step_trainer._jit_train_step.lower(abstract, batch, jax.random.key(1)).as_text()
  stacked_types = {"tensor<" + "x".join(map(str, leaf.shape)) + "xf32>"
                   for leaf in jax.tree.leaves(abstract.params) if leaf.shape[0] == 3}
  assert stacked_types and all(type_ in lowered for type_ in stacked_types)
  copies = [line for line in lowered.splitlines()
            if "stablehlo.concatenate" in line and line.rstrip().endswith(tuple(stacked_types))]
  assert not copies
