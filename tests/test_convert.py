"""Tests for dsbs_jax.convert and dsbs_jax.checkpoints: Hugging Face and T5X imports
proven equal to transformers on random tiny models, and clear errors."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from flax import traverse_util

from conftest import make_hf_t5
from dsbs_jax import checkpoints
from dsbs_jax import cli
from dsbs_jax import convert
from dsbs_jax import resources
from dsbs_jax.models import t5

import torch
from safetensors import torch as safetensors_torch

# Two padded examples: [batch, length] inputs and targets, 0 = padding, 1 = EOS.
ENCODER_TOKENS = np.array([[5, 17, 33, 90, 12, 7, 1, 0],
                           [44, 3, 1, 0, 0, 0, 0, 0]])
DECODER_TARGETS = np.array([[8, 9, 100, 1, 0],
                            [77, 66, 55, 44, 1]])


def shift_right(targets):
  return np.pad(targets, ((0, 0), (1, 0)))[:, :-1]


def hf_logits(model, encoder_tokens, decoder_targets):
  with torch.no_grad():
    return model(input_ids=torch.tensor(encoder_tokens),
                 attention_mask=torch.tensor(encoder_tokens > 0),
                 decoder_input_ids=torch.tensor(shift_right(decoder_targets)),
                 decoder_attention_mask=torch.tensor(decoder_targets > 0)).logits.numpy()


def our_logits(params, config, encoder_tokens, decoder_targets):
  return np.asarray(t5.Transformer(config).apply(
      {"params": params}, jnp.asarray(encoder_tokens),
      jnp.asarray(shift_right(decoder_targets)), jnp.asarray(decoder_targets),
      enable_dropout=False))


def run_convert(*argv) -> int:
  return cli.main(["convert", *map(str, argv)])


def assert_logits_match(hf_model, model_dir):
  params, config = checkpoints.load_model(model_dir)
  expected = hf_logits(hf_model, ENCODER_TOKENS, DECODER_TARGETS)
  actual = our_logits(params, config, ENCODER_TOKENS, DECODER_TARGETS)
  valid = DECODER_TARGETS > 0  # padded positions are masked differently, and unused
  np.testing.assert_allclose(actual[valid], expected[valid], atol=1e-4, rtol=1e-4)


def write_flan_style(model, directory: pathlib.Path):
  """A directory as the public Flan-T5 ones: lm_head.weight saved, tie_word_embeddings false."""
  directory.mkdir()
  state = {k: v.clone() for k, v in model.state_dict().items()}
  safetensors_torch.save_file(state, directory / "model.safetensors")
  hf_config = model.config.to_dict()
  hf_config.pop("scale_decoder_outputs", None)
  hf_config["tie_word_embeddings"] = False
  (directory / "config.json").write_text(json.dumps(hf_config))


def test_hf_v1_1_save_pretrained_matches_transformers(tmp_path):
  model = make_hf_t5("v1.1")
  model.save_pretrained(tmp_path / "hf")
  assert run_convert("--from", "hf", tmp_path / "hf", "--out", tmp_path / "ours") == 0
  assert_logits_match(model, tmp_path / "ours")


def test_hf_flan_style_untied_output_matches_transformers(tmp_path):
  model = make_hf_t5("v1.1", seed=1)
  write_flan_style(model, tmp_path / "hf")
  assert run_convert("--from", "hf", tmp_path / "hf", "--out", tmp_path / "ours") == 0
  params, config = checkpoints.load_model(tmp_path / "ours")
  assert not config.logits_via_embedding
  np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"],
                                model.lm_head.weight.detach().numpy().T)
  assert_logits_match(model, tmp_path / "ours")


def test_hf_v1_0_tied_pytorch_bin_matches_transformers(tmp_path):
  model = make_hf_t5("v1.0")
  (tmp_path / "hf").mkdir()
  model.config.save_pretrained(tmp_path / "hf")
  torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
  assert run_convert("--from", "hf", tmp_path / "hf", "--out", tmp_path / "ours") == 0
  params, config = checkpoints.load_model(tmp_path / "ours")
  assert config.logits_via_embedding and config.mlp_activations == ("relu",)
  assert "logits_dense" not in params["decoder"]
  assert_logits_match(model, tmp_path / "ours")


def test_hf_sharded_safetensors_matches_transformers(tmp_path):
  model = make_hf_t5("v1.0", seed=2)
  model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
  assert run_convert("--from", "hf", tmp_path / "hf", "--out", tmp_path / "ours") == 0
  assert_logits_match(model, tmp_path / "ours")


def test_hf_name_table_covers_every_parameter(tiny_config):
  names = traverse_util.flatten_dict(t5.param_shapes(tiny_config), sep="/")
  assert convert.hf_name("encoder/layers_1/attention/query/kernel") == (
      "encoder.block.1.layer.0.SelfAttention.q.weight")
  assert convert.hf_name("decoder/layers_0/mlp/wi_1/kernel") == (
      "decoder.block.0.layer.2.DenseReluDense.wi_1.weight")
  assert len({convert.hf_name(name) for name in names}) == len(names)


def write_t5x_msgpack_checkpoint(params, checkpoint_dir: pathlib.Path):
  """T5X's legacy layout: a msgpack `checkpoint` file whose arrays are tensorstore specs
  of zarr arrays in `target.<name>` directories, paths relative to the checkpoint dir."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  checkpoint_dir.mkdir(parents=True)
  specs = {}
  for name, array in traverse_util.flatten_dict(params, sep="/").items():
    array = np.asarray(array)
    relative_path = "target." + name.replace("/", ".")
    metadata = {"shape": list(array.shape), "chunks": list(array.shape), "dtype": "<f4",
                "compressor": {"id": "gzip"}}
    spec = {"driver": "zarr", "dtype": "float32", "metadata": metadata,
            "kvstore": {"driver": "file", "path": relative_path}}
    absolute = {**spec, "kvstore": {"driver": "file", "path": str(checkpoint_dir / relative_path)}}
    ts.open(absolute, create=True).result().write(array).result()
    specs[name] = spec
  contents = {"version": 3, "optimizer": {
      "target": traverse_util.unflatten_dict(specs, sep="/"),
      "state": {"step": np.array(1000)}}}
  (checkpoint_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))


