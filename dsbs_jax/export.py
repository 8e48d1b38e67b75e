"""Export of a trained student for serving: `dsbs export`.

    dsbs export --checkpoint MODEL_DIR [--step best|latest|N] --format hf --out DIR
    dsbs export --checkpoint MODEL_DIR --format saved_model --out DIR
        [--decode greedy|beam --num_beams 4 --alpha 0.6] [--with_rationales]

`hf` writes a Hugging Face directory (config.json, model.safetensors, generation_config.json,
spiece.model and tokenizer_config.json) that transformers' T5ForConditionalGeneration and
AutoTokenizer load offline; callers prepend the task prefix recorded in the manifest.
`saved_model` writes a TensorFlow SavedModel made with jax2tf whose serving signature maps
a batch of raw input strings (any batch size) to decoded strings, with the task prefix,
tokenization and decoding inside the graph. Both write the manifest dsbs_export.json and
appear at --out only once complete.

This module only reads trained students and writes foreign formats; training, prediction
and the network live elsewhere (train.py, infer.py, models/t5.py).
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import sys
import uuid
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from flax import traverse_util
from jax.experimental import jax2tf
from jax.interpreters import mlir
from safetensors import numpy as safetensors_numpy

import dsbs_jax
from dsbs_jax import checkpoints
from dsbs_jax import convert
from dsbs_jax import data
from dsbs_jax import flags
from dsbs_jax import infer
from dsbs_jax.models import t5

MANIFEST_FILE = "dsbs_export.json"
# The vocabulary's name in each format's directory (transformers looks for spiece.model).
VOCABULARY_FILES = {"hf": "spiece.model", "saved_model": infer.VOCABULARY_FILE}
FORMATS = tuple(VOCABULARY_FILES)
SIGNATURE_NAME = "serving_default"


class ExportError(ValueError):
  """A student or an option that cannot be exported; the message names the path or flag."""


@dataclasses.dataclass(frozen=True)
class Student:
  """A trained student as host numpy arrays, with what prediction must reproduce."""
  model_dir: pathlib.Path
  step: int
  params: Any
  config: t5.T5Config
  spec: infer.RunSpec


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How a SavedModel decodes (an hf export only records decode_length)."""
  method: str = "greedy"  # or "beam"
  num_beams: int = 4
  alpha: float = 0.6
  decode_length: Optional[int] = None  # default: the run's target length
  with_rationales: bool = False


def load_student(model_dir, step: str = "best") -> Student:
  """The student of MODEL_DIR at `step` ('best', 'latest' or a number), gathered to the host."""
  model_dir = pathlib.Path(model_dir).absolute()
  if not model_dir.is_dir():
    raise FileNotFoundError(f"{model_dir}: no such MODEL_DIR")
  try:
    spec = infer.RunSpec.load(model_dir)
    infer.vocabulary_of(model_dir, spec)  # fails here, naming the file, if missing
    params, config, chosen = infer.load_trained_params(model_dir, step)
  except ValueError as error:  # a malformed run.json or config.json, named in the message
    raise ExportError(str(error)) from error
  # Checkpoints trained sharded are restored as global arrays; gather every one.
  return Student(model_dir, chosen, jax.device_get(params), config, spec)


def manifest(student: Student, export_format: str, decode: DecodeOptions,
             format_entries: dict[str, Any]) -> dict[str, Any]:
  """The contents of dsbs_export.json: where the export came from and how to use it."""
  spec = student.spec
  decoding = dataclasses.asdict(decode)
  if decode.method == "greedy":
    del decoding["num_beams"], decoding["alpha"]
  return {
      "format": export_format,
      "source": {"checkpoint": str(student.model_dir), "step": student.step,
                 "mixture_or_task_name": spec.mixture_or_task_name},
      "task_prefixes": {"label": spec.label_prefix, "rationale": spec.rationale_prefix},
      "vocabulary": {"file": VOCABULARY_FILES[export_format],
                     "extra_ids": spec.vocabulary_extra_ids},
      "feature_lengths": {"inputs": spec.input_length, "targets": spec.target_length},
      "decoding": decoding,
      "dsbs_jax_version": dsbs_jax.__version__,
      **format_entries,
  }


# ------------------------------------------------------------------------------
# Hugging Face directory.
# ------------------------------------------------------------------------------
# Our activation -> transformers' `feed_forward_proj` (v1.1's gated GELU is "gated-gelu").
_HF_FEED_FORWARD = {"relu": "relu", "gelu": "gelu_new", "silu": "silu"}


