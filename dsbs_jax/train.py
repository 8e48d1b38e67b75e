"""The training loop and its gin entry point: `dsbs train` / `python -m dsbs_jax.train`.

`train()` is configured entirely by gin (see gin/runs/*.gin for the macros). It is a short
loop over named pieces: `check_run` (everything checked before anything is written),
`restore_or_initialize` (MODEL_DIR's latest checkpoint, INITIAL_CHECKPOINT_PATH, or
scratch), the periodic actions of periodic_actions.py (progress report, checkpointing,
validation), and `final_evaluation` (the checkpoint best on validation scores the
validation and test splits). The jitted steps live in trainer.py, MODEL_DIR's files in
run_dir.py; this file must stay a loop.
"""
import sys

if __name__ == "__main__":  # `python -m dsbs_jax.train ...` is `dsbs train ...`. Returning
  from dsbs_jax import cli  # here, before anything is defined, keeps gin from registering
  sys.exit(cli.main(["train", *sys.argv[1:]]))  # this file's configurables twice.

import collections
import dataclasses
import json
import time
from typing import Mapping, Optional

import gin
import jax

from dsbs_jax import checkpoints
from dsbs_jax import console
from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import flops
from dsbs_jax import gin_utils
from dsbs_jax import infer
from dsbs_jax import input_pipeline
from dsbs_jax import partitioning
from dsbs_jax import per_input_batches
from dsbs_jax import periodic_actions
from dsbs_jax import plots
from dsbs_jax import run_dir
from dsbs_jax import seqio_tasks
from dsbs_jax import stop_signals
from dsbs_jax import storage
from dsbs_jax import tpu_runtime
from dsbs_jax import trainer as trainer_lib
from dsbs_jax.models import t5

class TrainingInterrupted(RuntimeError):
  """SIGTERM or SIGINT arrived; the run saved a checkpoint and stopped. `exit_code` follows
  every stop's rule (stop_signals.EXIT_CODES): 130 for SIGINT, 143 for SIGTERM, and 143 for
  a notice passed on between hosts (a preemption's SIGTERM to one of them)."""

  def __init__(self, message: str, signal_name: str):
    super().__init__(message)
    self.exit_code = stop_signals.EXIT_CODES.get(signal_name, stop_signals.EXIT_CODES["SIGTERM"])


USER_ERRORS = (trainer_lib.NonFiniteLossError, checkpoints.CheckpointError,
               run_dir.ModelDirMismatchError, input_pipeline.TaskDataError, run_dir.ModelDirError,
               storage.StorageError)


BATCHINGS = {"mixture": input_pipeline.train_batches,
             "per_input": per_input_batches.train_batches}


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
  mismatched = run_dir.architecture_differences(pretrained, configured)
  if mismatched:
    details = ", ".join(f"{name}: gin {now!r} vs checkpoint {there!r}"
                        for name, there, now in mismatched)
    raise gin_utils.GinConfigError(
        f"INITIAL_CHECKPOINT_PATH={initial_checkpoint_path} does not fit the model gin file "
        f"({details}); include the gin/models file of that checkpoint")
  return dataclasses.replace(pretrained, **{k: getattr(configured, k)
                                             for k in run_dir.RUN_TIME_CONFIG_FIELDS})


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


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """What a run is, checked against its gin, its data and MODEL_DIR before anything is written."""
  config: t5.T5Config
  spec: run_dir.RunSpec
  label_task: str  # the task validation and the final evaluation score
  split_sizes: dict[str, dict[str, int]]  # {task: {split: examples}}

  @property
  def lengths(self) -> dict[str, int]:
    return {"inputs": self.spec.input_length, "targets": self.spec.target_length}


