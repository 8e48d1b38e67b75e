"""Tests of the model wrapper: cross-entropy with z-loss, per-example and per-token
normalization, the label/rationale decomposition of packed batches, and scoring."""
import dataclasses

import jax
import numpy as np
import pytest

from dsbs_jax import model
from dsbs_jax.models import t5

LABEL, RATIONALE = model.LABEL_TASK_ID, model.RATIONALE_TASK_ID
FEATURE_NAMES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
                 "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                 "decoder_segment_ids", "decoder_positions", "decoder_task_ids")


def pack_examples(rows, inputs_length=16, targets_length=16):
  """Features as seqio's EncDecFeatureConverter(pack=True) gives them, plus decoder_task_ids.

  rows: per row, a list of (input ids, target ids, task id) examples packed left to right.
  """
  features = {name: np.zeros((len(rows), targets_length if name.startswith("decoder")
                                 else inputs_length), np.int32) for name in FEATURE_NAMES}
  for row_index, row in enumerate(rows):
    input_start = target_start = 0
    for segment, (inputs, targets, task) in enumerate(row, start=1):
      encoder = (row_index, slice(input_start, input_start + len(inputs)))
      decoder = (row_index, slice(target_start, target_start + len(targets)))
      features["encoder_input_tokens"][encoder] = inputs
      features["encoder_segment_ids"][encoder] = segment
      features["encoder_positions"][encoder] = np.arange(len(inputs))
      features["decoder_target_tokens"][decoder] = targets
      features["decoder_input_tokens"][decoder] = [0] + list(targets[:-1])
      features["decoder_loss_weights"][decoder] = 1
      features["decoder_segment_ids"][decoder] = segment
      features["decoder_positions"][decoder] = np.arange(len(targets))
      features["decoder_task_ids"][decoder] = task
      input_start += len(inputs)
      target_start += len(targets)
  return features


def random_example(rng: np.random.Generator, vocab_size: int, task: int, inputs_length: int,
                   targets_length: int):
  """Random token ids in [2, vocab), each sequence ending with EOS (1)."""
  tokens = lambda length: list(rng.integers(2, vocab_size, length - 1)) + [t5.EOS_ID]
  return tokens(inputs_length), tokens(targets_length), task


@pytest.fixture(scope="module")
def params(tiny_config):
  return t5.init_params(tiny_config, jax.random.key(0))


def numpy_token_losses(params, config, batch, z_loss):
  """Per-token cross-entropy + z-loss [batch, length] computed in NumPy from the logits."""
  logits = np.asarray(model._logits(params, batch, config, None), np.float64)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  targets = batch["decoder_target_tokens"]
  target_logits = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return log_z - target_logits + z_loss * log_z**2


def test_cross_entropy_with_z_loss_matches_numpy():
  logits = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32) * 3
  targets = np.array([[0, 6, 3], [2, 2, 5]])
  token_loss, token_z_loss = model.cross_entropy_with_z_loss(logits, targets, 1e-2)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  expected_ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(token_z_loss, 1e-2 * log_z**2, rtol=1e-5)
  np.testing.assert_allclose(token_loss, expected_ce + 1e-2 * log_z**2, rtol=1e-5)


def test_each_example_weighs_the_same_whatever_its_length(tiny_config, params):
  rng = np.random.default_rng(1)
  vocab = tiny_config.vocab_size
  # Row 0 packs a 2-token and a 9-token example; row 1 holds one of 4 tokens.
  rows = [[random_example(rng, vocab, LABEL, 5, 2), random_example(rng, vocab, RATIONALE, 6, 9)],
          [random_example(rng, vocab, LABEL, 7, 4)]]
  batch = pack_examples(rows)
  token_losses = numpy_token_losses(params, tiny_config, batch, z_loss=1e-4)
  example_means = [token_losses[0, :2].mean(), token_losses[0, 2:11].mean(),
                   token_losses[1, :4].mean()]
  per_token = (token_losses[0, :11].sum() + token_losses[1, :4].sum()) / 15

  loss, metrics = model.eval_loss(params, batch, tiny_config)
  np.testing.assert_allclose(loss, np.mean(example_means), rtol=1e-5)
  assert metrics["loss_normalizer"] == metrics["examples"] == 3
  np.testing.assert_allclose(metrics["label_loss_sum"], example_means[0] + example_means[2],
                             rtol=1e-5)
  loss, metrics = model.eval_loss(params, batch, tiny_config, loss_normalization="per_token")
  np.testing.assert_allclose(loss, per_token, rtol=1e-5)
  assert metrics["loss_normalizer"] == metrics["tokens"] == 15


