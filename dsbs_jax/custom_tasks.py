"""Custom datasets without code: a rationale record file in, SeqIO tasks and mixtures out.

`register_custom_dataset` lays a record file (e.g. from `dsbs rationales generate`) out as
<layout_dir>/<name>/{train,valid,test}.jsonl (layout_dir defaults to the record file's
folder), carving validation from train as the paper carves CQA's (and test too, when no
test file is given), and registers the dataset's three tasks and four mixtures as the
shipped benchmarks have (<name>_dsbs_teacher and so on). Records are split in id order,
so a file that concurrent, resumed generation wrote in any order gives the same splits.

A file's records carry gold labels all or none. Without them the teacher's labels are the
only ones: the `*_distill` and `*_dsbs_teacher` mixtures train on them and score that
file's splits against them (agreement with the teacher); the gold-label tasks refuse it. `register_custom_datasets` is the gin-configurable form:

    register_custom_datasets.datasets = [
        {"name": "mydata", "rationales_file": "/data/mydata.jsonl", "metric": "exact_match"}]

It runs when every dataset is registered (datasets.register_all: `dsbs` commands after
parsing gin, and `import tasks`) and again when gin is finalized, which T5X does after its
files and --gin.* flags are parsed: a gin file's `import tasks` comes before the bindings
that follow it. A dataset already registered with the same arguments is left as it is; one
registered here with other arguments (a second `dsbs distill` in one process, over another
record file) is registered anew in its place.

This module must not define the benchmarks (datasets.py does) or talk to a teacher.
"""
import re
from typing import Mapping, Optional, Sequence

import gin
import seqio

from dsbs_jax import distillation
from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import seqio_tasks
from dsbs_jax import storage

METRICS = {"exact_match": metrics.exact_match_accuracy, "equation": metrics.equation_accuracy}
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
# Dataset name -> (the arguments it was registered with, its task and mixture names).
_REGISTERED: dict[str, tuple[dict, list[str]]] = {}


def read_custom_records(path: str) -> list:
  """The records of `path` in id order; each needs an input, and gold labels are all or none."""
  read = rationales.read_records(path)
  for number, record in enumerate(read, start=1):
    if record.input is None:
      raise rationales.RationaleFileError(f"{path}: record {number} ({record.id!r}) has no input")
    if (record.label is None) != (read[0].label is None):
      raise rationales.RationaleFileError(
          f"{path}: record {number} ({record.id!r}) has {'no' if record.label is None else 'a'} "
          f"gold label, record 1 ({read[0].id!r}) {'has' if record.label is None else 'has none'}; "
          "give every record a gold label or none")
  return sorted(read, key=lambda record: record.id)


def register_custom_dataset(name: str, rationales_file: str, metric: str = "exact_match",
                            valid_fraction: float = 0.1, test_file: Optional[str] = None,
                            layout_dir: Optional[str] = None,
                            drop_parse_failures: bool = False) -> list[str]:
  """Writes the record layout of dataset `name` and registers its tasks; returns their names.

  Validation is `valid_fraction` of the records; without `test_file`, test is the same
  fraction of the rest. `drop_parse_failures` leaves out the records of `rationales_file`
  whose teacher output did not parse (from every split carved from it); a test file is
  kept whole.
  """
  if not _NAME_PATTERN.fullmatch(name):
    raise ValueError(f"custom dataset name {name!r}: use lowercase letters, digits and '_'")
  if metric not in METRICS:
    raise ValueError(f"custom dataset {name}: metric {metric!r} is not one of {sorted(METRICS)}")
  if not 0.0 < valid_fraction < 1.0:
    raise ValueError(f"custom dataset {name}: valid_fraction must be in (0, 1), got {valid_fraction}")
  if distillation.task_name(name, "rationale") in seqio.TaskRegistry.names():
    raise ValueError(f"custom dataset {name}: tasks named {name}_* are already registered")
  train = read_custom_records(rationales_file)
  if drop_parse_failures:
    train = [record for record in train if record.parsed()]
  splits = {"test": read_custom_records(test_file)} if test_file else {}
  train, splits["valid"] = records.split_records(train, valid_fraction, seed=0)
  if not test_file:
    train, splits["test"] = records.split_records(train, valid_fraction, seed=0)
  splits["train"] = train
  for split, kept in splits.items():
    if not kept:
      raise rationales.RationaleFileError(
          f"{test_file if split == 'test' and test_file else rationales_file}: too few records "
          f"{'left after dropping parse failures ' if drop_parse_failures else ''}"
          f"for a {split} split of custom dataset {name}")
  layout_dir = str(storage.path(layout_dir or _folder_of(rationales_file)))
  dataset_dir = storage.path(layout_dir) / name
  dataset_dir.mkdir(parents=True, exist_ok=True)
  for split, kept in splits.items():
    rationales.write_records(str(dataset_dir / f"{split}.jsonl"), kept)
  return seqio_tasks.register_dataset(
      distillation.DatasetSpec(name=name, metric_fn=METRICS[metric], rationales_dir=layout_dir))


def _folder_of(file: str) -> str:
  return str(storage.path(file).parent)


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
    if registered:  # registered here before with other arguments: a new run replaces it
      _unregister(registered[1])
      del _REGISTERED[kwargs["name"]]
    dataset_names = register_custom_dataset(**kwargs)
    _REGISTERED[kwargs["name"]] = (kwargs, dataset_names)
    names.extend(dataset_names)
  return names


def _unregister(names: Sequence[str]) -> None:
  """Removes tasks and mixtures from SeqIO's registries, mixtures first (they name tasks)."""
  for name in names:
    if name in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(name)
  for name in names:
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)


def names_in_gin() -> list[str]:
  """The names of the custom datasets that gin's config in use registers."""
  bound = gin.get_bindings(register_custom_datasets).get("datasets", ())
  return [dict(kwargs).get("name") for kwargs in bound]


def paths_in_gin() -> tuple[list[str], list[str]]:
  """(files read, folders written) by the custom datasets that gin's config registers."""
  read, written = [], []
  for kwargs in gin.get_bindings(register_custom_datasets).get("datasets", ()):
    kwargs = dict(kwargs)
    read += [kwargs[key] for key in ("rationales_file", "test_file") if kwargs.get(key)]
    if kwargs.get("rationales_file"):
      written.append(kwargs.get("layout_dir") or _folder_of(kwargs["rationales_file"]))
  return read, written


@gin.config.register_finalize_hook
def _register_when_gin_is_final(config) -> None:
  del config  # the bindings are read by calling the configurable
  register_custom_datasets()
