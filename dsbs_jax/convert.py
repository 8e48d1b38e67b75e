"""Importers of pretrained T5 checkpoints (Hugging Face and T5X) into this project's model
format, and the `dsbs convert` subcommand (its flags: command_flags.py).

Sources and --out may be local or gs:// URLs: T5X arrays are read by tensorstore and orbax,
which read gs:// themselves, and each Hugging Face weights file, which safetensors and torch
read only from a disk, from a temporary local copy.

It also holds the other direction of the Hugging Face mapping (`hf_config`, `hf_weights`),
which the exporter writes. Only foreign formats and renaming/reshaping their arrays belong
here; the network lives in models/t5.py and our own checkpoint format in checkpoints.py.
It must not import TensorFlow.
"""
import argparse
import dataclasses
import pathlib
import re
import sys
from typing import Any, Callable, Optional

import gin
from gin import config_parser
import numpy as np
from flax import serialization
from flax import traverse_util

from dsbs_jax import checkpoints
from dsbs_jax import distillation
from dsbs_jax import resources
from dsbs_jax import run_dir
from dsbs_jax import stop_signals
from dsbs_jax import storage
from dsbs_jax import text_files
from dsbs_jax.models import t5


class ConversionError(ValueError):
  """A checkpoint that cannot become a model of the given config; the message names the path."""


# ------------------------------------------------------------------------------
# Matching a foreign parameter set against the config's parameter tree.
# ------------------------------------------------------------------------------
def _fit_params(config: t5.T5Config, lookup: Callable[[str], Optional[np.ndarray]],
                source: storage.Path) -> dict[str, Any]:
  """Our parameter tree (per layer, however `config` runs), each leaf
  `lookup(our/slash/name)` checked against its shape."""
  per_layer = dataclasses.replace(config, scan_layers=False)
  expected = traverse_util.flatten_dict(t5.param_shapes(per_layer), sep="/")
  dtype = np.dtype(config.param_dtype)
  params, missing = {}, []
  for name, shape_dtype in expected.items():
    array = lookup(name)
    if array is None:
      missing.append(name)
      continue
    array = _reshape_joined_heads(np.asarray(array), shape_dtype.shape)
    if array.shape != shape_dtype.shape:
      raise ConversionError(
          f"{source}: parameter {name} has shape {array.shape} but the config expects "
          f"{shape_dtype.shape}; is the model config right?")
    params[name] = array.astype(dtype)
  if missing:
    raise ConversionError(f"{source}: missing parameters {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''}; is the model config right?")
  return traverse_util.unflatten_dict(params, sep="/")


