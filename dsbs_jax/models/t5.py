"""The T5 encoder-decoder (T5 v1.0, v1.1 and Flan-T5) in Flax, its config, helpers to
initialize parameters and get their logical partition specs, and the conversion of
parameter trees between the two layouts of the layers.

Parameter names follow T5X's minimal T5 example so T5X checkpoints load without renaming.
Unrolled, each stack keeps its layers apart (`layers_0`, `layers_1`, ...): the per-layer
layout of model folders, converters and Hugging Face. With `scan_layers` the layers run as
one compiled body scanned over depth, reading the stacked layout as T5X and MaxText keep
it: one `layers` subtree per stack whose arrays have a leading layer axis (logical name
'layers'). `init_params`, `param_shapes` and `param_partition_specs` give the layout the
config runs with; `params_in_layout` converts any tree that mirrors parameter paths
(parameters, gradients, optimizer states) at the boundaries where the other is needed.
With decode=True the decoder runs one step over its key/value cache; the generation loops
that drive it live with the loss in encoder_decoder.py. This module holds no loss,
generation, optimizer, data or checkpoint-file code.
"""
import dataclasses
import functools
import json
import numbers
import re
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from dsbs_jax.models import layers

EOS_ID = 1
# A scanned stack's module holding every layer, and the logical axis name of the leading
# layer axis of its parameters.
STACKED_KEY = "layers"


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Field type -> (whether a value is one, what to call it): T5Config checks its values, which
# gin files and config.json files give untyped.
_TYPE_CHECKS = {
    int: (lambda value: _is_number(value) and isinstance(value, numbers.Integral) and value > 0,
          "a positive integer"),
    float: (_is_number, "a number"),
    bool: (lambda value: isinstance(value, bool), "a boolean"),
    Optional[bool]: (lambda value: value is None or isinstance(value, bool), "a boolean or None"),
    str: (lambda value: isinstance(value, str), "a string"),
    tuple[str, ...]: (lambda value: isinstance(value, (list, tuple))
                      and all(isinstance(item, str) for item in value), "a list of strings"),
}
# Fields whose values are narrower than their type's.
_FIELD_CHECKS = {
    "dropout_rate": (lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1)"),
    "layer_norm_epsilon": (lambda value: _is_number(value) and value > 0, "a positive number"),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of the network; defaults are T5 v1.0 small's."""
  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  # One per input projection, multiplied together: ('relu',) for T5 v1.0,
  # ('gelu', 'linear') for v1.1's gated GELU. Names are keys of layers.ACTIVATIONS.
  mlp_activations: tuple[str, ...] = ("relu",)
  dropout_rate: float = 0.1
  # Output logits from the transposed token embedding, scaled by 1/sqrt(emb_dim)
  # as T5 v1.0 does, instead of a separate `logits_dense` kernel.
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # activations, e.g. "bfloat16"
  param_dtype: str = "float32"
  # How the network runs, not what it computes: these change neither the parameters nor
  # (beyond rounding) the outputs, so a run may choose them for a pretrained checkpoint.
  # One compiled layer body scanned over each stack, so compile time stays flat in depth;
  # None: scanned on accelerators, unrolled on CPUs (XLA:CPU compiles repeated layers
  # once anyway, and runs them unrolled faster).
  scan_layers: Optional[bool] = None
  # What the backward pass recomputes instead of keeping: see layers.REMAT_POLICIES.
  remat_policy: str = "none"
  # See layers.ATTENTION_IMPLEMENTATIONS; 'cudnn' needs an NVIDIA GPU.
  attention_implementation: str = "einsum"
  # See layers.DENSE_BACKWARDS: 'auto' picks the one measured fastest on each backend.
  dense_backward: str = "auto"

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      accepts, expected = _FIELD_CHECKS.get(field.name, _TYPE_CHECKS[field.type])
      if not accepts(value):
        raise ValueError(f"T5Config.{field.name}={value!r}: expected {expected}")
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    unknown = [a for a in self.mlp_activations if a not in layers.ACTIVATIONS]
    if not self.mlp_activations or unknown:
      raise ValueError(f"mlp_activations {self.mlp_activations!r}: each must be one of "
                       f"{sorted(layers.ACTIVATIONS)}")
    for name in ("dtype", "param_dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name
    for name, allowed in (("remat_policy", layers.REMAT_POLICIES),
                          ("attention_implementation", layers.ATTENTION_IMPLEMENTATIONS),
                          ("dense_backward", layers.DENSE_BACKWARDS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"T5Config.{name}={getattr(self, name)!r}: expected one of "
                         f"{sorted(allowed)}")

  def with_default_execution(self) -> "T5Config":
    """This network with EXECUTION_FIELDS at their defaults (what suits the backend)."""
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    return dataclasses.replace(self, **{name: defaults[name] for name in EXECUTION_FIELDS})

  def to_dict(self) -> dict[str, Any]:
    values = dataclasses.asdict(self)
    values["mlp_activations"] = list(self.mlp_activations)
    return values

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "T5Config":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown T5Config fields: {unknown}")
    # Every field is passed so that gin bindings in scope cannot leak in.
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return cls(**{**defaults, **values})

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# T5Config fields that choose how the network runs, not what it computes: each run sets
# its own, whatever a checkpoint's config.json recorded (see `with_default_execution`).
EXECUTION_FIELDS = ("scan_layers", "remat_policy", "attention_implementation", "dense_backward")


def _dtypes(config: T5Config) -> dict[str, jnp.dtype]:
  return {"dtype": jnp.dtype(config.dtype), "param_dtype": jnp.dtype(config.param_dtype)}


def _dense_options(config: T5Config) -> dict[str, Any]:
  return dict(_dtypes(config), backward=config.dense_backward)


def scans_layers(config: T5Config) -> bool:
  """Whether the network runs its layers as a scan (T5Config.scan_layers, resolved)."""
  if config.scan_layers is None:
    return jax.default_backend() != "cpu"
  return config.scan_layers


def _dropout(config: T5Config, x, deterministic: bool):
  return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


def _attention(config: T5Config, name: str, is_cross_attention: bool = False):
  return layers.MultiHeadAttention(
      num_heads=config.num_heads, head_dim=config.head_dim,
      is_cross_attention=is_cross_attention, dropout_rate=config.dropout_rate,
      implementation=config.attention_implementation, name=name, **_dense_options(config))


def _norm(config: T5Config, name: str):
  return layers.RMSNorm(epsilon=config.layer_norm_epsilon, name=name, **_dtypes(config))


def _mlp(config: T5Config):
  return layers.MlpBlock(
      intermediate_dim=config.mlp_dim, activations=config.mlp_activations,
      dropout_rate=config.dropout_rate, name="mlp", **_dense_options(config))


def _relpos_bias(config: T5Config):
  # One table per stack, shared by its layers (T5 keeps it in the first layer only).
  return layers.RelativePositionBiases(
      num_buckets=config.relative_attention_num_buckets,
      max_distance=config.relative_attention_max_distance, num_heads=config.num_heads,
      name="relpos_bias", **_dtypes(config))


# Layers take their Python-valued switches as attributes and every array as an argument,
# and return (outputs, None): the (carry, per-step output) pair that nn.scan expects.
class EncoderLayer(nn.Module):
  """Pre-norm self-attention then MLP, each added back to its input."""
  config: T5Config
  deterministic: bool

  @nn.compact
  def __call__(self, inputs, mask, bias):
    cfg, deterministic = self.config, self.deterministic
    # [batch, length, embed]
    x = _norm(cfg, "pre_attention_layer_norm")(inputs)
    x = _attention(cfg, "attention")(x, x, mask, bias, deterministic=deterministic)
    x = inputs + _dropout(cfg, x, deterministic)
    y = _mlp(cfg)(_norm(cfg, "pre_mlp_layer_norm")(x), deterministic=deterministic)
    y = x + _dropout(cfg, y, deterministic)
    return layers.constrain(y, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, attention to the encoder, then MLP."""
  config: T5Config
  deterministic: bool
  decode: bool

  @nn.compact
  def __call__(self, inputs, encoded, self_mask, cross_mask, bias, decode_position):
    cfg, deterministic, decode = self.config, self.deterministic, self.decode
    # [batch, length, embed]
    x = _norm(cfg, "pre_self_attention_layer_norm")(inputs)
    x = _attention(cfg, "self_attention")(
        x, x, self_mask, bias, deterministic=deterministic, decode=decode,
        decode_position=decode_position)
    x = inputs + _dropout(cfg, x, deterministic)
    y = _norm(cfg, "pre_cross_attention_layer_norm")(x)
    y = _attention(cfg, "encoder_decoder_attention", is_cross_attention=True)(
        y, encoded, cross_mask, deterministic=deterministic, decode=decode)
    y = x + _dropout(cfg, y, deterministic)
    z = _mlp(cfg)(_norm(cfg, "pre_mlp_layer_norm")(y), deterministic=deterministic)
    z = y + _dropout(cfg, z, deterministic)
    return layers.constrain(z, ("batch", "length", "embed")), None


def _run_layers(config: T5Config, layer_cls, num_layers: int, parent_kwargs: dict,
                inputs, *args):
  """Applies `num_layers` layers to `inputs`, unrolled or scanned, rematerialized as configured.

  Must be called inside the stack's compact method. Unrolled layers are named `layers_i`;
  scanned, one `layers` module holds every parameter and cache entry with a layer axis
  (parameters: axis 0, the stacked layout of `params_in_layout`; caches: axis 1, so that
  their leading axis stays the batch, which beam search reorders).
  """
  policy = layers.REMAT_POLICIES[config.remat_policy]
  scanned = scans_layers(config)
  if policy is not layers.NO_REMAT:
    # Under scan, XLA cannot merge the recomputation with the forward pass anyway.
    layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not scanned)
  if not scanned:
    x = inputs
    for index in range(num_layers):
      x, _ = layer_cls(config, name=f"layers_{index}", **parent_kwargs)(x, *args)
    return x
  scan = nn.scan(
      layer_cls, variable_axes={"params": 0, "cache": 1},
      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * len(args),
      length=num_layers, metadata_params={nn.PARTITION_NAME: STACKED_KEY})
  x, _ = scan(config, name=STACKED_KEY, **parent_kwargs)(inputs, *args)
  return x


# ------------------------------------------------------------------------------
# The two layouts of a stack's layers, and the conversion between them.
# ------------------------------------------------------------------------------
_PER_LAYER_KEY = re.compile(r"layers_(\d+)")


def _is_dict(node) -> bool:
  return isinstance(node, dict)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _per_layer_keys(node: dict) -> list[str]:
  """`node`'s keys `layers_0 ... layers_{n-1}` in layer order; ValueError if some are missing."""
  indices = sorted(int(match.group(1)) for key in node if isinstance(key, str)
                   for match in [_PER_LAYER_KEY.fullmatch(key)] if match)
  if indices != list(range(len(indices))):
    raise ValueError(f"layers {indices}: expected layers_0 ... layers_{len(indices) - 1}")
  if indices and STACKED_KEY in node:
    raise ValueError(f"both {STACKED_KEY!r} and per-layer keys in one node: {sorted(node)}")
  return [f"layers_{index}" for index in indices]


def _sharding_with_layer_axis(sharding, stacked: bool):
  """A NamedSharding with an unsharded leading layer axis added, or its leading axis removed."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  spec = (None,) + spec if stacked else spec[1:]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec),
                                    memory_kind=sharding.memory_kind)


def _stack(*per_layer):
  first = per_layer[0]
  if _is_boxed(first):
    return first.replace(value=_stack(*(x.value for x in per_layer)),
                         names=(STACKED_KEY,) + tuple(first.names))
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(per_layer),) + tuple(first.shape), first.dtype,
                                sharding=_sharding_with_layer_axis(first.sharding, True))
  if isinstance(first, (np.ndarray, np.generic)):
    return np.stack(per_layer)  # host arrays stay on the host
  return jnp.stack(per_layer)


def _layer(stacked, index: int):
  if _is_boxed(stacked):
    return stacked.replace(value=_layer(stacked.value, index), names=tuple(stacked.names)[1:])
  if isinstance(stacked, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(stacked.shape[1:]), stacked.dtype,
                                sharding=_sharding_with_layer_axis(stacked.sharding, False))
  return stacked[index]


def _num_stacked_layers(stacked_tree) -> int:
  sizes = {(leaf.value if _is_boxed(leaf) else leaf).shape[0]
           for leaf in jax.tree.leaves(stacked_tree, is_leaf=_is_boxed)}
  if len(sizes) != 1:
    raise ValueError(f"stacked layers of sizes {sorted(sizes)}: expected one leading "
                     "layer axis shared by every array")
  return sizes.pop()


def _with_layers_stacked(node: dict) -> dict:
  names = _per_layer_keys(node)
  if not names:
    return node
  stacked = {key: value for key, value in node.items() if key not in names}
  stacked[STACKED_KEY] = jax.tree.map(_stack, *(node[name] for name in names), is_leaf=_is_boxed)
  return stacked


def _with_layers_apart(node: dict) -> dict:
  _per_layer_keys(node)  # refuses a node that mixes the layouts
  if STACKED_KEY not in node:
    return node
  per_layer = {key: value for key, value in node.items() if key != STACKED_KEY}
  for index in range(_num_stacked_layers(node[STACKED_KEY])):
    per_layer[f"layers_{index}"] = jax.tree.map(
        lambda x, i=index: _layer(x, i), node[STACKED_KEY], is_leaf=_is_boxed)
  return per_layer


def params_in_layout(tree: Any, stacked: bool) -> Any:
  """`tree` with every stack's layers stacked (`stacked`, the layout of a scanned network,
  `scans_layers(config)`) or apart (the per-layer layout of an unrolled one, and of model
  folders, converters and Hugging Face), from either layout.

  Any pytree whose dict nodes mirror parameter paths converts: a dict node holding
  `layers_0 ... layers_{n-1}` becomes one holding `layers`, each leaf of which stacks the
  layers' leaves along a new leading axis, and back. So parameters, gradients, optimizer
  states (trainer.per_parameter's: their leaves under `layers` carry the layer axis too)
  convert alike; boxed parameters gain or lose the leading 'layers' logical axis name,
  ShapeDtypeStructs an unsharded leading axis of their NamedSharding; host (numpy) arrays
  stay on the host. Nodes already in the asked layout, and everything else, are unchanged.
  """
  restructure = _with_layers_stacked if stacked else _with_layers_apart

  def convert(node):
    if not _is_dict(node):
      return node
    return restructure({key: jax.tree.map(convert, value, is_leaf=_is_dict)
                        for key, value in node.items()})

  return jax.tree.map(convert, tree, is_leaf=_is_dict)


def holds_stacked_layers(tree: Any) -> Optional[bool]:
  """Whether `tree` (as `params_in_layout` takes) holds its layers stacked (True) or apart
  (False); None if it holds no layers. ValueError if it holds both."""
  layouts = set()

  def visit(node):
    if _is_dict(node):
      if STACKED_KEY in node:
        layouts.add(True)
      if _per_layer_keys(node):
        layouts.add(False)
      for value in node.values():
        jax.tree.map(visit, value, is_leaf=_is_dict)
    return node

  jax.tree.map(visit, tree, is_leaf=_is_dict)
  if len(layouts) > 1:
    raise ValueError("a tree with some layers stacked and others apart")
  return layouts.pop() if layouts else None


class Encoder(nn.Module):
  config: T5Config
  token_embedder: nn.Module

  @nn.compact
  def __call__(self, tokens, mask, *, deterministic: bool):
    cfg = self.config
    # [batch, length] -> [batch, length, embed]
    x = _dropout(cfg, self.token_embedder(tokens), deterministic)
    # Row positions: within a packed segment, relative distances equal the segment's own.
    positions = np.arange(tokens.shape[1])
    bias = _relpos_bias(cfg)(positions, positions, bidirectional=True)
    x = _run_layers(cfg, EncoderLayer, cfg.num_encoder_layers,
                    {"deterministic": deterministic}, x, mask, bias)
    x = _norm(cfg, "encoder_norm")(x)
    return _dropout(cfg, x, deterministic)


class Decoder(nn.Module):
  config: T5Config
  token_embedder: nn.Module

  @nn.compact
  def __call__(self, encoded, tokens, self_mask, cross_mask, *, deterministic: bool,
               decode: bool, max_decode_length: Optional[int]):
    cfg = self.config
    # [batch, length] -> [batch, length, embed]
    y = _dropout(cfg, self.token_embedder(tokens), deterministic)
    decode_position = None
    key_positions = np.arange(tokens.shape[1])
    query_positions = key_positions
    if decode:
      is_step = self.has_variable("cache", "cache_index")
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if is_step:
        if max_decode_length is None:
          raise ValueError("decoding with a cache needs max_decode_length")
        decode_position = cache_index.value
        cache_index.value = decode_position + 1
        query_positions = decode_position[None]
        key_positions = np.arange(max_decode_length)
    bias = _relpos_bias(cfg)(query_positions, key_positions, bidirectional=False)
    y = _run_layers(cfg, DecoderLayer, cfg.num_decoder_layers,
                    {"deterministic": deterministic, "decode": decode},
                    y, encoded, self_mask, cross_mask, bias, decode_position)
    y = _dropout(cfg, _norm(cfg, "decoder_norm")(y), deterministic)
    if cfg.logits_via_embedding:
      logits = self.token_embedder.attend(y) / np.sqrt(cfg.emb_dim)
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), output_dtype=jnp.float32,
                            name="logits_dense", **_dense_options(cfg))(y)
    # [batch, length, vocab]
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """The encoder-decoder with T5X's interface. Token 0 is padding, 1 is EOS."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, **_dtypes(cfg))
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, *,
             enable_dropout: bool = True):
    """[batch, length] tokens -> [batch, length, embed].

    `encoder_positions` is accepted for T5X's interface; relative attention needs none.
    """
    del encoder_positions
    valid = encoder_input_tokens > 0
    mask = layers.make_attention_mask(valid, valid)
    if encoder_segment_ids is not None:
      mask &= layers.make_attention_mask(encoder_segment_ids, encoder_segment_ids, jnp.equal)
    return self.encoder(encoder_input_tokens, mask, deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, *,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None):
    """Logits [batch, length, vocab] (float32) for the decoder inputs.

    With decode=True the first call creates the 'cache' collection (pass inputs of the
    full decoding length); later calls take one token [batch, 1] each.
    """
    del decoder_positions  # as encoder_positions in `encode`
    encoder_valid = encoder_input_tokens > 0
    if decode:
      if encoder_segment_ids is not None:
        raise ValueError("packed inputs (segment ids) cannot be decoded with a cache")
      self_mask = None  # the attention's cache supplies the causal mask
      cross_mask = layers.make_attention_mask(
          jnp.ones_like(decoder_input_tokens, dtype=bool), encoder_valid)
    else:
      self_mask = layers.make_decoder_mask(decoder_target_tokens, decoder_segment_ids)
      cross_mask = layers.make_attention_mask(decoder_target_tokens > 0, encoder_valid)
      if encoder_segment_ids is not None:
        cross_mask &= layers.make_attention_mask(
            decoder_segment_ids, encoder_segment_ids, jnp.equal)
    return self.decoder(encoded, decoder_input_tokens, self_mask, cross_mask,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout: bool = True):
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout=enable_dropout)


def _init_variables(config: T5Config, rng: jax.Array):
  # Always through the scan: one layer's initializers to compile instead of every
  # layer's (on CPU 3 s instead of 11 s for T5 v1.1-small), and the same values whichever
  # way the network will run. The parameters come stacked; unrolled, they are unstacked.
  scanned = dataclasses.replace(config, scan_layers=True, remat_policy="none")
  tokens = jnp.ones((1, 1), jnp.int32)
  variables = Transformer(scanned).init(rng, tokens, tokens, tokens, enable_dropout=False)
  return params_in_layout(variables["params"], scans_layers(config))


def _abstract_boxed_params(config: T5Config):
  return jax.eval_shape(functools.partial(_init_variables, config), jax.random.key(0))


def init_params(config: T5Config, rng: jax.Array) -> dict[str, Any]:
  """Freshly initialized parameters (plain arrays, T5X names), in the layout `config` runs
  with: stacked if `scans_layers(config)`, else per layer (see `params_in_layout`)."""
  init = jax.jit(functools.partial(_init_variables, config))
  return nn.meta.unbox(init(rng))


def param_shapes(config: T5Config) -> dict[str, Any]:
  """The tree `init_params` gives, as jax.ShapeDtypeStruct leaves, computed without allocating."""
  return nn.meta.unbox(_abstract_boxed_params(config))


def param_partition_specs(config: T5Config) -> dict[str, Any]:
  """PartitionSpecs of logical axis names ('embed', 'mlp', ...) for every parameter of
  `param_shapes` (a stacked array's leading axis is 'layers').

  Map them to a mesh with nn.logical_to_mesh_sharding(specs, mesh, rules).
  """
  return nn.get_partition_spec(_abstract_boxed_params(config))