def check_run(run: run_dir.RunDir, options: distillation.TaskOptions, mixture_or_task_name: str,
              task_feature_lengths: Mapping[str, int], initial_checkpoint_path: Optional[str],
              print_fn) -> RunSettings:
  """Checks everything a run needs before anything is written, so that a refused run leaves
  MODEL_DIR as it was: the network (and INITIAL_CHECKPOINT_PATH's fit to it), the
  vocabulary, the mixture and every record of every split, and MODEL_DIR's earlier run."""
  config = model_config_for(initial_checkpoint_path)
  vocabulary = seqio_tasks.OptionsVocabulary()
  if vocabulary.vocab_size > config.vocab_size:
    raise gin_utils.GinConfigError(
        f"the vocabulary ({options.vocabulary_path}) has {vocabulary.vocab_size} ids but the "
        f"model only {config.vocab_size} (T5Config.vocab_size)")
  label_task = infer.label_task_of(mixture_or_task_name)
  spec = run_dir.RunSpec(mixture_or_task_name, task_feature_lengths["inputs"],
                         task_feature_lengths["targets"], options.label_prefix,
                         options.rationale_prefix, options.vocabulary_extra_ids)
  run.check_fits(config, spec, options.vocabulary_path)
  split_sizes = input_pipeline.split_sizes(mixture_or_task_name)
  truncated = input_pipeline.truncated_counts(mixture_or_task_name, task_feature_lengths)
  print_fn(read_check_line(mixture_or_task_name, split_sizes, truncated))
  return RunSettings(config, spec, label_task, split_sizes)


def _per_split(counts: Mapping[str, int]) -> str:
  return ", ".join(f"{n:,} {split}" for split, n in counts.items())


def read_check_line(mixture_or_task_name: str, split_sizes: dict, truncated: dict) -> str:
  """What the check of every record says: the examples per task and split, then how many
  of them are longer than TASK_FEATURE_LENGTHS (input_pipeline.truncated_counts)."""
  sizes = "; ".join(f"{task}: {_per_split(counts)}" for task, counts in split_sizes.items())
  line = f"{mixture_or_task_name}: every record read and checked ({sizes})"
  cut = "; ".join(f"{task} {feature} {_per_split(counts)}"
                  for task, features in truncated.items() for feature, counts in features.items())
  return line + (f"; truncated, longer than TASK_FEATURE_LENGTHS: {cut}" if cut else "")


def restore_or_initialize(run: run_dir.RunDir, checkpointer: checkpoints.TrainCheckpointer,
                          trainer: trainer_lib.Trainer, input_state: dict,
                          restore_step: Optional[int], initial_checkpoint_path: Optional[str],
                          seed: int, print_fn) -> trainer_lib.TrainState:
  """The state to start from: MODEL_DIR's checkpoint (restore_step, else the latest), else
  INITIAL_CHECKPOINT_PATH's parameters with a fresh optimizer, else fresh parameters."""
  restore_from = restore_step if restore_step is not None else checkpointer.latest_step()
  if restore_from is not None:
    run.check_input_state(checkpointer.input_state(restore_from), input_state, restore_from)
    state, _ = checkpointer.restore(restore_from, trainer.abstract_state())
    print_fn(f"restored step {restore_from} from {checkpointer.directory}")
    return state
  if initial_checkpoint_path:
    params, _ = checkpoints.load_model(initial_checkpoint_path)
    state = trainer.state_from_params(params)
    print_fn(f"initialized from {initial_checkpoint_path}")
    return state
  return trainer.init_state(jax.random.key(seed))


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


