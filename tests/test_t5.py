"""Tests for dsbs_jax.models (layers.py, t5.py): configs, shipped gin files, relative
position buckets, packing, logical axes, dropout, dtypes, how the network runs (scanned or
unrolled layers, rematerialization, attention and dense kernels), and the two layouts of
the layers' parameters (stacked when scanned, per layer when unrolled) and their conversion."""
import dataclasses
import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dsbs_jax import convert
from dsbs_jax import encoder_decoder
from dsbs_jax import resources
from dsbs_jax.models import layers
from dsbs_jax.models import t5
from test_encoder_decoder import pack_examples, random_example

GIN_MODEL_FILES = sorted(resources.GIN_MODELS_DIR.glob("*.gin"))
LOGICAL_AXES = {"vocab", "embed", "mlp", "heads", "kv", "joined_kv", "relpos_buckets"}


def jitted_apply(config):
  """Transformer(config).apply, compiled (op-by-op dispatch is slow on CPU)."""
  return jax.jit(t5.Transformer(config).apply, static_argnames=("enable_dropout",))


def count_params(config):
  return sum(np.prod(x.shape) for x in jax.tree.leaves(t5.param_shapes(config)))


@pytest.mark.parametrize("gin_file", GIN_MODEL_FILES, ids=lambda p: p.stem)
def test_every_gin_model_file_builds_a_config(gin_file):
  config = convert.config_from_gin(gin_file)
  assert config.vocab_size in (128, 32128)
  assert t5.T5Config.from_dict(json.loads(config.to_json())) == config
  assert count_params(config) > 0


def test_gin_model_sizes_match_the_public_checkpoints():
  # Parameter counts of google/t5-v1_1-base and t5-base on the Hugging Face hub.
  assert count_params(convert.config_from_gin(resources.GIN_MODELS_DIR / "t5_1_1_base.gin")) \
      == 247_577_856
  assert count_params(convert.config_from_gin(resources.GIN_MODELS_DIR / "t5_base.gin")) \
      == 222_903_552


def test_tiny_gin_file_matches_the_test_fixture(tiny_config):
  config = convert.config_from_gin(resources.GIN_MODELS_DIR / "t5_1_1_tiny.gin")
  assert config == dataclasses.replace(tiny_config, dropout_rate=config.dropout_rate)


def test_config_validation_and_dict_round_trip(tiny_config):
  assert t5.T5Config.from_dict(tiny_config.to_dict()) == tiny_config
  with pytest.raises(ValueError, match="unknown T5Config fields: \\['d_model'\\]"):
    t5.T5Config.from_dict({**tiny_config.to_dict(), "d_model": 3})
  with pytest.raises(ValueError, match="mlp_activations"):
    t5.T5Config(mlp_activations=("gelu_new",))


@pytest.mark.parametrize("field, value, expected", [
    ("vocab_size", "32128", "a positive integer"),
    ("emb_dim", -4, "a positive integer"),
    ("num_heads", 2.0, "a positive integer"),
    ("num_decoder_layers", True, "a positive integer"),
    ("dropout_rate", 1, r"a number in \[0, 1\)"),
    ("layer_norm_epsilon", 0, "a positive number"),
    ("logits_via_embedding", "no", "a boolean"),
    ("scan_layers", 1, "a boolean or None"),
    ("dtype", 32, "a string"),
    ("mlp_activations", "gelu", "a list of strings"),
])
def test_config_values_of_the_wrong_type_or_range_are_named(field, value, expected):
  with pytest.raises(ValueError, match=f"T5Config.{field}={re.escape(repr(value))}: expected "
                                       f"{expected}\n"):  # then gin's line naming T5Config
    t5.T5Config(**{field: value})


def test_config_takes_numpy_integers(tiny_config):
  assert t5.T5Config(**dict(tiny_config.to_dict(), emb_dim=np.int64(32))) == tiny_config


def test_relative_position_buckets_match_transformers():
  torch = pytest.importorskip("torch")
  modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
  relative = np.arange(-700, 700)
  for bidirectional in (True, False):
    for num_buckets, max_distance in ((32, 128), (16, 64)):
      expected = modeling_t5.T5Attention._relative_position_bucket(
          torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets,
          max_distance=max_distance).numpy()
      ours = jax.jit(lambda r, b=bidirectional, n=num_buckets, d=max_distance:
                     layers.relative_position_bucket(r, bidirectional=b, num_buckets=n,
                                                     max_distance=d))(relative)
      np.testing.assert_array_equal(ours, expected)


