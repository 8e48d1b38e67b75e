"""The paper's recipe against the release's trainer rebuilt on transformers and torch, step
for step (tools/paper_step_check.py), and the pieces it is made of, each against its
PyTorch original: transformers' and torch's AdamW, torch's gradient clipping, the per-input
batches (both tasks of B inputs, an epoch's short batch, resumable order) and their loss.

Tolerance of the step-for-step cases: 10x the float32 floor, the distance between the
reference in float32 and in float64 over the same steps. Two float32 computations of one
float64 value differ by up to twice that floor, more where XLA and torch sum in other
orders; 10x leaves that room and is still over 25x below the subtlest wrong step we know
(torch's AdamW in place of transformers': 250x the floor on the loss, 1,000x on the
parameters), which the control case asserts.
"""
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_torch  # noqa: E402  (tools/ is not a package)
import paper_step_check  # noqa: E402

from dsbs_jax import distillation  # noqa: E402
from dsbs_jax import encoder_decoder  # noqa: E402
from dsbs_jax import per_input_batches  # noqa: E402
from dsbs_jax import trainer  # noqa: E402

FLOOR_MULTIPLE = 10
LABEL, RATIONALE = distillation.TASK_IDS["label"], distillation.TASK_IDS["rationale"]


def within_floor(row: dict) -> None:
  ours, floor = row["ours_vs_release"], row["float32_floor"]
  assert ours["loss_rel"] <= FLOOR_MULTIPLE * floor["loss_rel"], row
  assert ours["param_abs"] <= FLOOR_MULTIPLE * floor["param_abs"], row


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(paper_step_check.CASES))
def test_every_step_equals_the_release_trainers(case):
  # The control: torch's AdamW on our side, which the check must tell from the release's.
  control = "adamw" if case == "dsbs_gold" else None
  row = paper_step_check.check(case, control_optimizer=control)
  assert row["steps"] == 20 and row["last_loss"] < row["first_loss"]  # it did train
  within_floor(row)
  if control:
    wrong, floor = row["control_vs_release"], row["float32_floor"]
    assert wrong["loss_rel"] > 2.5 * FLOOR_MULTIPLE * floor["loss_rel"], row
    assert wrong["param_abs"] > 2.5 * FLOOR_MULTIPLE * floor["param_abs"], row


# ------------------------------------------------------------------------------
# The optimizers and the clipping, each against its PyTorch original.
# ------------------------------------------------------------------------------
def random_arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  # Gradients spanning the magnitudes where epsilon's placement matters (1e-9 to 1).
  return {"matrix": (rng.standard_normal((6, 5)) * scale * 10.0 ** rng.integers(-9, 1, (6, 5))
                     ).astype(np.float32),
          "scale": (rng.standard_normal(7) * scale).astype(np.float32)}


@pytest.mark.parametrize("name,release_name", [("adamw_hf", "adamw_hf"),
                                               ("adamw", "adamw_torch")])
def test_each_adamw_updates_as_its_pytorch_original(name, release_name):
  steps = 6
  params = random_arrays(0)
  optimizer, _ = trainer.make_optimizer(name, 1e-3, total_steps=steps, grad_clip_norm=0.0)
  state, ours = optimizer.init(params), dict(params)
  tensors = {key: torch.nn.Parameter(torch.from_numpy(value.copy()))
             for key, value in params.items()}
  module = torch.nn.Module()
  for key, tensor in tensors.items():
    module.register_parameter(key, tensor)
  torch_optimizer, schedule = bench_torch.trainer_optimizer(module, release_name, 1e-3, steps)
  for step in range(steps):
    grads = random_arrays(step + 1)
    updates, state = optimizer.update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
    for key, tensor in tensors.items():
      tensor.grad = torch.from_numpy(grads[key])
    torch_optimizer.step()
    schedule.step()
  for key, tensor in tensors.items():
    # 1e-3 a step: a few float32 roundings of the update, nothing more.
    np.testing.assert_allclose(ours[key], tensor.detach().numpy(), rtol=0, atol=1e-8)


def test_the_two_adamws_differ_where_epsilon_weighs():
  params = random_arrays(0)
  grads = random_arrays(1, scale=1e-7)
  moved = {}
  for name in ("adamw", "adamw_hf"):
    optimizer, _ = trainer.make_optimizer(name, 1e-3, schedule="constant", grad_clip_norm=0.0)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    moved[name] = np.abs(updates["matrix"]).max()
  assert moved["adamw"] > 2 * moved["adamw_hf"]


