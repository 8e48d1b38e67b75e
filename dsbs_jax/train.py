"""The training loop and its gin entry point: `dsbs train` / `python -m dsbs_jax.train`.

`train()` is configured entirely by gin (see gin/runs/*.gin for the macros): it builds the
mesh, restores MODEL_DIR's latest checkpoint or starts from INITIAL_CHECKPOINT_PATH or from
scratch, trains with periodic logging (losses per task, steps/s, tokens/s, MFU, ETA),
asynchronous checkpoints and validation, then scores the test split with the checkpoint
that was best on validation. The jitted steps live in trainer.py; this file must stay a
loop.
"""
import collections
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import sys
import time
from typing import Optional

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax import checkpoints
from dsbs_jax import data
from dsbs_jax import flops
from dsbs_jax import gin_utils
from dsbs_jax import infer
from dsbs_jax import input_pipeline
from dsbs_jax import model
from dsbs_jax import partitioning
from dsbs_jax import plots
from dsbs_jax import trainer as trainer_lib
from dsbs_jax.models import t5

# T5Config fields a run may change on a pretrained checkpoint; the rest is architecture.
RUN_TIME_CONFIG_FIELDS = ("dropout_rate", "dtype") + t5.EXECUTION_FIELDS
NOT_SUMMED_METRICS = ("grad_norm", "learning_rate")


class TrainingInterrupted(RuntimeError):
  """SIGTERM or SIGINT arrived; the run saved a checkpoint and stopped."""


USER_ERRORS = (trainer_lib.NonFiniteLossError, checkpoints.CheckpointError)


def model_config_for(initial_checkpoint_path: Optional[str]) -> t5.T5Config:
  """The gin-bound T5Config, or the checkpoint's with gin's dropout and dtype."""
  configured = t5.T5Config()
  if not initial_checkpoint_path:
    return configured
  pretrained = checkpoints.load_config(initial_checkpoint_path)
  mismatched = [f.name for f in dataclasses.fields(t5.T5Config)
                if f.name not in RUN_TIME_CONFIG_FIELDS
                and getattr(pretrained, f.name) != getattr(configured, f.name)]
  if mismatched:
    details = ", ".join(f"{name}: gin {getattr(configured, name)!r} vs checkpoint "
                        f"{getattr(pretrained, name)!r}" for name in mismatched)
    raise ValueError(f"INITIAL_CHECKPOINT_PATH={initial_checkpoint_path} does not fit the model "
                     f"gin file ({details}); include the gin/models file of that checkpoint")
  return dataclasses.replace(pretrained, **{k: getattr(configured, k) for k in RUN_TIME_CONFIG_FIELDS})


def write_run_files(model_dir: str, config: t5.T5Config, spec: infer.RunSpec) -> None:
  """config.json, run.json and vocabulary.model: what eval, predict and export read."""
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, checkpoints.CONFIG_FILE), "w") as f:
    f.write(config.to_json() + "\n")
  spec.save(model_dir)
  shutil.copyfile(data.TaskOptions().vocabulary_path, os.path.join(model_dir, infer.VOCABULARY_FILE))


class MetricsLog:
  """Writes each summary to MODEL_DIR/metrics.jsonl and TensorBoard (on process 0 only)."""

  def __init__(self, model_dir: str):
    self._active = jax.process_index() == 0
    if self._active:
      self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a", encoding="utf-8")
      self._writer = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))

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


def progress_line(step: int, train_steps: int, values: dict, eta_seconds: float) -> str:
  parts = [f"step {step}/{train_steps}", f"loss {values.get('loss', float('nan')):.4f}"]
  for task in ("label", "rationale"):
    if f"{task}_loss" in values:
      parts.append(f"{task} {values[f'{task}_loss']:.4f}")
  if "learning_rate" in values:
    parts.append(f"lr {values['learning_rate']:.2e}")
  parts += [f"{values['steps_per_sec']:.2f} steps/s", f"{values['examples_per_sec']:.1f} ex/s",
            f"{values['tokens_per_sec']:,.0f} tok/s", f"MFU {100 * values['mfu']:.1f}%",
            f"ETA {format_duration(eta_seconds)}"]
  return " | ".join(parts)


