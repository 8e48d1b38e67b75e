"""The paper's batching: each training batch holds B inputs with every task of each (its
label example and, in the two-task mixtures, its rationale example), the loss weighed as
the paper's code weighs it.

The release's trainer (Hugging Face Seq2SeqTrainer) draws B inputs per step, epoch after
epoch in a fresh random order, keeps an epoch's last, smaller batch, and takes the loss
alpha * (mean label-task token loss) + (1 - alpha) * (mean rationale-task token loss) over
the batch (only the label loss in the label-only mixtures). Here a batch is 2B rows (B in
the label-only mixtures), row 2i holding input i's label example and row 2i + 1 its
rationale example; a short batch's missing inputs are empty rows, which weigh nothing.
`decoder_loss_scales` carries each target token's weight in that loss, computed over the
whole global batch, so that microbatches and devices only add sums
(encoder_decoder.loss_terms). Rows are padded to the smallest power of two that holds the
batch's longest sequence (at least 128, at most TASK_FEATURE_LENGTHS), which computes what
the paper's padding to the longest does and bounds the compiled shapes to a few.

Every host holds the whole training split's ids and builds every global batch, so that all
agree on the padded lengths; each passes on its own rows. The order is a function of the
seed and the batch's index, so a resumed run skips to its next batch at once.

This module must not know the model, the optimizer or the training loop.
"""
import dataclasses
from typing import Iterator, Mapping, Optional

import numpy as np
import seqio

from dsbs_jax import distillation
from dsbs_jax import gin_utils
from dsbs_jax import input_pipeline