def print_flushed(*args):
  print(*args, flush=True)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long a run trains, how often it acts, and how much it evaluates (train's gin
  parameters of the same names)."""
  train_steps: int
  batch_size: int
  log_period: int
  checkpoint_period: int
  eval_period: int
  keep_checkpoints: int
  eval_batch_size: int
  eval_max_examples: Optional[int]
  final_eval_max_examples: Optional[int]
  eval_decode_length: int
  predict_rationales: bool
  seed: int


@gin.configurable(denylist=["print_fn"])
def train(model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: dict = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, initial_checkpoint_path: Optional[str] = None,
          log_period: int = 100, checkpoint_period: int = 1000, eval_period: int = 1000,
          keep_checkpoints: int = 3, eval_batch_size: int = 64,
          eval_max_examples: Optional[int] = None,
          final_eval_max_examples: Optional[int] = None, eval_decode_length: int = 64,
          predict_rationales: bool = False, seed: int = 0, batching: str = "mixture",
          restore_step: Optional[int] = None, print_fn=print_flushed) -> dict:
  """Trains, evaluates and returns {"validation": ..., "test": ..., "best_step": ...}.

  Periodic validation decodes at most eval_max_examples examples; the final scoring of
  the best checkpoint, whole splits unless final_eval_max_examples says otherwise, and
  with predict_rationales the predictions files also hold each generated rationale.

  batching: 'mixture' (BATCH_SIZE packed rows drawn from the SeqIO mixture at its rates,
  T5X's way) or 'per_input' (BATCH_SIZE inputs, each with all its tasks, and the paper's
  loss: the paper's way, see per_input_batches.py).

  TRAIN_STEPS counts the updates of this fine-tuning run (a restored run continues to
  it), not the pretraining steps of INITIAL_CHECKPOINT_PATH.
  """
  gin_utils.check_required("train", {
      "model_dir": model_dir, "mixture_or_task_name": mixture_or_task_name,
      "task_feature_lengths": task_feature_lengths, "train_steps": train_steps,
      "batch_size": batch_size, "initial_checkpoint_path": initial_checkpoint_path})
  check_settings({"TRAIN_STEPS": train_steps, "BATCH_SIZE": batch_size,
                  "train.log_period": log_period, "CHECKPOINT_PERIOD": checkpoint_period,
                  "EVAL_PERIOD": eval_period, "train.keep_checkpoints": keep_checkpoints,
                  "train.eval_batch_size": eval_batch_size,
                  "train.eval_decode_length": eval_decode_length}, task_feature_lengths)
  if batching not in BATCHINGS:
    raise gin_utils.GinConfigError(f"train.batching must be one of {tuple(BATCHINGS)}, got "
                                   f"{batching!r}")
  schedule = Schedule(train_steps, batch_size, log_period, checkpoint_period, eval_period,
                      keep_checkpoints, eval_batch_size, eval_max_examples,
                      final_eval_max_examples, eval_decode_length, predict_rationales, seed)
  # Read once; the tasks read these until the run ends.
  options = distillation.TaskOptions().for_run(mixture_or_task_name)
  options.check_covers(task_feature_lengths)
  run = run_dir.RunDir(model_dir)
  with distillation.options_in_use(options), run.writing():
    with stop_signals.phase("checking the data, the model and MODEL_DIR",
                            resume="nothing was written; rerun the same command"):
      settings = check_run(run, options, mixture_or_task_name, task_feature_lengths,
                           initial_checkpoint_path, print_fn)
      trainer, build_start = build_trainer(settings.config, train_steps)
    input_state = {"mixture_or_task_name": mixture_or_task_name, "seed": seed,
                   "batch_size": batch_size, "task_feature_lengths": settings.lengths}
    if batching != "mixture":  # absent from earlier runs' checkpoints, which mixed
      input_state["batching"] = batching
    best = periodic_actions.BestStep(run)
    checkpointer = run.checkpointer(keep=keep_checkpoints, keep_step=best.step)
    log = None
    try:
      with stop_signals.phase("building the trainer and its state",
                              resume=resume_hint(checkpointer)):
        state = restore_or_initialize(run, checkpointer, trainer, input_state, restore_step,
                                      initial_checkpoint_path, seed, print_fn)
        step = start_step = int(jax.device_get(state.step))
        state_seconds = time.time() - build_start
        log = start_writing(run, settings, options, checkpointer, best, step, restore_step,
                            print_fn)
        batches = BATCHINGS[batching](mixture_or_task_name, settings.lengths, batch_size, seed,
                                      skip_batches=step)
        predictor = make_predictor(settings, schedule)
        report, checkpointing, validation = make_periodic_actions(
            settings, schedule, trainer, checkpointer, best, log, input_state, predictor, step,
            print_fn)
      rng = jax.random.key(seed + 1)
      with periodic_actions.StopRequests() as stop:
        while step < train_steps:
          batch = next(batches)
          state, metrics = trainer.train_step(state, trainer.shard_batch(batch), rng)
          step += 1
          if step == start_step + 1:
            periodic_actions.report_startup(log, step, build_start, state_seconds, metrics,
                                            settings.config, print_fn)
          report.add(batch, metrics)
          # Read once: a signal arriving later in this step is acted on after the next one.
          stopping = stop.requested()
          validate = validation.due(step)
          save = checkpointing.due(step) or validate or stopping
          if not (report.due(step) or save):
            continue
          report(step)  # first: it refuses non-finite metrics, so no NaN is checkpointed
          if save:  # before validating, so that a failed validation loses no training
            checkpointing(step, state)
          if validate:
            validation(step, state.params)
          if stopping:
            checkpointer.wait()
            raise TrainingInterrupted(f"{stopping} at step {step}: checkpoint saved in "
                                      f"{checkpointer.directory}; rerun the same command to "
                                      "resume", stopping)
          report.restart()
      best_step = best.step or step
      with stop_signals.phase(f"the final evaluation of step {best_step}",
                              resume=resume_hint(checkpointer, "redo the final evaluation")):
        checkpointer.wait()
        print_fn(f"final evaluation of step {best_step} (best on validation), about "
                 f"{report.remaining_time(step)}")
        return final_evaluation(run, settings, options, schedule, best_step, checkpointer,
                                trainer, predictor, log, print_fn)
    finally:
      checkpointer.close()
      if log is not None:
        log.close()


def resume_hint(checkpointer: checkpoints.TrainCheckpointer,
                action: str = "resume from the latest") -> str:
  """How a run stopped outside its step loop goes on, given the checkpoints on disk now."""
  steps = checkpointer.all_steps()
  if not steps:
    return "no checkpoint was written yet; rerun the same command to start again"
  return (f"checkpoints {', '.join(map(str, steps))} are intact; rerun the same command to "
          f"{action}")


def build_trainer(config: t5.T5Config, train_steps: int) -> tuple[trainer_lib.Trainer, float]:
  """(the trainer gin configures, the time its building started)."""
  with gin_utils.as_config_errors():
    partitioner = partitioning.make_partitioner()
    optimizer, learning_rate_fn = trainer_lib.make_optimizer(total_steps=train_steps)
    build_start = time.time()
    return trainer_lib.Trainer(config, partitioner, optimizer, learning_rate_fn), build_start


def start_writing(run: run_dir.RunDir, settings: RunSettings, options: distillation.TaskOptions,
                  checkpointer: checkpoints.TrainCheckpointer, best: periodic_actions.BestStep,
                  step: int, restore_step: Optional[int], print_fn) -> run_dir.MetricsLog:
  """The run's first writes, once it knows the step it starts from: the metrics log (which
  drops what this run will log again), the run files, and the end of any continuation past
  the restored step."""
  log = run.metrics_log(step)  # first: it refuses a garbled metrics.jsonl
  best.forget_if_after(step, checkpointer)
  if jax.process_index() == 0:
    run.write_run_files(settings.config, settings.spec, options.vocabulary_path)
    if restore_step is not None and (dropped := checkpointer.delete_after(restore_step)):
      print_fn(f"deleted later checkpoints {dropped}: this run continues from step {restore_step}")
  return log


def make_predictor(settings: RunSettings, schedule: Schedule):
  """params -> the Predictor that validation and the final evaluation decode with."""
  decode_length = min(schedule.eval_decode_length, settings.spec.target_length)
  return lambda params: infer.Predictor(
      params, settings.config, seqio_tasks.OptionsVocabulary(), settings.spec.input_length,
      decode_length, batch_size=schedule.eval_batch_size)


def evaluated_examples(settings: RunSettings, split: str, most: Optional[int]) -> int:
  """How many examples of the label task's `split` an evaluation capped at `most` scores."""
  size = settings.split_sizes.get(settings.label_task, {}).get(split, 0)
  return min(most or size, size)