def _reshape_joined_heads(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Flaxformer stores attention kernels as [embed, heads, head_dim] / [heads, head_dim,
  embed]; ours join heads and head_dim into one axis."""
  if array.ndim == 3 and len(shape) == 2 and (
      (array.shape[0], array.shape[1] * array.shape[2]) == shape
      or (array.shape[0] * array.shape[1], array.shape[2]) == shape):
    return array.reshape(shape)
  return array


def _reject_unused(names: set[str], used: set[str], source: storage.Path) -> None:
  unused = sorted(names - used)
  if unused:
    raise ConversionError(f"{source}: parameters the config has no place for: {unused[:8]}"
                          f"{' ...' if len(unused) > 8 else ''}; is the model config right?")


# ------------------------------------------------------------------------------
# Hugging Face (transformers' T5ForConditionalGeneration).
# ------------------------------------------------------------------------------
# Our name (regex over the '/'-joined path) -> Hugging Face name. Every 2-d kernel and
# the relative-position table are transposed (torch stores [out, in], T5X [in, out]);
# norm scales and the token embedding are copied as they are.
_ATTENTION_NAMES = {"query": "q", "key": "k", "value": "v", "out": "o"}
HF_NAME_TABLE = (
    (r"token_embedder/embedding", "shared.weight"),
    (r"(encoder|decoder)/relpos_bias/rel_embedding",
     "{0}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"encoder/layers_(\d+)/attention/(\w+)/kernel",
     "encoder.block.{0}.layer.0.SelfAttention.{1}.weight"),
    (r"encoder/layers_(\d+)/pre_attention_layer_norm/scale",
     "encoder.block.{0}.layer.0.layer_norm.weight"),
    (r"encoder/layers_(\d+)/mlp/(\w+)/kernel",
     "encoder.block.{0}.layer.1.DenseReluDense.{1}.weight"),
    (r"encoder/layers_(\d+)/pre_mlp_layer_norm/scale",
     "encoder.block.{0}.layer.1.layer_norm.weight"),
    (r"encoder/encoder_norm/scale", "encoder.final_layer_norm.weight"),
    (r"decoder/layers_(\d+)/self_attention/(\w+)/kernel",
     "decoder.block.{0}.layer.0.SelfAttention.{1}.weight"),
    (r"decoder/layers_(\d+)/pre_self_attention_layer_norm/scale",
     "decoder.block.{0}.layer.0.layer_norm.weight"),
    (r"decoder/layers_(\d+)/encoder_decoder_attention/(\w+)/kernel",
     "decoder.block.{0}.layer.1.EncDecAttention.{1}.weight"),
    (r"decoder/layers_(\d+)/pre_cross_attention_layer_norm/scale",
     "decoder.block.{0}.layer.1.layer_norm.weight"),
    (r"decoder/layers_(\d+)/mlp/(\w+)/kernel",
     "decoder.block.{0}.layer.2.DenseReluDense.{1}.weight"),
    (r"decoder/layers_(\d+)/pre_mlp_layer_norm/scale",
     "decoder.block.{0}.layer.2.layer_norm.weight"),
    (r"decoder/decoder_norm/scale", "decoder.final_layer_norm.weight"),
    # Checkpoints saved by transformers >= 5 leave lm_head out when it equals
    # shared.weight; `convert_hf` then reads shared.weight.
    (r"decoder/logits_dense/kernel", "lm_head.weight"),
)
# Hugging Face names that carry no parameter of their own: copies of shared.weight, and
# a table transformers itself ignores on load.
HF_IGNORED_NAMES = re.compile(
    r"(encoder|decoder)\.embed_tokens\.weight"
    r"|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")

# Hugging Face activation (config `dense_act_fn`) -> ours (see layers.ACTIVATIONS).
_HF_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                   "silu": "silu", "swish": "silu"}
_HF_MODEL_TYPES = ("t5", "mt5")


def hf_name(our_name: str) -> str:
  for pattern, template in HF_NAME_TABLE:
    match = re.fullmatch(pattern, our_name)
    if match:
      groups = [_ATTENTION_NAMES.get(g, g) for g in match.groups()]
      return template.format(*groups)
  raise KeyError(f"no Hugging Face name for parameter {our_name}")


def hf_layout(our_name: str, array: np.ndarray) -> np.ndarray:
  """`array` of parameter `our_name` in Hugging Face's layout, or back: 2-d kernels and the
  relative-position tables are transposed, so this is its own inverse."""
  return array.T if our_name.endswith(("kernel", "rel_embedding")) else array


def config_from_hf(hf_config: dict[str, Any], source: storage.Path,
                   dtype: str = "float32") -> t5.T5Config:
  """Our config for a transformers T5Config dict (config.json)."""
  model_type = hf_config.get("model_type")
  if model_type not in _HF_MODEL_TYPES:
    raise ConversionError(
        f"{source}: unsupported architecture model_type={model_type!r} "
        f"(architectures={hf_config.get('architectures')}); expected one of {_HF_MODEL_TYPES}")
  feed_forward = hf_config.get("feed_forward_proj", "relu")
  is_gated = feed_forward.startswith("gated-")
  # transformers maps "gated-gelu" to gelu_new (tanh); T5 v1.1 was trained with it.
  hf_activation = ("gelu_new" if feed_forward == "gated-gelu"
                   else feed_forward.split("-")[-1])
  if hf_activation not in _HF_ACTIVATIONS:
    raise ConversionError(f"{source}: unsupported feed_forward_proj {feed_forward!r}")
  activation = _HF_ACTIVATIONS[hf_activation]
  num_layers = hf_config.get("num_layers", 6)
  # Original T5 ties the output layer to the embedding and scales it by 1/sqrt(d_model);
  # v1.1 does neither. transformers >= 5 records this as `scale_decoder_outputs`,
  # earlier versions as `tie_word_embeddings`.
  scaled_tied_output = hf_config.get(
      "scale_decoder_outputs", hf_config.get("tie_word_embeddings", True) is not False)
  return t5.T5Config(
      vocab_size=hf_config["vocab_size"],
      emb_dim=hf_config["d_model"],
      num_heads=hf_config["num_heads"],
      num_encoder_layers=num_layers,
      num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
      head_dim=hf_config["d_kv"],
      mlp_dim=hf_config["d_ff"],
      mlp_activations=(activation, "linear") if is_gated else (activation,),
      dropout_rate=hf_config.get("dropout_rate", 0.1),
      logits_via_embedding=bool(scaled_tied_output),
      relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
      dtype=dtype)


def _read_hf_weights(src_dir: storage.Path) -> dict[str, np.ndarray]:
  """All tensors of a save_pretrained directory: safetensors or torch .bin, sharded or not."""
  for weights_name, reader in (("model.safetensors", _read_safetensors),
                               ("pytorch_model.bin", _read_torch_bin)):
    index_path = src_dir / f"{weights_name}.index.json"
    if index_path.is_file():
      files = sorted(set(text_files.read_json(index_path)["weight_map"].values()))
    elif (src_dir / weights_name).is_file():
      files = [weights_name]
    else:
      continue
    weights = {}
    for file_name in files:
      if not (src_dir / file_name).is_file():
        raise FileNotFoundError(f"{src_dir / file_name} (listed in {index_path}) is missing")
      weights.update(reader(src_dir / file_name))
    return weights
  raise FileNotFoundError(
      f"no weights in {src_dir}: expected model.safetensors, pytorch_model.bin, or a "
      "sharded *.index.json")


def _read_safetensors(path: storage.Path) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=g-import-not-at-top
  # The 'flax' framework reads bfloat16, which plain numpy cannot.
  with (storage.temporary_local_copy(path) as local,
        safetensors.safe_open(local, framework="flax") as tensors):
    return {name: np.asarray(tensors.get_tensor(name), np.float32) for name in tensors.keys()}


def _read_torch_bin(path: storage.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch), or convert the "
                      "checkpoint to safetensors first") from error
  with storage.temporary_local_copy(path) as local:
    state_dict = torch.load(local, map_location="cpu", weights_only=True)
  return {name: tensor.float().numpy() for name, tensor in state_dict.items()}


def convert_hf(src_dir, dtype: str = "float32") -> tuple[dict[str, Any], t5.T5Config]:
  """(params, config) from a Hugging Face T5 directory (config.json + weights)."""
  src_dir = storage.path(src_dir)
  config_path = src_dir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"no Hugging Face config at {config_path}")
  hf_config = text_files.read_json(config_path)
  # Anything but an object has no model_type, which config_from_hf names as the fault.
  config = config_from_hf(hf_config if isinstance(hf_config, dict) else {}, config_path, dtype)
  weights = _read_hf_weights(src_dir)
  used = set()

  def lookup(our_name):
    name = hf_name(our_name)
    if name == "lm_head.weight" and name not in weights:
      name = "shared.weight"
    if name not in weights:
      return None
    used.add(name)
    return hf_layout(our_name, weights[name])

  params = _fit_params(config, lookup, src_dir)
  unused = {n for n in weights if not HF_IGNORED_NAMES.fullmatch(n)}
  if config.logits_via_embedding:
    unused.discard("lm_head.weight")  # tied to shared.weight
  _reject_unused(unused, used, src_dir)
  return params, config


# Our activation -> transformers' `feed_forward_proj` (v1.1's gated GELU is "gated-gelu").
_HF_FEED_FORWARD = {"relu": "relu", "gelu": "gelu_new", "silu": "silu"}


def hf_config(config: t5.T5Config) -> dict[str, Any]:
  """transformers' config.json for `config` (its architecture: how it ran is not
  recorded), checked by importing it back."""
  activation, *gate = config.mlp_activations
  if activation not in _HF_FEED_FORWARD or gate not in ([], ["linear"]):
    raise ConversionError(f"mlp_activations {config.mlp_activations} has no transformers T5 "
                      "equivalent")
  feed_forward = _HF_FEED_FORWARD[activation]
  if gate:
    feed_forward = "gated-gelu" if activation == "gelu" else f"gated-{feed_forward}"
  values = {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
      "d_ff": config.mlp_dim, "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
      "feed_forward_proj": feed_forward,
      # Every transformers version reads this as "original T5": the output layer is the
      # embedding, scaled by 1/sqrt(d_model). Otherwise lm_head.weight is its own.
      "tie_word_embeddings": config.logits_via_embedding,
      "is_encoder_decoder": True, "decoder_start_token_id": 0,
      "pad_token_id": 0, "eos_token_id": t5.EOS_ID, "dtype": "float32"}
  imported = config_from_hf(values, pathlib.Path("config.json"), config.dtype)
  if imported != dataclasses.replace(config.with_default_execution(), param_dtype="float32"):
    raise ConversionError(f"the model config has no exact transformers T5 equivalent: {config}")
  return values


def hf_weights(params: Any) -> dict[str, np.ndarray]:
  """{Hugging Face name: float32 array} of our parameter tree (in either layout)."""
  per_layer = t5.params_in_layout(params, stacked=False)
  return {hf_name(name): np.ascontiguousarray(hf_layout(name, array), np.float32)
          for name, array in traverse_util.flatten_dict(per_layer, sep="/").items()}


# ------------------------------------------------------------------------------
# T5X: the msgpack `checkpoint` file with tensorstore arrays, or the orbax format.
# ------------------------------------------------------------------------------
# T5X names need no renaming: our tree is T5X's minimal T5 layout under `target/`
# (flaxformer's 3-d attention kernels are reshaped by `_reshape_joined_heads`).
def _find_t5x_checkpoint(path: storage.Path) -> storage.Path:
  """The checkpoint directory for a step directory, a `checkpoint` file, or a model dir."""
  if path.is_file():
    return path.parent
  if not path.is_dir():
    raise FileNotFoundError(f"no T5X checkpoint at {path}")
  steps = sorted((int(p.name.split("_")[1]), p) for p in path.glob("checkpoint_*")
                 if p.is_dir() and p.name.split("_")[1].isdigit())
  if not (path / "checkpoint").exists() and not (path / "state").is_dir() and steps:
    return steps[-1][1]
  return path


def _read_t5x_msgpack(checkpoint_file: storage.Path) -> Optional[dict[str, Any]]:
  """The target tree of a T5X msgpack checkpoint, or None if the file is not one."""
  contents = serialization.msgpack_restore(checkpoint_file.read_bytes())
  if not isinstance(contents, dict) or "optimizer" not in contents:
    return None
  target = contents["optimizer"]["target"]
  flat = traverse_util.flatten_dict(
      target, sep="/", is_leaf=lambda _, value: _is_tensorstore_spec(value))
  return {name: _read_tensorstore(value, checkpoint_file.parent, name)
          if _is_tensorstore_spec(value) else np.asarray(value)
          for name, value in flat.items()}


def _is_tensorstore_spec(value) -> bool:
  return isinstance(value, dict) and {"driver", "kvstore"} <= set(value)


def _read_tensorstore(spec: dict[str, Any], checkpoint_dir: storage.Path,
                      name: str) -> np.ndarray:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  kvstore = dict(spec["kvstore"])
  # T5X writes paths relative to the checkpoint directory; older tensorstore
  # versions kept the path at the top level, and GCS checkpoints name the bucket
  # they were written to, which the checkpoint may since have left.
  relative_path = kvstore.get("path", spec.get("path"))
  array_path = checkpoint_dir / relative_path
  spec = {key: value for key, value in spec.items() if key != "path"}
  spec["kvstore"] = (str(array_path) if storage.is_url(array_path)  # tensorstore's gs:// URL
                     else {"driver": "file", "path": str(array_path)})
  metadata = {k: v for k, v in spec.get("metadata", {}).items()
              if k not in ("chunks", "compressor")}
  spec["metadata"] = metadata
  if not array_path.exists():
    raise FileNotFoundError(f"array {name} missing: no {array_path}")
  return np.asarray(ts.open(spec, open=True, read=True).result().read().result())


def _read_t5x_orbax(checkpoint_dir: storage.Path) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state_dir = checkpoint_dir / "state" if (checkpoint_dir / "state").is_dir() else checkpoint_dir
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(state_dir)
  target = tree.get("target", tree)
  return {name: np.asarray(value)
          for name, value in traverse_util.flatten_dict(target, sep="/").items()}


def read_t5x_params(path) -> tuple[dict[str, np.ndarray], storage.Path]:
  """Flat {'encoder/layers_0/...': array} of a T5X checkpoint's target, and where it was."""
  checkpoint_dir = _find_t5x_checkpoint(storage.path(path))
  msgpack_file = checkpoint_dir / "checkpoint"
  if msgpack_file.is_file():
    flat = _read_t5x_msgpack(msgpack_file)
    if flat is not None:
      return flat, checkpoint_dir
  try:
    return _read_t5x_orbax(checkpoint_dir), checkpoint_dir
  except (FileNotFoundError, ValueError, KeyError) as error:
    raise FileNotFoundError(
        f"no T5X checkpoint at {checkpoint_dir}: neither a msgpack `checkpoint` file "
        f"nor an orbax checkpoint ({error})") from error


