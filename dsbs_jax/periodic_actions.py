"""What the training loop does between steps, each a named action run every so many steps
and at the last one (as clu's periodic_actions): the progress report (losses per task,
throughput, MFU, time left), checkpointing, and validation, which keeps the step best on
validation; the first step's startup report; and the stop requests (SIGTERM, SIGINT) the
loop checks after each step, agreed on by every host of a multi-host run.

Nothing here runs a training step, builds a model or reads data; train.py owns the loop.
"""
import json
import signal
import time
from typing import Any, Callable, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from dsbs_jax import checkpoints
from dsbs_jax import encoder_decoder
from dsbs_jax import run_dir
from dsbs_jax import trainer as trainer_lib
from dsbs_jax.models import t5

# Train-step metrics that are values of the step, not sums to add over a logging window.
NOT_SUMMED_METRICS = ("grad_norm", "learning_rate")


class PeriodicAction:
  """Something the loop does every `period` steps and at the last step."""

  def __init__(self, period: int, last_step: int):
    self.period, self.last_step = period, last_step

  def due(self, step: int) -> bool:
    return step % self.period == 0 or step == self.last_step


def startup_times(build_start: float, state_seconds: float, first_metrics) -> dict:
  """Seconds from building the trainer to the end of the first step (which compiles it)."""
  jax.block_until_ready(first_metrics)
  seconds = time.time() - build_start
  return {"seconds": seconds, "state_seconds": state_seconds,
          "first_step_seconds": seconds - state_seconds}


def report_startup(log: run_dir.MetricsLog, step: int, build_start: float, state_seconds: float,
                   first_metrics, config: t5.T5Config, print_fn) -> None:
  """Prints and logs (a "startup" row) the seconds from building the trainer to the end of
  the first step: state, then compiling and running the step."""
  startup = startup_times(build_start, state_seconds, first_metrics)
  print_fn(f"first step done {startup['seconds']:.1f}s after building the trainer "
           f"(state {startup['state_seconds']:.1f}s, compiling and running the step "
           f"{startup['first_step_seconds']:.1f}s; layers "
           f"{'scanned' if t5.scans_layers(config) else 'unrolled'})")
  log.write(step, "startup", startup)


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


class ProgressReport(PeriodicAction):
  """Adds up each step's metrics over a window; when called, checks them (a NaN or infinite
  value stops the run), prints a progress line and logs a "train" row."""

  def __init__(self, period: int, train_steps: int, log: run_dir.MetricsLog,
               remaining_time: RemainingTime, step_flops: float, peak_flops: float,
               print_fn: Callable[[str], None]):
    super().__init__(period, train_steps)
    self._log, self.remaining_time, self._print = log, remaining_time, print_fn
    self._step_flops, self._peak_flops = step_flops, peak_flops
    self.restart()

  def restart(self) -> None:
    """Starts a new window: what the loop does between reports is not timed as training."""
    self._sums, self._latest, self._steps, self._input_tokens = None, {}, 0, 0
    self._start = time.time()

  def add(self, batch: dict, metrics: dict) -> None:
    """One step's batch (this host's rows) and metrics."""
    self._steps += 1
    self._input_tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
    self._latest = {key: metrics.pop(key) for key in NOT_SUMMED_METRICS if key in metrics}
    self._sums = metrics if self._sums is None else jax.tree.map(np.add, self._sums, metrics)

  def __call__(self, step: int) -> None:
    trainer_lib.check_finite(dict(self._sums, **self._latest), step)
    summary = dict(encoder_decoder.summarize_metrics(self._sums), **jax.device_get(self._latest))
    summary.update(throughput(summary, self._steps, self._input_tokens, time.time() - self._start,
                              self._step_flops, self._peak_flops))
    self._print(progress_line(step, self.last_step, summary, self.remaining_time(step)))
    self._log.write(step, "train", {k: float(v) for k, v in summary.items()})


class Checkpointing(PeriodicAction):
  """Starts saving the train state with the input pipeline's position (asynchronously)."""

  def __init__(self, period: int, train_steps: int, checkpointer: checkpoints.TrainCheckpointer,
               input_state: dict):
    super().__init__(period, train_steps)
    self._checkpointer, self._input_state = checkpointer, input_state

  def __call__(self, step: int, state: Any) -> None:
    self._checkpointer.save(step, state, self._input_state)