# Below this, shorter rows save little (a TPU's matrix units are 128 wide) and add
# compiled shapes.
MIN_PADDED_LENGTH = 128
READ_BATCH = 4096
FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "decoder_loss_weights", "decoder_task_ids", "decoder_loss_scales")


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example: input and target ids, EOS included, no padding."""
  inputs: np.ndarray
  targets: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrainingInput:
  """One training input's examples: its label example, and its rationale example in the
  two-task mixtures (None where the input has none)."""
  label: Example
  rationale: Optional[Example] = None


def _tasks(mixture_or_task_name: str) -> tuple[seqio.Task, Optional[seqio.Task]]:
  """(label task, rationale task or None) of a run's mixture or task."""
  provider = input_pipeline.mixture_or_task(mixture_or_task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  label_tasks = [task for task in tasks if task.metric_fns]
  others = [task for task in tasks if not task.metric_fns]
  if len(label_tasks) != 1 or len(others) > 1:
    raise input_pipeline.TaskDataError(
        f"MIXTURE_OR_TASK_NAME={mixture_or_task_name!r}: per-input batching needs a label "
        "task and at most a rationale task (a <dataset>_<method> mixture)")
  return label_tasks[0], (others[0] if others else None)


def _ids_and_tokens(row: dict) -> dict:
  return {key: row[key] for key in ("id", "inputs", "targets")}


def _read(task: seqio.Task, lengths: Mapping[str, int]) -> list[tuple[str, Example]]:
  dataset = task.get_dataset(lengths, split="train", shuffle=False, num_epochs=1,
                             use_cached=False)
  # In ragged batches: a row at a time from Python takes twice as long.
  dataset = dataset.map(_ids_and_tokens).ragged_batch(READ_BATCH)
  return [(input_id.decode("utf-8"), Example(np.asarray(inputs, np.int32),
                                             np.asarray(targets, np.int32)))
          for batch in dataset.as_numpy_iterator()
          for input_id, inputs, targets in zip(batch["id"], batch["inputs"], batch["targets"])]


def read_training_inputs(mixture_or_task_name: str,
                         lengths: Mapping[str, int]) -> tuple[list[TrainingInput], bool]:
  """(the training split of a run's mixture as inputs with their examples, in record order,
  tokenized and truncated as the SeqIO tasks do with the TaskOptions in use; whether the
  mixture trains the rationale task too)."""
  label_task, rationale_task = _tasks(mixture_or_task_name)
  labels = _read(label_task, lengths)
  if rationale_task is None:
    return [TrainingInput(example) for _, example in labels], False
  rationales = {}
  for input_id, example in _read(rationale_task, lengths):
    if input_id in rationales:
      raise gin_utils.GinConfigError(
          f"{rationale_task.name}/train: input {input_id!r} has several rationale examples "
          f"(TaskOptions.train_rationales={distillation.current_options().train_rationales!r}); "
          "per-input batching, as the paper, trains one rationale per input: use "
          "train_rationales='first', or train.batching='mixture'")
    rationales[input_id] = example
  return [TrainingInput(example, rationales.get(input_id)) for input_id, example in labels], True


def padded_length(longest: int, limit: int) -> int:
  """The smallest power of two >= longest (and >= MIN_PADDED_LENGTH), at most `limit`."""
  return min(limit, max(MIN_PADDED_LENGTH, 1 << max(longest - 1, 0).bit_length()))


class PerInputBatches:
  """Global batches of `batch_size` inputs; `batch(index)` is the index-th of the run.

  two_tasks: the mixture trains the rationale task too. alpha weighs the label task's
  mean token loss against the rationale task's (ignored in label-only mixtures, whose loss
  is the label task's mean). Epoch e visits the inputs in the order
  np.random.default_rng([seed, e]).permutation.
  """

  def __init__(self, inputs: list[TrainingInput], two_tasks: bool, batch_size: int,
               lengths: Mapping[str, int], alpha: float, seed: int):
    if not inputs:
      raise input_pipeline.TaskDataError("the training split has no examples")
    self.inputs = inputs
    self.batch_size = batch_size
    self.lengths = dict(lengths)
    self.alpha = alpha
    self.seed = seed
    self.two_tasks = two_tasks
    self.rows_per_input = 2 if self.two_tasks else 1
    self.batches_per_epoch = -(-len(inputs) // batch_size)
    self._order = (None, None)  # (epoch, its order): drawn once an epoch, not once a batch

  @property
  def rows(self) -> int:
    """Rows of a global batch."""
    return self.batch_size * self.rows_per_input

  def batch_inputs(self, index: int) -> list[TrainingInput]:
    """The inputs of global batch `index` (fewer than batch_size at an epoch's end)."""
    epoch, position = divmod(index, self.batches_per_epoch)
    if self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.inputs)))
    order = self._order[1]
    return [self.inputs[i] for i in
            order[position * self.batch_size:(position + 1) * self.batch_size]]

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Global batch `index` as model features [rows, length]."""
    chosen = self.batch_inputs(index)
    examples = [[item.label, item.rationale] if self.two_tasks else [item.label]
                for item in chosen]
    task_ids = [distillation.TASK_IDS["label"], distillation.TASK_IDS["rationale"]]
    present = [example for row in examples for example in row if example is not None]
    input_length = padded_length(max(len(e.inputs) for e in present), self.lengths["inputs"])
    target_length = padded_length(max(len(e.targets) for e in present), self.lengths["targets"])
    encoder = np.zeros((self.rows, input_length), np.int32)
    targets = np.zeros((self.rows, target_length), np.int32)
    task_of_row = np.zeros(self.rows, np.int32)
    for i, row in enumerate(examples):
      for j, example in enumerate(row):
        if example is not None:
          r = i * self.rows_per_input + j
          encoder[r, :len(example.inputs)] = example.inputs
          targets[r, :len(example.targets)] = example.targets
          task_of_row[r] = task_ids[j]
    weights = (targets > 0).astype(np.int32)
    task_tokens = task_of_row[:, None] * weights
    scales = np.zeros(targets.shape, np.float64)
    task_weights = (self.alpha, 1.0 - self.alpha) if self.two_tasks else (1.0,)
    for task_id, weight in zip(task_ids, task_weights):
      mask = task_tokens == task_id
      if mask.any():
        scales[mask] = weight / mask.sum()
    decoder_inputs = np.concatenate([np.zeros((self.rows, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": encoder, "decoder_input_tokens": decoder_inputs,
            "decoder_target_tokens": targets, "decoder_loss_weights": weights,
            "decoder_task_ids": task_tokens, "decoder_loss_scales": scales.astype(np.float32)}

  def host_batches(self, skip_batches: int = 0,
                   shard_info: Optional[seqio.ShardInfo] = None) -> Iterator[dict]:
    """Endless batches from index `skip_batches` on, each this host's contiguous rows."""
    shard_info = shard_info or input_pipeline.host_shard()
    if self.rows % shard_info.num_shards:
      raise gin_utils.GinConfigError(
          f"BATCH_SIZE={self.batch_size} inputs ({self.rows} rows) do not divide over "
          f"{shard_info.num_shards} data shards (hosts)")
    per_host = self.rows // shard_info.num_shards
    rows = slice(shard_info.index * per_host, (shard_info.index + 1) * per_host)
    index = skip_batches
    while True:
      yield {key: value[rows] for key, value in self.batch(index).items()}
      index += 1


def batches_of(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
               global_batch_size: int, seed: int) -> PerInputBatches:
  """The global batches of a run's mixture, read (and weighed by alpha) with the
  TaskOptions in use."""
  inputs, two_tasks = read_training_inputs(mixture_or_task_name, task_feature_lengths)
  return PerInputBatches(inputs, two_tasks, global_batch_size, task_feature_lengths,
                         distillation.current_options().alpha, seed)


def train_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                  global_batch_size: int, seed: int, skip_batches: int = 0) -> Iterator[dict]:
  """input_pipeline.train_batches' per-input counterpart: this host's rows of each batch of
  `global_batch_size` inputs."""
  return batches_of(mixture_or_task_name, task_feature_lengths, global_batch_size,
                    seed).host_batches(skip_batches)
