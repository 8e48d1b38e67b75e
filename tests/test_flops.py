"""Tests for dsbs_jax.flops: parameter layout, FLOPs against XLA's own count, measured peaks."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbs_jax import flops
from dsbs_jax.models import t5

CONFIGS = {
    "v1_1": t5.T5Config(vocab_size=512, emb_dim=64, num_heads=4, num_encoder_layers=2,
                        num_decoder_layers=3, head_dim=16, mlp_dim=128,
                        mlp_activations=("gelu", "linear"), dropout_rate=0.0),
    "v1_0": t5.T5Config(vocab_size=512, emb_dim=64, num_heads=4, num_encoder_layers=2,
                        num_decoder_layers=2, head_dim=16, mlp_dim=128,
                        mlp_activations=("relu",), logits_via_embedding=True, dropout_rate=0.0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_count_matches_the_network(name):
  config = CONFIGS[name]
  shapes = jax.tree_util.tree_leaves(t5.param_shapes(config))
  assert flops.parameter_count(config) == sum(int(np.prod(s.shape)) for s in shapes)


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_flops_match_xla_cost_analysis(name):
  config = CONFIGS[name]
  batch, input_length, target_length = 2, 48, 24
  params = t5.param_shapes(config)
  tokens_in = jax.ShapeDtypeStruct((batch, input_length), jnp.int32)
  tokens_out = jax.ShapeDtypeStruct((batch, target_length), jnp.int32)
  forward = lambda p, x, y: t5.Transformer(config).apply({"params": p}, x, y, y, enable_dropout=False)
  compiled = jax.jit(forward).lower(params, tokens_in, tokens_out).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  counted = flops.forward_flops(config, batch, input_length, target_length)
  # XLA also counts softmax, norms and masks; the matmuls dominate.
  assert counted <= cost["flops"] <= 1.15 * counted


def test_training_step_is_three_forward_passes():
  config = CONFIGS["v1_1"]
  assert flops.train_step_flops(config, 4, 32, 16) == 3 * flops.forward_flops(config, 4, 32, 16)


def test_unknown_devices_use_the_best_peak_of_the_model_dtype_measured_on_the_machine(tmp_path):
  cache = tmp_path / "peaks.json"
  for dtype in (jnp.float32, jnp.bfloat16):
    peak, source = flops.peak_flops_per_device(dtype, cache)
    assert peak > 0 and f"best {jnp.dtype(dtype).name} 1024x1024 matmul" in source
    assert str(cache) in source
  keys = json.loads(cache.read_text())
  float32_key = next(key for key in keys if "float32" in key)
  # A faster figure measured earlier (on an idle machine) stays the peak of later runs...
  cache.write_text(json.dumps({float32_key: 1e15}))
  assert flops.peak_flops_per_device(jnp.float32, cache)[0] == 1e15
  # ...and a slower one gives way to this process's own measurement, which is then kept.
  cache.write_text(json.dumps({float32_key: 1.0}))
  peak, source = flops.peak_flops_per_device(jnp.float32, cache)
  assert peak > 1.0 and json.loads(cache.read_text())[float32_key] == peak
  assert f"this run measured {peak:.3g}" in source
