"""MODEL_DIR, the folder of one training run: every file in it is named here, and read and
written here. train, infer, export and plots ask a `RunDir`; none of them spells a name.

    MODEL_DIR/
      config.json           the network (a T5Config, in checkpoints.py's model format)
      run.json              RunSpec: what prediction must reproduce (mixture, lengths, prefixes)
      vocabulary.model      the SentencePiece model the run tokenized with
      checkpoints/<step>/   training checkpoints (checkpoints.TrainCheckpointer)
      best_step.json        the step best on validation so far, with its accuracy
      metrics.jsonl         one row per logged step or evaluation: {"step", "kind", values}
      tensorboard/          the same rows as TensorBoard scalars
      results.json          a finished run's final scores, majority baseline and data choices
      predictions.jsonl     the final test predictions; predictions_<split>[_step<N>].jsonl
      config.gin            gin's operative config of the run
      learning_curves.png   the run's curves (drawn by plots.py)

The rules a run keeps here: everything is checked before anything is written, so a refused
run leaves MODEL_DIR as it was (`check_fits`, `check_input_state`); one run at a time writes
it (`writing`, a lock the kernel drops when its holder dies); files are replaced atomically,
and identical ones left untouched; a resumed run first drops what it will log again, and
nothing is dropped before its replacement is written (`MetricsLog`); best_step.json never
names a step whose checkpoint is not on disk (the caller waits for the checkpointer first).

This module must not train, evaluate or draw. TensorFlow is imported only to write and trim
the TensorBoard log, so that `dsbs plot` reads runs without it.
"""
import contextlib
import dataclasses
import glob
import json
import os
import pathlib
from typing import Any, Optional

import jax

from dsbs_jax import checkpoints
from dsbs_jax import folder_lock
from dsbs_jax import gin_utils
from dsbs_jax import storage
from dsbs_jax import text_files
from dsbs_jax.models import t5

SPEC_FILE = "run.json"
VOCABULARY_FILE = "vocabulary.model"
CHECKPOINTS_DIR = "checkpoints"
# In a model folder that `dsbs convert` wrote from another run: where it came from.
SOURCE_FILE = "source.json"
BEST_FILE = "best_step.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESULTS_FILE = "results.json"
GIN_CONFIG_FILE = "config.gin"
LEARNING_CURVES_FILE = "learning_curves.png"
# What makes a folder a run to `dsbs plot`: it has logged, or it has finished.
RUN_MARKERS = (METRICS_FILE, RESULTS_FILE)
# T5Config fields a run may change on a pretrained checkpoint or a resumed run; the rest is
# architecture.
RUN_TIME_CONFIG_FIELDS = ("dropout_rate", "dtype") + t5.EXECUTION_FIELDS


class ModelDirError(ValueError):
  """A MODEL_DIR file that is malformed, or an output that cannot be written; named in the message."""


