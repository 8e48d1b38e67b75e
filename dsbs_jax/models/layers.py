"""T5 building blocks in Flax linen: dense, embedding, RMS norm, gated MLP, relative
position biases, and multi-head attention with a decoding cache.

Every parameter carries logical axis names and main activations are constrained by them.
This module holds no encoder/decoder wiring (see models/t5.py) and no training code.
"""
import functools
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]

# Added to attention logits at masked positions (T5X's value; finite so that
# fully masked rows, e.g. padding queries, stay NaN-free).
NEG_INF = -1e10

ACTIVATIONS = {
    "relu": jax.nn.relu,
    # The tanh approximation: T5 v1.1 was trained with it and it is what
    # Hugging Face calls `gelu_new`.
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

# What a layer's backward pass keeps from its forward pass (T5Config.remat_policy):
# everything ('none', no rematerialization), nothing ('full': the layer runs twice), or
# the products' outputs ('dots'; 'dots_no_batch' keeps only those without batch
# dimensions, i.e. the projections but not the attention scores).
NO_REMAT = object()
REMAT_POLICIES = {
    "none": NO_REMAT,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# How attention is computed (T5Config.attention_implementation): 'einsum', this module's
# products; 'xla' and 'cudnn', jax.nn.dot_product_attention's implementations (cuDNN's
# fused flash attention on NVIDIA GPUs). The last two have no dropout on the weights.
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")

# The backward pass of the dense layers (T5Config.dense_backward): 'materialized', the
# hand-written one of `project` (fast on XLA:CPU); 'xla', XLA's own differentiation of
# the product; 'auto', 'materialized' on CPUs and 'xla' elsewhere.
DENSE_BACKWARDS = ("auto", "materialized", "xla")


def uses_materialized_backward(backward: str) -> bool:
  if backward not in DENSE_BACKWARDS:
    raise ValueError(f"dense backward {backward!r}: expected one of {DENSE_BACKWARDS}")
  return backward == "materialized" or (backward == "auto" and jax.default_backend() == "cpu")


def constrain(x: Array, axes: Sequence[Optional[str]]) -> Array:
  return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
  """A bias-free linear map over the last axis, kernel [in, out].

  `dtype` is the dtype of the product's operands and, unless `output_dtype` says
  otherwise, of its result; `backward` one of DENSE_BACKWARDS.
  """
  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Initializer = default_kernel_init
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  output_dtype: Optional[jnp.dtype] = None
  backward: str = "auto"

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (inputs.shape[-1], self.features), self.param_dtype)
    product = project if uses_materialized_backward(self.backward) else _accumulated_dot
    return product(inputs.astype(self.dtype), kernel.astype(self.dtype),
                   jnp.dtype(self.output_dtype or self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x: Array, kernel: Array, output_dtype: jnp.dtype) -> Array:
  """x [..., in] @ kernel [in, out] as output_dtype, with a backward pass that XLA:CPU runs fast.

  Products accumulate in float32 and round once: for bfloat16 operands that is what
  TPUs and GPUs do inside the product, and it is what lets XLA:CPU use its native
  bfloat16 kernels (asked for a bfloat16 result it takes a path half as fast). The
  backward products take the gradient rounded to x's dtype, as a cast after the product
  would.

  The gradient is materialized (an optimization barrier) before the two backward
  matmuls. Without it XLA fuses the elementwise backward of the next layer (GELU,
  dropout) with the transpose the weight gradient needs into a strided loop, which cost
  about a fifth of the T5 v1.1-small CPU train step; with it the transpose is a plain copy.
  """
  return _accumulated_dot(x, kernel, output_dtype)


def _accumulated_dot(a: Array, b: Array, dtype: jnp.dtype) -> Array:
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)


def _project_fwd(x, kernel, output_dtype):
  return _accumulated_dot(x, kernel, output_dtype), (x, kernel)


def _project_bwd(output_dtype, residuals, grad):
  del output_dtype
  x, kernel = residuals
  grad = jax.lax.optimization_barrier(grad.astype(x.dtype))
  x_rows = x.reshape(-1, x.shape[-1])
  grad_rows = grad.reshape(-1, grad.shape[-1])
  return (_accumulated_dot(grad, kernel.T, x.dtype),
          _accumulated_dot(x_rows.T, grad_rows, kernel.dtype))


project.defvjp(_project_fwd, _project_bwd)


class Embed(nn.Module):
  """Token embedding table [vocab, embed], also usable as the output projection."""
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    # [batch, length] -> [batch, length, embed]
    embedded = jnp.take(self.embedding, tokens.astype(jnp.int32), axis=0).astype(self.dtype)
    return constrain(embedded, ("batch", "length", "embed"))

  def attend(self, query: Array) -> Array:
    """Logits [..., vocab] from the transposed table, in float32 for stability."""
    return jnp.dot(query.astype(jnp.float32), self.embedding.astype(jnp.float32).T)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class MlpBlock(nn.Module):
  """Feed-forward block: the product of one projection per activation, then `wo`.

  ('relu',) gives T5's `wi`; ('gelu', 'linear') gives T5 v1.1's gated `wi_0`, `wi_1`.
  """
  intermediate_dim: int
  activations: tuple[str, ...]
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  backward: str = "auto"

  @nn.compact
  def __call__(self, inputs: Array, *, deterministic: bool) -> Array:
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              backward=self.backward)
    hidden = None
    for index, activation in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{index}"
      projected = ACTIVATIONS[activation](
          dense(self.intermediate_dim, ("embed", "mlp"), name=name)(inputs))
      hidden = projected if hidden is None else hidden * projected
    # T5 drops whole feature vectors, shared along the length axis.
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    return dense(inputs.shape[-1], ("mlp", "embed"), name="wo")(hidden)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """T5's bucket of `key_position - query_position` (exact for small distances, log-spaced after).

  Float32 arithmetic in the same order as Mesh TensorFlow and Hugging Face, so that
  bucket boundaries agree with the checkpoints' training code.
  """
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # Clamped to max_exact only to keep log() finite; those entries take the exact branch.
  log_ratio = jnp.log(jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact)
  if_large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact)).astype(relative_position.dtype)
  if_large = jnp.minimum(if_large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, if_large)