def majority_baseline(task_name: str, lengths: dict, split: str = "test") -> dict:
  """The task's metrics when every example gets the most common training target."""
  task = seqio.get_mixture_or_task(task_name)
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
  options = data.TaskOptions()
  config = model_config_for(initial_checkpoint_path)
  vocabulary = data.OptionsVocabulary()
  if vocabulary.vocab_size > config.vocab_size:
    raise ValueError(f"the vocabulary ({options.vocabulary_path}) has {vocabulary.vocab_size} "
                     f"ids but the model only {config.vocab_size} (T5Config.vocab_size)")
  lengths = dict(task_feature_lengths)
  label_task = infer.label_task_of(mixture_or_task_name)
  spec = infer.RunSpec(mixture_or_task_name, lengths["inputs"], lengths["targets"],
                       options.label_prefix, options.rationale_prefix, options.vocabulary_extra_ids)
  if jax.process_index() == 0:
    write_run_files(model_dir, config, spec)

  partitioner = partitioning.make_partitioner()
  optimizer, learning_rate_fn = trainer_lib.make_optimizer(total_steps=train_steps)
  build_start = time.time()
  trainer = trainer_lib.Trainer(config, partitioner, optimizer, learning_rate_fn)
  metric_name = "validation_accuracy"
  checkpointer = checkpoints.TrainCheckpointer(model_dir, keep=keep_checkpoints,
                                               best_metric=metric_name)
  input_state = {"mixture_or_task_name": mixture_or_task_name, "seed": seed,
                 "batch_size": batch_size, "task_feature_lengths": lengths}
  restore_from = restore_step if restore_step is not None else checkpointer.latest_step()
  if restore_from is not None:
    state, saved_input_state = checkpointer.restore(restore_from, trainer.abstract_state())
    if saved_input_state != input_state:
      raise ValueError(f"{checkpointer.directory / str(restore_from)} was written with input "
                       f"{saved_input_state}, this run reads {input_state}; use a new MODEL_DIR")
    print_fn(f"restored step {restore_from} from {checkpointer.directory}")
    if restore_step is not None and jax.process_index() == 0:
      dropped = checkpointer.delete_after(restore_step)
      if dropped:
        print_fn(f"deleted later checkpoints {dropped}: this run continues from step {restore_step}")
  elif initial_checkpoint_path:
    params, _ = checkpoints.load_model(initial_checkpoint_path)
    state = trainer.state_from_params(jax.device_put(params, trainer.param_shardings))
    print_fn(f"initialized from {initial_checkpoint_path}")
  else:
    state = trainer.init_state(jax.random.key(seed))
  step = int(jax.device_get(state.step))
  state_seconds = time.time() - build_start
  batches = input_pipeline.train_batches(mixture_or_task_name, lengths, batch_size, seed,
                                         skip_batches=step)

  log = MetricsLog(model_dir)
  step_flops = flops.train_step_flops(config, batch_size, lengths["inputs"], lengths["targets"])
  peak_flops, peak_source = flops.peak_flops_per_device(config.dtype)
  print_fn(f"training {mixture_or_task_name} to step {train_steps} on {jax.device_count()} "
           f"device(s), mesh {dict(partitioner.mesh.shape)}; MFU against {peak_flops:.3g} FLOP/s "
           f"({peak_source})")
  rng = jax.random.key(seed + 1)
  # A restarted run keeps the best result it had, so a worse later one cannot replace it.
  best = infer.read_best(model_dir) or {"step": None, metric_name: None}
  sums, window_start, window_steps, window_input_tokens = None, time.time(), 0, 0
  run_start, start_step = time.time(), step
  predictor = lambda params: infer.Predictor(params, config, vocabulary, lengths["inputs"],
                                             min(eval_decode_length, lengths["targets"]),
                                             batch_size=eval_batch_size)
  try:
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
        summary = dict(model.summarize_metrics(sums), **jax.device_get(latest))
        seconds = time.time() - window_start
        summary.update(throughput(summary, window_steps, window_input_tokens, seconds, step_flops,
                                  peak_flops))
        rate = (step - start_step) / (time.time() - run_start)
        print_fn(progress_line(step, train_steps, summary, (train_steps - step) / max(rate, 1e-9)))
        log.write(step, "train", {k: float(v) for k, v in summary.items()})
        sums, window_start, window_steps, window_input_tokens = None, time.time(), 0, 0
        eval_metrics = None
        if eval_now:
          eval_metrics = infer.evaluate_split(predictor(state.params), label_task, "validation",
                                              lengths, max_examples=eval_max_examples)
          log.write(step, "validation", eval_metrics)
          print_fn(f"step {step} validation: {json.dumps(eval_metrics)}")
          if best[metric_name] is None or eval_metrics["accuracy"] > best[metric_name]:
            best = {"step": step, metric_name: eval_metrics["accuracy"]}
        if save_now or eval_now:
          checkpointer.save(step, state, input_state,
                            metrics={metric_name: eval_metrics["accuracy"]} if eval_metrics else None)
          if eval_metrics and best["step"] == step and jax.process_index() == 0:
            checkpointer.wait()
            with open(os.path.join(model_dir, infer.BEST_FILE), "w") as f:
              json.dump(best, f)
        if stopping:
          checkpointer.wait()
          raise TrainingInterrupted(f"{stop.signal_name} at step {step}: checkpoint saved in "
                                    f"{checkpointer.directory}; rerun the same command to resume")
    checkpointer.wait()
    run_options = {"mixture_or_task_name": mixture_or_task_name, "alpha": options.alpha,
                   "train_fraction": options.train_fraction,
                   "subsample_seed": options.subsample_seed}
    return final_evaluation(model_dir, best["step"] or step, run_options, checkpointer, trainer,
                            predictor, label_task, lengths, final_eval_max_examples, log,
                            print_fn, options.rationale_prefix if predict_rationales else None)
  finally:
    checkpointer.close()
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


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("train", help="train a student as the gin files say")
  gin_utils.add_gin_arguments(parser)
  parser.add_argument("--coordinator_address", default=None,
                      help="host:port of process 0, for multi-host runs (jax.distributed)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.set_defaults(func=run)


def initialize_distributed(args) -> None:
  if args.coordinator_address:
    # Only the CPU backend reads this; it lets CPU-only hosts (and tests) run collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def run(args) -> int:
  initialize_distributed(args)
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
  import tasks  # registers every task, after gin like T5X's task modules
  del tasks
  try:
    train()
  except TrainingInterrupted as interrupted:
    print(f"dsbs train: {interrupted}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  from dsbs_jax import cli
  sys.exit(cli.main(["train", *sys.argv[1:]]))