def test_bias_correction_is_exact_to_float32_rounding():
  counts = jnp.arange(1, 20001, 997)
  exact = np.array([1.0 - 0.999 ** int(c) for c in counts])
  np.testing.assert_allclose(trainer.bias_correction(0.999, counts), exact, rtol=3e-7)


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clipping_is_torchs(scale):
  grads = random_arrays(3, scale)
  clip = trainer.clip_by_global_norm(1.0)
  clipped, _ = clip.update(grads, clip.init(grads))
  tensors = [torch.nn.Parameter(torch.zeros(value.shape)) for value in grads.values()]
  for tensor, value in zip(tensors, grads.values()):
    tensor.grad = torch.from_numpy(value.copy())
  torch.nn.utils.clip_grad_norm_(tensors, 1.0)
  for tensor, value in zip(tensors, clipped.values()):
    np.testing.assert_allclose(value, tensor.grad.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------
# Per-input batches.
# ------------------------------------------------------------------------------
def example(length: int, first: int) -> per_input_batches.Example:
  return per_input_batches.Example(np.arange(first, first + length, dtype=np.int32),
                                   np.arange(first, first + length, dtype=np.int32) + 1)


def inputs(count: int, with_rationale: bool = True) -> list:
  return [per_input_batches.TrainingInput(
      example(2 + i % 3, 10 * i + 2), example(5 + i % 7, 10 * i + 3) if with_rationale else None)
      for i in range(count)]


def test_a_batch_holds_each_input_with_both_tasks_and_the_papers_weights():
  items = inputs(10)
  batches = per_input_batches.PerInputBatches(items, True, 4, {"inputs": 64, "targets": 64},
                                              alpha=0.3, seed=0)
  batch = batches.batch(0)
  chosen = batches.batch_inputs(0)
  assert batch["encoder_input_tokens"].shape == (8, 64)  # the limit, under 128
  for i, item in enumerate(chosen):
    assert batch["decoder_target_tokens"][2 * i, :len(item.label.targets)].tolist() == \
        item.label.targets.tolist()
    assert batch["encoder_input_tokens"][2 * i + 1, :len(item.rationale.inputs)].tolist() == \
        item.rationale.inputs.tolist()
  scales, tasks = batch["decoder_loss_scales"], batch["decoder_task_ids"]
  label_tokens = sum(len(item.label.targets) for item in chosen)
  np.testing.assert_allclose(scales[tasks == LABEL], 0.3 / label_tokens)
  np.testing.assert_allclose(scales.sum(), 1.0, rtol=1e-6)
  assert np.all(scales[batch["decoder_target_tokens"] == 0] == 0)


def test_epochs_visit_every_input_once_and_keep_their_short_batch():
  batches = per_input_batches.PerInputBatches(inputs(10), True, 4, {"inputs": 64, "targets": 64},
                                              alpha=0.5, seed=3)
  assert batches.batches_per_epoch == 3
  for epoch in range(2):
    seen = [item for index in range(3 * epoch, 3 * epoch + 3)
            for item in batches.batch_inputs(index)]
    assert sorted(id(item) for item in seen) == sorted(id(item) for item in batches.inputs)
  short = batches.batch(2)
  assert short["decoder_target_tokens"].shape[0] == 8
  assert np.count_nonzero(short["decoder_target_tokens"].any(axis=1)) == 4  # 2 inputs x 2 tasks
  np.testing.assert_allclose(short["decoder_loss_scales"].sum(), 1.0, rtol=1e-6)
  assert [id(i) for i in batches.batch_inputs(3)] != [id(i) for i in batches.batch_inputs(0)]


def test_hosts_split_each_batch_and_a_resumed_run_continues_it():
  batches = per_input_batches.PerInputBatches(inputs(9, with_rationale=False), False, 4,
                                              {"inputs": 64, "targets": 64}, alpha=0.5, seed=0)
  shard = lambda index: per_input_batches.seqio.ShardInfo(index=index, num_shards=2)
  first, second = (next(batches.host_batches(5, shard(i))) for i in range(2))
  whole = batches.batch(5)
  for key, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), value)
  resumed = batches.host_batches(2, shard(0))
  continuous = batches.host_batches(0, shard(0))
  next(continuous), next(continuous)
  np.testing.assert_array_equal(next(resumed)["encoder_input_tokens"],
                                next(continuous)["encoder_input_tokens"])
  # Label-only: one row per input, the label's token mean.
  np.testing.assert_allclose(whole["decoder_loss_scales"].sum(), 1.0, rtol=1e-6)
  assert whole["decoder_target_tokens"].shape[0] == 4


@pytest.mark.parametrize("longest,limit,expected", [(1, 1024, 128), (128, 1024, 128),
                                                    (129, 1024, 256), (700, 1000, 1000),
                                                    (5, 64, 64)])
def test_rows_are_padded_to_a_power_of_two_within_the_limit(longest, limit, expected):
  assert per_input_batches.padded_length(longest, limit) == expected


def test_scaled_batches_lose_alpha_label_mean_plus_the_rationale_mean(tiny_config):
  config = tiny_config
  params = jax.jit(paper_step_check.t5.init_params, static_argnums=0)(config, jax.random.key(1))
  items = [per_input_batches.TrainingInput(
      per_input_batches.Example(np.array([5 + i, 6, 1], np.int32), np.array([7, 1], np.int32)),
      per_input_batches.Example(np.array([8, 9 + i, 1], np.int32),
                                np.array([3, 4, 5 + i, 6, 1], np.int32))) for i in range(3)]
  batch = per_input_batches.PerInputBatches(items, True, 3, {"inputs": 16, "targets": 16},
                                            alpha=0.2, seed=0).batch(0)
  loss_sum, metrics = encoder_decoder.loss_terms(params, batch, None, config, z_loss=0.0)
  label_mean = metrics["label_loss_sum"] / metrics["label_tokens"]
  rationale_mean = metrics["rationale_loss_sum"] / metrics["rationale_tokens"]
  assert metrics["label_tokens"] == 6 and metrics["rationale_tokens"] == 15
  np.testing.assert_allclose(loss_sum, 0.2 * label_mean + 0.8 * rationale_mean, rtol=1e-6)
  assert math.isclose(float(metrics["loss_normalizer"]), 1.0, rel_tol=1e-6)