def test_t5x_msgpack_tensorstore_checkpoint_imports_same_params(tmp_path, tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(3))
  write_t5x_msgpack_checkpoint(params, tmp_path / "model" / "checkpoint_1000")
  # A model directory: the latest checkpoint_<step> is taken.
  assert run_convert("--from", "t5x", tmp_path / "model", "--config", "t5_1_1_tiny",
                     "--out", tmp_path / "ours") == 0
  imported, config = checkpoints.load_model(tmp_path / "ours")
  assert config.mlp_activations == ("gelu", "linear")
  jax.tree.map(np.testing.assert_array_equal, imported, params)


def test_t5x_orbax_checkpoint_with_flaxformer_kernels_imports_same_params(tmp_path,
                                                                          tiny_config):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  params = t5.init_params(tiny_config, jax.random.key(4))
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  # Flaxformer keeps attention kernels 3-d: [embed, heads, head_dim] and [heads, head_dim, embed].
  heads, head_dim = tiny_config.num_heads, tiny_config.head_dim
  flat["encoder/layers_0/attention/query/kernel"] = flat[
      "encoder/layers_0/attention/query/kernel"].reshape(-1, heads, head_dim)
  flat["encoder/layers_0/attention/out/kernel"] = flat[
      "encoder/layers_0/attention/out/kernel"].reshape(heads, head_dim, -1)
  state = {"target": traverse_util.unflatten_dict(flat, sep="/"), "state": {"step": 7}}
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "checkpoint_7" / "state", state)
  gin_file = resources.GIN_MODELS_DIR / "t5_1_1_tiny.gin"
  assert run_convert("--from", "t5x", tmp_path / "checkpoint_7", "--gin_file", gin_file,
                     "--out", tmp_path / "ours") == 0
  imported, _ = checkpoints.load_model(tmp_path / "ours")
  jax.tree.map(np.testing.assert_array_equal, imported, params)


# A T5X-style model gin tree, written for this test: dynamic registration, imports of T5X
# modules (absent here), a block binding of network.T5Config with a macro left REQUIRED, and
# a run file that includes it and overrides fields, as a T5X user's own file would.
T5X_STYLE_BASE = """
from __gin__ import dynamic_registration
from t5x import models
from t5x.examples.t5 import network

DROPOUT_RATE = %gin.REQUIRED
MODEL = @models.EncoderDecoderModel()
models.EncoderDecoderModel.module = @network.Transformer()
network.Transformer.config = @network.T5Config()
network.T5Config:
  vocab_size = 128
  dtype = 'bfloat16'
  emb_dim = 64
  num_heads = 4
  num_encoder_layers = 2
  num_decoder_layers = 2
  head_dim = 8
  mlp_dim = 64
  mlp_activations = ('gelu', 'linear')
  dropout_rate = %DROPOUT_RATE
  logits_via_embedding = False
"""
T5X_STYLE_RUN = """
from __gin__ import dynamic_registration
from t5x.examples.t5 import network
from t5x import utils
include 'models/base_like.gin'

EMBED = 32
network.T5Config.emb_dim = %EMBED
network.T5Config.float32_attention_logits = True
utils.SaveCheckpointConfig.period = 100
"""


def write_t5x_style_gin(root: pathlib.Path) -> pathlib.Path:
  (root / "models").mkdir(parents=True)
  (root / "models" / "base_like.gin").write_text(T5X_STYLE_BASE)
  (root / "run.gin").write_text(T5X_STYLE_RUN)
  return root / "run.gin"


def test_t5x_gin_binding_network_t5config_gives_the_config(tmp_path, tiny_config):
  write_t5x_style_gin(tmp_path / "t5x_root")
  config = convert.config_from_gin("run.gin", [tmp_path / "t5x_root"])
  assert config == t5.T5Config.from_dict({**tiny_config.to_dict(), "dtype": "bfloat16",
                                          "dropout_rate": 0.1})


