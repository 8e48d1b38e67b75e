"""Export of a trained student for serving: `dsbs export`.

    dsbs export --checkpoint MODEL_DIR [--step best|latest|N] --format hf --out DIR
    dsbs export --checkpoint MODEL_DIR --format saved_model --out DIR
        [--decode greedy|beam --num_beams 4 --length_penalty 0.6] [--with_rationales]

`hf` writes a Hugging Face directory (config.json, model.safetensors, generation_config.json,
spiece.model, tokenizer_config.json and a model card, README.md) that transformers'
T5ForConditionalGeneration and AutoTokenizer load offline; callers prepend the task prefix
recorded in the manifest and the card.
`saved_model` writes TensorFlow SavedModels made with jax2tf. At --out, the text one: its
serving signature maps a batch of raw input strings (any batch size) to decoded strings,
with the task prefix, tokenization and decoding inside the graph; its tokenizer is
tensorflow-text's, which must be imported to load it. In --out/token_ids, the token-ids
one: token ids in, generated ids out, loadable with TensorFlow alone (stock TensorFlow
Serving). Both formats write the manifest dsbs_export.json, which says what each part
needs.

--checkpoint and --out may be local or gs:// URLs. An export is written to a local folder
first (TensorFlow and safetensors write local files). On a disk that folder is renamed into
place, so an export appears at --out only once complete and a failed one leaves an old --out
as it was. An object store has no folder rename: there each file is uploaded (an object
appears whole), dsbs_export.json deleted first and uploaded last, and the old export's files
that the new one lacks deleted once the rest are up. A failure before the upload leaves --out
as it was; a kill during it can leave old and new files mixed, without dsbs_export.json:
rerun with --overwrite.

This module only reads trained students and writes foreign formats; training, prediction
and the network live elsewhere (train.py, infer.py, encoder_decoder.py, models/t5.py).
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
import tempfile
import uuid
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from jax.experimental import jax2tf
from jax.interpreters import mlir
from safetensors import numpy as safetensors_numpy

import dsbs_jax
from dsbs_jax import checkpoints
from dsbs_jax import command_flags
from dsbs_jax import convert
from dsbs_jax import encoder_decoder
from dsbs_jax import folder_lock
from dsbs_jax import infer
from dsbs_jax import rationales
from dsbs_jax import run_dir
from dsbs_jax import seqio_tasks
from dsbs_jax import stop_signals
from dsbs_jax import storage
from dsbs_jax.models import t5

MANIFEST_FILE = "dsbs_export.json"
MODEL_CARD_FILE = "README.md"  # of a Hugging Face export
# The vocabulary's name in each format's directory (transformers looks for spiece.model).
VOCABULARY_FILES = {"hf": "spiece.model", "saved_model": run_dir.VOCABULARY_FILE}
FORMATS = command_flags.EXPORT_FORMATS
SIGNATURE_NAME = "serving_default"
# The token-ids SavedModel's folder inside a saved_model export, and its signature's names
# (also a second signature of the text SavedModel).
TOKEN_IDS_DIR = "token_ids"
TOKEN_IDS_SIGNATURE = "token_ids"
TOKEN_IDS_INPUT, TOKEN_IDS_OUTPUT = "input_ids", "output_ids"


class ExportError(ValueError):
  """A student or an option that cannot be exported; the message names the path or flag."""


@dataclasses.dataclass(frozen=True)
class Student:
  """A trained student as host numpy arrays, with what prediction must reproduce."""
  run: run_dir.RunDir
  step: int
  params: Any  # in the layout `config` runs with (t5.params_in_layout)
  config: t5.T5Config
  spec: run_dir.RunSpec
  results: Optional[dict[str, Any]]  # MODEL_DIR/results.json; None if the run did not finish


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How a SavedModel decodes (an hf export only records decode_length)."""
  method: str = "greedy"  # or "beam"
  num_beams: int = command_flags.DEFAULT_NUM_BEAMS
  # beam search's, as decoding.brevity_penalty applies it
  length_penalty: float = command_flags.DEFAULT_LENGTH_PENALTY
  decode_length: Optional[int] = None  # default: the run's target length
  with_rationales: bool = False


def load_student(model_dir, step: str = "best") -> Student:
  """The student of MODEL_DIR at `step` ('best', 'latest' or a number), gathered to the host."""
  run = run_dir.RunDir(model_dir)
  if not run.path.is_dir():
    raise FileNotFoundError(f"{run.path}: no such MODEL_DIR")
  try:
    spec = run.spec()
    run.vocabulary_file()  # fails here, naming the file, if missing
    params, config, chosen = run.load_params(step)
    results = run.results()
  except ValueError as error:  # a malformed run file, named in the message
    raise ExportError(str(error)) from error
  # Checkpoints trained sharded are restored as global arrays; gather every one.
  return Student(run, chosen, jax.device_get(params), config, spec, results)


