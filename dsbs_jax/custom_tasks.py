"""Custom datasets without code: a rationale record file in, SeqIO tasks and mixtures out.

`register_custom_dataset` lays a record file (e.g. from `dsbs rationales generate`) out as
<TaskOptions.rationales_dir>/<name>/{train,valid,test}.jsonl, carving validation from train
deterministically when no split is given, and registers the dataset's three tasks and four
mixtures as the shipped benchmarks have (<name>_dsbs_teacher and so on).
`register_custom_datasets` is the gin-configurable form:

    register_custom_datasets.datasets = [
        {"name": "mydata", "rationales_file": "/data/mydata.jsonl", "metric": "exact_match"}]

The records are read through `TaskOptions.rationales_dir` like every dataset's, so the
layout is written there: point it at a folder of your own for custom runs. This module
must not define the benchmarks' tasks (tasks/ does) or talk to a teacher.
"""
import math
import os
import re
from typing import Mapping, Optional, Sequence

import gin
import numpy as np
import seqio

from dsbs_jax import data
from dsbs_jax import metrics
from dsbs_jax import rationales

METRICS = {"exact_match": metrics.exact_match_accuracy, "equation": metrics.equation_accuracy}
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


def carve_validation(records: Sequence, valid_fraction: float) -> tuple[list, list]:
  """(train, valid) as Hugging Face's `train_test_split(test_size=valid_fraction, seed=0)`.

  The same carving as the shipped CQA and SVAMP validation splits (see rationales/README.md).
  """
  permutation = np.random.default_rng(0).permutation(len(records))
  num_valid = math.ceil(valid_fraction * len(records))
  return [records[i] for i in permutation[num_valid:]], [records[i] for i in permutation[:num_valid]]


def _read_labelled(path: str) -> list:
  records = rationales.read_records(path)
  for record in records:
    if record.input is None or record.label is None:
      raise rationales.RationaleFileError(
          f"{path}: record {record.id!r} has no {'input' if record.input is None else 'gold label'}; "
          "custom datasets need both")
  return records


def register_custom_dataset(name: str, rationales_file: str, metric: str = "exact_match",
                            valid_fraction: float = 0.1, test_file: Optional[str] = None) -> list[str]:
  """Writes the record layout of dataset `name` and registers its tasks; returns their names."""
  if not _NAME_PATTERN.fullmatch(name):
    raise ValueError(f"custom dataset name {name!r}: use lowercase letters, digits and '_'")
  if metric not in METRICS:
    raise ValueError(f"custom dataset {name}: metric {metric!r} is not one of {sorted(METRICS)}")
  if not 0.0 < valid_fraction < 1.0:
    raise ValueError(f"custom dataset {name}: valid_fraction must be in (0, 1), got {valid_fraction}")
  if data.task_name(name, "rationale") in seqio.TaskRegistry.names():
    raise ValueError(f"custom dataset {name}: tasks named {name}_* are already registered")
  train, valid = carve_validation(_read_labelled(rationales_file), valid_fraction)
  if not train:
    raise rationales.RationaleFileError(f"{rationales_file}: too few records to carve a validation split")
  dataset_dir = os.path.join(data.TaskOptions().rationales_dir, name)
  os.makedirs(dataset_dir, exist_ok=True)
  rationales.write_records(os.path.join(dataset_dir, "train.jsonl"), train)
  rationales.write_records(os.path.join(dataset_dir, "valid.jsonl"), valid)
  if test_file:
    rationales.write_records(os.path.join(dataset_dir, "test.jsonl"), _read_labelled(test_file))
  return data.register_dataset(data.DatasetSpec(name=name, metric_fn=METRICS[metric]))


@gin.configurable
def register_custom_datasets(datasets: Sequence[Mapping] = ()) -> list[str]:
  """Registers each dataset, given as the keyword arguments of `register_custom_dataset`."""
  names = []
  for kwargs in datasets:
    names.extend(register_custom_dataset(**kwargs))
  return names
