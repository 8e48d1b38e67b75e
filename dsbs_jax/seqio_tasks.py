"""The SeqIO side of distilling step-by-step: a source over a dataset's records (a
training rationale task holding an example per rationale that TaskOptions.train_rationales
picks from a record's K teacher samples), the preprocessors (task prefix, tokenization with
NLI separators as EOS, task ids on target tokens), the vocabulary TaskOptions names, and the
registration of a dataset's three tasks and four mixtures.

Everything a run may change is read from the TaskOptions in use when a dataset is built
(distillation.current_options), not when the tasks are registered: registration happens
once per process, and each command decides the rest.

This module must not decide which datasets exist (datasets.py does), read record files
itself (records.py does), or know about models or training.
"""
import functools
import itertools
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from dsbs_jax import distillation
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import self_consistency
from dsbs_jax import storage

TARGETS = {  # task kind -> the target text of a record in a split
    "label_gold": lambda record, split: record.label,
    # Teacher labels train the student; evaluation is against gold labels, or against the
    # teacher's in a split that has none (custom data that only the teacher labeled).
    "label_teacher": lambda record, split: (
        record.teacher_label if split == "train" or record.label is None else record.label),
    "rationale": lambda record, split: record.rationale,
}
# Task kind -> the TaskOptions field whose text prefixes its inputs.
PREFIX_FIELDS = {"label_gold": "label_prefix", "label_teacher": "label_prefix",
                 "rationale": "rationale_prefix"}


def _cut(text: Optional[str], most: int) -> Optional[str]:
  """A text's first `most` characters (TaskOptions.max_text_chars): what its features keep."""
  return text if text is None else text[:most]


