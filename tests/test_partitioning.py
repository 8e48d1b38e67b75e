"""Tests of the mesh builder, the logical-axis rules and the shardings they give."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dsbs_jax import partitioning
from dsbs_jax import trainer
from dsbs_jax.models import t5


def _param_specs(config, parallelism, mesh_shape):
  partitioner = partitioning.make_partitioner(parallelism, mesh_shape)
  shardings = partitioner.param_shardings(t5.param_partition_specs(config),
                                          t5.param_shapes(config))
  return jax.tree.map(lambda sharding: sharding.spec, shardings)


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_shape, expected", [
    ((-1, 1), (8, 1)), ((2, -1), (2, 4)), ((4, 2), (4, 2)), ((1, 8), (1, 8))])
def test_make_mesh_resolves_the_shape(mesh_shape, expected):
  mesh = partitioning.make_mesh(mesh_shape)
  assert mesh.axis_names == ("data", "model")
  assert tuple(mesh.devices.shape) == expected
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_one_device():
  mesh = partitioning.make_mesh((-1, 1), devices=jax.devices()[:1])
  assert tuple(mesh.devices.shape) == (1, 1)


@pytest.mark.parametrize("mesh_shape, message", [
    ((3, 2), "needs 6 devices, but 8 are available"),
    ((3, -1), "do not divide by 3"),
    ((-1, -1), "expected \\(data, model\\)"),
    ((8,), "expected \\(data, model\\)")])
def test_make_mesh_rejects_shapes_that_do_not_fit(mesh_shape, message):
  with pytest.raises(ValueError, match=message):
    partitioning.make_mesh(mesh_shape)


def test_unknown_parallelism():
  with pytest.raises(ValueError, match="unknown parallelism 'pipeline'"):
    partitioning.standard_logical_axis_rules("pipeline")


def test_data_parallel_replicates_every_parameter(tiny_config):
  specs = jax.tree.leaves(_param_specs(tiny_config, "data", (8, 1)),
                          is_leaf=lambda x: isinstance(x, P))
  assert all(all(axis is None for axis in spec) for spec in specs)


def test_tensor_parallel_puts_vocab_mlp_and_heads_on_model(tiny_config):
  specs = _param_specs(tiny_config, "tensor", (2, 4))
  decoder_layer = specs["decoder"]["layers_0"]
  assert specs["token_embedder"]["embedding"] == P("model", None)
  assert specs["decoder"]["logits_dense"]["kernel"] == P(None, "model")
  assert decoder_layer["mlp"]["wi_0"]["kernel"] == P(None, "model")
  assert decoder_layer["mlp"]["wo"]["kernel"] == P("model", None)
  assert decoder_layer["self_attention"]["query"]["kernel"] == P(None, "model")
  assert decoder_layer["self_attention"]["out"]["kernel"] == P("model", None)
  assert specs["decoder"]["relpos_bias"]["rel_embedding"] == P("model", None)
  assert decoder_layer["pre_mlp_layer_norm"]["scale"] == P(None)


def test_fsdp_also_puts_embed_on_data(tiny_config):
  specs = _param_specs(tiny_config, "fsdp", (4, 2))
  assert specs["token_embedder"]["embedding"] == P("model", "data")
  assert specs["encoder"]["layers_1"]["mlp"]["wo"]["kernel"] == P("model", "data")
  assert specs["encoder"]["encoder_norm"]["scale"] == P("data")


def test_fsdp_activations_keep_batch_on_data():
  rules = partitioning.standard_logical_axis_rules("fsdp")
  assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P("data", None, None)


def test_indivisible_parameter_is_named(tiny_config):
  # 4 heads cannot split over a model axis of 8.
  with pytest.raises(ValueError, match=r"rel_embedding.*dimension 4 does not divide"):
    _param_specs(tiny_config, "tensor", (1, 8))


def test_batch_must_split_over_data_and_microbatches():
  partitioner = partitioning.make_partitioner("data", (4, 2))
  with pytest.raises(ValueError, match="global batch size 6 .* multiple of 4"):
    partitioner.shard_batch({"decoder_target_tokens": np.ones((6, 3), np.int32)})
  with pytest.raises(ValueError, match="multiple of 16"):
    partitioner.check_batch_size(8, num_microbatches=4)


def test_shard_batch_splits_rows_over_data():
  partitioner = partitioning.make_partitioner("tensor", (4, 2))
  rows = np.arange(24, dtype=np.int32).reshape(8, 3)
  sharded = partitioner.shard_batch({"decoder_target_tokens": rows})["decoder_target_tokens"]
  np.testing.assert_array_equal(np.asarray(sharded), rows)
  assert sharded.sharding.spec == P("data")
  assert {shard.data.shape for shard in sharded.addressable_shards} == {(2, 3)}


@pytest.mark.parametrize("optimizer", [
    optax.adamw(1e-3), optax.adafactor(1e-3, min_dim_size_to_factor=8),
    trainer.per_parameter(optax.adamw(1e-3)),
    trainer.per_parameter(optax.adafactor(1e-3, min_dim_size_to_factor=8))],
                         ids=["adamw", "factored_adafactor", "per_parameter_adamw",
                              "per_parameter_factored_adafactor"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "stacked"])
def test_opt_state_follows_parameters(tiny_config, optimizer, scan_layers):
  config = dataclasses.replace(tiny_config, scan_layers=scan_layers)
  partitioner = partitioning.make_partitioner("fsdp", (4, 2))
  param_shapes = t5.param_shapes(config)
  param_shardings = partitioner.param_shardings(t5.param_partition_specs(config),
                                                param_shapes)
  opt_state_shapes = jax.eval_shape(optimizer.init, param_shapes)
  shardings = partitioner.opt_state_shardings(opt_state_shapes, param_shapes, param_shardings)

  layers = config.num_encoder_layers
  wo_shape = ((layers,) if scan_layers else ()) + (config.mlp_dim, config.emb_dim)
  wo_spec = P(*((None,) if scan_layers else ()), "model", "data")
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  shapes = jax.tree.leaves(opt_state_shapes)
  mirrored = factored = 0
  for (path, sharding), shape in zip(flat, shapes):
    name = jax.tree_util.keystr(path)
    if "embedding" in name and shape.shape == (config.vocab_size, config.emb_dim):
      assert sharding.spec == P("model", "data"), name
      mirrored += 1
    elif "encoder']['layers" in name and "['mlp']['wo']" in name and shape.shape == wo_shape:
      assert sharding.spec == wo_spec, name
    elif "encoder']['layers" in name and "['mlp']['wo']" in name and "v_row" in name:
      # factored row statistics, a vector per layer: [layers, n] when stacked
      assert shape.ndim == len(wo_shape) - 1 and sharding.spec == P(), name
      factored += 1
    elif shape.ndim <= 1 and "scale" not in name:
      # counts, placeholders and factored row/column statistics
      assert sharding.spec == P(), name
  # Adam: mu and nu; factored Adafactor keeps no full-size copy of a matrix.
  assert mirrored == (2 if "mu" in str(flat) else 0)
  assert factored == (0 if "mu" in str(flat) else 1 if scan_layers else layers)