def hf_config(config: t5.T5Config) -> dict[str, Any]:
  """transformers' config.json for `config`, checked by importing it back."""
  activation, *gate = config.mlp_activations
  if activation not in _HF_FEED_FORWARD or gate not in ([], ["linear"]):
    raise ExportError(f"mlp_activations {config.mlp_activations} has no transformers T5 "
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
  imported = convert.config_from_hf(values, pathlib.Path("config.json"), config.dtype)
  if imported != dataclasses.replace(config, param_dtype="float32"):
    raise ExportError(f"the model config has no exact transformers T5 equivalent: {config}")
  return values


def hf_weights(params: Any) -> dict[str, np.ndarray]:
  """{Hugging Face name: float32 array} of our parameter tree."""
  return {convert.hf_name(name): np.ascontiguousarray(convert.hf_layout(name, array), np.float32)
          for name, array in traverse_util.flatten_dict(params, sep="/").items()}


def write_hf(student: Student, directory: pathlib.Path, decode: DecodeOptions) -> dict[str, Any]:
  spec = student.spec
  _write_json(directory / "config.json", hf_config(student.config))
  safetensors_numpy.save_file(hf_weights(student.params), directory / "model.safetensors",
                              metadata={"format": "pt"})
  _write_json(directory / "generation_config.json", {
      "decoder_start_token_id": 0, "eos_token_id": t5.EOS_ID, "pad_token_id": 0,
      "max_new_tokens": decode.decode_length, "num_beams": 1, "do_sample": False})
  shutil.copyfile(student.model_dir / infer.VOCABULARY_FILE, directory / VOCABULARY_FILES["hf"])
  vocabulary = infer.vocabulary_of(student.model_dir, spec)
  piece = vocabulary.tokenizer.id_to_piece
  _write_json(directory / "tokenizer_config.json", {
      "tokenizer_class": "T5Tokenizer", "extra_ids": spec.vocabulary_extra_ids,
      "pad_token": piece(vocabulary.pad_id), "eos_token": piece(vocabulary.eos_id),
      "unk_token": piece(vocabulary.unk_id),
      # Without this, transformers makes the vocabulary's user-defined pieces (such as the
      # task prefixes) added tokens, which drops the word-boundary piece SentencePiece
      # puts before them. The extra ids are added whatever this says.
      "additional_special_tokens": [],
      # With truncation=True the tokenizer then keeps input_length - 1 tokens and EOS,
      # as training did.
      "model_max_length": spec.input_length})
  return {"weights": "model.safetensors"}


# ------------------------------------------------------------------------------
# TensorFlow SavedModel.
# ------------------------------------------------------------------------------
class _ServingVocabulary(seqio.SentencePieceVocabulary):
  """seqio's vocabulary with one TF tokenizer for every call (seqio makes a new one each
  time), so that the SavedModel holds a single tokenizer resource that it tracks."""

  @functools.cached_property
  def tf_tokenizer(self):
    return super().tf_tokenizer


def _top_k_by_sort(operand, *, k: int, axis: int):
  """lax.top_k by a stable sort: equal values keep the lower index first, as top_k does."""
  operand = jnp.moveaxis(operand, axis, -1)
  last = operand.ndim - 1
  index = jax.lax.broadcasted_iota(np.int32, operand.shape, last)
  negated, index = jax.lax.sort((-operand, index), dimension=last, num_keys=1, is_stable=True)
  return [jnp.moveaxis(-negated[..., :k], -1, axis), jnp.moveaxis(index[..., :k], -1, axis)]


@contextlib.contextmanager
def _top_k_lowered_as_sort(platform: str):
  """Lowers lax.top_k (beam search) through a sort while jax2tf serializes.

  jax lowers top_k to chlo.top_k, which reaches TensorFlow as a StableHLO composite that
  TF 2.21 either cannot read (jax 0.10 writes composite_v2, newer than TF's StableHLO
  1.13.7) or, read at TF's version, cannot shape-refine for a polymorphic batch.
  """
  lowerings = mlir._platform_specific_lowerings[platform]  # pylint: disable=protected-access
  previous = lowerings.get(jax.lax.top_k_p)
  mlir.register_lowering(jax.lax.top_k_p, mlir.lower_fun(_top_k_by_sort, multiple_results=True),
                         platform=platform)
  try:
    yield
  finally:
    if previous is None:
      del lowerings[jax.lax.top_k_p]
    else:
      lowerings[jax.lax.top_k_p] = previous


def tokenize_tf(vocabulary: seqio.Vocabulary, texts: tf.Tensor, length: int) -> tf.Tensor:
  """[batch, length] ids of [batch] strings, as infer.tokenize_inputs makes them."""
  ids = tf.map_fn(lambda text: data.encode_with_separators(vocabulary, text), texts,
                  fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))
  eos = tf.fill([tf.shape(texts)[0], 1], vocabulary.eos_id)
  return tf.concat([ids[:, :length - 1], eos], axis=1).to_tensor(0, shape=[None, length])


