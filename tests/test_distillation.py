"""Tests for dsbs_jax.distillation: the options' checks, the options a command puts in use
taking precedence over gin's, and the names every stage shares loading without TensorFlow."""
import gin
import pytest

from conftest import modules_loaded_by
from dsbs_jax import distillation
from dsbs_jax import gin_utils


def test_alpha_outside_open_interval_is_rejected():
  gin.bind_parameter("TaskOptions.alpha", 1.0)
  with pytest.raises(gin_utils.GinConfigError, match="alpha must be in"):
    distillation.TaskOptions()


def test_options_in_use_take_precedence_over_gin_until_the_block_ends():
  gin.bind_parameter("TaskOptions.alpha", 0.3)
  assert distillation.current_options().alpha == 0.3
  chosen = distillation.TaskOptions(alpha=0.2)
  with distillation.options_in_use(chosen):
    assert distillation.current_options() is chosen
    inner = distillation.TaskOptions(alpha=0.7)
    with distillation.options_in_use(inner):
      assert distillation.current_options() is inner
    assert distillation.current_options() is chosen
  assert distillation.current_options().alpha == 0.3


def test_names_of_tasks_and_mixtures():
  assert [distillation.task_name("cqa", kind) for kind in distillation.TASK_KINDS] == [
      "cqa_label_gold", "cqa_label_teacher", "cqa_rationale"]
  assert sorted(distillation.MIXTURES) == ["distill", "dsbs_gold", "dsbs_teacher", "finetune"]
  assert 0 not in distillation.TASK_IDS.values()  # 0 marks padding


def test_what_every_stage_shares_loads_without_tensorflow():
  # The teacher, the model wrapper and tools/bench.py's replay of saved batches run where
  # TensorFlow may be missing.
  assert modules_loaded_by("from dsbs_jax import distillation, encoder_decoder, records, teacher",
                           ("tensorflow", "seqio")) == []
