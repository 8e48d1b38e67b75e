"""Label-task metrics as SeqIO metric functions: `fn(targets, predictions) -> dict`.

Holds exact-match accuracy, SVAMP's equation accuracy, and the safe arithmetic
evaluator the latter needs. Targets and predictions are lists of strings after
postprocessing. Nothing here may run model output as code: equations are parsed
into an AST and only arithmetic, boolean operators and comparisons on numeric
literals are computed, in floats, under limits on size, depth and exponents.
"""
import ast
import math
import operator
from typing import Callable, Dict, Optional, Sequence

MAX_EXPRESSION_CHARS = 1_000
MAX_EXPRESSION_DEPTH = 100
MAX_EXPONENT_MAGNITUDE = 1_000

_BINARY_OPERATORS: Dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPERATORS: Dict[type, Callable[[float], float]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
    ast.Not: lambda value: float(not value),
}
_COMPARISONS: Dict[type, Callable[[float, float], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


class _NotArithmetic(Exception):
  """The expression is not plain arithmetic, or its value is not a finite float."""


def _check_targets_and_predictions(metric_name: str, targets: Sequence[str],
                                   predictions: Sequence[str]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(
        f"{metric_name}: got {len(targets)} targets but {len(predictions)} predictions.")
  if not targets:
    raise ValueError(f"{metric_name}: targets and predictions are empty.")


def exact_match_accuracy(targets: Sequence[str],
                         predictions: Sequence[str]) -> Dict[str, float]:
  """Fraction in [0, 1] of predictions equal to their target after `.strip()`."""
  _check_targets_and_predictions("exact_match_accuracy", targets, predictions)
  matches = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
  return {"accuracy": matches / len(targets)}


def _evaluate_node(node: ast.AST, depth: int) -> float:
  if depth > MAX_EXPRESSION_DEPTH:
    raise _NotArithmetic("expression nested too deeply")
  if isinstance(node, ast.Constant):
    # True and False count as 1 and 0, as in Python (bool is an int subclass).
    if not isinstance(node.value, (int, float)):
      raise _NotArithmetic(f"not a real number: {node.value!r}")
    # Floats throughout, so no integer can grow without bound (`9**9**9**9`).
    value = float(node.value)
    if not math.isfinite(value):  # `1e999` parses as inf.
      raise _NotArithmetic(f"not a finite number: {node.value!r}")
    return value
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
    return _UNARY_OPERATORS[type(node.op)](_evaluate_node(node.operand, depth + 1))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
    left = _evaluate_node(node.left, depth + 1)
    right = _evaluate_node(node.right, depth + 1)
    if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT_MAGNITUDE:
      raise _NotArithmetic("exponent too large")
    result = _BINARY_OPERATORS[type(node.op)](left, right)
    # A negative base to a fractional power gives a complex number.
    if not isinstance(result, float) or not math.isfinite(result):
      raise _NotArithmetic(f"not a finite real result: {result!r}")
    return result
  # Python's semantics, operands evaluated lazily as Python does (`0 and 1/0` is 0): `and`
  # and `or` give one of their operands, comparisons and `not` a bool, here 1.0 or 0.0.
  if isinstance(node, ast.BoolOp):
    stop_when_true = isinstance(node.op, ast.Or)
    for operand in node.values:
      value = _evaluate_node(operand, depth + 1)
      if bool(value) == stop_when_true:
        break
    return value
  if isinstance(node, ast.Compare) and all(type(op) in _COMPARISONS for op in node.ops):
    left = _evaluate_node(node.left, depth + 1)
    for op, comparator in zip(node.ops, node.comparators):  # `a < b < c`: a < b and b < c
      right = _evaluate_node(comparator, depth + 1)
      if not _COMPARISONS[type(op)](left, right):
        return 0.0
      left = right
    return 1.0
  if isinstance(node, ast.IfExp):
    branch = node.body if _evaluate_node(node.test, depth + 1) else node.orelse
    return _evaluate_node(branch, depth + 1)
  raise _NotArithmetic(f"unsupported syntax: {type(node).__name__}")


def evaluate_arithmetic(text: str) -> Optional[float]:
  """The value of an arithmetic expression, or None if it is not one or is unsafe.

  Accepts int, float and bool literals, unary + - and `not`, binary + - * / // % **,
  `and`, `or`, comparisons (== != < <= > >=, chained), `x if c else y` and
  parentheses, each with Python's meaning: `(34 + 40) and (62 - 17)` is 45.0, as
  Python's `eval` gives 45. Everything is computed in floats, so `(10 * 45)` and
  `( 10.0 * 45.0 )` both give 450.0, and a bool result is 1.0 or 0.0 (True == 1 in
  Python). Returns None, without executing anything, for any other syntax (names,
  calls, attributes, subscripts, strings, tuples, complex literals, `is`, `in`,
  ...), for text over MAX_EXPRESSION_CHARS, trees deeper than MAX_EXPRESSION_DEPTH,
  exponents beyond +-MAX_EXPONENT_MAGNITUDE, division or modulo by zero, overflow,
  and complex, infinite or NaN values.
  """
  if len(text) > MAX_EXPRESSION_CHARS:
    return None
  try:
    # Strip as `eval` would; ast.parse rejects leading whitespace as an indent.
    tree = ast.parse(text.strip(), mode="eval")
    return _evaluate_node(tree.body, depth=0)
  except (_NotArithmetic, SyntaxError, ValueError, RecursionError, MemoryError,
          ZeroDivisionError, OverflowError):
    return None


def equation_accuracy(targets: Sequence[str],
                      predictions: Sequence[str]) -> Dict[str, float]:
  """Fraction in [0, 1] of predicted equations whose value equals the target's.

  Mirrors the paper's SVAMP metric (evaluate both equations with `eval`, a failure
  giving NaN, and compare values with `==`) but evaluates with `evaluate_arithmetic`.
  Comparison is exact float equality, as in the paper, so round-off counts
  (`0.1 + 0.2` does not match `0.3`). The two metrics agree on every pair of
  equations written with the syntax `evaluate_arithmetic` accepts whose intermediate
  values are exact in floats and within its limits. They differ only where `eval`
  evaluates what is refused here (calls such as `abs(-3)` or `round(2.5)`, names the
  paper's module defines, strings, containers): such an equation never matches here.
  A tuple, such as the teacher label `(14, 21)`, cannot equal a number either way. An
  equation that fails to evaluate never matches, even if its target fails too.
  """
  _check_targets_and_predictions("equation_accuracy", targets, predictions)
  matches = 0
  for target, prediction in zip(targets, predictions):
    target_value = evaluate_arithmetic(target)
    matches += target_value is not None and target_value == evaluate_arithmetic(prediction)
  return {"accuracy": matches / len(targets)}
