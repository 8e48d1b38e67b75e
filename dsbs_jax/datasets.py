"""Which datasets exist: the paper's four benchmarks, shipped in rationales/, and the custom
ones named in gin; `register_all` registers their SeqIO tasks and mixtures.

Per dataset <ds>: tasks <ds>_label_gold, <ds>_label_teacher, <ds>_rationale and mixtures
<ds>_finetune, <ds>_distill, <ds>_dsbs_gold, <ds>_dsbs_teacher. `dsbs` commands call
`register_all` once they have parsed gin; the top-level `tasks` package calls it when
imported (T5X's gin files import it). Registering again is harmless.

`data_paths` names the files and folders gin's data settings point at, for the commands to
check before anything reads them.

This module must not say how a dataset becomes tasks (seqio_tasks.py) or read records.
"""
from dsbs_jax import custom_tasks
from dsbs_jax import distillation
from dsbs_jax import gin_utils
from dsbs_jax import metrics
from dsbs_jax import seqio_tasks

_NLI_TRAIN_INPUTS = ("the JSONL that the paper's data_utils.py writes from Hugging Face's "
                     "`{hf}` {split} ({file}: premise, hypothesis, label), or '{tfds}'")
BENCHMARKS = (
    # CommonsenseQA (via CoS-E v1.11): the label is the chosen answer's text.
    distillation.DatasetSpec(name="cqa", metric_fn=metrics.exact_match_accuracy,
                             validation_carved=True),
    # SVAMP math word problems: the label is an equation, scored by its value.
    distillation.DatasetSpec(name="svamp", metric_fn=metrics.equation_accuracy,
                             validation_carved=True),
    # e-SNLI and ANLI R1: train inputs are not in the paper's release and are joined.
    distillation.DatasetSpec(
        name="esnli", metric_fn=metrics.exact_match_accuracy,
        train_inputs_hint=_NLI_TRAIN_INPUTS.format(hf="esnli", split="train split",
                                                   file="esnli_train.json", tfds="tfds:esnli")),
    distillation.DatasetSpec(
        name="anli1", metric_fn=metrics.exact_match_accuracy,
        train_inputs_hint=_NLI_TRAIN_INPUTS.format(hf="anli", split="split train_r1",
                                                   file="anli1_train.json", tfds="tfds:anli/r1")),
)
_registered: dict[str, list[str]] = {}  # benchmark name -> its task and mixture names


def dataset_names() -> list[str]:
  """The benchmarks' names, then those of the custom datasets gin names."""
  return [spec.name for spec in BENCHMARKS] + custom_tasks.names_in_gin()


def data_paths() -> tuple[list[str], list[str]]:
  """(paths read, folders written) that gin's data settings name: TaskOptions' vocabulary,
  rationales folder and train inputs, and the custom datasets' files and layout folders,
  for storage.check to check before anything reads them."""
  with gin_utils.as_config_errors(ValueError, TypeError, configurable="TaskOptions"):
    options = distillation.TaskOptions()
  custom_read, custom_written = custom_tasks.paths_in_gin()
  read = [options.vocabulary_path, options.rationales_dir, *options.train_inputs.values(),
          *custom_read]
  return read, custom_written


def register_all() -> list[str]:
  """Registers every benchmark (once) and the custom datasets gin names; returns the names
  of all their tasks and mixtures."""
  for spec in BENCHMARKS:
    if spec.name not in _registered:
      _registered[spec.name] = seqio_tasks.register_dataset(spec)
  return [name for names in _registered.values() for name in names] + (
      custom_tasks.register_custom_datasets())
