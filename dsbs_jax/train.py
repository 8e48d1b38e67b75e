"""The training loop and its gin entry point: `dsbs train` / `python -m dsbs_jax.train`.

`train()` is configured entirely by gin (see gin/runs/*.gin for the macros): it builds the
mesh, restores MODEL_DIR's latest checkpoint or starts from INITIAL_CHECKPOINT_PATH or from
scratch, trains with periodic logging (losses per task, steps/s, tokens/s, MFU, ETA),
asynchronous checkpoints and validation, then scores the test split with the checkpoint
that was best on validation. The jitted steps live in trainer.py; this file must stay a
loop.
"""
import sys

if __name__ == "__main__":  # `python -m dsbs_jax.train ...` is `dsbs train ...`. Returning
  from dsbs_jax import cli  # here, before anything is defined, keeps gin from registering
  sys.exit(cli.main(["train", *sys.argv[1:]]))  # this file's configurables twice.

import argparse
import collections
import dataclasses
import filecmp
import glob
import json
import os
import pathlib
import signal
import tempfile
import time
from typing import Mapping, Optional

import gin
import jax
import numpy as np
import tensorflow as tf
from tensorflow.core.util import event_pb2

from dsbs_jax import checkpoints
from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import encoder_decoder
from dsbs_jax import flags
from dsbs_jax import flops
from dsbs_jax import gin_utils
from dsbs_jax import infer
from dsbs_jax import input_pipeline
from dsbs_jax import partitioning
from dsbs_jax import plots
from dsbs_jax import resources
from dsbs_jax import seqio_tasks
from dsbs_jax import trainer as trainer_lib
from dsbs_jax.models import t5

# T5Config fields a run may change on a pretrained checkpoint or a resumed run; the rest is
# architecture.
RUN_TIME_CONFIG_FIELDS = ("dropout_rate", "dtype") + t5.EXECUTION_FIELDS
NOT_SUMMED_METRICS = ("grad_norm", "learning_rate")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class TrainingInterrupted(RuntimeError):
  """SIGTERM or SIGINT arrived; the run saved a checkpoint and stopped."""


class ModelDirMismatchError(ValueError):
  """MODEL_DIR holds a run trained with other settings; nothing in it was changed."""


USER_ERRORS = (trainer_lib.NonFiniteLossError, checkpoints.CheckpointError, ModelDirMismatchError,
               input_pipeline.TaskDataError, infer.ModelDirError)


def model_config_for(initial_checkpoint_path: Optional[str]) -> t5.T5Config:
  """The gin-bound T5Config, or the checkpoint's with gin's dropout and dtype.

  A checkpoint's parameters are checked against its config.json here (from their metadata),
  so that a damaged one is refused before any work.
  """
  with gin_utils.as_config_errors(ValueError, TypeError, configurable="T5Config"):
    configured = t5.T5Config()
  if not initial_checkpoint_path:
    return configured
  pretrained = checkpoints.check_params(initial_checkpoint_path)
  mismatched = [f.name for f in dataclasses.fields(t5.T5Config)
                if f.name not in RUN_TIME_CONFIG_FIELDS
                and getattr(pretrained, f.name) != getattr(configured, f.name)]
  if mismatched:
    details = ", ".join(f"{name}: gin {getattr(configured, name)!r} vs checkpoint "
                        f"{getattr(pretrained, name)!r}" for name in mismatched)
    raise gin_utils.GinConfigError(
        f"INITIAL_CHECKPOINT_PATH={initial_checkpoint_path} does not fit the model gin file "
        f"({details}); include the gin/models file of that checkpoint")
  return dataclasses.replace(pretrained, **{k: getattr(configured, k) for k in RUN_TIME_CONFIG_FIELDS})


def check_settings(values: dict, task_feature_lengths) -> None:
  """Refuses, before any work, settings that would fail later: each value of `values`
  ({gin name: value}) must be a positive integer, and the feature lengths two of them."""
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise gin_utils.GinConfigError(f"{name} must be a positive integer, got {value!r}")
  if (not isinstance(task_feature_lengths, Mapping)
      or set(task_feature_lengths) != {"inputs", "targets"}
      or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                 for v in task_feature_lengths.values())):
    raise gin_utils.GinConfigError(
        f"TASK_FEATURE_LENGTHS must be {{'inputs': N, 'targets': M}} with positive N and M, "
        f"got {task_feature_lengths!r}")