def test_packed_examples_match_each_alone(tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(0))
  apply = jitted_apply(tiny_config)
  inputs_a, targets_a = [5, 6, 7, 1], [9, 10, 1]
  inputs_b, targets_b = [11, 12, 1], [13, 14, 15, 1]

  def alone(inputs, targets):
    decoder_inputs = [0] + targets[:-1]
    return apply({"params": params}, jnp.array([inputs]), jnp.array([decoder_inputs]),
                       jnp.array([targets]), enable_dropout=False)[0]

  # Packed as T5X's feature converter does: each segment's decoder input starts at 0.
  packed = apply(
      {"params": params},
      jnp.array([inputs_a + inputs_b + [0]]),
      jnp.array([[0] + targets_a[:-1] + [0] + targets_b[:-1] + [0]]),
      jnp.array([targets_a + targets_b + [0]]),
      encoder_segment_ids=jnp.array([[1] * 4 + [2] * 3 + [0]]),
      decoder_segment_ids=jnp.array([[1] * 3 + [2] * 4 + [0]]),
      encoder_positions=jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]]),
      decoder_positions=jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]]),
      enable_dropout=False)[0]
  np.testing.assert_allclose(packed[:3], alone(inputs_a, targets_a), atol=1e-5)
  np.testing.assert_allclose(packed[3:7], alone(inputs_b, targets_b), atol=1e-5)


def test_every_parameter_has_logical_axes(tiny_config):
  specs = traverse_util.flatten_dict(t5.param_partition_specs(tiny_config), sep="/")
  shapes = traverse_util.flatten_dict(t5.param_shapes(tiny_config), sep="/")
  assert specs.keys() == shapes.keys()
  for name, spec in specs.items():
    assert len(spec) == len(shapes[name].shape), name
    assert set(spec) <= LOGICAL_AXES, name
  assert tuple(specs["encoder/layers_0/attention/query/kernel"]) == ("embed", "joined_kv")
  assert tuple(specs["decoder/logits_dense/kernel"]) == ("embed", "vocab")


def test_parameter_names_follow_t5x(tiny_config):
  tied = dataclasses.replace(tiny_config, logits_via_embedding=True, mlp_activations=("relu",))
  names = set(traverse_util.flatten_dict(t5.param_shapes(tied), sep="/"))
  assert {"token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
          "encoder/layers_1/mlp/wi/kernel", "encoder/encoder_norm/scale",
          "decoder/layers_0/pre_cross_attention_layer_norm/scale",
          "decoder/layers_1/encoder_decoder_attention/out/kernel",
          "decoder/decoder_norm/scale"} <= names
  assert not any("logits_dense" in name for name in names)


@pytest.mark.parametrize("dtype,output_dtype", [(jnp.float32, jnp.float32),
                                                (jnp.bfloat16, jnp.bfloat16),
                                                (jnp.bfloat16, jnp.float32)])
def test_projection_equals_a_plain_matmul_forward_and_backward(dtype, output_dtype):
  # layers.project has a hand-written backward pass; jnp.dot's is the reference.
  x = jax.random.normal(jax.random.key(0), (3, 5, 8)).astype(dtype)
  kernel = jax.random.normal(jax.random.key(1), (8, 4)).astype(dtype)
  weights = jax.random.normal(jax.random.key(2), (3, 5, 4))
  plain = lambda x, k: jnp.dot(x, k, preferred_element_type=jnp.float32).astype(output_dtype)
  ours = lambda x, k: layers.project(x, k, jnp.dtype(output_dtype))
  loss = lambda matmul: lambda x, k: jnp.sum(jnp.sin(matmul(x, k).astype(jnp.float32)) * weights)
  tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=1e-5)
  assert ours(x, kernel).dtype == output_dtype
  np.testing.assert_allclose(np.asarray(ours(x, kernel), np.float32),
                             np.asarray(plain(x, kernel), np.float32), **tolerance)
  got = jax.jit(jax.grad(loss(ours), (0, 1)))(x, kernel)
  want = jax.jit(jax.grad(loss(plain), (0, 1)))(x, kernel)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == dtype and g.shape == w.shape
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    if dtype == jnp.bfloat16:
      # Rounding the gradient before or after the product (ours: before, as a cast after
      # the forward product would) differs by bfloat16's precision at the terms' scale.
      tolerance["atol"] = 1e-2 * np.abs(w).max()
    np.testing.assert_allclose(g, w, **tolerance)


