"""Prediction and evaluation with a trained student: `dsbs predict` and `dsbs eval`.

A trained MODEL_DIR (run_dir.py) holds the network, the run spec (task prefixes, feature
lengths) and the vocabulary beside its checkpoints, so prediction needs no gin. Inputs are
tokenized by the same code as training (seqio_tasks.py), decoded with the key/value cache
(encoder_decoder.predict_batch), and scored with the task's own SeqIO metrics. Model
outputs are untrusted text: they are only compared and written, never executed.

This module must not train or change checkpoints.
"""
import argparse
import json
import os
import sys
import time
from typing import Iterable, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax import checkpoints
from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import decoding
from dsbs_jax import encoder_decoder
from dsbs_jax import gin_utils
from dsbs_jax import input_pipeline
from dsbs_jax import rationales
from dsbs_jax import run_dir
from dsbs_jax import seqio_tasks
from dsbs_jax import stop_signals
from dsbs_jax import storage
from dsbs_jax import text_files
from dsbs_jax.models import t5

USER_ERRORS = (run_dir.ModelDirError, checkpoints.CheckpointError, input_pipeline.TaskDataError)


def vocabulary_of(run: run_dir.RunDir, spec: run_dir.RunSpec) -> seqio.SentencePieceVocabulary:
  return seqio.SentencePieceVocabulary(str(run.vocabulary_file()),
                                       extra_ids=spec.vocabulary_extra_ids)


def tokenize_inputs(vocabulary: seqio.Vocabulary, texts: list[str], length: int) -> np.ndarray:
  """[len(texts), length] ids as training tokenizes them: separators as EOS, EOS at the end."""
  dataset = tf.data.Dataset.from_tensor_slices(tf.constant(texts, tf.string))
  dataset = dataset.map(lambda text: seqio_tasks.encode_with_separators(vocabulary, text))
  rows = np.zeros((len(texts), length), np.int32)
  for i, ids in enumerate(dataset.as_numpy_iterator()):
    ids = np.append(ids[:length - 1], vocabulary.eos_id)
    rows[i, :len(ids)] = ids
  return rows


def detokenize(vocabulary: seqio.Vocabulary, ids: np.ndarray) -> list[str]:
  texts = []
  for row in np.asarray(ids):
    ends = np.flatnonzero(row == vocabulary.eos_id)
    texts.append(vocabulary.decode(row[:ends[0]].tolist() if len(ends) else row.tolist()))
  return texts


class Predictor:
  """Batched decoding of raw texts with fixed shapes (one compilation per setting)."""

  def __init__(self, params, config: t5.T5Config, vocabulary: seqio.Vocabulary,
               input_length: int, decode_length: int, batch_size: int = 32,
               method: str = "greedy", num_beams: int = 4):
    self.params, self.config, self.vocabulary = params, config, vocabulary
    self.input_length, self.decode_length = input_length, decode_length
    self.batch_size, self.method, self.num_beams = batch_size, method, num_beams

  def decode_tokens(self, encoder_tokens: np.ndarray) -> list[str]:
    """Texts for [rows <= batch_size, input_length] ids (padded to the batch inside)."""
    rows = encoder_tokens.shape[0]
    encoder_tokens = decoding.trim_padding(encoder_tokens)
    padded = np.zeros((self.batch_size, encoder_tokens.shape[1]), np.int32)
    padded[:rows] = encoder_tokens
    ids = encoder_decoder.predict_batch(self.params, self.config, padded, self.decode_length,
                                        method=self.method, num_beams=self.num_beams)
    # Gathered from every device and host, whatever sharding jit chose for the output.
    return detokenize(self.vocabulary, multihost_utils.process_allgather(ids, tiled=True)[:rows])

  def predict(self, texts: list[str], prefix: str) -> list[str]:
    outputs = []
    for start in range(0, len(texts), self.batch_size):
      chunk = [prefix + text for text in texts[start:start + self.batch_size]]
      outputs += self.decode_tokens(tokenize_inputs(self.vocabulary, chunk, self.input_length))
    return outputs


def evaluate_split(predictor: Predictor, task_name: str, split: str, lengths: dict,
                   predictions_path: Optional[str] = None,
                   rationale_prefix: Optional[str] = None, label_prefix: str = "",
                   max_examples: Optional[int] = None) -> dict:
  """Greedy-decodes `split` of a label task, scores it with the task's metrics.

  Writes predictions_path (JSONL: id, input, gold, prediction; with rationale_prefix also
  the rationale generated for the input without its `label_prefix`) when given. Returns
  the metrics, e.g. {"accuracy": 0.61}.
  """
  task = input_pipeline.mixture_or_task(task_name)
  records = []
  for batch in input_pipeline.eval_batches(task_name, split, lengths, predictor.batch_size,
                                           max_examples):
    count = int(batch.valid.sum())
    predictions = predictor.decode_tokens(batch.features["encoder_input_tokens"][:count])
    for i in range(count):
      records.append({"id": batch.ids[i], "input": batch.inputs[i], "gold": batch.targets[i],
                      "prediction": predictions[i]})
  if not records:
    raise input_pipeline.TaskDataError(f"{task_name}/{split}: no examples to evaluate")
  targets = [task.postprocess_fn(r["gold"], is_target=True) for r in records]
  predictions = [task.postprocess_fn(r["prediction"], is_target=False) for r in records]
  metrics = {}
  for metric_fn in task.metric_fns:
    metrics.update(metric_fn(targets, predictions))
  if predictions_path and jax.process_index() == 0:
    if rationale_prefix is not None:
      raw_inputs = [r["input"][len(label_prefix):] for r in records]
      for record, rationale in zip(records, predictor.predict(raw_inputs, rationale_prefix)):
        record["rationale"] = rationale
    write_jsonl(predictions_path, records)
  return metrics


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  storage.write_atomically(path, "".join(json.dumps(record, ensure_ascii=False) + "\n"
                                         for record in records).encode("utf-8"))