def convert_t5x(path, config: t5.T5Config) -> tuple[dict[str, Any], t5.T5Config]:
  """(params, config) from a T5X checkpoint, given the model config it was trained with."""
  flat, checkpoint_dir = read_t5x_params(path)
  used = set()

  def lookup(name):
    if name in flat:
      used.add(name)
    return flat.get(name)

  params = _fit_params(config, lookup, checkpoint_dir)
  _reject_unused(set(flat), used, checkpoint_dir)
  return params, config


# ------------------------------------------------------------------------------
# The model config a gin file binds: this project's `T5Config.*`, or T5X's
# `network.T5Config.*` (t5x/examples/t5), read without importing T5X.
# ------------------------------------------------------------------------------
# T5X's T5Config has this project's fields, meanings and defaults, plus this one, which
# holds no parameter: this network computes attention logits in float32 either way.
_T5X_ONLY_FIELDS = ("float32_attention_logits",)


@dataclasses.dataclass(frozen=True)
class _Macro:
  name: str


@dataclasses.dataclass(frozen=True)
class _Reference:
  name: str


class _UnresolvedValues(config_parser.ParserDelegate):
  """Keeps %macros and @references as names: resolving a reference would import its
  configurable (T5X's, for T5X files)."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    del evaluate
    return _Reference(scoped_configurable_name)

  def macro(self, macro_name):
    return _Macro(macro_name)


def _find_gin_file(name: str, search_paths: list, included_at: str) -> storage.Path:
  for folder in ("", *search_paths):  # as given (absolute, or from the working dir) first
    if storage.is_url(name) or storage.is_url(folder):
      candidate = storage.path(name) if storage.is_url(name) else storage.path(folder) / name
    else:
      candidate = pathlib.Path(folder) / name  # relative stays relative in messages
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f"{included_at}gin file {name!r} not found in the working directory "
                          f"or {[str(p) for p in search_paths]}; add its folder with "
                          "--gin_search_path")


def _read_gin_bindings(gin_file: storage.Path, search_paths: list, config_values: dict,
                       macros: dict, others: dict) -> None:
  """Adds the file's (and its includes') T5Config bindings and macros, the last one winning,
  and to `others` every other unscoped binding, as {(configurable, field): (value, where)}
  (the configurable's name without its module)."""
  try:
    statements = list(config_parser.ConfigParser(text_files.read_text(gin_file),
                                                 _UnresolvedValues()))
  except SyntaxError as error:
    raise ConversionError(f"{gin_file}: {error}") from None
  for statement in statements:
    where = f"{gin_file}:{statement.location.line_num}"
    if isinstance(statement, config_parser.IncludeStatement):
      included = _find_gin_file(statement.filename, search_paths, f"{where}: ")
      _read_gin_bindings(included, search_paths, config_values, macros, others)
    elif isinstance(statement, config_parser.BindingStatement) and not statement.scope:
      configurable = statement.selector.split(".")[-1]
      if configurable == "T5Config" and statement.arg_name:
        config_values[statement.arg_name] = (statement.value, where)
      elif not statement.arg_name:
        macros[statement.selector] = statement.value
      else:
        others[(configurable, statement.arg_name)] = (statement.value, where)


def _read_gin(gin_file, search_paths) -> tuple[storage.Path, dict, dict, dict]:
  """(the file found, its T5Config bindings, its macros, its other unscoped bindings), the
  file and its includes looked up as given, then in `search_paths`, then in gin/."""
  search_paths = [*search_paths, resources.GIN_DIR]
  found = _find_gin_file(str(gin_file), search_paths, "")
  config_values, macros, others = {}, {}, {}
  _read_gin_bindings(found, search_paths, config_values, macros, others)
  return found, config_values, macros, others


def _resolve(value, macros: dict, where: str, seen: tuple = ()):
  if isinstance(value, _Macro):
    if value.name == "gin.REQUIRED":
      return gin.REQUIRED
    if value.name not in macros or value.name in seen:
      raise ConversionError(f"{where}: macro %{value.name} is not bound to a value")
    return _resolve(macros[value.name], macros, where, (*seen, value.name))
  if isinstance(value, _Reference):
    raise ConversionError(f"{where}: T5Config fields must be plain values, not @{value.name}")
  if isinstance(value, (list, tuple)):
    return type(value)(_resolve(item, macros, where, seen) for item in value)
  return value


def config_from_gin(gin_file, search_paths=()) -> t5.T5Config:
  """The T5Config that a gin file (with its includes) binds: this project's model files, or
  T5X's, e.g. t5x/examples/t5/t5_1_1/base.gin or a T5X run's operative config.gin.

  Only T5Config bindings and the macros they use are read; nothing is imported and gin's
  global config is untouched. The file and its includes are looked up as given, then in
  `search_paths` (T5X's repository for its files), then in this project's gin/. A field
  bound to %gin.REQUIRED (T5X's DROPOUT_RATE) keeps its default: dropout and dtype are set
  by the training run.
  """
  gin_file, bindings, macros, _ = _read_gin(gin_file, search_paths)
  if "vocab_size" not in bindings:
    raise ConversionError(f"{gin_file}: binds no T5Config.vocab_size (network.T5Config.vocab_size "
                          "in T5X); is it a model gin file?")
  values = {}
  for field, (value, where) in bindings.items():
    value = _resolve(value, macros, where)
    if value is not gin.REQUIRED and field not in _T5X_ONLY_FIELDS:
      values[field] = value
  try:
    return t5.T5Config.from_dict(values)
  except (TypeError, ValueError) as error:
    raise ConversionError(f"{gin_file}: {error}") from None


def run_spec_from_gin(gin_file, search_paths=()) -> Optional[tuple[run_dir.RunSpec, str]]:
  """(run_dir.RunSpec, vocabulary file) of the run a T5X config.gin trained, for `dsbs
  predict` and `dsbs export`: its MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS, the task
  options it bound (prefixes, extra ids; this project's defaults otherwise, as its tasks
  had) and its SentencePiece file (TaskOptions.vocabulary_path, VOCABULARY_FILE or
  seqio.SentencePieceVocabulary's). None for a gin file of a model alone."""
  gin_file, _, macros, others = _read_gin(gin_file, search_paths)
  if "MIXTURE_OR_TASK_NAME" not in macros:
    return None
  value = lambda v: _resolve(v, macros, str(gin_file))
  mixture = value(macros["MIXTURE_OR_TASK_NAME"])
  lengths = value(macros.get("TASK_FEATURE_LENGTHS", _Macro("TASK_FEATURE_LENGTHS")))
  if not (isinstance(lengths, dict) and {"inputs", "targets"} <= set(lengths)):
    raise ConversionError(f"{gin_file}: TASK_FEATURE_LENGTHS must be a dict with 'inputs' and "
                          f"'targets', not {lengths!r}")
  options = {field: value(v) for (configurable, field), (v, _) in others.items()
             if configurable == "TaskOptions" and field in (
                 "label_prefix", "rationale_prefix", "label_only_prefix", "vocabulary_extra_ids",
                 "vocabulary_path")}
  vocabulary = options.pop("vocabulary_path", None)
  for candidate in (macros.get("VOCABULARY_FILE"),
                    others.get(("SentencePieceVocabulary", "sentencepiece_model_file"),
                               (None,))[0]):
    if vocabulary is None and candidate is not None:
      vocabulary = value(candidate)
  if not isinstance(vocabulary, str):
    raise ConversionError(f"{gin_file}: names MIXTURE_OR_TASK_NAME but no SentencePiece file "
                          "(TaskOptions.vocabulary_path, VOCABULARY_FILE or seqio."
                          "SentencePieceVocabulary.sentencepiece_model_file)")
  task_options = distillation.TaskOptions(**options).for_run(mixture)
  spec = run_dir.RunSpec(mixture, lengths["inputs"], lengths["targets"],
                         task_options.label_prefix, task_options.rationale_prefix,
                         task_options.vocabulary_extra_ids)
  return spec, vocabulary


def t5x_step(checkpoint_dir: storage.Path) -> Optional[int]:
  """The step of a T5X `checkpoint_N` folder, from its name."""
  match = re.fullmatch(r"checkpoint_(\d+)", checkpoint_dir.name)
  return int(match[1]) if match else None


# ------------------------------------------------------------------------------
# The `dsbs convert` subcommand.
# ------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
  trained = None  # (RunSpec, vocabulary) of the T5X run the gin file describes, if it does
  try:
    storage.check(read=[args.source], write=[args.out])
    out = storage.path(args.out)
    if not args.overwrite and ((out / checkpoints.PARAMS_DIR).exists()
                               or (out / checkpoints.CONFIG_FILE).exists()):
      raise ConversionError(f"--out {args.out} already holds a model; pass --overwrite to "
                            "replace it")
    if args.source_format == "hf":
      if args.gin_file or args.config:
        raise ConversionError("--gin_file/--config are for --from t5x; Hugging Face "
                              "checkpoints carry their config.json")
      params, config = convert_hf(args.source, dtype=args.dtype or "float32")
    else:
      if not (args.gin_file or args.config):
        raise ConversionError("--from t5x needs the model config: --gin_file or --config")
      gin_file = args.gin_file or resources.GIN_MODELS_DIR / f"{args.config}.gin"
      config = config_from_gin(gin_file, args.gin_search_path)
      if args.dtype:
        config = t5.T5Config.from_dict({**config.to_dict(), "dtype": args.dtype})
      trained = run_spec_from_gin(gin_file, args.gin_search_path) if args.gin_file else None
      if trained is not None:
        storage.check(read=[trained[1]])
      params, config = convert_t5x(args.source, config)
  except (FileNotFoundError, ImportError, ValueError) as error:
    print(f"dsbs convert: error: {error}", file=sys.stderr)
    return 2
  with stop_signals.phase(f"writing {args.out}",
                          resume="rerun the same command with --overwrite to write it whole"):
    checkpoints.save_model(args.out, params, config)
    if args.source_format == "t5x" and trained is not None:
      run = run_dir.RunDir(args.out)
      run.write_run_files(config, trained[0], trained[1])
      run.write_source({"format": "t5x", "path": str(args.source),
                        "step": t5x_step(_find_t5x_checkpoint(storage.path(args.source)))})
      print(f"wrote {args.out}: the T5X run's {trained[0].mixture_or_task_name}, ready for "
            f"dsbs predict and dsbs export (--checkpoint {args.out})")
      return 0
  print(f"wrote {args.out}")
  return 0