def manifest(student: Student, export_format: str, decode: DecodeOptions,
             format_entries: dict[str, Any]) -> dict[str, Any]:
  """The contents of dsbs_export.json: where the export came from and how to use it."""
  spec, results = student.spec, student.results or {}
  decoding = dataclasses.asdict(decode)
  if decode.method == "greedy":
    del decoding["num_beams"], decoding["length_penalty"]
  metrics = {"step": results.get("best_step"), "label_task": results.get("label_task"),
             **{key: results.get(key) for key in ("validation", "test", "majority_baseline_test")}}
  return {
      "format": export_format,
      "source": {"checkpoint": str(student.run.path), "step": student.step,
                 "mixture_or_task_name": spec.mixture_or_task_name,
                 **{key: results[key] for key in ("alpha", "train_fraction", "subsample_seed")
                    if key in results}},
      # The run's final scoring, of the checkpoint best on validation (None if unfinished).
      "metrics": metrics if results else None,
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
def _format_metrics(values: Optional[dict[str, Any]]) -> str:
  return ", ".join(f"{name} {value:.2%}" if name == "accuracy" and isinstance(value, float)
                   else f"{name} {value}" for name, value in (values or {}).items()) or "-"


def model_card(values: dict[str, Any], config: t5.T5Config) -> str:
  """README.md of a Hugging Face export, written from its manifest `values`."""
  source, prefixes, metrics = values["source"], values["task_prefixes"], values["metrics"]
  decoding, lengths = values["decoding"], values["feature_lengths"]
  num_params = sum(int(np.prod(shape.shape)) for shape in jax.tree.leaves(t5.param_shapes(config)))
  run = (f"alpha {source['alpha']}, training-data fraction {source['train_fraction']}, "
         f"subsample seed {source['subsample_seed']}" if "alpha" in source else "")
  if metrics is None:
    evaluation = ("The run that trained it wrote no final results (it had not finished), so "
                  "there are no metrics to report.")
  else:
    chosen = ("this export" if metrics["step"] == source["step"]
              else f"step {metrics['step']}; this export is step {source['step']}")
    baseline = metrics["majority_baseline_test"] or {}
    evaluation = "\n".join([
        f"Label task `{metrics['label_task']}`, scored by `dsbs train` on the checkpoint best "
        f"on validation ({chosen}), greedy decoding:", "",
        "| split | metrics |", "| --- | --- |",
        f"| validation | {_format_metrics(metrics['validation'])} |",
        f"| test | {_format_metrics(metrics['test'])} |",
        f"| test, majority-class baseline (`{baseline.get('prediction', '')}`) | "
        f"{_format_metrics({'accuracy': baseline.get('accuracy')})} |"])
  return f"""---
library_name: transformers
pipeline_tag: text2text-generation
tags:
- t5
- distilling-step-by-step
- dsbs-jax
---

# A distilling step-by-step student

A T5 ({config.num_encoder_layers} + {config.num_decoder_layers} layers, d_model {config.emb_dim},
{num_params / 1e6:.1f}M parameters) trained with dsbs-jax to answer and to explain, as in
*Distilling step-by-step* (Hsieh et al., ACL 2023), on the SeqIO mixture
`{source["mixture_or_task_name"]}`{f" ({run})" if run else ""}. Exported by dsbs-jax
{values["dsbs_jax_version"]} from step {source["step"]} of `{source["checkpoint"]}`;
`{MANIFEST_FILE}` records the details.

## Use

Every input starts with its task prefix: `{prefixes["label"]}` for the answer,
`{prefixes["rationale"]}` for the rationale. Inputs longer than {lengths["inputs"]} tokens are
cut as in training (the tokenizer's `model_max_length`). NLI inputs join premise and
hypothesis with `{rationales.NLI_SEPARATOR}`.

```python
from transformers import AutoTokenizer, T5ForConditionalGeneration

tokenizer = AutoTokenizer.from_pretrained("PATH")
model = T5ForConditionalGeneration.from_pretrained("PATH")
inputs = tokenizer([{prefixes["label"]!r} + text for text in texts], return_tensors="pt",
                   padding=True, truncation=True)
answers = tokenizer.batch_decode(model.generate(**inputs), skip_special_tokens=True)
```

`generation_config.json` sets what `dsbs predict` does: {decoding["method"]} decoding of at
most {decoding["decode_length"]} new tokens.

## Evaluation

{evaluation}
"""


def write_hf(student: Student, directory: pathlib.Path, decode: DecodeOptions) -> dict[str, Any]:
  spec = student.spec
  _write_json(directory / "config.json", convert.hf_config(student.config))
  weights = directory / "model.safetensors"
  safetensors_numpy.save_file(convert.hf_weights(student.params), weights,
                              metadata={"format": "pt"})
  _as_the_umask_says(weights)
  _write_json(directory / "generation_config.json", {
      "decoder_start_token_id": 0, "eos_token_id": t5.EOS_ID, "pad_token_id": 0,
      "max_new_tokens": decode.decode_length, "num_beams": 1, "do_sample": False})
  shutil.copyfile(student.run.vocabulary_file(), directory / VOCABULARY_FILES["hf"])
  vocabulary = infer.vocabulary_of(student.run, spec)
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
  ids = tf.map_fn(lambda text: seqio_tasks.encode_with_separators(vocabulary, text), texts,
                  fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))
  eos = tf.fill([tf.shape(texts)[0], 1], vocabulary.eos_id)
  return tf.concat([ids[:, :length - 1], eos], axis=1).to_tensor(0, shape=[None, length])