def _differences(pairs: list[tuple[str, object, object]], where: str) -> list[str]:
  return [f"{name} is {there!r} in {where}, {now!r} now" for name, there, now in pairs
          if there != now]


def check_model_dir(model_dir: str, config: t5.T5Config, spec: infer.RunSpec,
                    vocabulary_path: str) -> None:
  """Refuses a MODEL_DIR whose run files say it was trained with other settings.

  Nothing is written before this check, so a refused run leaves MODEL_DIR as it was.
  """
  directory = pathlib.Path(model_dir)
  differences = []
  if (directory / checkpoints.CONFIG_FILE).is_file():
    there = checkpoints.load_config(directory)
    differences += _differences(
        [(f"T5Config.{f.name}", getattr(there, f.name), getattr(config, f.name))
         for f in dataclasses.fields(t5.T5Config) if f.name not in RUN_TIME_CONFIG_FIELDS],
        checkpoints.CONFIG_FILE)
  if (directory / infer.RUN_FILE).is_file():
    there = infer.RunSpec.load(model_dir)
    differences += _differences([
        ("MIXTURE_OR_TASK_NAME", there.mixture_or_task_name, spec.mixture_or_task_name),
        ("TASK_FEATURE_LENGTHS['inputs']", there.input_length, spec.input_length),
        ("TASK_FEATURE_LENGTHS['targets']", there.target_length, spec.target_length),
        ("TaskOptions.label_prefix", there.label_prefix, spec.label_prefix),
        ("TaskOptions.rationale_prefix", there.rationale_prefix, spec.rationale_prefix),
        ("VOCABULARY_EXTRA_IDS", there.vocabulary_extra_ids, spec.vocabulary_extra_ids)],
        infer.RUN_FILE)
  vocabulary_there = directory / infer.VOCABULARY_FILE
  if vocabulary_there.is_file() and not filecmp.cmp(vocabulary_there, vocabulary_path, shallow=False):
    differences.append(f"VOCABULARY {vocabulary_path} is not the {infer.VOCABULARY_FILE} there")
  if differences:
    raise ModelDirMismatchError(_mismatch_message(model_dir, differences))


def _mismatch_message(model_dir: str, differences: list[str]) -> str:
  return (f"MODEL_DIR {model_dir} holds a run trained with other settings ("
          + "; ".join(differences) + "); nothing in it was changed. Rerun with its settings to "
          "resume it, or give a new MODEL_DIR")


def check_input_state(model_dir: str, saved: dict, current: dict, step: int) -> None:
  """Refuses to resume a checkpoint whose batches were drawn with other data settings."""
  names = {"mixture_or_task_name": "MIXTURE_OR_TASK_NAME", "seed": "train.seed",
           "batch_size": "BATCH_SIZE", "task_feature_lengths": "TASK_FEATURE_LENGTHS"}
  differences = _differences([(names.get(key, key), saved.get(key), current.get(key))
                              for key in sorted(set(saved) | set(current))],
                             f"{checkpoints.TRAIN_CHECKPOINTS_DIR}/{step}")
  if differences:
    raise ModelDirMismatchError(_mismatch_message(model_dir, differences))


def check_writable(model_dir: str) -> None:
  """Creates MODEL_DIR if needed and proves a file can be written in it."""
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=model_dir):
      pass
  except OSError as error:
    raise gin_utils.GinConfigError(f"MODEL_DIR={model_dir}: cannot write there "
                                   f"({error.strerror or error})") from None


def _write_if_changed(path: str, content: bytes) -> None:
  """Writes `content` to `path` atomically, leaving an identical file untouched."""
  if os.path.isfile(path) and open(path, "rb").read() == content:
    return
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(content)
  os.replace(tmp, path)


def write_run_files(model_dir: str, config: t5.T5Config, spec: infer.RunSpec) -> None:
  """config.json, run.json and vocabulary.model: what eval, predict and export read."""
  os.makedirs(model_dir, exist_ok=True)
  _write_if_changed(os.path.join(model_dir, checkpoints.CONFIG_FILE), (config.to_json() + "\n").encode())
  _write_if_changed(os.path.join(model_dir, infer.RUN_FILE), spec.to_json().encode())
  with open(distillation.TaskOptions().vocabulary_path, "rb") as f:
    _write_if_changed(os.path.join(model_dir, infer.VOCABULARY_FILE), f.read())


