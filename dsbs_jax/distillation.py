"""What distilling step-by-step is made of, named once for every stage: a dataset (`DatasetSpec`)
and its splits, its three tasks and the ids that mark their target tokens, its four mixtures
and how their names are formed, the paper's task prefixes, and `TaskOptions`, what a run
chooses about its data.

A command reads its TaskOptions once, from gin, and passes them down; the SeqIO tasks, which
are registered once per process and built whenever a dataset is read, take the options a
command put in use (`options_in_use`), or gin's where none is (T5X, scripts).

This module must not import TensorFlow, SeqIO or JAX: the teacher, the model wrapper and
the tools that run without TensorFlow import it.
"""
import contextlib
import dataclasses
from typing import Callable, Iterator, Mapping, Optional, Sequence

import gin

from dsbs_jax import gin_utils
from dsbs_jax import resources
from dsbs_jax import self_consistency

SPLITS = ("train", "validation", "test")
# A dataset's tasks, by what their targets are: gold labels, the teacher's labels (gold
# ones for evaluation), or the teacher's rationales.
TASK_KINDS = ("label_gold", "label_teacher", "rationale")
MIXTURES = {  # mixture suffix -> (label task kind, with the rationale task)
    "finetune": ("label_gold", False),
    "distill": ("label_teacher", False),
    "dsbs_gold": ("label_gold", True),
    "dsbs_teacher": ("label_teacher", True),
}
# Marks each target token with the task it belongs to, so that losses can be split; 0 is
# padding.
TASK_IDS = {"label": 1, "rationale": 2}
# The feature that carries those ids through SeqIO (see seqio_tasks.add_task_ids).
TASK_ID_FEATURE = "targets_task"
PAPER_PREFIXES = ("predict: ", "explain: ")
# Characters of text kept per token of a feature (TaskOptions.max_text_chars): twice the
# longest SentencePiece piece (16, the trainer's default and the longest in T5's and the
# shipped vocabularies), so that a cut never reaches a kept token.
CHARS_PER_TOKEN = 32
# The shipped from-scratch vocabulary, for gin files: VOCABULARY = %DSBS_VOCABULARY.
gin.constant("DSBS_VOCABULARY", str(resources.VOCABULARY_FILE))