class ModelDirMismatchError(ValueError):
  """MODEL_DIR holds a run trained with other settings; nothing in it was changed."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """How a student was trained: what prediction must reproduce (MODEL_DIR/run.json)."""
  mixture_or_task_name: str
  input_length: int
  target_length: int
  label_prefix: str
  rationale_prefix: str
  vocabulary_extra_ids: int = 0

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def _differences(pairs: list[tuple[str, object, object]], where: str) -> list[str]:
  return [f"{name} is {there!r} in {where}, {now!r} now" for name, there, now in pairs
          if there != now]


def architecture_differences(there: t5.T5Config, now: t5.T5Config) -> list[tuple[str, Any, Any]]:
  """(field, there, now) for each T5Config field outside RUN_TIME_CONFIG_FIELDS that differs."""
  return [(f.name, getattr(there, f.name), getattr(now, f.name))
          for f in dataclasses.fields(t5.T5Config)
          if f.name not in RUN_TIME_CONFIG_FIELDS and getattr(there, f.name) != getattr(now, f.name)]


class RunDir:
  """One MODEL_DIR: the paths of its files and their reading and writing."""

  def __init__(self, path):
    self.path = storage.path(path)
    self.config_path = self.path / checkpoints.CONFIG_FILE
    self.spec_path = self.path / SPEC_FILE
    self.vocabulary_path = self.path / VOCABULARY_FILE
    self.checkpoints_dir = self.path / CHECKPOINTS_DIR
    self.best_path = self.path / BEST_FILE
    self.metrics_path = self.path / METRICS_FILE
    self.tensorboard_dir = self.path / TENSORBOARD_DIR
    self.results_path = self.path / RESULTS_FILE
    self.gin_config_path = self.path / GIN_CONFIG_FILE
    self.source_path = self.path / SOURCE_FILE
    self.learning_curves_path = self.path / LEARNING_CURVES_FILE

  def __repr__(self) -> str:
    return f"RunDir({str(self.path)!r})"

  def predictions_path(self, split: str, step: Optional[int] = None) -> storage.Path:
    """The final evaluation's predictions of `split` (the test split's is predictions.jsonl),
    or with `step` those `dsbs eval` writes for that checkpoint."""
    if step is not None:
      return self.path / f"predictions_{split}_step{step}.jsonl"
    return self.path / ("predictions.jsonl" if split == "test" else f"predictions_{split}.jsonl")

  # ----------------------------------------------------------------------------
  # What a trained run holds for prediction and export.
  # ----------------------------------------------------------------------------
  def spec(self) -> RunSpec:
    if not self.spec_path.is_file():
      raise FileNotFoundError(f"{self.spec_path}: not found; is {self.path} a MODEL_DIR written "
                              "by dsbs train (or a T5X run's checkpoint converted with its "
                              "config.gin)?")
    try:
      return RunSpec(**text_files.read_json(self.spec_path))
    except TypeError as error:
      raise ModelDirError(f"{self.spec_path}: not a run spec written by dsbs train ({error})") from None

  def vocabulary_file(self) -> pathlib.Path:
    """The run's SentencePiece model, which must be there, as a local file."""
    if not self.vocabulary_path.is_file():
      raise FileNotFoundError(f"{self.vocabulary_path}: vocabulary missing from the model dir")
    return pathlib.Path(storage.local_copy(self.vocabulary_path))

  def tokenization(self, spec: RunSpec) -> dict[str, Any]:
    """The TaskOptions fields that make the data pipeline tokenize as this run did."""
    return {"vocabulary_path": str(self.vocabulary_file()),
            "vocabulary_extra_ids": spec.vocabulary_extra_ids,
            "label_prefix": spec.label_prefix, "rationale_prefix": spec.rationale_prefix}

  def config(self) -> t5.T5Config:
    """The network, set to run as suits this machine (see checkpoints.load_config)."""
    return checkpoints.load_config(self.path)

  def checkpointer(self, keep: int = 3, keep_step: Optional[int] = None,
                   asynchronous: bool = True) -> checkpoints.TrainCheckpointer:
    return checkpoints.TrainCheckpointer(self.checkpoints_dir, keep=keep, keep_step=keep_step,
                                         asynchronous=asynchronous)

  def write_source(self, source: dict) -> None:
    storage.write_if_changed(self.source_path, json.dumps(source, indent=1).encode())

  def _load_converted(self, step: str) -> tuple[Any, t5.T5Config, int]:
    """A model folder's one set of parameters (`dsbs convert` of a T5X run), at its step."""
    source = self._read_object(self.source_path) or {}
    converted_step = source.get("step") or 0
    if step not in ("best", "latest") and int(step) != converted_step:
      raise FileNotFoundError(f"{self.path} holds one model, of step {converted_step} (converted "
                              f"from {source.get('path', 'elsewhere')}), not step {step}")
    params, config = checkpoints.load_model(self.path)
    return t5.params_in_layout(params, t5.scans_layers(config)), config, converted_step

  def load_params(self, step: str = "best") -> tuple[Any, t5.T5Config, int]:
    """(params, config, step) on this host's first device: 'best' (by validation), 'latest'
    or a step number; params in the layout `config` runs with, whichever the run trained in.
    A model folder with run files (`dsbs convert --from t5x` of a run) has its one step."""
    if not self.checkpoints_dir.is_dir() and (self.path / checkpoints.PARAMS_DIR).is_dir():
      return self._load_converted(step)
    config = self.config()
    checkpointer = self.checkpointer()
    try:
      steps = checkpointer.all_steps()
      if not steps:
        raise FileNotFoundError(f"{checkpointer.directory}: no checkpoints")
      if step == "latest":
        chosen = steps[-1]
      elif step == "best":
        chosen = self.best_step() or steps[-1]
      else:
        chosen = int(step)
      checkpointer.check_fits(chosen, config, self.config_path)
      state, _ = checkpointer.restore_on_one_device(chosen)
    finally:
      checkpointer.close()
    return t5.params_in_layout(state["params"], t5.scans_layers(config)), config, chosen

  # ----------------------------------------------------------------------------
  # JSON files: the best step so far and the final results.
  # ----------------------------------------------------------------------------
  def _read_object(self, path: storage.Path) -> Optional[dict]:
    if not path.is_file():
      return None
    values = text_files.read_json(path)
    if not isinstance(values, dict):
      raise ModelDirError(f"{path}: expected a JSON object")
    return values

  def best(self) -> Optional[dict]:
    """The best validation result so far ({"step": N, "validation_accuracy": x}), if any."""
    best = self._read_object(self.best_path)
    if best is not None:
      try:
        int(best["step"])
      except (ValueError, TypeError, KeyError) as error:
        raise ModelDirError(f"{self.best_path}: expected {{\"step\": N, ...}} ({error!r})") from None
    return best

  def best_step(self) -> Optional[int]:
    best = self.best()
    return best["step"] if best else None

  def write_best(self, best: dict) -> None:
    storage.write_if_changed(self.best_path, json.dumps(best).encode())

  def forget_best(self) -> None:
    self.best_path.unlink(missing_ok=True)

  def results(self) -> Optional[dict]:
    """A finished run's results.json; None if the run has not finished."""
    return self._read_object(self.results_path)

  def write_results(self, results: dict) -> None:
    storage.write_if_changed(self.results_path, json.dumps(results, indent=2).encode())

  def write_gin_config(self, text: str) -> None:
    storage.write_if_changed(self.gin_config_path, text.encode())

  # ----------------------------------------------------------------------------
  # Before a run writes: does this folder take it?
  # ----------------------------------------------------------------------------
  def has_checkpoint(self) -> bool:
    """Whether a step was saved here (orbax's step folders; its unfinished ones are named
    otherwise)."""
    return self.checkpoints_dir.is_dir() and any(
        child.name.isdigit() for child in self.checkpoints_dir.iterdir())

  def check_fits(self, config: t5.T5Config, spec: RunSpec, vocabulary_path: str) -> None:
    """Refuses a MODEL_DIR whose run files say it was trained with other settings.

    Nothing is written before this check, so a refused run leaves MODEL_DIR as it was. Run
    files without a checkpoint (a run stopped before its first save) bind nothing: the new
    run's replace them.
    """
    if not self.has_checkpoint():
      return
    differences = []
    if self.config_path.is_file():
      there = self.config()
      differences += _differences([(f"T5Config.{name}", was, now) for name, was, now
                                   in architecture_differences(there, config)],
                                  checkpoints.CONFIG_FILE)
    if self.spec_path.is_file():
      there = self.spec()
      differences += _differences([
          ("MIXTURE_OR_TASK_NAME", there.mixture_or_task_name, spec.mixture_or_task_name),
          ("TASK_FEATURE_LENGTHS['inputs']", there.input_length, spec.input_length),
          ("TASK_FEATURE_LENGTHS['targets']", there.target_length, spec.target_length),
          ("TaskOptions.label_prefix", there.label_prefix, spec.label_prefix),
          ("TaskOptions.rationale_prefix", there.rationale_prefix, spec.rationale_prefix),
          ("VOCABULARY_EXTRA_IDS", there.vocabulary_extra_ids, spec.vocabulary_extra_ids)],
          SPEC_FILE)
    if (self.vocabulary_path.is_file()
        and self.vocabulary_path.read_bytes() != storage.path(vocabulary_path).read_bytes()):
      differences.append(f"VOCABULARY {vocabulary_path} is not the {VOCABULARY_FILE} there")
    if differences:
      raise ModelDirMismatchError(self._mismatch_message(differences))

  def check_input_state(self, saved: dict, current: dict, step: int) -> None:
    """Refuses to resume a checkpoint whose batches were drawn with other data settings."""
    names = {"mixture_or_task_name": "MIXTURE_OR_TASK_NAME", "seed": "train.seed",
             "batch_size": "BATCH_SIZE", "task_feature_lengths": "TASK_FEATURE_LENGTHS",
             "batching": "train.batching"}
    differences = _differences([(names.get(key, key), saved.get(key), current.get(key))
                                for key in sorted(set(saved) | set(current))],
                               f"{CHECKPOINTS_DIR}/{step}")
    if differences:
      raise ModelDirMismatchError(self._mismatch_message(differences))

  def _mismatch_message(self, differences: list[str]) -> str:
    return (f"MODEL_DIR {self.path} holds a run trained with other settings ("
            + "; ".join(differences) + "); nothing in it was changed. Rerun with its settings "
            "to resume it, or give a new MODEL_DIR")

  @contextlib.contextmanager
  def writing(self, command: str = "dsbs train"):
    """Holds MODEL_DIR for this process while the block writes it (folder_lock.py): a
    folder in use by another run is refused at once, as is one that cannot be written; a
    MODEL_DIR the block created and left empty is removed again."""
    lock = folder_lock.lock_for(folder_lock.lock_path(self.path, jax.process_index()),
                                f"MODEL_DIR {self.path}", command)
    try:
      lock.__enter__()
    except OSError as error:
      where = f": {error.filename}" if error.filename else ""  # e.g. the lock file
      raise gin_utils.GinConfigError(f"MODEL_DIR={self.path}: cannot write there "
                                     f"({error.strerror or error}{where})") from None
    try:
      yield
    finally:
      lock.__exit__()

  def in_use_by(self) -> Optional[str]:
    """The process training here now, in words; None when none is."""
    return folder_lock.holder(self.path)

  def still_training_note(self) -> str:
    """For a line about a checkpoint read from here: that a run is still writing, so the
    checkpoint is one of those complete so far ("" when no run is)."""
    holder = self.in_use_by()
    return "" if holder is None else (f" (the run is still training, by {holder}: its "
                                      "checkpoints complete so far were used)")

  def write_run_files(self, config: t5.T5Config, spec: RunSpec, vocabulary_path: str) -> None:
    """config.json, run.json and vocabulary.model: what eval, predict and export read."""
    self.path.mkdir(parents=True, exist_ok=True)
    storage.write_if_changed(self.config_path, (config.to_json() + "\n").encode())
    storage.write_if_changed(self.spec_path, spec.to_json().encode())
    storage.write_if_changed(self.vocabulary_path, storage.path(vocabulary_path).read_bytes())

  # ----------------------------------------------------------------------------
  # The metrics log.
  # ----------------------------------------------------------------------------
  def metrics(self) -> list[dict]:
    """The rows of metrics.jsonl; a row that is not a JSON object is an error naming its line."""
    if not self.metrics_path.is_file():
      return []
    rows = []
    for number, line in text_files.iter_lines(self.metrics_path):
      if not line.strip():
        continue
      row = text_files.parse_json_line(line, self.metrics_path, number)
      if not isinstance(row, dict):
        raise ModelDirError(f"{self.metrics_path}:{number}: expected a JSON object")
      rows.append(row)
    return rows

  def metrics_log(self, start_step: int) -> "MetricsLog":
    return MetricsLog(self, start_step)