def write_saved_model(student: Student, directory: pathlib.Path,
                      decode: DecodeOptions) -> dict[str, Any]:
  spec, config = student.spec, student.config
  vocabulary = _ServingVocabulary(str(student.model_dir / infer.VOCABULARY_FILE),
                                  extra_ids=spec.vocabulary_extra_ids)
  prefixes = {"prediction": spec.label_prefix}
  if decode.with_rationales:
    prefixes["rationale"] = spec.rationale_prefix
  platform = jax.export.default_export_platform()

  def generate(params, encoder_input_tokens):
    return t5.predict_batch(params, config, encoder_input_tokens, decode.decode_length,
                            method=decode.method, num_beams=decode.num_beams, alpha=decode.alpha)

  module = tf.Module()
  module.params = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False),
                                        student.params)
  module.tokenizer = vocabulary.tf_tokenizer
  generate_tf = jax2tf.convert(generate, polymorphic_shapes=[None, "(b, ...)"],
                               with_gradient=False, native_serialization_platforms=[platform])

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")],
               autograph=False)
  def serve(inputs):
    # Every prefix's inputs in one batch: [len(prefixes) * batch] strings.
    texts = tf.concat([prefix + inputs for prefix in prefixes.values()], axis=0)
    ids = generate_tf(module.params, tokenize_tf(vocabulary, texts, spec.input_length))
    outputs = tf.split(vocabulary.decode_tf(ids), len(prefixes))
    return dict(zip(prefixes, outputs))

  module.serve = serve
  with _top_k_lowered_as_sort(platform):
    tf.saved_model.save(module, str(directory), signatures={SIGNATURE_NAME: serve})
  shutil.copyfile(student.model_dir / infer.VOCABULARY_FILE,
                  directory / VOCABULARY_FILES["saved_model"])
  return {"signature": {"name": SIGNATURE_NAME, "inputs": {"inputs": "[batch] string"},
                        "outputs": {name: "[batch] string" for name in prefixes}},
          "platforms": [platform]}


# ------------------------------------------------------------------------------
# Writing atomically, and the `dsbs export` subcommand.
# ------------------------------------------------------------------------------
WRITERS: dict[str, Callable[[Student, pathlib.Path, DecodeOptions], dict[str, Any]]] = {
    "hf": write_hf, "saved_model": write_saved_model}


def _write_json(path: pathlib.Path, values: dict[str, Any]) -> None:
  path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _new_sibling_dir(out: pathlib.Path, kind: str) -> pathlib.Path:
  """A new hidden directory beside `out` (mkdir, unlike mkdtemp, honours the umask)."""
  directory = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.{kind}"
  directory.mkdir(parents=True)
  return directory


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
  if out.exists() and not overwrite:
    raise ExportError(f"{out} exists; pass --overwrite to replace it")


def export(model_dir, out, export_format: str, step: str = "best",
           decode: DecodeOptions = DecodeOptions(), overwrite: bool = False) -> pathlib.Path:
  """Writes MODEL_DIR's student at `step` to `out` in `export_format`; returns `out`.

  Everything is written to a temporary directory beside `out`, renamed into place once
  complete, so a failed export leaves nothing at `out` (and an old `out` as it was).
  """
  if export_format not in WRITERS:
    raise ExportError(f"--format {export_format!r}: expected one of {FORMATS}")
  if decode.method not in ("greedy", "beam"):
    raise ExportError(f"--decode {decode.method!r}: expected greedy or beam")
  if export_format == "hf" and (decode.method != "greedy" or decode.with_rationales):
    raise ExportError("--decode beam and --with_rationales are for --format saved_model; "
                      "with --format hf, prepend the manifest's task prefix yourself")
  out = pathlib.Path(out).absolute()
  _check_out(out, overwrite)
  student = load_student(model_dir, step)
  decode = dataclasses.replace(
      decode, decode_length=decode.decode_length or student.spec.target_length)
  staging = _new_sibling_dir(out, "tmp")
  try:
    format_entries = WRITERS[export_format](student, staging, decode)
    _write_json(staging / MANIFEST_FILE, manifest(student, export_format, decode, format_entries))
    _check_out(out, overwrite)  # again: another export may have finished meanwhile
    if out.exists():
      replaced = _new_sibling_dir(out, "old")
      os.replace(out, replaced / out.name)
      os.replace(staging, out)
      shutil.rmtree(replaced)
    else:
      os.replace(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


USER_ERRORS = (ExportError, checkpoints.CheckpointError)


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "export", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="MODEL_DIR written by dsbs train")
  parser.add_argument("--step", default="best", type=flags.checkpoint_step, help=flags.STEP_HELP)
  parser.add_argument("--format", dest="export_format", required=True, choices=FORMATS,
                      help="hf: a Hugging Face T5 folder; saved_model: a TF SavedModel that "
                           "decodes raw strings")
  parser.add_argument("--out", required=True, help="directory to write (must not exist)")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  parser.add_argument("--decode", default="greedy", choices=("greedy", "beam"),
                      help="saved_model: decoding inside the graph")
  parser.add_argument("--num_beams", type=flags.positive_int, default=DecodeOptions.num_beams,
                      help=f"beams for --decode beam (default {DecodeOptions.num_beams})")
  parser.add_argument("--alpha", type=float, default=DecodeOptions.alpha,
                      help="beam search length penalty")
  parser.add_argument("--decode_length", type=flags.positive_int, default=None,
                      help="most tokens to generate (default: the run's target length)")
  parser.add_argument("--with_rationales", action="store_true",
                      help="saved_model: also return a generated rationale per input")
  parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  decode = DecodeOptions(args.decode, args.num_beams, args.alpha, args.decode_length,
                         args.with_rationales)
  out = export(args.checkpoint, args.out, args.export_format, args.step, decode, args.overwrite)
  print(f"wrote {out}", file=sys.stderr)
  return 0