class RelativePositionBiases(nn.Module):
  """Per-head attention biases looked up by relative-position bucket (table [heads, buckets])."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array, *,
               bidirectional: bool) -> Array:
    """Biases [1, heads, queries, keys] for 1-d integer position vectors."""
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), self.param_dtype)
    relative_position = (jnp.asarray(key_positions, jnp.int32)[None, :]
                         - jnp.asarray(query_positions, jnp.int32)[:, None])
    buckets = relative_position_bucket(
        relative_position, bidirectional=bidirectional, num_buckets=self.num_buckets,
        max_distance=self.max_distance)
    # [heads, queries, keys]
    biases = jnp.take(table.astype(jnp.float32), buckets, axis=1)
    return biases[None]


class MultiHeadAttention(nn.Module):
  """T5 attention: no 1/sqrt(head_dim) logit scaling (T5 folds it into the query init).

  With `decode=True` the module keeps its keys and values in the 'cache' collection.
  The first such call (no cache yet) creates it: zeros of the full length for
  self-attention, the projected encoder output for cross-attention. Later calls feed
  one query position (`decode_position`) and read the cache. Decoding always uses the
  'einsum' implementation: one query per step leaves nothing for a fused kernel to win.
  """
  num_heads: int
  head_dim: int
  is_cross_attention: bool = False
  dropout_rate: float = 0.0
  implementation: str = "einsum"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  backward: str = "auto"

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array] = None,
               bias: Optional[Array] = None, *, deterministic: bool, decode: bool = False,
               decode_position: Optional[Array] = None) -> Array:
    """inputs_q [batch, q_len, embed], inputs_kv [batch, kv_len, embed], boolean mask
    broadcastable to [batch, heads, q_len, kv_len], bias likewise; returns [batch, q_len, embed]."""
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              backward=self.backward)
    projection = functools.partial(dense, self.num_heads * self.head_dim, ("embed", "joined_kv"))
    # [batch, length, heads * head_dim] -> [batch, length, heads, head_dim]
    split_heads = lambda x: constrain(
        x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim)),
        ("batch", "length", "heads", "kv"))
    query_init = lambda *args: default_kernel_init(*args) / math.sqrt(self.head_dim)
    query = split_heads(projection(kernel_init=query_init, name="query")(inputs_q))
    project_key_value = lambda: (split_heads(projection(name="key")(inputs_kv)),
                                 split_heads(projection(name="value")(inputs_kv)))

    # The cache holds keys and values heads-major, [batch, heads, kv_len, head_dim], the
    # layout the attention products read: stored length-major, every decoding step
    # would transpose the whole cache (XLA puts the batch dimensions of a product first).
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)
    has_cache = self.has_variable("cache", "cached_key")
    if decode and self.is_cross_attention:
      # The encoder output is fixed while decoding: project it once, then reuse.
      if has_cache:
        key = self.get_variable("cache", "cached_key")
        value = self.get_variable("cache", "cached_value")
      else:
        key, value = map(heads_major, project_key_value())
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
    else:
      key, value = project_key_value()
      if decode:
        key, value = heads_major(key), heads_major(value)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                     value.dtype)
        if has_cache:
          start = (0, 0, decode_position, 0)
          key = jax.lax.dynamic_update_slice(cached_key.value, key, start)
          value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
          cached_key.value, cached_value.value = key, value
          # The one query sees the positions written so far, itself included.
          mask = (jnp.arange(key.shape[2]) <= decode_position)[None, None, None, :]

    if decode or self.implementation == "einsum":
      attended = self._einsum_attention(query, key, value, mask, bias, deterministic,
                                        kv="bhkd" if decode else "bkhd")
    else:
      if self.dropout_rate and not deterministic:
        raise ValueError(f"attention implementation {self.implementation!r} has no dropout "
                         f"on the attention weights (dropout_rate={self.dropout_rate}); use "
                         "'einsum' or train with dropout_rate=0")
      # [batch, q_len, heads, head_dim]; T5's logits are not scaled.
      attended = jax.nn.dot_product_attention(
          query, key, value.astype(self.dtype),
          None if bias is None else bias.astype(self.dtype), mask, scale=1.0,
          implementation=self.implementation)
    attended = attended.reshape(attended.shape[:2] + (self.num_heads * self.head_dim,))
    return dense(inputs_q.shape[-1], ("joined_kv", "embed"), name="out")(attended)

  def _einsum_attention(self, query, key, value, mask, bias, deterministic, kv):
    """[batch, q_len, heads, head_dim] from keys and values laid out as `kv` says."""
    # [batch, heads, q_len, kv_len], float32 even for bfloat16 activations.
    logits = jnp.einsum(f"bqhd,{kv}->bhqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, NEG_INF)
    weights = jax.nn.softmax(logits).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        weights, deterministic=deterministic)
    return jnp.einsum(f"bhqk,{kv}->bqhd", weights, value.astype(self.dtype))


def make_attention_mask(query_input: Array, key_input: Array,
                        pairwise_fn: Callable[[Array, Array], Array] = jnp.logical_and) -> Array:
  """A boolean mask [batch, 1, q_len, kv_len] from per-position values [batch, len]."""
  return pairwise_fn(query_input[:, :, None], key_input[:, None, :])[:, None]


def make_decoder_mask(decoder_target_tokens: Array,
                      decoder_segment_ids: Optional[Array] = None) -> Array:
  """Causal, padding and (if packed) same-segment mask [batch, 1, len, len]."""
  valid = decoder_target_tokens > 0
  positions = jnp.broadcast_to(jnp.arange(decoder_target_tokens.shape[1]),
                               decoder_target_tokens.shape)
  mask = make_attention_mask(valid, valid) & make_attention_mask(
      positions, positions, jnp.greater_equal)
  if decoder_segment_ids is not None:
    mask &= make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal)
  return mask