class BestStep:
  """The step best on validation so far: in best_step.json, and kept by the checkpointer.

  A restarted run keeps the best result it had, so that a worse later one cannot replace it.
  """

  def __init__(self, run: run_dir.RunDir):
    self._run = run
    best = run.best() or {}
    self.step: Optional[int] = best.get("step")
    self.accuracy: Optional[float] = best.get("validation_accuracy")

  def forget_if_after(self, step: int, checkpointer: checkpoints.TrainCheckpointer) -> None:
    """Forgets a best step past `step`: it belongs to a continuation a run resumed at `step`
    replaces."""
    if self.step is not None and self.step > step:
      self.step = self.accuracy = None
      checkpointer.keep_step(None)
      if jax.process_index() == 0:
        self._run.forget_best()

  def offer(self, step: int, accuracy: float, checkpointer: checkpoints.TrainCheckpointer) -> None:
    """Makes `step` the best if its validation accuracy is at least the best so far: a tie
    goes to the later step, trained longer (validation scores accuracy only)."""
    if self.accuracy is not None and accuracy < self.accuracy:
      return
    self.step, self.accuracy = step, accuracy
    checkpointer.wait()  # best_step.json never names a step not yet on disk
    if jax.process_index() == 0:
      self._run.write_best({"step": step, "validation_accuracy": accuracy})
    checkpointer.keep_step(step)


class Validation(PeriodicAction):
  """Scores the validation split, logs a "validation" row and offers the step as the best."""

  def __init__(self, period: int, train_steps: int, evaluate: Callable[[Any], dict],
               examples: int, best: BestStep, checkpointer: checkpoints.TrainCheckpointer,
               log: run_dir.MetricsLog, remaining_time: RemainingTime,
               print_fn: Callable[[str], None]):
    super().__init__(period, train_steps)
    self._evaluate, self._examples = evaluate, examples
    self._best, self._checkpointer, self._log = best, checkpointer, log
    self._remaining_time, self._print = remaining_time, print_fn

  def __call__(self, step: int, params: Any) -> None:
    started = time.time()
    metrics = self._evaluate(params)
    self._remaining_time.add_evaluation(time.time() - started, self._examples)
    self._log.write(step, "validation", metrics)
    self._print(f"step {step} validation ({self._examples:,} examples): {json.dumps(metrics)}")
    self._best.offer(step, metrics["accuracy"], self._checkpointer)


class StopRequests:
  """Turns SIGTERM/SIGINT into a reason to stop that the loop asks for once a step, so that
  it can checkpoint and stop.

  One process: a signal sets a flag; the loop stops after the step that reads it.

  Several processes (jax.distributed): every host must save the same step, or the save (a
  collective) hangs. JAX's preemption sync manager owns SIGTERM: jax.distributed.initialize
  installs its handler over the one cli.main set before, and a Python handler installed
  after it would hide the notice from JAX, so none is. A notice to any one host reaches all
  of them, and `requested` answers on every host at the step they agree on
  (multihost_utils.reached_preemption_sync_point). SIGINT is passed on to JAX as SIGTERM,
  so Ctrl-C on any host stops them all at that step too: stopped on one host alone, the
  others would wait in the next collective for ever.
  """

  def __init__(self):
    self._signal_name = None
    self._previous = {}
    self._checks = 0
    self._hosts = jax.process_count()

  def __enter__(self):
    if self._hosts == 1:
      handlers = {signal.SIGTERM: self._handle, signal.SIGINT: self._handle}
    else:
      handlers = {signal.SIGINT: self._pass_to_jax}
    for signum, handler in handlers.items():
      self._previous[signum] = signal.signal(signum, handler)
    return self

  def _handle(self, signum, frame):
    del frame
    self._signal_name = signal.Signals(signum).name

  def _pass_to_jax(self, signum, frame):
    del signum, frame
    signal.raise_signal(signal.SIGTERM)  # the C handler JAX installed, not a Python one

  def requested(self) -> Optional[str]:
    """What asked the run to stop after this step, or None; asked once a step, by every host."""
    if self._hosts == 1:
      return self._signal_name
    # The sync point is agreed in calls, not steps: JAX's count starts at 0, so a notice from
    # before the first call falls on call 1, which a restored run's steps would never meet.
    self._checks += 1
    if multihost_utils.reached_preemption_sync_point(self._checks):
      return f"a preemption notice (SIGTERM or SIGINT to one of the {self._hosts} hosts)"
    return None

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