def find_runs(root) -> list[RunDir]:
  """Every folder under `root` (itself included) holding one of RUN_MARKERS."""
  return [RunDir(path) for path in sorted({file.parent for file in storage.files_under(root)
                                           if file.name in RUN_MARKERS})]


def _logged_after(step: int):
  """Whether a row (kind, step) is one a run resumed at `step` logs again."""
  return lambda kind, row_step: row_step > step


def _final(kind: str, row_step: int) -> bool:
  """Whether a row is the final evaluation's (replaced when a run evaluates again)."""
  del row_step
  return kind.startswith("final_")


def rewrite_metrics(path: pathlib.Path, dropped, added: tuple[str, ...] = ()) -> None:
  """Replaces metrics.jsonl, atomically, by its rows without those `dropped(kind, step)`
  says and without a last line torn by a kill, followed by the lines `added`."""
  path = pathlib.Path(path)
  lines = text_files.read_text(path).splitlines() if path.is_file() else []
  kept = []
  for number, line in enumerate(lines, start=1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines):
        continue  # torn by a kill mid-write
      raise ModelDirError(f"{path}:{number}: not a JSON line; fix or remove it") from None
    if not dropped(str(row.get("kind", "")), int(row.get("step", 0))):
      kept.append(line)
  if kept != lines or added:
    storage.write_if_changed(path, "".join(line + "\n" for line in kept + list(added)).encode("utf-8"))