def _logged_again(kind: str, row_step: int, step: int) -> bool:
  """Whether a run resumed at `step` logs this row again: rows of later steps, and the
  final evaluation's (it runs again at the end)."""
  return kind.startswith("final_") or row_step > step


def drop_metrics_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without the rows a run resumed at `step` will write again, and
  without a last line torn by a kill."""
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  kept = []
  for number, line in enumerate(lines, start=1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines):
        continue  # torn by a kill mid-write
      raise infer.ModelDirError(f"{path}:{number}: not a JSON line; fix or remove it") from None
    if not _logged_again(str(row.get("kind", "")), int(row.get("step", 0)), step):
      kept.append(line)
  if kept != lines:
    _write_if_changed(path, "".join(line + "\n" for line in kept).encode("utf-8"))


def drop_tensorboard_events_after(directory: str, step: int) -> None:
  """Rewrites MODEL_DIR/tensorboard's event files without the summaries a run resumed at
  `step` will write again (TensorBoard would draw both), and without a torn last record."""
  for path in sorted(glob.glob(os.path.join(directory, "*tfevents*"))):
    kept, changed = [], False
    try:
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        event = event_pb2.Event.FromString(record)
        if any(_logged_again(value.tag, event.step, step) for value in event.summary.value):
          changed = True
        else:
          kept.append(record)
    except tf.errors.DataLossError:  # a record torn by a kill mid-write
      changed = True
    if changed:
      tmp = os.path.join(directory, ".rewriting")
      with tf.io.TFRecordWriter(tmp) as writer:
        for record in kept:
          writer.write(record)
      os.replace(tmp, path)


class MetricsLog:
  """Writes each summary to MODEL_DIR/metrics.jsonl and TensorBoard (on process 0 only).

  A run resumed at `start_step` first drops what earlier runs logged past that step, so
  that every step is logged once.
  """

  def __init__(self, model_dir: str, start_step: int):
    self._active = jax.process_index() == 0
    if self._active:
      jsonl_path = os.path.join(model_dir, METRICS_FILE)
      tensorboard_dir = os.path.join(model_dir, TENSORBOARD_DIR)
      drop_metrics_after(jsonl_path, start_step)
      drop_tensorboard_events_after(tensorboard_dir, start_step)
      self._jsonl = open(jsonl_path, "a", encoding="utf-8")
      self._writer = tf.summary.create_file_writer(tensorboard_dir)

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self._active:
      return
    self._jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
    self._jsonl.flush()
    with self._writer.as_default(step=step):
      for key, value in values.items():
        if isinstance(value, (int, float)):
          tf.summary.scalar(f"{kind}/{key}", value)
    self._writer.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._writer.close()


def startup_times(build_start: float, state_seconds: float, first_metrics) -> dict:
  """Seconds from building the trainer to the end of the first step (which compiles it)."""
  jax.block_until_ready(first_metrics)
  seconds = time.time() - build_start
  return {"seconds": seconds, "state_seconds": state_seconds,
          "first_step_seconds": seconds - state_seconds}


def format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def throughput(summary: dict, steps: int, input_tokens: int, seconds: float, step_flops: float,
               peak_flops: float) -> dict:
  """Rates over a logging window. Tokens: all non-padding target tokens, plus input tokens
  counted on this host and scaled by the number of hosts (each reads an equal share)."""
  return {
      "steps_per_sec": steps / seconds,
      "examples_per_sec": summary.get("examples", 0.0) / seconds,
      "tokens_per_sec": (summary.get("tokens", 0.0) + input_tokens * jax.process_count()) / seconds,
      "mfu": steps * step_flops / seconds / (peak_flops * jax.device_count()),
  }


def progress_line(step: int, train_steps: int, values: dict, eta: str) -> str:
  parts = [f"step {step}/{train_steps}", f"loss {values.get('loss', float('nan')):.4f}"]
  for task in ("label", "rationale"):
    if f"{task}_loss" in values:
      parts.append(f"{task} {values[f'{task}_loss']:.4f}")
  if "learning_rate" in values:
    parts.append(f"lr {values['learning_rate']:.2e}")
  parts += [f"{values['steps_per_sec']:.2f} steps/s", f"{values['examples_per_sec']:.1f} ex/s",
            f"{values['tokens_per_sec']:,.0f} tok/s", f"MFU {100 * values['mfu']:.1f}%",
            f"ETA {eta}"]
  return " | ".join(parts)


class RemainingTime:
  """The time a run has left: its training steps at the step rate measured so far, plus the
  validations still to come and the final evaluation at the decoding rate of the last
  validation. Until a validation is timed, the estimate counts training only and says so."""

  def __init__(self, start_step: int, train_steps: int, eval_period: int,
               validation_examples: int, final_examples: int):
    self._start_time, self._start_step = time.time(), start_step
    self._train_steps, self._eval_period = train_steps, eval_period
    self._validation_examples, self._final_examples = validation_examples, final_examples
    self._evaluation_seconds = 0.0
    self._seconds_per_example = None

  def add_evaluation(self, seconds: float, examples: int) -> None:
    self._evaluation_seconds += seconds
    self._seconds_per_example = seconds / max(examples, 1)

  def validations_after(self, step: int) -> int:
    """Periodic validations at steps after `step` (every eval_period, and the last step)."""
    periodic = self._train_steps // self._eval_period - step // self._eval_period
    return periodic + int(step < self._train_steps and self._train_steps % self._eval_period != 0)

  def __call__(self, step: int) -> str:
    training_seconds = time.time() - self._start_time - self._evaluation_seconds
    rate = (step - self._start_step) / max(training_seconds, 1e-9)
    seconds = (self._train_steps - step) / max(rate, 1e-9)
    if self._seconds_per_example is None:
      return f"{format_duration(seconds)}+eval"
    examples = self.validations_after(step) * self._validation_examples + self._final_examples
    return format_duration(seconds + examples * self._seconds_per_example)


def majority_baseline(task_name: str, lengths: dict, split: str = "test") -> dict:
  """The task's metrics when every example gets the most common training target."""
  task = input_pipeline.mixture_or_task(task_name)
  train_targets = [ex["targets_pretokenized"].decode() for ex in task.get_dataset(
      lengths, split="train", shuffle=False, use_cached=False).as_numpy_iterator()]
  majority = collections.Counter(train_targets).most_common(1)[0][0]
  gold = [ex["targets_pretokenized"].decode() for ex in task.get_dataset(
      lengths, split=split, shuffle=False, use_cached=False).as_numpy_iterator()]
  results = {}
  for metric_fn in task.metric_fns:
    results.update(metric_fn(gold, [majority] * len(gold)))
  return {"prediction": majority, **results}