class RecordDataSource(seqio.FunctionDataSource):
  """A SeqIO source over rationale records, resolved from the TaskOptions in use at read time."""

  def __init__(self, spec: distillation.DatasetSpec, target_kind: str):
    self._spec = spec
    self._target_kind = target_kind
    super().__init__(dataset_fn=self._dataset_fn, splits=distillation.SPLITS, caching_permitted=False)

  def _examples(self, split: str) -> dict:
    options = distillation.current_options()
    read = records.records_for(self._spec, split, options)
    if self._target_kind == "rationale" and split == "train":
      return self._training_rationales(read, options)
    target_of = TARGETS[self._target_kind]
    targets = [target_of(r, split) for r in read]
    if None in targets:
      raise rationales.RationaleFileError(
          f"{self._spec.name}/{split}: record {read[targets.index(None)].id!r} has no gold label, "
          f"which {distillation.task_name(self._spec.name, self._target_kind)} needs; train "
          f"{distillation.task_name(self._spec.name, 'dsbs_teacher')} or "
          f"{distillation.task_name(self._spec.name, 'distill')} (the teacher's labels) instead")
    most = options.max_text_chars
    return {"id": [r.id for r in read], "input": [_cut(r.input, most) for r in read],
            "target": [_cut(target, most) for target in targets]}

  def texts(self, split: str) -> dict[str, list[str]]:
    """{"inputs": [...], "targets": [...]}: the texts of `split` as the task tokenizes them."""
    examples = self._examples(split)
    prefix = getattr(distillation.current_options(), PREFIX_FIELDS[self._target_kind])
    return {"inputs": [prefix + text for text in examples["input"]], "targets": examples["target"]}

  def _training_rationales(self, read: list, options: distillation.TaskOptions) -> dict:
    which = options.train_rationales
    same_answer = self_consistency.same_answer_for(self._spec.metric_fn)
    examples = {"id": [], "input": [], "target": []}
    for record in read:
      try:
        chosen = self_consistency.training_rationales(record, which, same_answer)
      except ValueError as e:
        raise rationales.RationaleFileError(f"{self._spec.name}/train: {e}") from None
      for rationale in chosen:
        examples["id"].append(record.id)
        examples["input"].append(_cut(record.input, options.max_text_chars))
        examples["target"].append(_cut(rationale, options.max_text_chars))
    return examples

  def _dataset_fn(self, split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory shard; seqio shuffles examples
    examples = self._examples(split)
    return tf.data.Dataset.from_tensor_slices({k: tf.constant(v, tf.string) for k, v in examples.items()})

  def num_input_examples(self, split: str) -> int:
    if self._target_kind == "rationale" and split == "train":  # expanded from the records
      return len(self._examples(split)["id"])
    return len(records.records_for(self._spec, split, distillation.current_options()))


def add_prefix(prefix_field: str):
  """A preprocessor that prepends the TaskOptions' `prefix_field` in use when the dataset is built."""
  @seqio.map_over_dataset
  def prefix(example):
    prefix_text = getattr(distillation.current_options(), prefix_field)
    return {"id": example["id"], "inputs": prefix_text + example["input"],
            "targets": example["target"]}
  return prefix


def encode_with_separators(vocabulary: seqio.Vocabulary, text: tf.Tensor) -> tf.Tensor:
  """Tokenizes `text`, turning each NLI_SEPARATOR into the EOS id, as the paper's HF tokenizer does."""
  pieces = tf.strings.split(text, rationales.NLI_SEPARATOR)
  ids = vocabulary.encode_tf(pieces)  # ragged [pieces, tokens]
  eos = tf.fill([tf.shape(pieces)[0], 1], tf.constant(vocabulary.eos_id, ids.dtype))
  with_eos = tf.concat([ids, tf.RaggedTensor.from_tensor(eos)], axis=1).flat_values
  return with_eos[:-1]  # the last piece has no separator after it


def token_counts(vocabulary: seqio.SentencePieceVocabulary, texts: Sequence[str]) -> list[int]:
  """How many ids `encode_with_separators` gives each text, tokenized in one batch."""
  pieces = [text.split(rationales.NLI_SEPARATOR) for text in texts]
  piece_ids = vocabulary.tokenizer.EncodeAsIds([piece for parts in pieces for piece in parts])
  piece_lengths = iter(map(len, piece_ids))
  # Each separator becomes one EOS id.
  return [sum(itertools.islice(piece_lengths, len(parts))) + len(parts) - 1 for parts in pieces]


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


def add_task_ids(task_id: int):
  """A preprocessor marking every target token with its task, so losses can be split.

  It writes distillation.TASK_ID_FEATURE, which is not one of the tasks' output features, so
  the tasks work with seqio's and T5X's plain EncDecFeatureConverter, which never see it (a
  mixture drops it unless asked to pass it through, as input_pipeline does).
  """
  @seqio.map_over_dataset
  def mark(example):
    return dict(example, **{distillation.TASK_ID_FEATURE: tf.fill(tf.shape(example["targets"]),
                                                                  task_id)})
  return mark


class OptionsVocabulary(seqio.SentencePieceVocabulary):
  """The SentencePiece vocabulary that the TaskOptions in use name.

  Tasks are registered once, before a command reads its options; this defers the choice of
  model (every use reads TaskOptions.vocabulary_path and .vocabulary_extra_ids). It equals any
  seqio.SentencePieceVocabulary that tokenizes as the one it resolves to: the same model
  with the same extra ids. So T5X, which checks that a task's vocabulary equals its
  model's, accepts a model whose VOCABULARY is a plain SentencePieceVocabulary of that file.
  """

  def __init__(self):
    super().__init__(sentencepiece_model_file="")  # never read: see _model_context

  @property
  def resolved(self) -> seqio.SentencePieceVocabulary:
    options = distillation.current_options()
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
  if not storage.path(path).is_file():
    raise FileNotFoundError(f"{path}: SentencePiece model not found (TaskOptions.vocabulary_path)")
  # SeqIO reads through TensorFlow's file system, which is handed no URL (storage.py).
  return seqio.SentencePieceVocabulary(storage.local_copy(path), extra_ids=extra_ids)


def output_features() -> dict:
  vocabulary = OptionsVocabulary()
  return {"inputs": seqio.Feature(vocabulary, add_eos=True),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def label_rate(task) -> float:
  del task
  return distillation.current_options().alpha


def rationale_rate(task) -> float:
  del task
  return 1.0 - distillation.current_options().alpha


def register_dataset(spec: distillation.DatasetSpec) -> list[str]:
  """Registers the three tasks and four mixtures of one dataset; returns their names."""
  names = []
  for kind in distillation.TASK_KINDS:
    name = distillation.task_name(spec.name, kind)
    is_rationale = kind == "rationale"
    seqio.TaskRegistry.add(
        name,
        source=RecordDataSource(spec, kind),
        preprocessors=[add_prefix(PREFIX_FIELDS[kind]),
                       tokenize, seqio.preprocessors.append_eos_after_trim,
                       add_task_ids(distillation.TASK_IDS["rationale" if is_rationale else "label"])],
        output_features=output_features(),
        postprocess_fn=None if is_rationale else lambda text, **unused: text.strip(),
        metric_fns=[] if is_rationale else [spec.metric_fn])
    names.append(name)
  for suffix, (label_kind, with_rationale) in distillation.MIXTURES.items():
    name = distillation.task_name(spec.name, suffix)
    label_task = distillation.task_name(spec.name, label_kind)
    rationale_task = distillation.task_name(spec.name, "rationale")
    subtasks = ([(label_task, label_rate), (rationale_task, rationale_rate)] if with_rationale
                else [(label_task, 1.0)])
    seqio.MixtureRegistry.add(name, subtasks)
    names.append(name)
  return names