def task_name(dataset: str, kind: str) -> str:
  """The name of a dataset's task (a TASK_KINDS entry) or mixture (a MIXTURES suffix)."""
  return f"{dataset}_{kind}"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What distinguishes one dataset: its name, metric, records folder and train inputs.

  rationales_dir: the folder holding <name>/<split>.jsonl; None means
  TaskOptions.rationales_dir (the shipped benchmarks).
  train_inputs_hint: set when the records lack train inputs, saying where to get them.
  validation_carved: the validation split is the paper's carve of 10% of the original train
    (records.VALID_FRACTION), which the paper makes after subsampling (CQA, SVAMP).
  """
  name: str
  metric_fn: Callable[[Sequence[str], Sequence[str]], dict]
  train_inputs_hint: Optional[str] = None
  rationales_dir: Optional[str] = None
  validation_carved: bool = False


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
    label_only_prefix: the label prefix of a run that trains no rationale task
      (`*_finetune`, `*_distill`, see `for_run`); None keeps label_prefix. The paper's code
      prefixes only its two-task runs (runs/paper.gin sets "").
    vocabulary_path: SentencePiece model; the standard T5 model for pretrained students.
    vocabulary_extra_ids: sentinel ids appended to the vocabulary (100 for T5's).
    rationales_dir: folder of <dataset>/<split>.jsonl[.gz] record files.
    train_inputs: for datasets whose train inputs the release lacks, {dataset: source},
      where source is a JSONL path or "tfds:<name>[:<split>]".
    drop_parse_failures: leave out training examples whose teacher output did not parse
      (the paper keeps them, with blank targets). An input of K > 1 samples is unparsed only
      when none of them parsed, and is left out of training either way.
    train_rationales: for records of K > 1 teacher samples (`dsbs rationales generate
      --samples K`), which samples' rationales train the rationale task, each one example,
      never one of a sample that did not parse: "first" (the first sample's that parsed:
      one per input, as the paper, which has one sample), "all" (every parsed sample's, up
      to K per input), "vote" (the samples whose answer is the vote's: Ho et al.
      2023 keep those that agree with the answer they trust) or "gold" (those whose answer
      is the gold label; every training record needs one). An input none of whose samples
      qualify has no rationale example; its label example stays. The label task keeps one
      example per input (the vote's answer) whatever this is; other splits are not expanded.
    min_agreement: leave out of training (both tasks) the inputs whose vote won less than
      this share of their K samples; a record of one sample agrees with itself (share 1).
      0 keeps every input, as the paper.
    max_text_chars: the most characters of a record's input or target that are tokenized:
      features keep only their first tokens anyway, and a SentencePiece piece holds at most
      16 characters, so a text cut at twice that per token of TASK_FEATURE_LENGTHS gives
      the same features, and a line of megabytes costs no more than this (`dsbs train`
      refuses lengths it would not cover; a T5X run over 4,096 tokens raises it itself).
  """
  alpha: float = 0.5
  train_fraction: float = 1.0
  subsample_seed: int = 0
  label_prefix: str = "[label] "
  rationale_prefix: str = "[rationale] "
  label_only_prefix: Optional[str] = None
  vocabulary_path: str = str(resources.VOCABULARY_FILE)
  vocabulary_extra_ids: int = 0
  rationales_dir: str = str(resources.RATIONALES_DIR)
  train_inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  drop_parse_failures: bool = False
  train_rationales: str = self_consistency.TRAIN_FIRST
  min_agreement: float = 0.0
  max_text_chars: int = 1 << 17

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
    if self.train_rationales not in self_consistency.TRAIN_RATIONALES:
      raise gin_utils.GinConfigError(
          f"TaskOptions.train_rationales must be one of {self_consistency.TRAIN_RATIONALES}, "
          f"got {self.train_rationales!r}")
    if not 0.0 <= self.min_agreement <= 1.0:
      raise gin_utils.GinConfigError(
          f"TaskOptions.min_agreement must be in [0, 1], got {self.min_agreement}")
    if isinstance(self.max_text_chars, bool) or not (isinstance(self.max_text_chars, int)
                                                      and self.max_text_chars > 0):
      raise gin_utils.GinConfigError(f"TaskOptions.max_text_chars must be a positive integer, "
                                     f"got {self.max_text_chars!r}")

  def check_covers(self, task_feature_lengths: Mapping[str, int]) -> None:
    """Refuses feature lengths longer than max_text_chars keeps exact (CHARS_PER_TOKEN each)."""
    longest = max(task_feature_lengths.values())
    if longest * CHARS_PER_TOKEN > self.max_text_chars:
      raise gin_utils.GinConfigError(
          f"TASK_FEATURE_LENGTHS up to {longest} tokens need TaskOptions.max_text_chars of at "
          f"least {longest * CHARS_PER_TOKEN} (it is {self.max_text_chars}): texts are cut "
          "there before they are tokenized")

  def for_run(self, mixture_or_task_name: str) -> "TaskOptions":
    """These options as a run of `mixture_or_task_name` uses them: label_only_prefix
    replaces label_prefix where it trains no rationale task."""
    if self.label_only_prefix is None or trains_rationales(mixture_or_task_name):
      return self
    return dataclasses.replace(self, label_prefix=self.label_only_prefix)


def trains_rationales(mixture_or_task_name: str) -> bool:
  """Whether a run's mixture (named <dataset>_<MIXTURES suffix>) trains the rationale task."""
  return any(mixture_or_task_name.endswith(f"_{suffix}")
             for suffix, (_, with_rationale) in MIXTURES.items() if with_rationale)


_options_in_use: list[TaskOptions] = []


@contextlib.contextmanager
def options_in_use(options: TaskOptions) -> Iterator[TaskOptions]:
  """Makes `options` what the SeqIO tasks read while the block runs (for every thread)."""
  _options_in_use.append(options)
  try:
    yield options
  finally:
    _options_in_use.pop()


def current_options() -> TaskOptions:
  """What the SeqIO tasks read when a dataset is built: the options in use, else gin's."""
  return _options_in_use[-1] if _options_in_use else TaskOptions()
