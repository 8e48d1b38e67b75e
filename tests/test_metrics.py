"""Tests for dsbs_jax.metrics: exact match, equation accuracy, the safe evaluator."""
import ast
import builtins
import os
import random
import time

import pytest

from dsbs_jax import metrics
from dsbs_jax import records
from dsbs_jax import resources

# Wall-clock bound for one evaluation; generous, it only catches hangs.
HANG_GUARD_SECONDS = 2.0

UNSAFE_OR_INVALID_EXPRESSIONS = [
    "__import__('os').system('touch x')",
    "9**9**9**9",
    "10**100000",
    "2**-99999",
    "(" * 10_000 + "1" + ")" * 10_000,
    "1+" * 100_000 + "1",
    "+" * 500 + "1",
    "1/0",
    "5 % 0",
    "5 // 0",
    "0 ** -1",
    "1e308*10",
    "1e999",
    "10.0 ** 400",
    "(-8) ** 0.5",
    "()",
    "[1]",
    "x+1",
    "1j",
    "'1'",
    "~1",
    "lambda: 1",
    "(1).real",
    "abs(-3)",
    "(14, 21)",
    "1 is 1",
    "1 in (1,)",
    "0 or x",
    "1 if x else 2",
    "1\x00",
    "",
    "   ",
]


def test_exact_match_accuracy_strips_whitespace():
  result = metrics.exact_match_accuracy(
      ["yes", "no", " b ", "4"], ["yes ", "yes", "b", "4.0"])
  assert result == {"accuracy": 0.5}


@pytest.mark.parametrize("metric", [metrics.exact_match_accuracy,
                                    metrics.equation_accuracy])
def test_metrics_reject_empty_and_mismatched_lists(metric):
  with pytest.raises(ValueError, match="empty"):
    metric([], [])
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metric(["1", "2"], ["1"])


@pytest.mark.parametrize("text, value", [
    ("( 10.0 * 45.0 )", 450.0),
    ("(10 * 45)", 450.0),
    (" ( ( 63.0 - 21.0 ) / 7.0 ) ", 6.0),
    ("-3 + +4", 1.0),
    ("2 ** 10", 1024.0),
    ("2 ** -1", 0.5),
    ("7 // 2", 3.0),
    ("-7 % 3", 2.0),
    ("1.5e2", 150.0),
    # Boolean operators and comparisons, with Python's meaning (as the paper's `eval`).
    ("(34 + 40) and (62 - 17)", 45.0),
    ("((29/2) and (30/2))", 15.0),
    ("0 and 1/0", 0.0),
    ("2 or 1/0", 2.0),
    ("1 < 2", 1.0),
    ("3 > 2 > 2", 0.0),
    ("not 0", 1.0),
    ("True + 1", 2.0),
    ("1 if 0 else 2", 2.0),
])
def test_evaluate_arithmetic_values(text, value):
  assert metrics.evaluate_arithmetic(text) == value


def test_equation_accuracy_on_paper_style_labels():
  targets = ["( 10.0 * 45.0 )", "( 8.0 + 6.0 )", "( 20.0 - 5.0 )", "( 9.0 / 3.0 )"]
  predictions = ["(10 * 45)", "(6 + 8)", "(20 + 5)", "3"]
  assert metrics.equation_accuracy(targets, predictions) == {"accuracy": 0.75}


def test_equation_accuracy_uses_exact_float_equality_like_the_paper():
  assert metrics.equation_accuracy(["0.3"], ["0.1 + 0.2"]) == {"accuracy": 0.0}


def test_failed_evaluations_never_match():
  assert metrics.equation_accuracy(["x"], ["x"]) == {"accuracy": 0.0}
  assert metrics.equation_accuracy(["1/0"], ["1/0"]) == {"accuracy": 0.0}


def test_code_is_never_executed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  text = "__import__('os').system('touch x')"
  assert metrics.evaluate_arithmetic(text) is None
  assert metrics.equation_accuracy(["0"], [text]) == {"accuracy": 0.0}
  assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("text", UNSAFE_OR_INVALID_EXPRESSIONS,
                         ids=lambda text: repr(text[:40]))
def test_unsafe_or_invalid_expressions_give_none_quickly(text):
  start = time.monotonic()
  value = metrics.evaluate_arithmetic(text)
  assert time.monotonic() - start < HANG_GUARD_SECONDS
  assert value is None
  assert metrics.equation_accuracy([text, "1"], [text, "1"]) == {"accuracy": 0.5}


OPERATORS = ("+", "-", "*", "/", "and", "or", "<", "<=", "==", "!=", ">", ">=")


def _random_expression(rng: random.Random, depth: int) -> str:
  if depth == 0 or rng.random() < 0.3:
    return str(rng.randint(0, 9))  # small, so comparisons and zeros come up often
  left = _random_expression(rng, depth - 1)
  right = _random_expression(rng, depth - 1)
  choice = rng.random()
  if choice < 0.1:
    return f"(not {left})"  # unparenthesized, `1 + not 2` is a syntax error
  if choice < 0.2:
    return f"({left} if {right} else {_random_expression(rng, depth - 1)})"
  expression = f"{left} {rng.choice(OPERATORS)} {right}"
  return f"({expression})" if rng.random() < 0.5 else expression


def test_agrees_with_python_eval_on_random_safe_expressions():
  # The texts are made here from digits and the operators above, never model output.
  rng = random.Random(20230710)
  for _ in range(5_000):
    text = _random_expression(rng, depth=4)
    try:
      expected = float(eval(text))  # pylint: disable=eval-used
    except ZeroDivisionError:
      expected = None
    assert metrics.evaluate_arithmetic(text) == expected, text


def svamp_records():
  return [record for split in ("train", "validation", "test")
          for record in records.read_split(str(resources.RATIONALES_DIR), "svamp", split)]


def test_shipped_teacher_labels_with_and_score_as_the_paper_scores_them():
  by_id = {record.id: record for record in svamp_records()}
  for record_id in ("chal-702", "chal-427"):  # `(34 + 40) and (62 - 17)`, `((29/2) and (30/2))`
    record = by_id[record_id]
    assert metrics.equation_accuracy([record.label], [record.teacher_label]) == {"accuracy": 1.0}
  train = records.read_split(str(resources.RATIONALES_DIR), "svamp", "train")
  accuracy = metrics.equation_accuracy([r.label for r in train], [r.teacher_label for r in train])
  assert round(accuracy["accuracy"] * len(train)) == 525  # 72.92%, the paper's `eval` figure


def test_shipped_labels_refused_here_are_ones_eval_fails_on_or_tuples():
  # Checked without running them: a syntax error, a name that is no builtin (eval raises
  # NameError), or a tuple (never equal to a number).
  for record in svamp_records():
    for text in (record.label, record.teacher_label):
      if metrics.evaluate_arithmetic(text) is not None:
        continue
      try:
        tree = ast.parse(text.strip(), mode="eval")
      except SyntaxError:
        continue
      names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
      is_tuple = any(isinstance(node, ast.Tuple) for node in ast.walk(tree))
      assert is_tuple or (names and not names & set(dir(builtins))), (record.id, text)