def test_dropout_only_when_enabled():
  config = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, num_encoder_layers=1,
                       num_decoder_layers=1, head_dim=8, mlp_dim=32, dropout_rate=0.3)
  params = t5.init_params(config, jax.random.key(0))
  tokens = jnp.array([[3, 4, 5, 1]])
  forward = jitted_apply(config)
  apply = lambda enable, seed: forward(
      {"params": params}, tokens, tokens, tokens, enable_dropout=enable,
      rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
  assert not np.allclose(apply(True, 0), apply(True, 1))


def test_bfloat16_activations_give_float32_logits_close_to_float32(tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(0))
  tokens = jnp.array([[3, 4, 5, 1, 0]])
  run = lambda config: jitted_apply(config)(
      {"params": params}, tokens, tokens, tokens, enable_dropout=False)
  low = run(dataclasses.replace(tiny_config, dtype="bfloat16"))
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low[0, :4], run(tiny_config)[0, :4], atol=0.5, rtol=0.1)


# ------------------------------------------------------------------------------
# How the network runs: scanned or unrolled layers, rematerialization, attention and
# dense-layer kernels change neither the parameters nor the results.
# ------------------------------------------------------------------------------
def packed_batch(config, seed=0):
  """Two packed rows of a label and a rationale example each, as the trainer sees them."""
  rng = np.random.default_rng(seed)
  example = lambda task, targets_length: random_example(
      rng, config.vocab_size, task, int(rng.integers(3, 7)), targets_length)
  return pack_examples([[example(encoder_decoder.LABEL_TASK_ID, 3),
                         example(encoder_decoder.RATIONALE_TASK_ID, 9)] for _ in range(2)])


def loss_and_gradients(config, params, batch):
  loss = lambda p: encoder_decoder.loss_terms(p, batch, None, config)[0]
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def unrolled_reference(tiny_config):
  """(config, params, batch, (loss, gradients)) of the unrolled network with the defaults, which
  each execution choice is compared with; computed once, as it is the same for every choice."""
  unrolled = dataclasses.replace(tiny_config, scan_layers=False)
  params = t5.init_params(unrolled, jax.random.key(0))
  batch = packed_batch(tiny_config)
  return unrolled, params, batch, loss_and_gradients(unrolled, params, batch)


@pytest.mark.parametrize("execution", [
    {"scan_layers": True},
    {"scan_layers": True, "remat_policy": "full"},
    {"scan_layers": True, "remat_policy": "dots_no_batch"},
    {"scan_layers": False, "remat_policy": "dots"},
    {"attention_implementation": "xla"},
    {"dense_backward": "xla"},
    {"scan_layers": True, "attention_implementation": "xla", "dense_backward": "xla"}],
    ids=lambda execution: ",".join(f"{k}={v}" for k, v in execution.items()))
def test_execution_choices_give_the_same_loss_and_gradients(unrolled_reference, execution):
  unrolled, params, batch, (expected_loss, expected_grads) = unrolled_reference
  config = dataclasses.replace(unrolled, **execution)
  loss, grads = loss_and_gradients(
      config, t5.params_in_layout(params, t5.scans_layers(config)), batch)
  grads = t5.params_in_layout(grads, stacked=False)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6),
               grads, expected_grads)


def test_scanned_layers_keep_their_parameters_stacked(tiny_config):
  scanned = dataclasses.replace(tiny_config, scan_layers=True)
  shapes = traverse_util.flatten_dict(t5.param_shapes(scanned), sep="/")
  specs = traverse_util.flatten_dict(t5.param_partition_specs(scanned), sep="/")
  assert specs.keys() == shapes.keys()
  assert not any("layers_" in name for name in shapes)
  assert shapes["encoder/layers/mlp/wo/kernel"].shape == (
      tiny_config.num_encoder_layers, tiny_config.mlp_dim, tiny_config.emb_dim)
  assert shapes["decoder/layers/pre_mlp_layer_norm/scale"].shape == (
      tiny_config.num_decoder_layers, tiny_config.emb_dim)
  for name, spec in specs.items():
    assert len(spec) == len(shapes[name].shape), name
    assert (spec[0] == "layers") == ("/layers/" in name), name
    assert set(spec) <= LOGICAL_AXES | {"layers"}, name
  assert tuple(specs["encoder/layers/attention/query/kernel"]) == ("layers", "embed", "joined_kv")
  assert tuple(specs["encoder/relpos_bias/rel_embedding"]) == ("heads", "relpos_buckets")
  # Apart from the layer axis, each stacked array is its layers' arrays.
  per_layer = traverse_util.flatten_dict(t5.param_shapes(tiny_config), sep="/")
  per_layer_specs = traverse_util.flatten_dict(t5.param_partition_specs(tiny_config), sep="/")
  for name, shape in per_layer.items():
    stacked_name = re.sub(r"/layers_\d+/", "/layers/", name)
    assert shapes[stacked_name].shape[int(stacked_name != name):] == shape.shape, name
    assert tuple(specs[stacked_name])[int(stacked_name != name):] == tuple(
        per_layer_specs[name]), name


