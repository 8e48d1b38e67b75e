"""SeqIO building blocks for distilling step-by-step: options, sources, preprocessors, vocabulary.

Everything a run may change (alpha, the training-data fraction and its seed, the task
prefixes, the vocabulary, where the e-SNLI / ANLI train inputs come from) is a field of
`TaskOptions`, a gin-configurable dataclass read when a dataset is built, not when tasks
are registered: `import tasks` registers everything once, and gin decides the rest.

The label task and the rationale task of a dataset read the same records through the same
subsampling, so they always see exactly the same examples.

This module must not register tasks itself (tasks/ does) or know about models or training.
"""
import dataclasses
import functools
import math
import os
from typing import Callable, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax import gin_utils
from dsbs_jax import rationales
from dsbs_jax import resources

DEFAULT_RATIONALES_DIR = str(resources.RATIONALES_DIR)
DEFAULT_VOCABULARY = str(resources.VOCABULARY_FILE)
# The shipped from-scratch vocabulary, for gin files: VOCABULARY = %DSBS_VOCABULARY.
gin.constant("DSBS_VOCABULARY", DEFAULT_VOCABULARY)
SPLITS = ("train", "validation", "test")
_SPLIT_FILES = {"train": "train", "validation": "valid", "test": "test"}
PAPER_PREFIXES = ("predict: ", "explain: ")
# Teacher labels that agree with gold labels less often than this mean the inputs were
# joined in an order other than the teacher outputs' (3-way NLI chance is 1/3).
MIN_JOINED_TEACHER_ACCURACY = 0.5


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskOptions:
  """What a run chooses about its data; bind fields in gin, e.g. `TaskOptions.alpha = 0.5`.

  Attributes:
    alpha: weight of the label task; mixtures sample label : rationale at alpha : 1-alpha.
    train_fraction: fraction of the training split used (the paper's 0.125 ... 1.0).
    subsample_seed: seed of the subsampling permutation (the paper's `--run`).
    label_prefix, rationale_prefix: task prefixes; the paper's code uses
      "predict: " and "explain: ".
    vocabulary_path: SentencePiece model; the standard T5 model for pretrained students.
    vocabulary_extra_ids: sentinel ids appended to the vocabulary (100 for T5's).
    rationales_dir: folder of <dataset>/<split>.jsonl[.gz] record files.
    train_inputs: for datasets whose train inputs the release lacks, {dataset: source},
      where source is a JSONL path or "tfds:<name>[:<split>]".
    drop_parse_failures: leave out training examples whose teacher output did not parse
      (the paper keeps them, with blank targets).
  """
  alpha: float = 0.5
  train_fraction: float = 1.0
  subsample_seed: int = 0
  label_prefix: str = "[label] "
  rationale_prefix: str = "[rationale] "
  vocabulary_path: str = DEFAULT_VOCABULARY
  vocabulary_extra_ids: int = 0
  rationales_dir: str = DEFAULT_RATIONALES_DIR
  train_inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  drop_parse_failures: bool = False

  def __post_init__(self):
    gin_utils.check_required("TaskOptions", {f.name: getattr(self, f.name)
                                             for f in dataclasses.fields(self)})
    if not 0.0 < self.alpha < 1.0:
      raise gin_utils.GinConfigError(
          f"TaskOptions.alpha must be in (0, 1), got {self.alpha} (the ALPHA macro); "
          "for label-only training use the *_finetune or *_distill mixtures")
    if not 0.0 < self.train_fraction <= 1.0:
      raise gin_utils.GinConfigError(f"TaskOptions.train_fraction must be in (0, 1], got "
                                     f"{self.train_fraction} (the TRAIN_FRACTION macro)")


