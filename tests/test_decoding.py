"""Tests for dsbs_jax.decoding and t5.predict_batch: exact toy cases, cache equals full
recomputation, identical outputs to transformers' generate on random tiny models with the
layers unrolled or scanned, and padding trimmed from decoding inputs."""
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_t5
from dsbs_jax import convert
from dsbs_jax import decoding
from dsbs_jax.models import t5

MAX_LENGTH = 12


def padded_inputs(seed: int = 0) -> np.ndarray:
  rng = np.random.RandomState(seed)
  tokens = rng.randint(2, 128, size=(6, 10))
  tokens[:, -1] = 1
  tokens[1, 6:] = 0
  tokens[2, 3:] = 0
  return tokens


# ------------------------------------------------------------------------------
# Toy language models over a tiny vocabulary; the cache is unused.
# ------------------------------------------------------------------------------
def bigram_tokens_to_logits(log_probs: np.ndarray):
  """Next-token log-probabilities depend on the last token only."""
  table = jnp.asarray(log_probs)
  return lambda ids, cache: (table[ids[:, 0]], cache)


def best_by_enumeration(log_probs, max_length, alpha, eos_id=1):
  """Highest-scoring sequence (ended by EOS or at max_length), by trying them all."""
  best, best_score = None, -np.inf
  vocab_size = log_probs.shape[0]
  for length in range(1, max_length + 1):
    for sequence in itertools.product(range(vocab_size), repeat=length):
      if eos_id in sequence[:-1] or (length < max_length and sequence[-1] != eos_id):
        continue
      tokens = (0,) + sequence
      total = sum(log_probs[a, b] for a, b in zip(tokens, tokens[1:]))
      score = total / ((5 + length) / 6) ** alpha
      if score > best_score:
        best, best_score = list(sequence) + [0] * (max_length - length), score
  return best, best_score


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_with_enough_beams_finds_the_best_sequence(alpha):
  rng = np.random.RandomState(1)
  vocab_size, max_length, beams = 3, 3, 9  # 9 beams keep every prefix alive: exact
  log_probs = np.asarray(jax.nn.log_softmax(2.0 * rng.randn(vocab_size, vocab_size)))
  sequences, scores = decoding.beam_search(
      bigram_tokens_to_logits(log_probs), None, 1, max_length, num_beams=beams, alpha=alpha)
  expected, expected_score = best_by_enumeration(log_probs, max_length, alpha)
  assert sequences[0, 0].tolist() == expected
  np.testing.assert_allclose(scores[0, 0], expected_score, rtol=1e-5)
  assert np.all(np.diff(np.asarray(scores[0])) <= 0)  # best first


def test_greedy_and_top_1_sampling_follow_the_argmax_and_stop_at_eos():
  log_probs = np.log(np.array([[0.1, 0.2, 0.7], [1 / 3] * 3, [0.1, 0.6, 0.3]]))
  step = bigram_tokens_to_logits(log_probs)
  greedy = decoding.greedy_search(step, None, 2, 5)
  assert greedy.tolist() == [[2, 1, 0, 0, 0]] * 2
  sampled = decoding.temperature_sample(step, None, jax.random.key(0), 2, 5, top_k=1)
  assert sampled.tolist() == greedy.tolist()


def test_sampling_follows_the_distribution_and_the_rng():
  log_probs = np.log(np.array([[0.1, 0.3, 0.6], [1 / 3] * 3, [0.1, 0.3, 0.6]]))
  step = bigram_tokens_to_logits(log_probs)
  first = decoding.temperature_sample(step, None, jax.random.key(0), 4000, 1)[:, 0]
  frequencies = np.bincount(np.asarray(first), minlength=3) / 4000
  np.testing.assert_allclose(frequencies, [0.1, 0.3, 0.6], atol=0.03)
  again = decoding.temperature_sample(step, None, jax.random.key(0), 4000, 1)[:, 0]
  assert np.array_equal(first, again)
  sharp = decoding.temperature_sample(step, None, jax.random.key(1), 4000, 1,
                                      temperature=0.05)[:, 0]
  assert np.mean(np.asarray(sharp) == 2) > 0.99


# ------------------------------------------------------------------------------
# The T5 model: cached decoding, and equality with transformers.
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
      t5.make_tokens_to_logits(params, tiny_config, encoded, tokens, MAX_LENGTH))
  cache = jax.jit(t5.init_decode_cache, static_argnums=(1, 4))(
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
  np.testing.assert_array_equal(t5.predict_batch(params, tiny_config, tokens, MAX_LENGTH),
                                greedy_full)


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
  torch = pytest.importorskip("torch")
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
  tokens = padded_inputs()
  expected = hf_generate(hf_model, tokens, num_beams=1)
  ended_early = [(row == 1).any() and row[-1] == 0 for row in expected]
  assert any(ended_early) and not all(ended_early)  # the comparison covers both
  np.testing.assert_array_equal(t5.predict_batch(params, config, tokens, MAX_LENGTH), expected)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_beam_search_matches_transformers_generate(hf_and_ours, scan_layers):
  # Beam search reorders the cache's rows; scanned layers keep theirs on axis 0 too.
  hf_model, params, config = hf_and_ours
  config = dataclasses.replace(config, scan_layers=scan_layers)
  tokens = padded_inputs(seed=1)
  # transformers divides by length ** length_penalty, T5X by ((5 + length) / 6) ** alpha:
  # they agree when both are 0.
  expected = hf_generate(hf_model, tokens, num_beams=4, length_penalty=0.0,
                         early_stopping=False)
  ended_early = [(row == 1).any() and row[-1] == 0 for row in expected]
  assert any(ended_early) and not all(ended_early)
  ours = t5.predict_batch(params, config, tokens, MAX_LENGTH, method="beam", num_beams=4,
                          alpha=0.0)
  np.testing.assert_array_equal(ours, expected)


def test_predict_batch_sampling_is_reproducible(tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(0))
  tokens = jnp.asarray(padded_inputs())
  sample = lambda seed: t5.predict_batch(params, tiny_config, tokens, MAX_LENGTH,
                                         method="sample", top_k=8, rng=jax.random.key(seed))
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))
  with pytest.raises(ValueError, match="needs rng"):
    t5.predict_batch(params, tiny_config, tokens, MAX_LENGTH, method="sample")


def test_trim_padding_keeps_every_token_in_a_bucket():
  tokens = np.zeros((3, 256), np.int32)
  tokens[0, :40] = 5
  tokens[1, :70] = 5
  trimmed = decoding.trim_padding(tokens)
  assert trimmed.shape == (3, 96)
  np.testing.assert_array_equal(trimmed, tokens[:, :96])
  assert decoding.trim_padding(np.zeros((2, 256), np.int32)).shape == (2, 32)


def test_decoding_does_not_depend_on_trailing_padding(tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = np.zeros((4, 128), np.int32)
  for row, length in enumerate((5, 17, 30, 9)):
    tokens[row, :length] = rng.integers(2, tiny_config.vocab_size, length)
  full = t5.predict_batch(params, tiny_config, tokens, 12)
  trimmed = t5.predict_batch(params, tiny_config, decoding.trim_padding(tokens), 12)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(trimmed))
