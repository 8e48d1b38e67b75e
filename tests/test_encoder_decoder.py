"""Tests of the model wrapper: cross-entropy with z-loss, per-example and per-token
normalization, the label/rationale decomposition of packed batches; and generation: cached
decoding equal to full recomputation, and identical outputs to transformers' generate on
random tiny models with the layers unrolled or scanned."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_t5
from dsbs_jax import convert
from dsbs_jax import decoding
from dsbs_jax import distillation
from dsbs_jax import encoder_decoder
from dsbs_jax.models import t5

LABEL, RATIONALE = distillation.TASK_IDS["label"], distillation.TASK_IDS["rationale"]
MAX_LENGTH = 12
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


def mean_loss(params, batch, config, dropout_rng=None, **options):
  """(loss, metric sums) as the trainer takes them: loss_terms' sum over its normalizer."""
  loss_sum, metrics = encoder_decoder.loss_terms(params, batch, dropout_rng, config, **options)
  return loss_sum / encoder_decoder.nonzero(metrics["loss_normalizer"]), metrics


def numpy_token_losses(params, config, batch, z_loss):
  """Per-token cross-entropy + z-loss [batch, length] computed in NumPy from the logits."""
  logits = np.asarray(encoder_decoder._logits(params, batch, config, None), np.float64)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  targets = batch["decoder_target_tokens"]
  target_logits = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return log_z - target_logits + z_loss * log_z**2


def test_cross_entropy_with_z_loss_matches_numpy():
  logits = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32) * 3
  targets = np.array([[0, 6, 3], [2, 2, 5]])
  token_loss, token_z_loss = encoder_decoder.cross_entropy_with_z_loss(logits, targets, 1e-2)
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

  loss, metrics = mean_loss(params, batch, tiny_config)
  np.testing.assert_allclose(loss, np.mean(example_means), rtol=1e-5)
  assert metrics["loss_normalizer"] == metrics["examples"] == 3
  np.testing.assert_allclose(metrics["label_loss_sum"], example_means[0] + example_means[2],
                             rtol=1e-5)
  loss, metrics = mean_loss(params, batch, tiny_config, loss_normalization="per_token")
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

  for normalization in encoder_decoder.LOSS_NORMALIZATIONS:
    summary = encoder_decoder.summarize_metrics(
        mean_loss(params, mixed, tiny_config, loss_normalization=normalization)[1])
    label_loss, _ = mean_loss(params, label_only, tiny_config,
                                    loss_normalization=normalization)
    rationale_loss, _ = mean_loss(params, rationale_only, tiny_config,
                                        loss_normalization=normalization)
    np.testing.assert_allclose(summary["label_loss"], label_loss, rtol=1e-5)
    np.testing.assert_allclose(summary["rationale_loss"], rationale_loss, rtol=1e-5)
    assert (summary["label_examples"], summary["rationale_examples"]) == (3, 2)
    assert (summary["label_tokens"], summary["rationale_tokens"]) == (7, 18)


def test_without_task_ids_everything_is_the_label_task(tiny_config, params):
  rng = np.random.default_rng(3)
  batch = pack_examples([[random_example(rng, tiny_config.vocab_size, RATIONALE, 4, 5)]])
  del batch["decoder_task_ids"]
  loss, metrics = mean_loss(params, batch, tiny_config)
  summary = encoder_decoder.summarize_metrics(metrics)
  np.testing.assert_allclose(summary["label_loss"], loss, rtol=1e-6)
  assert "rationale_loss" not in summary and summary["rationale_examples"] == 0


def test_unpacked_batch_without_segment_ids(tiny_config, params):
  rng = np.random.default_rng(4)
  rows = [[random_example(rng, tiny_config.vocab_size, LABEL, 4, m)] for m in (3, 6)]
  batch = {name: value for name, value in pack_examples(rows).items()
           if name.endswith("tokens") or name == "decoder_loss_weights"}
  token_losses = numpy_token_losses(params, tiny_config, batch, z_loss=0.0)
  loss, metrics = mean_loss(params, batch, tiny_config, z_loss=0.0)
  np.testing.assert_allclose(loss, (token_losses[0, :3].mean() + token_losses[1, :6].mean()) / 2,
                             rtol=1e-5)
  assert metrics["examples"] == 2