def test_label_and_rationale_losses_equal_those_of_each_task_alone(tiny_config, params):
  rng = np.random.default_rng(2)
  vocab = tiny_config.vocab_size
  labels = [random_example(rng, vocab, LABEL, n, m) for n, m in [(4, 2), (6, 3), (5, 2)]]
  rationales = [random_example(rng, vocab, RATIONALE, n, m) for n, m in [(4, 10), (3, 8)]]
  mixed = pack_examples([[labels[0], rationales[0], labels[1]],
                         [rationales[1], labels[2]]])
  label_only = pack_examples([[labels[2]], [labels[0], labels[1]]])
  rationale_only = pack_examples([[rationales[1], rationales[0]]], targets_length=24)

  for normalization in model.LOSS_NORMALIZATIONS:
    summary = model.summarize_metrics(
        model.eval_loss(params, mixed, tiny_config, loss_normalization=normalization)[1])
    label_loss, _ = model.eval_loss(params, label_only, tiny_config,
                                    loss_normalization=normalization)
    rationale_loss, _ = model.eval_loss(params, rationale_only, tiny_config,
                                        loss_normalization=normalization)
    np.testing.assert_allclose(summary["label_loss"], label_loss, rtol=1e-5)
    np.testing.assert_allclose(summary["rationale_loss"], rationale_loss, rtol=1e-5)
    assert (summary["label_examples"], summary["rationale_examples"]) == (3, 2)
    assert (summary["label_tokens"], summary["rationale_tokens"]) == (7, 18)


def test_without_task_ids_everything_is_the_label_task(tiny_config, params):
  rng = np.random.default_rng(3)
  batch = pack_examples([[random_example(rng, tiny_config.vocab_size, RATIONALE, 4, 5)]])
  del batch["decoder_task_ids"]
  loss, metrics = model.eval_loss(params, batch, tiny_config)
  summary = model.summarize_metrics(metrics)
  np.testing.assert_allclose(summary["label_loss"], loss, rtol=1e-6)
  assert "rationale_loss" not in summary and summary["rationale_examples"] == 0


def test_unpacked_batch_without_segment_ids(tiny_config, params):
  rng = np.random.default_rng(4)
  rows = [[random_example(rng, tiny_config.vocab_size, LABEL, 4, m)] for m in (3, 6)]
  batch = {name: value for name, value in pack_examples(rows).items()
           if name.endswith("tokens") or name == "decoder_loss_weights"}
  token_losses = numpy_token_losses(params, tiny_config, batch, z_loss=0.0)
  loss, metrics = model.eval_loss(params, batch, tiny_config, z_loss=0.0)
  np.testing.assert_allclose(loss, (token_losses[0, :3].mean() + token_losses[1, :6].mean()) / 2,
                             rtol=1e-5)
  assert metrics["examples"] == 2
  np.testing.assert_allclose(model.score_batch(params, batch, tiny_config),
                             [-token_losses[0, :3].sum(), -token_losses[1, :6].sum()], rtol=1e-5)


def test_z_loss_is_reported_and_added(tiny_config, params):
  rng = np.random.default_rng(5)
  batch = pack_examples([[random_example(rng, tiny_config.vocab_size, LABEL, 4, 6)]])
  loss_without, _ = model.eval_loss(params, batch, tiny_config, z_loss=0.0)
  loss_with, metrics = model.eval_loss(params, batch, tiny_config, z_loss=0.1)
  summary = model.summarize_metrics(metrics)
  assert summary["z_loss"] > 0
  np.testing.assert_allclose(loss_with, loss_without + summary["z_loss"], rtol=1e-5)
  assert 0 <= summary["accuracy"] <= 1


def test_dropout_changes_the_loss(tiny_config, params):
  config = dataclasses.replace(tiny_config, dropout_rate=0.5)
  rng = np.random.default_rng(6)
  batch = pack_examples([[random_example(rng, config.vocab_size, LABEL, 6, 6)]])
  with_dropout, _ = model.loss_fn(params, batch, jax.random.key(1), config)
  without_dropout, _ = model.eval_loss(params, batch, config)
  assert with_dropout != without_dropout


def test_unknown_normalization(tiny_config, params):
  batch = pack_examples([[([2, 1], [3, 1], LABEL)]])
  with pytest.raises(ValueError, match="unknown loss_normalization 'per_batch'"):
    model.eval_loss(params, batch, tiny_config, loss_normalization="per_batch")