class MissingTrainInputsError(FileNotFoundError):
  """The paper's release lacks this dataset's train inputs and no source was named."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What distinguishes one dataset: its name, metric, records folder and train inputs.

  rationales_dir: the folder holding <name>/<split>.jsonl; None means
  TaskOptions.rationales_dir (the shipped benchmarks).
  train_inputs_hint: set when the records lack train inputs, saying where to get them.
  """
  name: str
  metric_fn: Callable[[Sequence[str], Sequence[str]], dict]
  train_inputs_hint: Optional[str] = None
  rationales_dir: Optional[str] = None


def split_records(records: Sequence, held_out_fraction: float, seed: int) -> tuple[list, list]:
  """(kept, held out) as Hugging Face's `train_test_split(test_size=held_out_fraction, seed)`.

  That call permutes with `numpy.random.default_rng(seed)`, holds out the first
  ceil(held_out_fraction * n) indices and keeps the rest, each in permuted order. The
  paper carves CQA's and SVAMP's validation splits (fraction 0.1, seed 0) and subsamples
  training data (fraction 1 - train_fraction, seed = run) this way.
  """
  permutation = np.random.default_rng(seed).permutation(len(records))
  num_held_out = math.ceil(held_out_fraction * len(records))
  return ([records[i] for i in permutation[num_held_out:]],
          [records[i] for i in permutation[:num_held_out]])


def subsample(records: list, fraction: float, seed: int) -> list:
  """Keeps `fraction` of the records (all of them, in order, at 1.0)."""
  if fraction >= 1.0:
    return list(records)
  return split_records(records, 1.0 - fraction, seed)[0]


def split_path(rationales_dir: str, dataset: str, split: str) -> str:
  base = os.path.join(rationales_dir, dataset, _SPLIT_FILES[split] + ".jsonl")
  for candidate in (base, base + ".gz"):
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(
      f"{base}[.gz]: no rationale file for {dataset}/{split}; set TaskOptions.rationales_dir "
      f"(now {rationales_dir!r}) or run tools/convert_release.py")


@functools.lru_cache(maxsize=32)
def _read_records_cached(path: str, mtime: float) -> tuple:
  del mtime  # part of the cache key only: an edited file is read again
  return tuple(rationales.read_records(path))


def read_split(rationales_dir: str, dataset: str, split: str) -> tuple:
  path = split_path(rationales_dir, dataset, split)
  return _read_records_cached(path, os.path.getmtime(path))