def test_z_loss_is_reported_and_added(tiny_config, params):
  rng = np.random.default_rng(5)
  batch = pack_examples([[random_example(rng, tiny_config.vocab_size, LABEL, 4, 6)]])
  loss_without, _ = mean_loss(params, batch, tiny_config, z_loss=0.0)
  loss_with, metrics = mean_loss(params, batch, tiny_config, z_loss=0.1)
  summary = encoder_decoder.summarize_metrics(metrics)
  assert summary["z_loss"] > 0
  np.testing.assert_allclose(loss_with, loss_without + summary["z_loss"], rtol=1e-5)
  assert 0 <= summary["accuracy"] <= 1


def test_dropout_changes_the_loss(tiny_config, params):
  config = dataclasses.replace(tiny_config, dropout_rate=0.5)
  rng = np.random.default_rng(6)
  batch = pack_examples([[random_example(rng, config.vocab_size, LABEL, 6, 6)]])
  with_dropout, _ = mean_loss(params, batch, config, jax.random.key(1))
  without_dropout, _ = mean_loss(params, batch, config)
  assert with_dropout != without_dropout


def test_unknown_normalization(tiny_config, params):
  batch = pack_examples([[([2, 1], [3, 1], LABEL)]])
  with pytest.raises(ValueError, match="unknown loss_normalization 'per_batch'"):
    mean_loss(params, batch, tiny_config, loss_normalization="per_batch")


def padded_inputs(seed: int = 0) -> np.ndarray:
  rng = np.random.RandomState(seed)
  tokens = rng.randint(2, 128, size=(6, 10))
  tokens[:, -1] = 1
  tokens[1, 6:] = 0
  tokens[2, 3:] = 0
  return tokens


# ------------------------------------------------------------------------------
# Generation: cached decoding, and equality with transformers.
# ------------------------------------------------------------------------------
def uncached_tokens_to_logits(params, config, encoder_tokens, max_length):
  """A step that reruns the whole decoder on the prefix: the cache is just the prefix."""
  model = t5.Transformer(config)

  def tokens_to_logits(ids, prefix):
    tokens = prefix["tokens"].at[:, prefix["index"]].set(ids[:, 0])
    logits = model.apply({"params": params}, jnp.asarray(encoder_tokens), tokens,
                         jnp.ones_like(tokens), enable_dropout=False)
    return logits[:, prefix["index"]], {"tokens": tokens, "index": prefix["index"] + 1}

  empty = {"tokens": jnp.zeros((encoder_tokens.shape[0], max_length), jnp.int32),
           "index": jnp.array(0)}
  return tokens_to_logits, empty


def test_cached_decoding_equals_full_recomputation(tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(0))
  tokens = jnp.asarray(padded_inputs())
  model = t5.Transformer(tiny_config)
  encoded = jax.jit(functools.partial(model.apply, enable_dropout=False,
                                      method=t5.Transformer.encode))({"params": params}, tokens)
  cached_step = jax.jit(
      encoder_decoder.make_tokens_to_logits(params, tiny_config, encoded, tokens, MAX_LENGTH))
  cache = jax.jit(encoder_decoder.init_decode_cache, static_argnums=(1, 4))(
      params, tiny_config, encoded, tokens, MAX_LENGTH)
  full_step, empty_prefix = uncached_tokens_to_logits(params, tiny_config, tokens, MAX_LENGTH)
  jitted_full_step, prefix = jax.jit(full_step), empty_prefix
  rng = np.random.RandomState(0)
  for _ in range(MAX_LENGTH):  # teacher-forced random tokens: every position is compared
    ids = jnp.asarray(rng.randint(2, 128, size=(tokens.shape[0], 1)))
    cached_logits, cache = cached_step(ids, cache)
    full_logits, prefix = jitted_full_step(ids, prefix)
    np.testing.assert_allclose(cached_logits, full_logits, atol=1e-5, rtol=1e-5)
  greedy_full = jax.jit(decoding.greedy_search, static_argnums=(0, 2, 3))(
      full_step, empty_prefix, tokens.shape[0], MAX_LENGTH)
  np.testing.assert_array_equal(
      encoder_decoder.predict_batch(params, tiny_config, tokens, MAX_LENGTH), greedy_full)


