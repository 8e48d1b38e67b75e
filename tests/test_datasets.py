"""Tests for dsbs_jax.datasets: the paper's four benchmarks, each with three tasks and four
mixtures, registered once however often registration is asked for."""
import seqio

import tasks  # what T5X's gin files import
from dsbs_jax import datasets
from dsbs_jax import distillation


def test_registry_holds_four_datasets_of_three_tasks_and_four_mixtures():
  names = datasets.register_all()
  expected = [distillation.task_name(spec.name, kind) for spec in datasets.BENCHMARKS
              for kind in (*distillation.TASK_KINDS, *distillation.MIXTURES)]
  assert len(expected) == 28 and set(expected) <= set(names)
  for name in expected:
    seqio.get_mixture_or_task(name)
  assert [spec.name for spec in datasets.BENCHMARKS] == ["cqa", "svamp", "esnli", "anli1"]


def test_registering_again_changes_nothing():
  first = datasets.register_all()
  assert datasets.register_all() == first


def test_importing_tasks_registers_them_for_t5x():
  assert "svamp_dsbs_teacher" in tasks.TASK_NAMES