def write_saved_model(student: Student, directory: pathlib.Path,
                      decode: DecodeOptions) -> dict[str, Any]:
  """Two SavedModels: the text one at `directory` (SentencePiece ops from tensorflow-text
  inside the graph) and, in TOKEN_IDS_DIR, the token-ids one, which TensorFlow alone loads
  (stock TensorFlow Serving has no tensorflow-text ops)."""
  spec, config = student.spec, student.config
  vocabulary = _ServingVocabulary(str(student.run.vocabulary_file()),
                                  extra_ids=spec.vocabulary_extra_ids)
  prefixes = {"prediction": spec.label_prefix}
  if decode.with_rationales:
    prefixes["rationale"] = spec.rationale_prefix
  platform = jax.export.default_export_platform()

  def generate(params, encoder_input_tokens):
    return encoder_decoder.predict_batch(
        params, config, encoder_input_tokens, decode.decode_length, method=decode.method,
        num_beams=decode.num_beams, length_penalty=decode.length_penalty)

  params = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), student.params)
  generate_tf = jax2tf.convert(generate, polymorphic_shapes=[None, "(b, ...)"],
                               with_gradient=False, native_serialization_platforms=[platform])

  @tf.function(input_signature=[tf.TensorSpec([None, spec.input_length], tf.int32,
                                               name=TOKEN_IDS_INPUT)], autograph=False)
  def serve_token_ids(input_ids):
    return {TOKEN_IDS_OUTPUT: generate_tf(params, input_ids)}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")],
               autograph=False)
  def serve_text(inputs):
    # Every prefix's inputs in one batch: [len(prefixes) * batch] strings.
    texts = tf.concat([prefix + inputs for prefix in prefixes.values()], axis=0)
    ids = generate_tf(params, tokenize_tf(vocabulary, texts, spec.input_length))
    outputs = tf.split(vocabulary.decode_tf(ids), len(prefixes))
    return dict(zip(prefixes, outputs))

  text_model, token_ids_model = tf.Module(), tf.Module()
  text_model.params = token_ids_model.params = params
  text_model.tokenizer = vocabulary.tf_tokenizer
  text_model.serve, text_model.serve_token_ids = serve_text, serve_token_ids
  token_ids_model.serve = serve_token_ids
  with _top_k_lowered_as_sort(platform):
    tf.saved_model.save(text_model, str(directory), signatures={
        SIGNATURE_NAME: serve_text, TOKEN_IDS_SIGNATURE: serve_token_ids})
    tf.saved_model.save(token_ids_model, str(directory / TOKEN_IDS_DIR),
                        signatures={SIGNATURE_NAME: serve_token_ids})
  shutil.copyfile(student.run.vocabulary_file(), directory / VOCABULARY_FILES["saved_model"])
  token_ids = {
      "inputs": {TOKEN_IDS_INPUT: (
          f"[batch, {spec.input_length}] int32: the task prefix and input tokenized with the "
          f"vocabulary file (the NLI separator {rationales.NLI_SEPARATOR!r} as the EOS id), "
          "cut to leave room for the EOS id that ends it, 0-padded")},
      "outputs": {TOKEN_IDS_OUTPUT: f"[batch, {decode.decode_length}] int32: generated ids, "
                                    "EOS-terminated, 0 after EOS"}}
  text = {"inputs": {"inputs": "[batch] string"},
          "outputs": {name: "[batch] string" for name in prefixes}}
  return {"saved_models": {
      ".": {"needs": "TensorFlow and tensorflow-text (the text signature's SentencePiece ops; "
                     "import tensorflow_text before loading)",
            "signatures": {SIGNATURE_NAME: text, TOKEN_IDS_SIGNATURE: token_ids}},
      TOKEN_IDS_DIR: {"needs": "TensorFlow only (stock TensorFlow Serving loads it)",
                      "signatures": {SIGNATURE_NAME: token_ids}}},
          "platforms": [platform]}