def test_layouts_convert_exactly_both_ways(tiny_config):
  per_layer = t5.init_params(tiny_config, jax.random.key(0))
  stacked = t5.params_in_layout(per_layer, stacked=True)
  assert t5.holds_stacked_layers(stacked) and t5.holds_stacked_layers(per_layer) is False
  assert t5.holds_stacked_layers({"token_embedder": per_layer["token_embedder"]}) is None
  assert "layers_0" not in stacked["encoder"]
  kernel = stacked["encoder"]["layers"]["mlp"]["wo"]["kernel"]
  np.testing.assert_array_equal(kernel[1], per_layer["encoder"]["layers_1"]["mlp"]["wo"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, t5.params_in_layout(stacked, stacked=False),
               per_layer)
  # A tree already in the asked layout is unchanged; host arrays stay numpy arrays.
  jax.tree.map(np.testing.assert_array_equal, t5.params_in_layout(stacked, stacked=True),
               stacked)
  on_host = t5.params_in_layout(jax.device_get(per_layer), stacked=True)
  assert isinstance(on_host["decoder"]["layers"]["mlp"]["wo"]["kernel"], np.ndarray)
  with pytest.raises(ValueError, match=r"layers \[0, 2\]: expected layers_0 ... layers_1"):
    t5.params_in_layout({"layers_0": 1, "layers_2": 2}, stacked=True)


def test_abstract_trees_convert_with_their_shardings(tiny_config):
  mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
  sharding = jax.NamedSharding(mesh, jax.P("data", "model"))
  per_layer = {"encoder": {f"layers_{i}": {"kernel": jax.ShapeDtypeStruct(
      (4, 8), np.float32, sharding=sharding)} for i in range(3)}}
  stacked = t5.params_in_layout(per_layer, stacked=True)["encoder"]["layers"]["kernel"]
  assert stacked.shape == (3, 4, 8) and stacked.sharding.spec == jax.P(None, "data", "model")
  back = t5.params_in_layout({"encoder": {"layers": {"kernel": stacked}}}, stacked=False)
  assert back == per_layer


def test_a_scanned_network_initializes_the_stacked_parameters(tiny_config):
  scanned = dataclasses.replace(tiny_config, scan_layers=True)
  tokens = jnp.ones((1, 1), jnp.int32)
  boxed = t5.Transformer(scanned).init(jax.random.key(0), tokens, tokens, tokens,
                                       enable_dropout=False)["params"]
  # Two programs draw the same numbers; the CPU compiler may round them apart by an ulp.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
               nn.meta.unbox(boxed), t5.init_params(scanned, jax.random.key(0)))
  assert nn.get_partition_spec(boxed) == t5.param_partition_specs(scanned)


def test_init_params_do_not_depend_on_how_the_network_runs(tiny_config):
  reference = t5.init_params(dataclasses.replace(tiny_config, scan_layers=False),
                             jax.random.key(3))
  for execution in ({"scan_layers": False, "remat_policy": "full"},
                    {"scan_layers": True, "remat_policy": "full"}):
    params = t5.init_params(dataclasses.replace(tiny_config, **execution), jax.random.key(3))
    assert t5.holds_stacked_layers(params) == execution["scan_layers"]
    jax.tree.map(np.testing.assert_array_equal, reference,
                 t5.params_in_layout(params, stacked=False))


def test_fused_attention_refuses_attention_dropout(tiny_config):
  config = dataclasses.replace(tiny_config, attention_implementation="xla", dropout_rate=0.1)
  params = t5.init_params(config, jax.random.key(0))
  tokens = jnp.array([[3, 4, 1]])
  with pytest.raises(ValueError, match="no dropout on the attention weights"):
    t5.Transformer(config).apply({"params": params}, tokens, tokens, tokens,
                                 enable_dropout=True, rngs={"dropout": jax.random.key(0)})


def test_execution_fields_are_validated_and_not_part_of_a_saved_network(tiny_config):
  with pytest.raises(ValueError, match="remat_policy='some'"):
    dataclasses.replace(tiny_config, remat_policy="some")
  with pytest.raises(ValueError, match="attention_implementation='flash'"):
    dataclasses.replace(tiny_config, attention_implementation="flash")
  ran = dataclasses.replace(tiny_config, scan_layers=True, remat_policy="full",
                            attention_implementation="cudnn", dense_backward="xla",
                            dtype="bfloat16")
  assert ran.with_default_execution() == dataclasses.replace(tiny_config, dtype="bfloat16")
