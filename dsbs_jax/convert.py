"""Importers of pretrained T5 checkpoints (Hugging Face and T5X) into this project's model
format, and the `dsbs convert` subcommand.

    dsbs convert --from hf  SRC_DIR --out DIR
    dsbs convert --from t5x SRC     --out DIR (--gin_file FILE | --config NAME)

Only reading foreign formats and renaming/reshaping their arrays belongs here; the network
lives in models/t5.py and our own checkpoint format in checkpoints.py.
"""
import argparse
import json
import os
import pathlib
import re
import sys
from typing import Any, Callable, Optional

import gin
import numpy as np
from flax import serialization
from flax import traverse_util

from dsbs_jax import checkpoints
from dsbs_jax.models import t5

GIN_MODELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin" / "models"


class ConversionError(ValueError):
  """A checkpoint that cannot become a model of the given config; the message names the path."""


# ------------------------------------------------------------------------------
# Matching a foreign parameter set against the config's parameter tree.
# ------------------------------------------------------------------------------
def _fit_params(config: t5.T5Config, lookup: Callable[[str], Optional[np.ndarray]],
                source: pathlib.Path) -> dict[str, Any]:
  """Our parameter tree, each leaf `lookup(our/slash/name)` checked against its shape."""
  expected = traverse_util.flatten_dict(t5.param_shapes(config), sep="/")
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


def _reject_unused(names: set[str], used: set[str], source: pathlib.Path) -> None:
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


def config_from_hf(hf_config: dict[str, Any], source: pathlib.Path,
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


def _read_hf_weights(src_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a save_pretrained directory: safetensors or torch .bin, sharded or not."""
  for weights_name, reader in (("model.safetensors", _read_safetensors),
                               ("pytorch_model.bin", _read_torch_bin)):
    index_path = src_dir / f"{weights_name}.index.json"
    if index_path.is_file():
      files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
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


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=g-import-not-at-top
  # The 'flax' framework reads bfloat16, which plain numpy cannot.
  with safetensors.safe_open(path, framework="flax") as tensors:
    return {name: np.asarray(tensors.get_tensor(name), np.float32) for name in tensors.keys()}


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch), or convert the "
                      "checkpoint to safetensors first") from error
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  return {name: tensor.float().numpy() for name, tensor in state_dict.items()}


def convert_hf(src_dir, dtype: str = "float32") -> tuple[dict[str, Any], t5.T5Config]:
  """(params, config) from a Hugging Face T5 directory (config.json + weights)."""
  src_dir = pathlib.Path(src_dir).absolute()
  config_path = src_dir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"no Hugging Face config at {config_path}")
  try:
    hf_config = json.loads(config_path.read_text())
  except ValueError as error:
    raise ConversionError(f"{config_path}: not valid JSON ({error})") from None
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


# ------------------------------------------------------------------------------
# T5X: the msgpack `checkpoint` file with tensorstore arrays, or the orbax format.
# ------------------------------------------------------------------------------
# T5X names need no renaming: our tree is T5X's minimal T5 layout under `target/`
# (flaxformer's 3-d attention kernels are reshaped by `_reshape_joined_heads`).
def _find_t5x_checkpoint(path: pathlib.Path) -> pathlib.Path:
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


def _read_t5x_msgpack(checkpoint_file: pathlib.Path) -> Optional[dict[str, Any]]:
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


def _read_tensorstore(spec: dict[str, Any], checkpoint_dir: pathlib.Path,
                      name: str) -> np.ndarray:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  kvstore = dict(spec["kvstore"])
  # T5X writes paths relative to the checkpoint directory; older tensorstore
  # versions kept the path at the top level, and GCS checkpoints name a bucket
  # that a local copy no longer needs.
  relative_path = kvstore.get("path", spec.get("path"))
  spec = {key: value for key, value in spec.items() if key != "path"}
  spec["kvstore"] = {"driver": "file", "path": str(checkpoint_dir / relative_path)}
  metadata = {k: v for k, v in spec.get("metadata", {}).items()
              if k not in ("chunks", "compressor")}
  spec["metadata"] = metadata
  if not os.path.exists(spec["kvstore"]["path"]):
    raise FileNotFoundError(f"array {name} missing: no {spec['kvstore']['path']}")
  return np.asarray(ts.open(spec, open=True, read=True).result().read().result())


def _read_t5x_orbax(checkpoint_dir: pathlib.Path) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state_dir = checkpoint_dir / "state" if (checkpoint_dir / "state").is_dir() else checkpoint_dir
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(state_dir)
  target = tree.get("target", tree)
  return {name: np.asarray(value)
          for name, value in traverse_util.flatten_dict(target, sep="/").items()}


def read_t5x_params(path) -> tuple[dict[str, np.ndarray], pathlib.Path]:
  """Flat {'encoder/layers_0/...': array} of a T5X checkpoint's target, and where it was."""
  checkpoint_dir = _find_t5x_checkpoint(pathlib.Path(path).absolute())
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


def config_from_gin(gin_file) -> t5.T5Config:
  """The T5Config bound by a gin file. Clears gin's global config before and after."""
  gin_file = pathlib.Path(gin_file)
  if not gin_file.is_file():
    raise FileNotFoundError(f"no gin file at {gin_file.absolute()}")
  gin.clear_config()
  try:
    gin.parse_config_file(str(gin_file))
    return t5.T5Config()
  finally:
    gin.clear_config()


# ------------------------------------------------------------------------------
# The `dsbs convert` subcommand.
# ------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "convert", description=__doc__.split("\n\n")[0] + "\n\nThe output is what "
      "INITIAL_CHECKPOINT_PATH takes.", formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source_format", choices=("hf", "t5x"), required=True,
                      help="format of SOURCE: hf (a folder with config.json and weights, e.g. "
                           "from `hf download`) or t5x (a T5X checkpoint_N folder)")
  parser.add_argument("source", help="Hugging Face directory, or T5X checkpoint directory")
  parser.add_argument("--out", required=True, help="output model directory")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a model already at --out")
  model = parser.add_mutually_exclusive_group()
  model.add_argument("--gin_file", help="T5X only: gin file binding the T5Config")
  model.add_argument("--config", help=f"T5X only: a model name from {GIN_MODELS_DIR}, "
                     "e.g. t5_1_1_base")
  parser.add_argument("--dtype", help="activation dtype to record in the config, e.g. "
                      "bfloat16 (default: float32 for hf, the gin file's for t5x)")
  parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  try:
    out = pathlib.Path(args.out)
    if not args.overwrite and ((out / checkpoints.PARAMS_DIR).exists()
                               or (out / checkpoints.CONFIG_FILE).exists()):
      raise ConversionError(f"--out {out} already holds a model; pass --overwrite to replace it")
    if args.source_format == "hf":
      if args.gin_file or args.config:
        raise ConversionError("--gin_file/--config are for --from t5x; Hugging Face "
                              "checkpoints carry their config.json")
      params, config = convert_hf(args.source, dtype=args.dtype or "float32")
    else:
      if not (args.gin_file or args.config):
        raise ConversionError("--from t5x needs the model config: --gin_file or --config")
      gin_file = args.gin_file or GIN_MODELS_DIR / f"{args.config}.gin"
      config = config_from_gin(gin_file)
      if args.dtype:
        config = t5.T5Config.from_dict({**config.to_dict(), "dtype": args.dtype})
      params, config = convert_t5x(args.source, config)
  except (FileNotFoundError, ImportError, ValueError) as error:
    print(f"dsbs convert: error: {error}", file=sys.stderr)
    return 2
  checkpoints.save_model(args.out, params, config)
  print(f"wrote {args.out}")
  return 0