def make_periodic_actions(settings: RunSettings, schedule: Schedule,
                          trainer: trainer_lib.Trainer,
                          checkpointer: checkpoints.TrainCheckpointer,
                          best: periodic_actions.BestStep, log: run_dir.MetricsLog,
                          input_state: dict, predictor, start_step: int, print_fn):
  """(progress report, checkpointing, validation) of a run starting at `start_step`."""
  validation_examples = evaluated_examples(settings, "validation", schedule.eval_max_examples)
  final_examples = ((evaluated_examples(settings, "validation", schedule.final_eval_max_examples)
                     + evaluated_examples(settings, "test", schedule.final_eval_max_examples))
                    * (2 if schedule.predict_rationales else 1))
  remaining_time = periodic_actions.RemainingTime(start_step, schedule.train_steps,
                                                  schedule.eval_period, validation_examples,
                                                  final_examples)
  config, lengths = settings.config, settings.lengths
  step_flops = flops.train_step_flops(config, schedule.batch_size, lengths["inputs"],
                                      lengths["targets"])
  peak_flops, peak_source = flops.peak_flops_per_device(config.dtype)
  print_fn(f"training {settings.spec.mixture_or_task_name} to step {schedule.train_steps} on "
           f"{jax.device_count()} device(s), mesh {dict(trainer.partitioner.mesh.shape)}; MFU against "
           f"{peak_flops:.3g} FLOP/s per device ({peak_source})")
  evaluate = lambda params: infer.evaluate_split(
      predictor(params), settings.label_task, "validation", lengths,
      max_examples=schedule.eval_max_examples)
  return (
      periodic_actions.ProgressReport(schedule.log_period, schedule.train_steps, log,
                                      remaining_time, step_flops, peak_flops, print_fn),
      periodic_actions.Checkpointing(schedule.checkpoint_period, schedule.train_steps,
                                     checkpointer, input_state),
      periodic_actions.Validation(schedule.eval_period, schedule.train_steps, evaluate,
                                  validation_examples, best, checkpointer, log, remaining_time,
                                  print_fn))


