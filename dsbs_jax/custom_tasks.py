"""Custom datasets without code: a rationale record file in, SeqIO tasks and mixtures out.

`register_custom_dataset` lays a record file (e.g. from `dsbs rationales generate`) out as
<layout_dir>/<name>/{train,valid,test}.jsonl (layout_dir defaults to the record file's
folder), carving validation from train as the paper carves CQA's, and registers the
dataset's three tasks and four mixtures as the shipped benchmarks have
(<name>_dsbs_teacher and so on). `register_custom_datasets` is the gin-configurable form:

    register_custom_datasets.datasets = [
        {"name": "mydata", "rationales_file": "/data/mydata.jsonl", "metric": "exact_match"}]

It runs when every dataset is registered (datasets.register_all: `dsbs` commands after
parsing gin, and `import tasks`) and again when gin is finalized, which T5X does after its
files and --gin.* flags are parsed: a gin file's `import tasks` comes before the bindings
that follow it. A dataset already registered
with the same arguments is left as it is.

This module must not define the benchmarks (datasets.py does) or talk to a teacher.
"""
import os
import re
from typing import Mapping, Optional, Sequence

import gin
import seqio

from dsbs_jax import distillation
from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import seqio_tasks

METRICS = {"exact_match": metrics.exact_match_accuracy, "equation": metrics.equation_accuracy}
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
# Dataset name -> (the arguments it was registered with, its task and mixture names).
_REGISTERED: dict[str, tuple[dict, list[str]]] = {}


def _read_labelled(path: str) -> list:
  labelled = rationales.read_records(path)
  for record in labelled:
    if record.input is None or record.label is None:
      raise rationales.RationaleFileError(
          f"{path}: record {record.id!r} has no {'input' if record.input is None else 'gold label'}; "
          "custom datasets need both")
  return labelled


def register_custom_dataset(name: str, rationales_file: str, metric: str = "exact_match",
                            valid_fraction: float = 0.1, test_file: Optional[str] = None,
                            layout_dir: Optional[str] = None) -> list[str]:
  """Writes the record layout of dataset `name` and registers its tasks; returns their names."""
  if not _NAME_PATTERN.fullmatch(name):
    raise ValueError(f"custom dataset name {name!r}: use lowercase letters, digits and '_'")
  if metric not in METRICS:
    raise ValueError(f"custom dataset {name}: metric {metric!r} is not one of {sorted(METRICS)}")
  if not 0.0 < valid_fraction < 1.0:
    raise ValueError(f"custom dataset {name}: valid_fraction must be in (0, 1), got {valid_fraction}")
  if distillation.task_name(name, "rationale") in seqio.TaskRegistry.names():
    raise ValueError(f"custom dataset {name}: tasks named {name}_* are already registered")
  train, valid = records.split_records(_read_labelled(rationales_file), valid_fraction, seed=0)
  if not train:
    raise rationales.RationaleFileError(f"{rationales_file}: too few records to carve a validation split")
  layout_dir = layout_dir or os.path.dirname(os.path.abspath(rationales_file))
  dataset_dir = os.path.join(layout_dir, name)
  os.makedirs(dataset_dir, exist_ok=True)
  rationales.write_records(os.path.join(dataset_dir, "train.jsonl"), train)
  rationales.write_records(os.path.join(dataset_dir, "valid.jsonl"), valid)
  if test_file:
    rationales.write_records(os.path.join(dataset_dir, "test.jsonl"), _read_labelled(test_file))
  return seqio_tasks.register_dataset(
      distillation.DatasetSpec(name=name, metric_fn=METRICS[metric], rationales_dir=layout_dir))


@gin.configurable
def register_custom_datasets(datasets: Sequence[Mapping] = ()) -> list[str]:
  """Registers each dataset, given as the keyword arguments of `register_custom_dataset`,
  unless it is registered with those arguments already; returns all their names."""
  names = []
  for kwargs in datasets:
    kwargs = dict(kwargs)
    registered = _REGISTERED.get(kwargs.get("name"))
    if registered and registered[0] == kwargs:
      names.extend(registered[1])
      continue
    dataset_names = register_custom_dataset(**kwargs)
    _REGISTERED[kwargs["name"]] = (kwargs, dataset_names)
    names.extend(dataset_names)
  return names


@gin.config.register_finalize_hook
def _register_when_gin_is_final(config) -> None:
  del config  # the bindings are read by calling the configurable
  register_custom_datasets()
