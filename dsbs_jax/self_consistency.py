"""Self-consistency (Wang et al. 2022): K teacher samples per input, a majority vote over
their answers, and the choice of which samples' rationales train the student.

Two answers are the same when the dataset's metric says so (`same_answer`): for SVAMP's
equations, the same value (`(3 + 5)` and `(5 + 3)`), else the same text after `.strip()`.
The vote counts the samples that parsed; the answer with the most votes wins, and a tie
goes to the tied answer sampled first (the lowest sample index), so a vote is a function
of the samples in order. `agreement` is the winner's share of all K samples, parse
failures included. The record's label is the winner's in the metric's normal form
(stripped). A record of K samples is unparsed (`parse_error`, the first sample's reason)
only when none of its samples parsed; its agreement is then 0, its label blank, and it
trains nothing. The rationales that train never include one of a sample that did not
parse. One sample gives the record of one
completion, as it always was.

This module must not send requests, read files, or import TensorFlow.
"""
from typing import Callable, Optional, Sequence

from dsbs_jax import metrics
from dsbs_jax import rationales

# Which samples' rationales train the rationale task (TaskOptions.train_rationales).
TRAIN_FIRST = "first"  # the first sample's only: one rationale per input, as the paper
TRAIN_ALL = "all"  # every sample's: K rationale examples per input
TRAIN_AGREE_WITH_VOTE = "vote"  # the samples whose answer is the vote's
TRAIN_AGREE_WITH_GOLD = "gold"  # the samples whose answer is the gold label's
TRAIN_RATIONALES = (TRAIN_FIRST, TRAIN_ALL, TRAIN_AGREE_WITH_VOTE, TRAIN_AGREE_WITH_GOLD)

SameAnswer = Callable[[str, str], bool]


def _same_equation(a: str, b: str) -> bool:
  value = metrics.evaluate_arithmetic(a)
  return value is not None and value == metrics.evaluate_arithmetic(b)


def _same_text(a: str, b: str) -> bool:
  return a.strip() == b.strip()


def same_answer_for(metric_fn: Callable) -> SameAnswer:
  """The answer equality that `metric_fn` (a label-task metric) scores with."""
  return _same_equation if metric_fn is metrics.equation_accuracy else _same_text


def vote(samples: Sequence[rationales.Sample], same_answer: SameAnswer) -> tuple[int, int]:
  """(index of the first sample of the winning answer, its votes); (0, 0) if none parsed."""
  first_of_answer, votes = [], []  # per distinct answer, in order of first appearance
  for index, sample in enumerate(samples):
    if sample.parse_error is not None:
      continue
    for answer, first in enumerate(first_of_answer):
      if same_answer(samples[first].teacher_label, sample.teacher_label):
        votes[answer] += 1
        break
    else:
      first_of_answer.append(index)
      votes.append(1)
  if not votes:
    return 0, 0
  winner = max(range(len(votes)), key=lambda answer: (votes[answer], -first_of_answer[answer]))
  return first_of_answer[winner], votes[winner]


def make_record(parser: str, same_answer: SameAnswer, example_id: str,
                input_text: Optional[str], label: Optional[str],
                teacher_outputs: Sequence[str]) -> rationales.RationaleRecord:
  """The record of an example's K teacher outputs (rationales.make_record's when K is 1)."""
  if len(teacher_outputs) == 1:
    return rationales.make_record(parser, example_id, input_text, label, teacher_outputs[0])
  samples = tuple(rationales.parse_sample(parser, output) for output in teacher_outputs)
  winner, votes = vote(samples, same_answer)
  first = samples[0]
  return rationales.RationaleRecord(
      id=example_id, input=input_text, label=label,
      teacher_label=samples[winner].teacher_label.strip() or samples[winner].teacher_label,
      rationale=first.rationale, teacher_output=first.teacher_output,
      parse_error=None if votes else first.parse_error, agreement=votes / len(samples),
      samples=samples)


def training_rationales(record: rationales.RationaleRecord, which: str,
                        same_answer: SameAnswer) -> list[str]:
  """The rationales of `record` that train the rationale task under `which`
  (a TRAIN_RATIONALES entry): of K samples, only ones that parsed ('first': the first that
  did); a one-sample record's own."""
  if record.samples is None:
    samples = record.all_samples()
  else:
    samples = [sample for sample in record.samples if sample.parse_error is None]
  if which == TRAIN_FIRST:
    return [sample.rationale for sample in samples[:1]]
  if which == TRAIN_ALL:
    return [sample.rationale for sample in samples]
  reference = record.teacher_label if which == TRAIN_AGREE_WITH_VOTE else record.label
  if reference is None:
    raise ValueError(f"record {record.id!r} has no gold label to select rationales by "
                     f"(TaskOptions.train_rationales = {which!r})")
  return [sample.rationale for sample in samples
          if sample.parse_error is None and same_answer(sample.teacher_label, reference)]