# ------------------------------------------------------------------------------
# Writing atomically, and the `dsbs export` subcommand.
# ------------------------------------------------------------------------------
WRITERS: dict[str, Callable[[Student, pathlib.Path, DecodeOptions], dict[str, Any]]] = {
    "hf": write_hf, "saved_model": write_saved_model}


def _write_json(path: pathlib.Path, values: dict[str, Any]) -> None:
  path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _as_the_umask_says(path: pathlib.Path) -> None:
  """Gives a file the mode a new file gets here (safetensors writes its own 0600), so that a
  serving container running as another user can read it."""
  umask = os.umask(0)
  os.umask(umask)
  path.chmod(0o666 & ~umask)


def _new_sibling_dir(out: pathlib.Path, kind: str) -> pathlib.Path:
  """A new hidden directory beside `out` (mkdir, unlike mkdtemp, honours the umask)."""
  directory = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.{kind}"
  directory.mkdir(parents=True)
  return directory


def _check_out(out: storage.Path, overwrite: bool) -> None:
  if out.exists() and not overwrite:
    raise ExportError(f"{out} exists; pass --overwrite to replace it")


def export(model_dir, out, export_format: str, step: str = "best",
           decode: DecodeOptions = DecodeOptions(), overwrite: bool = False) -> storage.Path:
  """Writes MODEL_DIR's student at `step` to `out` in `export_format`; returns `out`.

  Everything is written to a temporary directory and then put in place as the module
  docstring says: on a disk, a failed export leaves nothing at `out` (and an old `out` as it
  was). One export at a time writes `out` (a lock beside it), and never over a folder a run
  holds.
  """
  if export_format not in WRITERS:
    raise ExportError(f"--format {export_format!r}: expected one of {FORMATS}")
  if decode.method not in ("greedy", "beam"):
    raise ExportError(f"--decode {decode.method!r}: expected greedy or beam")
  if export_format == "hf" and (decode.method != "greedy" or decode.with_rationales):
    raise ExportError("--decode beam and --with_rationales are for --format saved_model; "
                      "with --format hf, prepend the manifest's task prefix yourself")
  storage.check(read=[model_dir], write=[out])
  out = storage.path(out)
  _check_out(out, overwrite)
  with folder_lock.lock_for(out.parent / f".{out.name}{folder_lock.LOCK_NAME}", f"--out {out}",
                            "dsbs export"):
    if (holder := folder_lock.holder(out)) is not None:
      raise ExportError(f"--out {out} is in use by {holder}; export elsewhere")
    with stop_signals.phase(f"exporting to {out}",
                            resume=f"{out} was not changed; rerun the same command"):
      student = load_student(model_dir, step)
      decode = dataclasses.replace(
          decode, decode_length=decode.decode_length or student.spec.target_length)
      _write_staged(student, out, export_format, decode, overwrite)
  return out


def _write_staged(student: Student, out: storage.Path, export_format: str,
                  decode: DecodeOptions, overwrite: bool) -> None:
  on_store = storage.is_url(out)
  staging = (pathlib.Path(tempfile.mkdtemp(prefix="dsbs-export-")) if on_store
             else _new_sibling_dir(out, "tmp"))
  try:
    format_entries = WRITERS[export_format](student, staging, decode)
    values = manifest(student, export_format, decode, format_entries)
    _write_json(staging / MANIFEST_FILE, values)
    if export_format == "hf":
      (staging / MODEL_CARD_FILE).write_text(model_card(values, student.config), encoding="utf-8")
    _check_out(out, overwrite)  # again: another export may have finished meanwhile
    if on_store:
      with stop_signals.phase(f"uploading to {out}",
                              resume=f"{out} may mix old and new files; rerun the same command "
                                     "with --overwrite"):
        storage.replace_folder(out, staging, last=MANIFEST_FILE)
    elif out.exists():
      replaced = _new_sibling_dir(out, "old")
      os.replace(out, replaced / out.name)
      os.replace(staging, out)
      shutil.rmtree(replaced)
    else:
      os.replace(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


USER_ERRORS = (ExportError, convert.ConversionError, checkpoints.CheckpointError)


def run(args: argparse.Namespace) -> int:
  decode = DecodeOptions(args.decode, args.num_beams, args.length_penalty, args.decode_length,
                         args.with_rationales)
  out = export(args.checkpoint, args.out, args.export_format, args.step, decode, args.overwrite)
  print(f"wrote {out}{run_dir.RunDir(args.checkpoint).still_training_note()}", file=sys.stderr)
  return 0