def read_prediction_inputs(path: str) -> list[dict]:
  """[{id, input}] from a JSONL file ({"input": ..., "id"?: ...}) or a plain-text file."""
  if path.endswith((".jsonl", ".jsonl.gz", ".json")):
    examples = []
    for where, obj in rationales.iter_json_lines(path):
      if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
        raise rationales.RationaleFileError(f"{where}: expected an object with a string 'input'")
      examples.append({"id": str(obj.get("id", len(examples))), "input": obj["input"]})
    return examples
  return [{"id": str(number - 1), "input": line.rstrip("\n")}
          for number, line in text_files.iter_lines(path) if line.strip()]


def check_output_file(path: str) -> None:
  """Refuses, before any work, an output file whose folder is missing or not writable."""
  if storage.is_url(path):
    return  # storage.check, at the command's start
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise run_dir.ModelDirError(f"{path}: is a folder; name the output file")
  if not os.path.isdir(folder):
    raise run_dir.ModelDirError(f"{path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise run_dir.ModelDirError(f"{path}: folder {folder} is not writable")


def _predictor(args, run: run_dir.RunDir, spec: run_dir.RunSpec, params, config) -> Predictor:
  return Predictor(params, config, vocabulary_of(run, spec), spec.input_length,
                   getattr(args, "decode_length", None) or spec.target_length,
                   batch_size=args.batch_size, method=getattr(args, "method", "greedy"))


def run_predict(args: argparse.Namespace) -> int:
  storage.check(read=[args.checkpoint, args.input], write=[args.output])
  run = run_dir.RunDir(args.checkpoint)
  spec = run.spec()
  examples = read_prediction_inputs(args.input)
  check_output_file(args.output)
  if not examples:
    print(f"{args.command_name}: warning: {args.input} holds no inputs (no line with text); "
          f"{args.output} is written empty", file=sys.stderr)
  with stop_signals.phase(f"predicting {len(examples):,} inputs",
                          resume=f"{args.output} was not written; rerun the same command"):
    params, config, step = run.load_params(args.step)
    predictor = _predictor(args, run, spec, params, config)
    start = time.time()
    texts = [example["input"] for example in examples]
    labels = predictor.predict(texts, spec.label_prefix)
    rationales_out = predictor.predict(texts, spec.rationale_prefix) if args.rationale else None
  records = []
  for i, example in enumerate(examples):
    record = dict(example, prediction=labels[i])
    if rationales_out is not None:
      record["rationale"] = rationales_out[i]
    records.append(record)
  write_jsonl(args.output, records)
  print(f"{len(records)} predictions from step {step}{run.still_training_note()} in "
        f"{time.time() - start:.1f}s -> {args.output}", file=sys.stderr)
  return 0


def label_task_of(mixture_or_task_name: str, flag: str = "MIXTURE_OR_TASK_NAME") -> str:
  """The label task of a run's mixture (evaluation always scores the label task)."""
  provider = input_pipeline.mixture_or_task(mixture_or_task_name, flag)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  label_tasks = [task.name for task in tasks if task.metric_fns]
  if not label_tasks:
    raise input_pipeline.TaskDataError(
        f"{flag}={mixture_or_task_name!r} has no label task with metrics to evaluate")
  return label_tasks[0]


def run_eval(args: argparse.Namespace) -> int:
  storage.check(read=[args.checkpoint], write=[args.output or args.checkpoint])
  run = run_dir.RunDir(args.checkpoint)
  spec = run.spec()
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
  storage.check(*datasets.data_paths())
  # Read once: gin's choices, with the run's tokenization (prefixes, vocabulary) over them.
  options = distillation.TaskOptions(**run.tokenization(spec))
  datasets.register_all()
  with distillation.options_in_use(options):
    task_name = (label_task_of(args.task, "--task") if args.task
                 else label_task_of(spec.mixture_or_task_name,
                                    f"{run_dir.SPEC_FILE} mixture_or_task_name"))
    if args.output:
      check_output_file(args.output)
    with stop_signals.phase(f"evaluating {task_name} {args.split}",
                            resume="nothing was written; rerun the same command"):
      params, config, step = run.load_params(args.step)
      output = args.output or str(run.predictions_path(args.split, step))
      lengths = {"inputs": spec.input_length, "targets": spec.target_length}
      metrics = evaluate_split(_predictor(args, run, spec, params, config), task_name,
                               args.split, lengths, output)
  if note := run.still_training_note():
    print(f"step {step}{note}", file=sys.stderr)
  print(json.dumps({"task": task_name, "split": args.split, "step": step, **metrics}))
  return 0