def drop_tensorboard_events(directory: pathlib.Path, dropped) -> None:
  """Rewrites the event files without the summaries `dropped(tag, step)` says (a resumed
  run would log them again, and TensorBoard would draw both), and without a torn last
  record."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (see the module docstring)
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  for path in sorted(glob.glob(os.path.join(directory, "*tfevents*"))):
    kept, changed = [], False
    try:
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        event = event_pb2.Event.FromString(record)
        if any(dropped(value.tag, event.step) for value in event.summary.value):
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
  that every step is logged once. An earlier final evaluation's rows stay until this run's
  replace them (`write_final`): a run stopped before then keeps its results.json true.

  Both are written in a storage.Mirror of MODEL_DIR: on a disk, the files themselves; on an
  object store, which cannot append, local copies uploaded whole after each write, so that
  the store holds every row written before the last upload, and a row at most once.
  """

  def __init__(self, run: RunDir, start_step: int):
    self._active = jax.process_index() == 0
    self._run = run
    if self._active:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top  (see the module docstring)
      self._tf = tf
      self._mirror = storage.Mirror(run.path, (METRICS_FILE, TENSORBOARD_DIR))
      self._metrics_path = self._mirror.local / METRICS_FILE
      self._tensorboard_dir = self._mirror.local / TENSORBOARD_DIR
      rewrite_metrics(self._metrics_path, _logged_after(start_step))
      drop_tensorboard_events(self._tensorboard_dir, _logged_after(start_step))
      self._mirror.sync()
      self._jsonl = open(self._metrics_path, "a", encoding="utf-8")
      self._writer = tf.summary.create_file_writer(str(self._tensorboard_dir))

  @staticmethod
  def _line(step: int, kind: str, values: dict) -> str:
    return json.dumps({"step": step, "kind": kind, **values})

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self._active:
      return
    self._jsonl.write(self._line(step, kind, values) + "\n")
    self._jsonl.flush()
    self._write_summaries(step, kind, values)
    self._mirror.sync()

  def _write_summaries(self, step: int, kind: str, values: dict) -> None:
    with self._writer.as_default(step=step):
      for key, value in values.items():
        if isinstance(value, (int, float)):
          self._tf.summary.scalar(f"{kind}/{key}", value)
    self._writer.flush()

  def write_final(self, step: int, rows: dict[str, dict]) -> None:
    """The final evaluation's rows ({kind: values}) in place of an earlier one's, in one
    atomic replacement of metrics.jsonl."""
    if not self._active:
      return
    self._jsonl.close()
    rewrite_metrics(self._metrics_path, _final,
                    tuple(self._line(step, kind, values) for kind, values in rows.items()))
    self._jsonl = open(self._metrics_path, "a", encoding="utf-8")
    self._writer.flush()
    drop_tensorboard_events(self._tensorboard_dir, _final)
    for kind, values in rows.items():
      self._write_summaries(step, kind, values)
    self._mirror.sync()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._writer.close()
      self._mirror.close()
