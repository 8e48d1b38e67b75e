"""Tests for dsbs_jax.metrics: exact match, equation accuracy, the safe evaluator."""
import os
import random
import time

import pytest

from dsbs_jax import metrics

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
    "True+1",
    "1j",
    "'1'",
    "1 < 2",
    "~1",
    "lambda: 1",
    "(1).real",
    "1 if 1 else 2",
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


def _random_expression(rng: random.Random, depth: int) -> str:
  if depth == 0 or rng.random() < 0.3:
    return str(rng.randint(0, 99))
  left = _random_expression(rng, depth - 1)
  right = _random_expression(rng, depth - 1)
  expression = f"{left} {rng.choice('+-*/')} {right}"
  return f"({expression})" if rng.random() < 0.5 else expression


def test_agrees_with_python_eval_on_random_safe_expressions():
  rng = random.Random(20230710)
  for _ in range(2_000):
    text = _random_expression(rng, depth=4)
    try:
      expected = float(eval(text))  # pylint: disable=eval-used  # digits and + - * / only
    except ZeroDivisionError:
      expected = None
    assert metrics.evaluate_arithmetic(text) == expected, text
