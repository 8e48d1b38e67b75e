"""A dataset's records as a run reads them: the split files on disk, the train inputs the
paper's release lacks joined in (with an alignment check), the training split subsampled as
the paper subsamples it (with a validation split carved from train, that too), and parse
failures and inputs of low teacher agreement then left out on request.

The label task and the rationale task of a dataset read the same records through the same
subsampling, so they always see exactly the same examples.

This module must not build SeqIO tasks (seqio_tasks.py does) or import TensorFlow, except
TensorFlow Datasets for a "tfds:" source of train inputs.
"""
import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from dsbs_jax import distillation
from dsbs_jax import rationales
from dsbs_jax import storage

_SPLIT_FILES = {"train": "train", "validation": "valid", "test": "test"}
# The paper's carve of validation from train where a benchmark has none:
# train_test_split(test_size=0.1, seed=0).
VALID_FRACTION = 0.1
VALID_SEED = 0
# Teacher labels that agree with gold labels less often than this mean the inputs were
# joined in an order other than the teacher outputs' (3-way NLI chance is 1/3).
MIN_JOINED_TEACHER_ACCURACY = 0.5


class MissingTrainInputsError(FileNotFoundError):
  """The paper's release lacks this dataset's train inputs and no source was named."""


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


def uncarved(kept: Sequence, held_out: Sequence, held_out_fraction: float, seed: int) -> list:
  """The records `split_records(records, held_out_fraction, seed)` split into (kept,
  held_out), in their original order again."""
  records = [*held_out, *kept]
  if len(held_out) != math.ceil(held_out_fraction * len(records)):
    raise ValueError(f"{len(held_out)} held out of {len(records)} records is not a carve of "
                     f"{held_out_fraction}")
  original = [None] * len(records)
  for index, record in zip(np.random.default_rng(seed).permutation(len(records)), records):
    original[index] = record
  return original


def paper_subsample_of_carved(train: Sequence, validation: Sequence, fraction: float,
                              seed: int) -> tuple[list, list]:
  """(train, validation) as the paper's run.py makes them for a dataset whose validation is
  carved from train (CQA, SVAMP): it subsamples the whole original train first
  (`train_test_split(test_size=1 - fraction, seed=run)`) and carves validation from what is
  left, so at a fraction below 1 both differ from the carve shipped in rationales/."""
  original = uncarved(train, validation, VALID_FRACTION, VALID_SEED)
  return split_records(subsample(original, fraction, seed), VALID_FRACTION, VALID_SEED)


def split_path(rationales_dir: str, dataset: str, split: str) -> str:
  base = f"{str(rationales_dir).rstrip('/')}/{dataset}/{_SPLIT_FILES[split]}.jsonl"
  for candidate in (base, base + ".gz"):
    if storage.path(candidate).is_file():
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
  return _read_records_cached(path, storage.modified_time(path))


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


def records_for(spec: distillation.DatasetSpec, split: str,
                options: distillation.TaskOptions) -> list:
  """The records a task reads for `split` under `options`: joined, subsampled as the paper
  subsamples (for a dataset with a carved validation split, validation too), filtered."""
  if split not in distillation.SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {distillation.SPLITS}")
  rationales_dir = spec.rationales_dir or options.rationales_dir
  carved_subsample = spec.validation_carved and options.train_fraction < 1.0
  if split == "train" and spec.train_inputs_hint:
    source = options.train_inputs.get(spec.name)
    if not source:
      raise MissingTrainInputsError(
          f"{spec.name} train inputs are not in the paper's release (only its teacher outputs are "
          f"shipped). Name them in gin: TaskOptions.train_inputs = {{'{spec.name}': SOURCE}}, where "
          f"SOURCE is {spec.train_inputs_hint}")
    records = list(_joined_train_records(rationales_dir, spec.name, source))
  elif split in ("train", "validation") and carved_subsample:
    train, validation = paper_subsample_of_carved(
        read_split(rationales_dir, spec.name, "train"),
        read_split(rationales_dir, spec.name, "validation"),
        options.train_fraction, options.subsample_seed)
    records = train if split == "train" else validation
  else:
    records = list(read_split(rationales_dir, spec.name, split))
  if split == "train":
    if not carved_subsample:
      records = subsample(records, options.train_fraction, options.subsample_seed)
    # After subsampling, which so picks the paper's inputs whatever the filters keep.
    # A record of K samples none of which parsed has no label to train on; one of a single
    # output that did not parse trains with a blank label, as the paper's, unless dropped.
    records = [r for r in records
               if r.parsed() or (r.samples is None and not options.drop_parse_failures)]
    if options.min_agreement > 0:
      records = [r for r in records
                 if (1.0 if r.agreement is None else r.agreement) >= options.min_agreement]
  return records