class StopRequests:
  """Turns SIGTERM/SIGINT into a flag the loop checks, so it can checkpoint and stop."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def print_flushed(*args):
  print(*args, flush=True)


@gin.configurable(denylist=["print_fn"])
def train(model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: dict = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, initial_checkpoint_path: Optional[str] = None,
          log_period: int = 100, checkpoint_period: int = 1000, eval_period: int = 1000,
          keep_checkpoints: int = 3, eval_batch_size: int = 64,
          eval_max_examples: Optional[int] = None,
          final_eval_max_examples: Optional[int] = None, eval_decode_length: int = 64,
          predict_rationales: bool = False,
          seed: int = 0, restore_step: Optional[int] = None, print_fn=print_flushed) -> dict:
  """Trains, evaluates and returns {"validation": ..., "test": ..., "best_step": ...}.

  Periodic validation decodes at most eval_max_examples examples; the final scoring of
  the best checkpoint, whole splits unless final_eval_max_examples says otherwise, and
  with predict_rationales the predictions files also hold each generated rationale.

  TRAIN_STEPS counts the updates of this fine-tuning run (a restored run continues to
  it), not the pretraining steps of INITIAL_CHECKPOINT_PATH.
  """
  gin_utils.check_required("train", {
      "model_dir": model_dir, "mixture_or_task_name": mixture_or_task_name,
      "task_feature_lengths": task_feature_lengths, "train_steps": train_steps,
      "batch_size": batch_size, "initial_checkpoint_path": initial_checkpoint_path})
  # Everything is checked before anything is written: a refused run leaves MODEL_DIR as it was.
  check_settings({"TRAIN_STEPS": train_steps, "BATCH_SIZE": batch_size,
                  "train.log_period": log_period, "CHECKPOINT_PERIOD": checkpoint_period,
                  "EVAL_PERIOD": eval_period, "train.keep_checkpoints": keep_checkpoints,
                  "train.eval_batch_size": eval_batch_size,
                  "train.eval_decode_length": eval_decode_length}, task_feature_lengths)
  options = distillation.TaskOptions()
  config = model_config_for(initial_checkpoint_path)
  vocabulary = seqio_tasks.OptionsVocabulary()
  if vocabulary.vocab_size > config.vocab_size:
    raise gin_utils.GinConfigError(
        f"the vocabulary ({options.vocabulary_path}) has {vocabulary.vocab_size} ids but the "
        f"model only {config.vocab_size} (T5Config.vocab_size)")
  lengths = dict(task_feature_lengths)
  label_task = infer.label_task_of(mixture_or_task_name)
  spec = infer.RunSpec(mixture_or_task_name, lengths["inputs"], lengths["targets"],
                       options.label_prefix, options.rationale_prefix, options.vocabulary_extra_ids)
  check_model_dir(model_dir, config, spec, options.vocabulary_path)
  check_writable(model_dir)
  split_sizes = input_pipeline.split_sizes(mixture_or_task_name)
  print_fn(f"{mixture_or_task_name}: every record read and checked (" + "; ".join(
      f"{task}: " + ", ".join(f"{n:,} {split}" for split, n in sizes.items())
      for task, sizes in split_sizes.items()) + ")")
  with gin_utils.as_config_errors():
    partitioner = partitioning.make_partitioner()
    optimizer, learning_rate_fn = trainer_lib.make_optimizer(total_steps=train_steps)
    build_start = time.time()
    trainer = trainer_lib.Trainer(config, partitioner, optimizer, learning_rate_fn)
  metric_name = "validation_accuracy"
  input_state = {"mixture_or_task_name": mixture_or_task_name, "seed": seed,
                 "batch_size": batch_size, "task_feature_lengths": lengths}
  # A restarted run keeps the best result it had, so a worse later one cannot replace it.
  best = infer.read_best(model_dir) or {"step": None, metric_name: None}
  checkpointer = checkpoints.TrainCheckpointer(model_dir, keep=keep_checkpoints,
                                               keep_step=best["step"])
  log = None
  try:
    restore_from = restore_step if restore_step is not None else checkpointer.latest_step()
    if restore_from is not None:
      check_input_state(model_dir, checkpointer.input_state(restore_from), input_state,
                        restore_from)
      state, _ = checkpointer.restore(restore_from, trainer.abstract_state())
      print_fn(f"restored step {restore_from} from {checkpointer.directory}")
    elif initial_checkpoint_path:
      params, _ = checkpoints.load_model(initial_checkpoint_path)
      state = trainer.state_from_params(jax.device_put(params, trainer.param_shardings))
      print_fn(f"initialized from {initial_checkpoint_path}")
    else:
      state = trainer.init_state(jax.random.key(seed))
    step = int(jax.device_get(state.step))
    start_step, state_seconds = step, time.time() - build_start
    log = MetricsLog(model_dir, step)  # the first write: it refuses a garbled metrics.jsonl
    # A best step past the restored one belongs to a continuation this run replaces.
    stale_best = best["step"] is not None and best["step"] > step
    if stale_best:
      best = {"step": None, metric_name: None}
      checkpointer.keep_step(None)
    if jax.process_index() == 0:
      write_run_files(model_dir, config, spec)
      if restore_step is not None:
        dropped = checkpointer.delete_after(restore_step)
        if dropped:
          print_fn(f"deleted later checkpoints {dropped}: this run continues from step {restore_step}")
      if stale_best:
        os.remove(os.path.join(model_dir, infer.BEST_FILE))
    batches = input_pipeline.train_batches(mixture_or_task_name, lengths, batch_size, seed,
                                           skip_batches=step)
    step_flops = flops.train_step_flops(config, batch_size, lengths["inputs"], lengths["targets"])
    peak_flops, peak_source = flops.peak_flops_per_device(config.dtype)
    print_fn(f"training {mixture_or_task_name} to step {train_steps} on {jax.device_count()} "
             f"device(s), mesh {dict(partitioner.mesh.shape)}; MFU against {peak_flops:.3g} "
             f"FLOP/s per device ({peak_source})")
    rng = jax.random.key(seed + 1)
    label_sizes = split_sizes.get(label_task, {})
    cap = lambda split, most: min(most or label_sizes.get(split, 0), label_sizes.get(split, 0))
    remaining_time = RemainingTime(
        step, train_steps, eval_period, cap("validation", eval_max_examples),
        (cap("validation", final_eval_max_examples) + cap("test", final_eval_max_examples))
        * (2 if predict_rationales else 1))
    sums, window_start, window_steps, window_input_tokens = None, time.time(), 0, 0
    predictor = lambda params: infer.Predictor(params, config, vocabulary, lengths["inputs"],
                                               min(eval_decode_length, lengths["targets"]),
                                               batch_size=eval_batch_size)
    with StopRequests() as stop:
      while step < train_steps:
        batch = next(batches)
        state, metrics = trainer.train_step(state, trainer.shard_batch(batch), rng)
        step += 1
        if step == start_step + 1:
          startup = startup_times(build_start, state_seconds, metrics)
          print_fn(f"first step done {startup['seconds']:.1f}s after building the trainer "
                   f"(state {startup['state_seconds']:.1f}s, compiling and running the step "
                   f"{startup['first_step_seconds']:.1f}s; layers "
                   f"{'scanned' if t5.scans_layers(config) else 'unrolled'})")
          log.write(step, "startup", startup)
        window_steps += 1
        window_input_tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
        latest = {key: metrics.pop(key) for key in NOT_SUMMED_METRICS if key in metrics}
        sums = metrics if sums is None else jax.tree.map(np.add, sums, metrics)
        is_last = step == train_steps
        # Read once: a signal arriving later in this step is acted on after the next one.
        stopping = stop.signal_name is not None
        save_now = step % checkpoint_period == 0 or is_last or stopping
        eval_now = step % eval_period == 0 or is_last
        if not (step % log_period == 0 or save_now or eval_now):
          continue
        trainer_lib.check_finite(dict(sums, **latest), step)
        summary = dict(encoder_decoder.summarize_metrics(sums), **jax.device_get(latest))
        summary.update(throughput(summary, window_steps, window_input_tokens,
                                  time.time() - window_start, step_flops, peak_flops))
        print_fn(progress_line(step, train_steps, summary, remaining_time(step)))
        log.write(step, "train", {k: float(v) for k, v in summary.items()})
        # Saved before validating, so that a failed or killed validation loses no training.
        if save_now or eval_now:
          checkpointer.save(step, state, input_state)
        if eval_now:
          started = time.time()
          eval_metrics = infer.evaluate_split(predictor(state.params), label_task, "validation",
                                              lengths, max_examples=eval_max_examples)
          remaining_time.add_evaluation(time.time() - started, cap("validation", eval_max_examples))
          log.write(step, "validation", eval_metrics)
          print_fn(f"step {step} validation: {json.dumps(eval_metrics)}")
          if best[metric_name] is None or eval_metrics["accuracy"] > best[metric_name]:
            best = {"step": step, metric_name: eval_metrics["accuracy"]}
            checkpointer.wait()  # best_step.json never names a step not yet on disk
            if jax.process_index() == 0:
              infer.write_best(model_dir, best)
            checkpointer.keep_step(step)
        if stopping:
          checkpointer.wait()
          raise TrainingInterrupted(f"{stop.signal_name} at step {step}: checkpoint saved in "
                                    f"{checkpointer.directory}; rerun the same command to resume")
        sums, window_start, window_steps, window_input_tokens = None, time.time(), 0, 0
    checkpointer.wait()
    run_options = {"mixture_or_task_name": mixture_or_task_name, "alpha": options.alpha,
                   "train_fraction": options.train_fraction,
                   "subsample_seed": options.subsample_seed}
    print_fn(f"final evaluation of step {best['step'] or step} (best on validation), about "
             f"{remaining_time(step)}")
    return final_evaluation(model_dir, best["step"] or step, run_options, checkpointer, trainer,
                            predictor, label_task, lengths, final_eval_max_examples, log,
                            print_fn, options.rationale_prefix if predict_rationales else None)
  finally:
    checkpointer.close()
    if log is not None:
      log.close()


def final_evaluation(model_dir, best_step, run_options, checkpointer, trainer, predictor,
                     label_task, lengths, eval_max_examples, log, print_fn,
                     rationale_prefix) -> dict:
  """Validation and test metrics of the checkpoint best on validation; writes results.json."""
  state, _ = checkpointer.restore(best_step, trainer.abstract_state())
  results = {"best_step": best_step, "label_task": label_task, **run_options}
  for split in ("validation", "test"):
    path = os.path.join(model_dir, "predictions.jsonl" if split == "test" else f"predictions_{split}.jsonl")
    results[split] = infer.evaluate_split(predictor(state.params), label_task, split, lengths,
                                          predictions_path=path, max_examples=eval_max_examples,
                                          rationale_prefix=rationale_prefix)
    log.write(best_step, f"final_{split}", results[split])
  results["majority_baseline_test"] = majority_baseline(label_task, lengths)
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, infer.RESULTS_FILE), "w") as f:
      json.dump(results, f, indent=2)
    plots.plot_learning_curves(os.path.basename(os.path.normpath(model_dir)),
                               plots.read_metrics(pathlib.Path(model_dir) / "metrics.jsonl"),
                               pathlib.Path(model_dir) / "learning_curves.png")
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
      f.write(gin.operative_config_str())
  print_fn(f"best step {best_step} (by validation): validation {json.dumps(results['validation'])}, "
           f"test {json.dumps(results['test'])}; majority-class baseline on test: "
           f"{json.dumps(results['majority_baseline_test'])}")
  print_fn(f"outputs in {model_dir}: checkpoints/, predictions.jsonl (test), metrics.jsonl, "
           "learning_curves.png, tensorboard/, results.json")
  return results


RUN_GIN_FILE = resources.GIN_DIR / "runs" / "train.gin"
DESCRIPTION = """\
Trains a student as the gin files say: a T5 (gin/models/*.gin) on a SeqIO mixture of the
label and rationale tasks, logging both losses, checkpointing and validating as it goes,
then scores the validation and test splits with the checkpoint best on validation. Outputs
go to MODEL_DIR. Rerunning the same command resumes from MODEL_DIR's latest checkpoint;
settings that do not fit that run are refused before anything is written."""
EXAMPLES = """\
examples:
  dsbs train --gin_file=quickstart.gin
  dsbs train --gin_file=quickstart.gin --gin.MODEL_DIR="'/tmp/run2'" --gin.TRAIN_STEPS=600
  dsbs train --gin_file=models/t5_1_1_small.gin --gin_file=runs/train.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'svamp_dsbs_teacher'" --gin.MODEL_DIR="'/tmp/svamp'" \\
      --gin.TRAIN_STEPS=2000
  dsbs train ... --gin.train.restore_step=400   # go back to step 400, dropping later ones"""


def macros_help() -> str:
  """The opening comment of gin/runs/train.gin, which lists its required and common macros."""
  if not os.path.isfile(RUN_GIN_FILE):
    return ""
  with open(RUN_GIN_FILE, encoding="utf-8") as f:
    header = f.read().split("\n\n")[0].splitlines()
  return "macros (gin/runs/train.gin, included by every run file):\n" + "\n".join(
      "  " + line.lstrip("#")[1:] for line in header if line.startswith("#"))


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("train", description=DESCRIPTION,
                                 epilog=macros_help() + "\n\n" + EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_arguments(parser)
  hosts = parser.add_argument_group("several hosts (jax.distributed; start the same command on each)")
  hosts.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                     help="address of process 0")
  hosts.add_argument("--num_processes", type=flags.positive_int, default=None,
                     help="number of processes (hosts) in the run")
  hosts.add_argument("--process_id", type=int, default=None,
                     help="this process's index, 0 to num_processes - 1")
  parser.set_defaults(func=run)


def initialize_distributed(args) -> None:
  if args.coordinator_address:
    # Only the CPU backend reads this; it lets CPU-only hosts (and tests) run collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def run(args) -> int:
  initialize_distributed(args)
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
  datasets.register_all()
  try:
    train()
  except TrainingInterrupted as interrupted:
    print(f"dsbs train: {interrupted}", file=sys.stderr)
    return 3
  return 0

