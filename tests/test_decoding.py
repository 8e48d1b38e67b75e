"""Tests for dsbs_jax.decoding: exact toy cases of greedy search, sampling and beam search with
its length penalty, and padding trimmed from decoding inputs (the T5 model's generation is
tested in test_encoder_decoder.py)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbs_jax import decoding


# ------------------------------------------------------------------------------
# Toy language models over a tiny vocabulary; the cache is unused.
# ------------------------------------------------------------------------------
def bigram_tokens_to_logits(log_probs: np.ndarray):
  """Next-token log-probabilities depend on the last token only."""
  table = jnp.asarray(log_probs)
  return lambda ids, cache: (table[ids[:, 0]], cache)


def best_by_enumeration(log_probs, max_length, length_penalty, eos_id=1):
  """Highest-scoring sequence (ended by EOS or at max_length), by trying them all."""
  best, best_score = None, -np.inf
  vocab_size = log_probs.shape[0]
  for length in range(1, max_length + 1):
    for sequence in itertools.product(range(vocab_size), repeat=length):
      if eos_id in sequence[:-1] or (length < max_length and sequence[-1] != eos_id):
        continue
      tokens = (0,) + sequence
      total = sum(log_probs[a, b] for a, b in zip(tokens, tokens[1:]))
      score = total / ((5 + length) / 6) ** length_penalty
      if score > best_score:
        best, best_score = list(sequence) + [0] * (max_length - length), score
  return best, best_score


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 2.0])
def test_beam_search_with_enough_beams_finds_the_best_sequence(length_penalty):
  rng = np.random.RandomState(1)
  vocab_size, max_length, beams = 3, 3, 9  # 9 beams keep every prefix alive: exact
  log_probs = np.asarray(jax.nn.log_softmax(2.0 * rng.randn(vocab_size, vocab_size)))
  sequences, scores = decoding.beam_search(
      bigram_tokens_to_logits(log_probs), None, 1, max_length, num_beams=beams,
      length_penalty=length_penalty)
  expected, expected_score = best_by_enumeration(log_probs, max_length, length_penalty)
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


def test_trim_padding_keeps_every_token_in_a_bucket():
  tokens = np.zeros((3, 256), np.int32)
  tokens[0, :40] = 5
  tokens[1, :70] = 5
  trimmed = decoding.trim_padding(tokens)
  assert trimmed.shape == (3, 96)
  np.testing.assert_array_equal(trimmed, tokens[:, :96])
  assert decoding.trim_padding(np.zeros((2, 256), np.int32)).shape == (2, 32)
