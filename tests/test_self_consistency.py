"""Tests of dsbs_jax.self_consistency: the vote (ties to the answer sampled first, parse
failures not voting, SVAMP equations equal by value), the record of K samples and of one,
and which samples' rationales train under each TaskOptions.train_rationales choice."""
import pytest

from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import self_consistency as sc

SAME_TEXT = sc.same_answer_for(metrics.exact_match_accuracy)
SAME_VALUE = sc.same_answer_for(metrics.equation_accuracy)


def cqa_output(rationale: str, letter: str, answer: str) -> str:
  return f"{rationale} So the answer is ({letter}) {answer}."


def test_majority_wins_and_a_tie_goes_to_the_answer_sampled_first():
  outputs = [cqa_output("r0", "a", "x"), cqa_output("r1", "b", "y"), cqa_output("r2", "b", "y"),
             cqa_output("r3", "a", "x"), cqa_output("r4", "b", "y")]
  record = sc.make_record("cqa", SAME_TEXT, "id", "q", "x", outputs)
  assert (record.teacher_label, record.agreement) == ("y", 0.6)
  # The first sample's rationale and output stay the record's own fields.
  assert (record.rationale, record.teacher_output) == ("r0", outputs[0])
  assert [s.rationale for s in record.samples] == ["r0", "r1", "r2", "r3", "r4"]
  tie = sc.make_record("cqa", SAME_TEXT, "id", "q", None, outputs[1:])  # y y x y -> y
  assert tie.teacher_label == "y"
  tie = sc.make_record("cqa", SAME_TEXT, "id", "q", None, outputs[:4])  # x y y x: x first
  assert (tie.teacher_label, tie.agreement) == ("x", 0.5)
  tie = sc.make_record("cqa", SAME_TEXT, "id", "q", None, outputs[1:4])  # y y x
  assert (tie.teacher_label, tie.agreement) == ("y", 2 / 3)


def test_parse_failures_do_not_vote_but_count_in_the_share():
  outputs = ["no answer here", "nor here", cqa_output("r", "c", "z")]
  record = sc.make_record("cqa", SAME_TEXT, "id", "q", None, outputs)
  assert (record.teacher_label, record.agreement) == ("z", 1 / 3)
  # One sample parsed: the record did (parse_error is the record's, not its first sample's).
  assert record.parse_error is None and record.samples[0].parse_error is not None
  assert sum(sample.parse_error is not None for sample in record.samples) == 2
  none_parsed = sc.make_record("cqa", SAME_TEXT, "id", "q", None, outputs[:2])
  assert (none_parsed.teacher_label, none_parsed.agreement) == (" ", 0.0)
  assert none_parsed.parse_error == none_parsed.samples[0].parse_error is not None
  assert sc.training_rationales(none_parsed, "all", SAME_TEXT) == []


def test_the_voted_label_is_stored_in_the_metrics_normal_form():
  outputs = [cqa_output("r0", "a", "photograph "), cqa_output("r1", "a", "photograph")]
  assert sc.make_record("cqa", SAME_TEXT, "id", "q", None, outputs).teacher_label == "photograph"


def test_svamp_equations_vote_by_value():
  outputs = [f"r{i}. The answer is {eq}." for i, eq in
             enumerate(["(2 + 3)", "(3 + 2)", "(7 - 1)", "(6)", "(1 + 4)"])]
  record = sc.make_record("svamp", SAME_VALUE, "id", "q", "(5)", outputs)
  assert (record.teacher_label, record.agreement) == ("(2 + 3)", 0.6)


def test_one_sample_is_the_single_completion_record_byte_for_byte():
  output = cqa_output("Because.", "a", "x")
  record = sc.make_record("cqa", SAME_TEXT, "id", "q", "x", [output])
  assert record == rationales.make_record("cqa", "id", "q", "x", output)
  assert record.to_json() == ('{"id": "id", "input": "q", "label": "x", "teacher_label": "x", '
                              '"rationale": "Because.", "teacher_output": "Because. So the answer '
                              'is (a) x.", "parse_error": null}')
  assert record.all_samples() == (rationales.Sample("x", "Because.", output, None),)


def test_training_rationales_under_each_choice():
  outputs = [cqa_output("r0", "a", "x"), cqa_output("r1", "b", "y"), "unparsed",
             cqa_output("r3", "b", "y"), cqa_output("r4", "a", "x"), cqa_output("r5", "b", "y")]
  record = sc.make_record("cqa", SAME_TEXT, "id", "q", "x", outputs)
  assert record.teacher_label == "y"
  chosen = {which: sc.training_rationales(record, which, SAME_TEXT)
            for which in sc.TRAIN_RATIONALES}
  assert chosen == {"first": ["r0"], "all": ["r0", "r1", "r3", "r4", "r5"],
                    "vote": ["r1", "r3", "r5"], "gold": ["r0", "r4"]}
  # 'first' is the first sample that parsed.
  first_failed = sc.make_record("cqa", SAME_TEXT, "id", "q", "x", outputs[2:])
  assert sc.training_rationales(first_failed, "first", SAME_TEXT) == ["r3"]
  unlabeled = sc.make_record("cqa", SAME_TEXT, "id", "q", None, outputs)
  with pytest.raises(ValueError, match="record 'id' has no gold label"):
    sc.training_rationales(unlabeled, "gold", SAME_TEXT)