@pytest.fixture(scope="module", params=[("v1.1", 20.0), ("v1.0", 3.0)], ids=["v1.1", "v1.0"])
def hf_and_ours(request, tmp_path_factory):
  """A random transformers model and the same model converted to ours."""
  version, eos_boost = request.param
  hf_model = make_hf_t5(version, eos_boost=eos_boost)
  directory = tmp_path_factory.mktemp(version)
  hf_model.save_pretrained(directory)
  params, config = convert.convert_hf(directory)
  return hf_model, params, config


def hf_generate(hf_model, encoder_tokens, **kwargs):
  import torch  # pylint: disable=import-outside-toplevel  (slow to import: only where used)
  inputs = torch.tensor(encoder_tokens)
  output = hf_model.generate(
      inputs, attention_mask=inputs > 0, max_new_tokens=MAX_LENGTH, min_new_tokens=0,
      do_sample=False, num_return_sequences=1, **kwargs).numpy()[:, 1:]  # drop the start
  # Beam search pads finished rows with EOS; ours pads with 0.
  after_eos = np.cumsum(np.cumsum(output == 1, axis=1), axis=1) > 1
  output = np.where(after_eos, 0, output)
  return np.pad(output, ((0, 0), (0, MAX_LENGTH - output.shape[1])))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_matches_transformers_generate(hf_and_ours, scan_layers):
  hf_model, params, config = hf_and_ours
  config = dataclasses.replace(config, scan_layers=scan_layers)
  params = t5.params_in_layout(params, stacked=scan_layers)
  tokens = padded_inputs()
  expected = hf_generate(hf_model, tokens, num_beams=1)
  ended_early = [(row == 1).any() and row[-1] == 0 for row in expected]
  assert any(ended_early) and not all(ended_early)  # the comparison covers both
  np.testing.assert_array_equal(encoder_decoder.predict_batch(params, config, tokens, MAX_LENGTH),
                                expected)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_beam_search_matches_transformers_generate(hf_and_ours, scan_layers):
  # Beam search reorders the cache's rows; scanned layers keep theirs on axis 0 too.
  hf_model, params, config = hf_and_ours
  config = dataclasses.replace(config, scan_layers=scan_layers)
  params = t5.params_in_layout(params, stacked=scan_layers)
  tokens = padded_inputs(seed=1)
  # transformers divides by length ** length_penalty, we (as T5X) by
  # ((5 + length) / 6) ** length_penalty: they agree when both are 0.
  expected = hf_generate(hf_model, tokens, num_beams=4, length_penalty=0.0,
                         early_stopping=False)
  ended_early = [(row == 1).any() and row[-1] == 0 for row in expected]
  assert any(ended_early) and not all(ended_early)
  ours = encoder_decoder.predict_batch(params, config, tokens, MAX_LENGTH, method="beam",
                                       num_beams=4, length_penalty=0.0)
  np.testing.assert_array_equal(ours, expected)


def test_predict_batch_sampling_is_reproducible(tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(0))
  tokens = jnp.asarray(padded_inputs())
  sample = lambda seed: encoder_decoder.predict_batch(
      params, tiny_config, tokens, MAX_LENGTH, method="sample", top_k=8, rng=jax.random.key(seed))
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))
  with pytest.raises(ValueError, match="needs rng"):
    encoder_decoder.predict_batch(params, tiny_config, tokens, MAX_LENGTH, method="sample")


def test_decoding_does_not_depend_on_trailing_padding(tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = np.zeros((4, 128), np.int32)
  for row, length in enumerate((5, 17, 30, 9)):
    tokens[row, :length] = rng.integers(2, tiny_config.vocab_size, length)
  full = encoder_decoder.predict_batch(params, tiny_config, tokens, 12)
  trimmed = encoder_decoder.predict_batch(params, tiny_config, decoding.trim_padding(tokens), 12)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(trimmed))