def _nli_label_text(value, where: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise rationales.RationaleFileError(f"{where}: 'label' must be 0, 1, 2 or a label name, got {value!r}")
  if isinstance(value, int):
    if value not in (0, 1, 2):
      raise rationales.RationaleFileError(f"{where}: label {value} is not 0, 1 or 2")
    return rationales.NLI_LABELS[value]
  if value not in rationales.NLI_LABELS:
    raise rationales.RationaleFileError(f"{where}: label {value!r} is not one of {rationales.NLI_LABELS}")
  return value


def _nli_example(obj, where: str) -> tuple[str, str]:
  """(input, label) from an NLI example: premise (or context), hypothesis, label."""
  if not isinstance(obj, dict):
    raise rationales.RationaleFileError(f"{where}: expected a JSON object")
  premise = obj.get("premise", obj.get("context"))
  for field, value in (("premise", premise), ("hypothesis", obj.get("hypothesis"))):
    if not isinstance(value, str):
      raise rationales.RationaleFileError(f"{where}: field {field!r} missing or not a string")
  if "label" not in obj:
    raise rationales.RationaleFileError(f"{where}: missing field 'label'")
  return (f"{premise}{rationales.NLI_SEPARATOR}{obj['hypothesis']}",
          _nli_label_text(obj["label"], where))


def _read_tfds_examples(spec: str) -> list[tuple[str, str]]:
  import tensorflow_datasets as tfds  # imported here: only this path needs it
  _, name, *rest = spec.split(":")
  split = rest[0] if rest else "train"
  dataset = tfds.load(name, split=split, shuffle_files=False)
  examples = []
  for index, example in enumerate(tfds.as_numpy(dataset)):
    decoded = {k: (v.decode("utf-8") if isinstance(v, bytes) else int(v)) for k, v in example.items()
               if k in ("premise", "context", "hypothesis", "label")}
    examples.append(_nli_example(decoded, f"{spec}[{index}]"))
  return examples


def read_train_inputs(source: str) -> list[tuple[str, str]]:
  """Reads (input, label) pairs from a JSONL path or a "tfds:<name>[:<split>]" source."""
  if source.startswith("tfds:"):
    return _read_tfds_examples(source)
  examples = [_nli_example(obj, where) for where, obj in rationales.iter_json_lines(source)]
  if not examples:
    raise rationales.RationaleFileError(f"{source}: file holds no examples")
  return examples


@functools.lru_cache(maxsize=4)
def _joined_train_records(rationales_dir: str, dataset: str, source: str) -> tuple:
  records = read_split(rationales_dir, dataset, "train")
  examples = read_train_inputs(source)
  if len(examples) != len(records):
    raise ValueError(
        f"{dataset} train inputs from {source}: {len(examples):,} examples, but the teacher outputs "
        f"in {split_path(rationales_dir, dataset, 'train')} cover {len(records):,}; the inputs must be "
        "the full train split in the paper's order")
  joined = tuple(dataclasses.replace(r, input=text, label=label)
                 for r, (text, label) in zip(records, examples))
  agreement = np.mean([r.teacher_label == r.label for r in joined])
  if agreement < MIN_JOINED_TEACHER_ACCURACY:
    raise ValueError(
        f"{dataset} train inputs from {source} look misaligned with the teacher outputs: teacher "
        f"labels agree with their gold labels on {agreement:.1%} of examples (chance level), against "
        f"~70% on the shipped validation split; give the inputs in the paper's order")
  return joined


def records_for(spec: DatasetSpec, split: str, options: TaskOptions) -> list:
  """The records a task reads for `split` under `options`: joined, filtered, subsampled."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  rationales_dir = spec.rationales_dir or options.rationales_dir
  if split == "train" and spec.train_inputs_hint:
    source = options.train_inputs.get(spec.name)
    if not source:
      raise MissingTrainInputsError(
          f"{spec.name} train inputs are not in the paper's release (only its teacher outputs are "
          f"shipped). Name them in gin: TaskOptions.train_inputs = {{'{spec.name}': SOURCE}}, where "
          f"SOURCE is {spec.train_inputs_hint}")
    records = list(_joined_train_records(rationales_dir, spec.name, source))
  else:
    records = list(read_split(rationales_dir, spec.name, split))
  if split == "train":
    if options.drop_parse_failures:
      records = [r for r in records if r.parse_error is None]
    records = subsample(records, options.train_fraction, options.subsample_seed)
  return records


TARGETS = {
    "label_gold": lambda record, split: record.label,
    # Teacher labels train the student; evaluation is always against gold labels.
    "label_teacher": lambda record, split: record.teacher_label if split == "train" else record.label,
    "rationale": lambda record, split: record.rationale,
}


class RecordDataSource(seqio.FunctionDataSource):
  """A SeqIO source over rationale records, resolved from `TaskOptions` at read time."""

  def __init__(self, spec: DatasetSpec, target_kind: str):
    self._spec = spec
    self._target_kind = target_kind
    super().__init__(dataset_fn=self._dataset_fn, splits=SPLITS, caching_permitted=False)

  def _examples(self, split: str) -> dict:
    records = records_for(self._spec, split, TaskOptions())
    target_of = TARGETS[self._target_kind]
    return {"id": [r.id for r in records], "input": [r.input for r in records],
            "target": [target_of(r, split) for r in records]}

  def _dataset_fn(self, split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory shard; seqio shuffles examples
    examples = self._examples(split)
    return tf.data.Dataset.from_tensor_slices({k: tf.constant(v, tf.string) for k, v in examples.items()})

  def num_input_examples(self, split: str) -> int:
    return len(records_for(self._spec, split, TaskOptions()))


def add_prefix(prefix_field: str):
  """A preprocessor that prepends TaskOptions' `prefix_field` (read when the dataset is built)."""
  @seqio.map_over_dataset
  def prefix(example):
    return {"id": example["id"], "inputs": getattr(TaskOptions(), prefix_field) + example["input"],
            "targets": example["target"]}
  return prefix


def encode_with_separators(vocabulary: seqio.Vocabulary, text: tf.Tensor) -> tf.Tensor:
  """Tokenizes `text`, turning each NLI_SEPARATOR into the EOS id, as the paper's HF tokenizer does."""
  pieces = tf.strings.split(text, rationales.NLI_SEPARATOR)
  ids = vocabulary.encode_tf(pieces)  # ragged [pieces, tokens]
  eos = tf.fill([tf.shape(pieces)[0], 1], tf.constant(vocabulary.eos_id, ids.dtype))
  with_eos = tf.concat([ids, tf.RaggedTensor.from_tensor(eos)], axis=1).flat_values
  return with_eos[:-1]  # the last piece has no separator after it


def tokenize(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Like seqio.preprocessors.tokenize, keeping "<key>_pretokenized", with EOS separators."""
  text_features = {key: output_features[key] for key in ("inputs", "targets")}
  for feature in text_features.values():
    feature.vocabulary.eos_id  # resolves the vocabulary now, so a bad path fails plainly here
  def encode(example):
    out = dict(example)
    for key, feature in text_features.items():
      out[f"{key}_pretokenized"] = example[key]
      out[key] = encode_with_separators(feature.vocabulary, example[key])
    return out
  return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE)


TASK_IDS = {"label": 1, "rationale": 2}  # 0 is padding
# The feature `add_task_ids` writes. It is not one of the tasks' output features, so the
# tasks work with seqio's and T5X's plain EncDecFeatureConverter, which never see it (a
# mixture drops it unless asked to pass it through, as input_pipeline does).
TASK_ID_FEATURE = "targets_task"


def add_task_ids(task_id: int):
  """A preprocessor marking every target token with its task, so losses can be split."""
  @seqio.map_over_dataset
  def mark(example):
    return dict(example, **{TASK_ID_FEATURE: tf.fill(tf.shape(example["targets"]), task_id)})
  return mark


class DistillationFeatureConverter(seqio.EncDecFeatureConverter):
  """EncDecFeatureConverter that also packs TASK_ID_FEATURE into "decoder_task_ids".

  decoder_task_ids is 0 on padding, TASK_IDS["label"] on label-task target tokens and
  TASK_IDS["rationale"] on rationale-task ones, aligned with decoder_target_tokens. A
  mixture's dataset carries TASK_ID_FEATURE only when asked for it as a passthrough feature.
  """
  TASK_FEATURES = dict(seqio.EncDecFeatureConverter.TASK_FEATURES,
                       **{TASK_ID_FEATURE: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)})
  MODEL_FEATURES = dict(seqio.EncDecFeatureConverter.MODEL_FEATURES,
                        decoder_task_ids=seqio.FeatureConverter.FeatureSpec(dtype=tf.int32))

  def __call__(self, ds, task_feature_lengths):
    lengths = dict(task_feature_lengths, **{TASK_ID_FEATURE: task_feature_lengths["targets"]})
    return super().__call__(ds, lengths)

  def _convert_example(self, features):
    return dict(super()._convert_example(features), decoder_task_ids=features[TASK_ID_FEATURE])

  def get_model_feature_lengths(self, task_feature_lengths):
    lengths = super().get_model_feature_lengths(task_feature_lengths)
    return dict(lengths, decoder_task_ids=task_feature_lengths["targets"])


class OptionsVocabulary(seqio.SentencePieceVocabulary):
  """The SentencePiece vocabulary that `TaskOptions` names when it is used.

  Tasks are registered at import, before gin is parsed; this defers the choice of model
  (every use reads TaskOptions.vocabulary_path and .vocabulary_extra_ids). It equals any
  seqio.SentencePieceVocabulary that tokenizes as the one it resolves to: the same model
  with the same extra ids. So T5X, which checks that a task's vocabulary equals its
  model's, accepts a model whose VOCABULARY is a plain SentencePieceVocabulary of that file.
  """

  def __init__(self):
    super().__init__(sentencepiece_model_file="")  # never read: see _model_context

  @property
  def resolved(self) -> seqio.SentencePieceVocabulary:
    options = TaskOptions()
    return _sentencepiece_vocabulary(options.vocabulary_path, options.vocabulary_extra_ids)

  def _model_context(self):
    return self.resolved._model_context()  # pylint: disable=protected-access

  @property
  def sentencepiece_model_file(self) -> str:
    return self.resolved.sentencepiece_model_file

  @property
  def extra_ids(self) -> int:
    return self.resolved.extra_ids

  def __eq__(self, other):
    # As a subclass, this is also what `SentencePieceVocabulary(...) == self` calls.
    if isinstance(other, OptionsVocabulary):
      return True
    return isinstance(other, seqio.SentencePieceVocabulary) and other.sp_model == self.sp_model

  def __hash__(self):
    return hash(OptionsVocabulary)

  def __str__(self) -> str:
    return f"OptionsVocabulary({self.resolved})"


@functools.lru_cache(maxsize=8)
def _sentencepiece_vocabulary(path: str, extra_ids: int) -> seqio.SentencePieceVocabulary:
  if not tf.io.gfile.exists(path):  # a local path, or a URL such as gs://... that TF reads
    raise FileNotFoundError(f"{path}: SentencePiece model not found (TaskOptions.vocabulary_path)")
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def output_features() -> dict:
  vocabulary = OptionsVocabulary()
  return {"inputs": seqio.Feature(vocabulary, add_eos=True),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def task_name(dataset: str, kind: str) -> str:
  return f"{dataset}_{kind}"


MIXTURES = {  # mixture suffix -> (label task kind, with rationale task)
    "finetune": ("label_gold", False),
    "distill": ("label_teacher", False),
    "dsbs_gold": ("label_gold", True),
    "dsbs_teacher": ("label_teacher", True),
}


def label_rate(task) -> float:
  del task
  return TaskOptions().alpha


def rationale_rate(task) -> float:
  del task
  return 1.0 - TaskOptions().alpha


def register_dataset(spec: DatasetSpec) -> list[str]:
  """Registers the three tasks and four mixtures of one dataset; returns their names."""
  names = []
  for kind in TARGETS:
    name = task_name(spec.name, kind)
    is_rationale = kind == "rationale"
    seqio.TaskRegistry.add(
        name,
        source=RecordDataSource(spec, kind),
        preprocessors=[add_prefix("rationale_prefix" if is_rationale else "label_prefix"),
                       tokenize, seqio.preprocessors.append_eos_after_trim,
                       add_task_ids(TASK_IDS["rationale" if is_rationale else "label"])],
        output_features=output_features(),
        postprocess_fn=None if is_rationale else lambda text, **unused: text.strip(),
        metric_fns=[] if is_rationale else [spec.metric_fn])
    names.append(name)
  for suffix, (label_kind, with_rationale) in MIXTURES.items():
    name = task_name(spec.name, suffix)
    label_task = task_name(spec.name, label_kind)
    subtasks = ([(label_task, label_rate), (task_name(spec.name, "rationale"), rationale_rate)]
                if with_rationale else [(label_task, 1.0)])
    seqio.MixtureRegistry.add(name, subtasks)
    names.append(name)
  return names