def test_t5x_checkpoint_converts_with_the_t5x_gin_that_trained_it(tmp_path, tiny_config):
  write_t5x_style_gin(tmp_path / "t5x_root")
  params = t5.init_params(tiny_config, jax.random.key(8))
  write_t5x_msgpack_checkpoint(params, tmp_path / "model" / "checkpoint_100")
  assert run_convert("--from", "t5x", tmp_path / "model", "--gin_file", "run.gin",
                     "--gin_search_path", tmp_path / "t5x_root", "--out", tmp_path / "ours") == 0
  imported, config = checkpoints.load_model(tmp_path / "ours")
  assert config.emb_dim == 32 and config.dtype == "bfloat16"
  jax.tree.map(np.testing.assert_array_equal, imported, params)


@pytest.mark.parametrize("line,error", [
    ("network.T5Config.mlp_dim = %UNSET", r"run.gin:\d+: macro %UNSET is not bound"),
    ("network.T5Config.mlp_dim = @network.Dense()", r"run.gin:\d+: .* not @network.Dense"),
    ("network.T5Config.mlp_dimm = 3", r"run.gin: unknown T5Config fields: \['mlp_dimm'\]"),
    ("include 'nowhere.gin'", r"run.gin:\d+: gin file 'nowhere.gin' not found"),
])
def test_gin_that_gives_no_config_is_named(tmp_path, line, error):
  run = write_t5x_style_gin(tmp_path)
  run.write_text(run.read_text() + line + "\n")
  with pytest.raises((convert.ConversionError, FileNotFoundError), match=error):
    convert.config_from_gin(run, [tmp_path])


def test_save_load_round_trip(tmp_path, tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(5))
  checkpoints.save_model(tmp_path / "m", params, tiny_config)
  checkpoints.save_model(tmp_path / "m", params, tiny_config)  # overwrites
  loaded, config = checkpoints.load_model(tmp_path / "m")
  assert config == tiny_config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ------------------------------------------------------------------------------
# Errors name the path.
# ------------------------------------------------------------------------------
def test_missing_hf_files_are_named(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "config.json")):
    convert.convert_hf(tmp_path / "empty")
  make_hf_t5("v1.0").config.save_pretrained(tmp_path / "no_weights")
  with pytest.raises(FileNotFoundError, match="no weights in .*no_weights"):
    convert.convert_hf(tmp_path / "no_weights")
  assert run_convert("--from", "hf", tmp_path / "empty", "--out", tmp_path / "o") == 2
  assert str(tmp_path / "empty") in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_unknown_architecture_is_named(tmp_path):
  (tmp_path / "bert").mkdir()
  (tmp_path / "bert" / "config.json").write_text(
      json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
  with pytest.raises(convert.ConversionError, match=r"bert.*config\.json.*model_type='bert'"):
    convert.convert_hf(tmp_path / "bert")


def test_hf_config_mismatch_names_parameter(tmp_path):
  make_hf_t5("v1.1").save_pretrained(tmp_path / "hf")
  config_path = tmp_path / "hf" / "config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "d_ff": 48}))
  with pytest.raises(convert.ConversionError,
                     match=r"hf: parameter decoder/layers_0/mlp/wi_0/kernel has shape"):
    convert.convert_hf(tmp_path / "hf")


def test_t5x_config_mismatch_names_parameter(tmp_path, tiny_config, capsys):
  write_t5x_msgpack_checkpoint(t5.init_params(tiny_config, jax.random.key(6)),
                               tmp_path / "checkpoint_1")
  assert run_convert("--from", "t5x", tmp_path / "checkpoint_1", "--config", "t5_1_1_small",
                     "--out", tmp_path / "o") == 2
  error = capsys.readouterr().err
  assert str(tmp_path / "checkpoint_1") in error and "decoder/decoder_norm/scale" in error
  fewer_layers = tmp_path / "two_layer.gin"
  fewer_layers.write_text((resources.GIN_MODELS_DIR / "t5_1_1_tiny.gin")
                          .read_text() + "T5Config.num_decoder_layers = 1\n")
  with pytest.raises(convert.ConversionError, match="no place for.*decoder/layers_1"):
    convert.convert_t5x(tmp_path / "checkpoint_1", convert.config_from_gin(fewer_layers))


def test_missing_t5x_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    convert.read_t5x_params(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
    convert.read_t5x_params(tmp_path / "empty")


@pytest.mark.parametrize("activations,feed_forward", [
    (("gelu", "linear"), "gated-gelu"), (("relu",), "relu"), (("silu", "linear"), "gated-silu"),
    (("gelu",), "gelu_new")])
def test_hf_config_imports_back_to_the_same_config(tiny_config, activations, feed_forward):
  config = t5.T5Config.from_dict({**tiny_config.to_dict(), "mlp_activations": activations})
  assert convert.hf_config(config)["feed_forward_proj"] == feed_forward


def test_hf_config_rejects_what_transformers_cannot_express(tiny_config):
  config = t5.T5Config.from_dict({**tiny_config.to_dict(), "mlp_activations": ("gelu", "relu")})
  with pytest.raises(convert.ConversionError, match="mlp_activations"):
    convert.hf_config(config)