def final_evaluation(run: run_dir.RunDir, settings: RunSettings, options: distillation.TaskOptions,
                     schedule: Schedule, best_step: int,
                     checkpointer: checkpoints.TrainCheckpointer, trainer: trainer_lib.Trainer,
                     predictor, log: run_dir.MetricsLog, print_fn) -> dict:
  """Validation and test metrics of the checkpoint best on validation, with the majority
  baseline; writes the predictions, results.json, the learning curves and config.gin."""
  state, _ = checkpointer.restore(best_step, trainer.abstract_state())
  results = {"best_step": best_step, "label_task": settings.label_task,
             "mixture_or_task_name": settings.spec.mixture_or_task_name, "alpha": options.alpha,
             "train_fraction": options.train_fraction, "subsample_seed": options.subsample_seed}
  for split in ("validation", "test"):
    results[split] = infer.evaluate_split(
        predictor(state.params), settings.label_task, split, settings.lengths,
        predictions_path=str(run.predictions_path(split)),
        max_examples=schedule.final_eval_max_examples,
        rationale_prefix=options.rationale_prefix if schedule.predict_rationales else None,
        label_prefix=options.label_prefix)
  log.write_final(best_step, {f"final_{split}": results[split] for split in ("validation", "test")})
  results["majority_baseline_test"] = majority_baseline(settings.label_task, settings.lengths)
  if jax.process_index() == 0:
    run.write_results(results)
    plots.plot_learning_curves(run.path.name, run.metrics(), run.learning_curves_path)
    run.write_gin_config(gin.operative_config_str())
  counted = {split: evaluated_examples(settings, split, schedule.final_eval_max_examples)
             for split in ("validation", "test")}
  print_fn(f"best step {best_step} (by validation): validation ({counted['validation']:,} "
           f"examples) {json.dumps(results['validation'])}, test ({counted['test']:,} examples) "
           f"{json.dumps(results['test'])}; majority-class baseline on test: "
           f"{json.dumps(results['majority_baseline_test'])}")
  print_fn(f"outputs in {run.path}: checkpoints/, predictions.jsonl (test), metrics.jsonl, "
           "learning_curves.png, tensorboard/, results.json")
  return results


def initialize_distributed(args) -> None:
  """jax.distributed from the flags; on a Cloud TPU VM without them, from what JAX detects
  there itself (every worker of the slice, one process each), as JAX's documentation asks."""
  if args.coordinator_address:
    # Only the CPU backend reads this; it lets CPU-only hosts (and tests) run collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif tpu_runtime.has_tpu_chips():
    jax.distributed.initialize()


def check_storage() -> None:
  """Checks every URL the parsed gin names (storage.check), before anything reads, builds or
  writes: MODEL_DIR, INITIAL_CHECKPOINT_PATH, the vocabulary, the record files."""
  bound = gin.get_bindings(train)
  data_read, data_written = datasets.data_paths()
  storage.check(read=[bound.get("initial_checkpoint_path"), *data_read],
                write=[bound.get("model_dir"), *data_written])


def run(args) -> int:
  initialize_distributed(args)
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
  check_storage()
  datasets.register_all()
  try:
    train()
  except TrainingInterrupted as interrupted:
    print(f"dsbs train: {console.one_line(interrupted)}", file=sys.stderr)
    return interrupted.exit_code
  return 0

