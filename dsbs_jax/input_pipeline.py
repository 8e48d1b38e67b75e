"""Features and batches for training and evaluation, read from SeqIO tasks and mixtures.

The feature converter packs examples and carries each target token's task id along.
Training batches are packed, repeated and deterministic given a seed, and each host reads
its own shard, so a restarted run resumes at exactly the next batch by skipping the
batches it already consumed. Evaluation batches are unpacked, the same on every host,
carry each example's id and text, and are padded to a full batch with masked-out rows.

This module must not know the model or the optimizer.
"""
import dataclasses
import difflib
from typing import Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax import custom_tasks
from dsbs_jax import distillation
from dsbs_jax import gin_utils
from dsbs_jax import seqio_tasks


class TaskDataError(ValueError):
  """A task or mixture name, or a split of one, that cannot feed a run; the message names it."""


def mixture_or_task(name: str, flag: str = "MIXTURE_OR_TASK_NAME"):
  """The registered SeqIO mixture or task `name`; TaskDataError naming `flag` if none."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.MixtureRegistry.names()) | set(seqio.TaskRegistry.names()))
    closest = difflib.get_close_matches(str(name), known, n=1)
    hint = f"did you mean {closest[0]!r}? " if closest else ""
    # A plain `dsbs tasks` would not list the custom datasets that this run's gin registers.
    lister = ("`dsbs tasks` with this run's --gin_file and --gin flags" if
              custom_tasks.names_in_gin() else "`dsbs tasks`")
    raise TaskDataError(f"{flag}={name!r}: no such task or mixture; {hint}{lister} lists "
                        "them") from None


def split_sizes(name: str, splits: Sequence[str] = distillation.SPLITS) -> dict[str, dict[str, int]]:
  """{task: {split: examples}} of every task of mixture (or task) `name`.

  Counting reads every record of every split, so a malformed record file fails here,
  naming its file and line, before a run spends time on training. An empty split is a
  TaskDataError; a source that cannot count its examples is left out.
  """
  provider = mixture_or_task(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  sizes = {}
  for task in tasks:
    sizes[task.name] = {}
    for split in splits:
      count = task.source.num_input_examples(split)
      if count == 0:
        raise TaskDataError(f"{task.name}/{split}: no examples")
      if count is not None:
        sizes[task.name][split] = count
  return sizes


def truncated_counts(name: str, lengths: Mapping[str, int],
                     splits: Sequence[str] = distillation.SPLITS) -> dict[str, dict[str, dict]]:
  """{task: {feature: {split: examples}}} of the examples of mixture (or task) `name` with
  more tokens than `lengths` hold (EOS included), which the features truncate; counts of
  none are left out."""
  provider = mixture_or_task(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  truncated = {}
  for task in tasks:
    if not isinstance(task.source, seqio_tasks.RecordDataSource):
      continue
    for split in splits:
      for feature, texts in task.source.texts(split).items():
        counts = seqio_tasks.token_counts(task.output_features[feature].vocabulary, texts)
        longer = sum(count + 1 > lengths[feature] for count in counts)  # + 1: the final EOS
        if longer:
          truncated.setdefault(task.name, {}).setdefault(feature, {})[split] = longer
  return truncated


class DistillationFeatureConverter(seqio.EncDecFeatureConverter):
  """EncDecFeatureConverter that also packs the task ids into "decoder_task_ids".

  decoder_task_ids is 0 on padding, TASK_IDS["label"] on label-task target tokens and
  TASK_IDS["rationale"] on rationale-task ones (distillation.TASK_IDS), aligned with decoder_target_tokens. A
  mixture's dataset carries their feature, distillation.TASK_ID_FEATURE, only when asked for
  it as a passthrough feature.
  """
  TASK_FEATURES = dict(
      seqio.EncDecFeatureConverter.TASK_FEATURES,
      **{distillation.TASK_ID_FEATURE: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)})
  MODEL_FEATURES = dict(seqio.EncDecFeatureConverter.MODEL_FEATURES,
                        decoder_task_ids=seqio.FeatureConverter.FeatureSpec(dtype=tf.int32))

  def __call__(self, ds, task_feature_lengths):
    lengths = dict(task_feature_lengths,
                   **{distillation.TASK_ID_FEATURE: task_feature_lengths["targets"]})
    return super().__call__(ds, lengths)

  def _convert_example(self, features):
    return dict(super()._convert_example(features),
                decoder_task_ids=features[distillation.TASK_ID_FEATURE])

  def get_model_feature_lengths(self, task_feature_lengths):
    lengths = super().get_model_feature_lengths(task_feature_lengths)
    return dict(lengths, decoder_task_ids=task_feature_lengths["targets"])


def host_shard() -> seqio.ShardInfo:
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def train_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                  global_batch_size: int, seed: int, skip_batches: int = 0,
                  pack: bool = True, shard_info: Optional[seqio.ShardInfo] = None
                  ) -> Iterator[dict]:
  """Endless packed training batches of a data shard (default: this host's), as numpy.

  Each of the shard_info.num_shards shards gives global_batch_size / num_shards rows per
  batch. `skip_batches` drops that many batches first: with the same seed the sequence is
  the same, so a restored run continues where it stopped.
  """
  shard_info = shard_info or host_shard()
  if global_batch_size % shard_info.num_shards:
    raise gin_utils.GinConfigError(f"BATCH_SIZE={global_batch_size} does not divide over "
                     f"{shard_info.num_shards} data shards (hosts)")
  provider = mixture_or_task(mixture_or_task_name)
  # A mixture keeps only its output features unless told otherwise; a task keeps all.
  task_ids = ({"passthrough_features": [distillation.TASK_ID_FEATURE]}
              if isinstance(provider, seqio.Mixture) else {})
  dataset = provider.get_dataset(
      task_feature_lengths, split="train", shuffle=True, seed=seed, num_epochs=None,
      shard_info=shard_info, use_cached=False, **task_ids)
  converter = DistillationFeatureConverter(pack=pack)
  dataset = converter(dataset, task_feature_lengths)
  dataset = dataset.batch(global_batch_size // shard_info.num_shards, drop_remainder=True)
  dataset = dataset.skip(skip_batches).prefetch(tf.data.AUTOTUNE)
  return dataset.as_numpy_iterator()


@dataclasses.dataclass
class EvalBatch:
  """Model features [batch, length] plus per-row ids, texts and a validity mask."""
  features: dict
  ids: list
  inputs: list
  targets: list
  valid: np.ndarray  # [batch] bool: False on filler rows


def eval_batches(task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, max_examples: Optional[int] = None) -> Iterator[EvalBatch]:
  """Unpacked batches of every example of `split`, in file order.

  Every host reads the whole split: decoding takes the same inputs on all hosts.
  """
  task = mixture_or_task(task_name)
  dataset = task.get_dataset(task_feature_lengths, split=split, shuffle=False, num_epochs=1,
                             use_cached=False)
  if max_examples:
    dataset = dataset.take(max_examples)
  converter = seqio.EncDecFeatureConverter(pack=False)
  lengths = converter.get_model_feature_lengths(task_feature_lengths)
  rows = []
  for example in dataset.as_numpy_iterator():
    rows.append(example)
    if len(rows) == batch_size:
      yield _eval_batch(rows, lengths, batch_size)
      rows = []
  if rows:
    yield _eval_batch(rows, lengths, batch_size)


def _pad(ids: np.ndarray, length: int) -> np.ndarray:
  out = np.zeros(length, np.int32)
  ids = ids[:length]
  out[:len(ids)] = ids
  return out


def _eval_batch(rows: list, lengths: Mapping[str, int], batch_size: int) -> EvalBatch:
  encoder = np.zeros((batch_size, lengths["encoder_input_tokens"]), np.int32)
  targets = np.zeros((batch_size, lengths["decoder_target_tokens"]), np.int32)
  for i, row in enumerate(rows):
    encoder[i] = _pad(row["inputs"], encoder.shape[1])
    targets[i] = _pad(row["targets"], targets.shape[1])
  decoder_inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
  valid = np.arange(batch_size) < len(rows)
  features = {
      "encoder_input_tokens": encoder,
      "decoder_input_tokens": decoder_inputs,
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets > 0).astype(np.int32) * valid[:, None],
  }
  decode = lambda key: [row[key].decode("utf-8") for row in rows] + [""] * (batch_size - len(rows))
  return EvalBatch(features=features, ids=decode("id"), inputs=decode("inputs_pretokenized"),
                   targets=decode("targets_pretokenized"), valid=valid)
