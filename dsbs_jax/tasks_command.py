"""`dsbs tasks`: lists every registered task and mixture with its examples per split.

With --examples N it also prints N preprocessed examples of each mixture (the text the
student reads and writes, and its token counts). It reads the same gin flags as training,
so a train fraction or alpha set there shows here. Nothing here defines tasks.
"""
import argparse
import itertools

import seqio

from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import gin_utils
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import storage

FEATURE_LENGTHS = {"inputs": 512, "targets": 256}


class UnknownDatasetError(ValueError):
  """A --dataset that no registered dataset has."""


USER_ERRORS = (UnknownDatasetError,)


def count(provider, split: str) -> str:
  try:
    if isinstance(provider, seqio.Mixture):
      return f"{sum(task.num_input_examples(split) for task in provider.tasks):,}"
    return f"{provider.num_input_examples(split):,}"
  except records.MissingTrainInputsError:
    return "inputs missing"


def print_examples(mixture: seqio.Mixture, num_examples: int) -> None:
  split = "validation"  # present for every dataset, train inputs or not
  dataset = mixture.get_dataset(FEATURE_LENGTHS, split=split, shuffle=True, seed=0, use_cached=False)
  vocabulary = mixture.output_features["inputs"].vocabulary
  for example in itertools.islice(dataset.as_numpy_iterator(), num_examples):
    for i, feature in enumerate(("inputs", "targets")):
      label = f"[{mixture.name}/{split}]" if i == 0 else " " * (len(mixture.name) + len(split) + 3)
      print(f"  {label} {feature} ({len(example[feature])} tokens): "
            f"{decode_with_separators(vocabulary, example[feature].tolist())!r}")


def decode_with_separators(vocabulary, ids: list[int]) -> str:
  """Decodes ids, showing each EOS inside the sequence (NLI's separator) as the marker."""
  if ids and ids[-1] == vocabulary.eos_id:
    ids = ids[:-1]
  pieces = [[]]
  for token in ids:
    if token == vocabulary.eos_id:
      pieces.append([])
    else:
      pieces[-1].append(token)
  return rationales.NLI_SEPARATOR.join(vocabulary.decode(piece) for piece in pieces)


def run(args: argparse.Namespace) -> int:
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
  data_read, data_written = datasets.data_paths()
  storage.check(read=data_read, write=data_written)
  options = distillation.TaskOptions()  # read once, and checked before any listing
  datasets.register_all()
  known = datasets.dataset_names()
  unknown = [name for name in args.dataset if name not in known]
  if unknown:
    raise UnknownDatasetError(f"--dataset {unknown[0]}: no such dataset; expected one of "
                              f"{', '.join(known)}, or a custom dataset that --gin_file or "
                              "--gin.register_custom_datasets.datasets registers")
  chosen = [name for name in known if not args.dataset or name in args.dataset]
  header = f"{'name':<24} {'kind':<8}" + "".join(f"{split:>16}" for split in distillation.SPLITS)
  with distillation.options_in_use(options):
    print(header)
    print("-" * len(header))
    for dataset in chosen:
      for kind in (*distillation.TASK_KINDS, *distillation.MIXTURES):
        name = distillation.task_name(dataset, kind)
        provider = seqio.get_mixture_or_task(name)
        print(f"{name:<24} {'mixture' if isinstance(provider, seqio.Mixture) else 'task':<8}"
              + "".join(f"{count(provider, split):>16}" for split in distillation.SPLITS))
    if args.examples:
      for dataset in chosen:
        for suffix in distillation.MIXTURES:
          print_examples(seqio.get_mixture_or_task(distillation.task_name(dataset, suffix)),
                         args.examples)
  return 0
