"""Autoregressive decoding as pure functions over a one-token step: greedy search,
temperature / top-k sampling, and beam search with T5X's length penalty.

The step is `tokens_to_logits(ids [rows, 1], cache) -> (logits [rows, vocab], new_cache)`:
it feeds the last token of every sequence and returns next-token logits. The cache is
any pytree; its leaves with a leading row dimension are per-sequence and get reordered
with the beams, scalar leaves (a cache index) are shared. Every loop stops early, in a
`lax.while_loop`, once all sequences have ended. Outputs exclude the start token and
hold 0 after EOS.

`trim_padding` shapes the encoder inputs of a decoding batch. Nothing here knows about a
model, parameters or vocabularies.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

LENGTH_BUCKET = 32


def trim_padding(encoder_tokens: np.ndarray, bucket: int = LENGTH_BUCKET) -> np.ndarray:
  """Drops padding columns past the longest row, keeping a multiple of `bucket` columns.

  Decoding then pays for the batch's longest input rather than the run's input length, and
  the bucketing bounds how many shapes get compiled.
  """
  longest = int(np.max(np.sum(encoder_tokens > 0, axis=1), initial=1))
  return encoder_tokens[:, :min(encoder_tokens.shape[1], -(-longest // bucket) * bucket)]


TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

# Log-probability of impossible hypotheses; finite so that arithmetic on it stays NaN-free.
NEG_INF = -1.0e7


def greedy_search(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int,
                  max_decode_length: int, *, eos_id: int = 1,
                  start_id: int = 0) -> jax.Array:
  """The most likely token at every step: ids [batch, max_decode_length]."""
  choose_argmax = lambda logits, rng: jnp.argmax(logits, axis=-1)
  return _sampling_loop(tokens_to_logits, cache, jax.random.key(0), batch_size,
                        max_decode_length, choose_argmax, eos_id, start_id)


def temperature_sample(tokens_to_logits: TokensToLogits, cache: Any, rng: jax.Array,
                       batch_size: int, max_decode_length: int, *,
                       temperature: float = 1.0, top_k: int = 0, eos_id: int = 1,
                       start_id: int = 0) -> jax.Array:
  """Tokens drawn from softmax(logits / temperature), restricted to the top_k if > 0."""

  def choose_sample(logits, step_rng):
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
      kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth_largest, NEG_INF, logits)
    return jax.random.categorical(step_rng, logits, axis=-1)

  return _sampling_loop(tokens_to_logits, cache, rng, batch_size, max_decode_length,
                        choose_sample, eos_id, start_id)


def _sampling_loop(tokens_to_logits, cache, rng, batch_size, max_decode_length,
                   choose_token, eos_id, start_id):
  """One token per sequence per step, chosen by `choose_token(logits, rng)`."""
  sequences = jnp.zeros((batch_size, max_decode_length), jnp.int32)
  last_tokens = jnp.full((batch_size,), start_id, jnp.int32)
  ended = jnp.zeros((batch_size,), bool)

  def not_done(state):
    step, _, _, ended, _, _ = state
    return (step < max_decode_length) & ~jnp.all(ended)

  def decode_step(state):
    step, sequences, last_tokens, ended, cache, rng = state
    rng, step_rng = jax.random.split(rng)
    logits, cache = tokens_to_logits(last_tokens[:, None], cache)
    tokens = jnp.where(ended, 0, choose_token(logits, step_rng)).astype(jnp.int32)
    sequences = sequences.at[:, step].set(tokens)
    return step + 1, sequences, tokens, ended | (tokens == eos_id), cache, rng

  state = (jnp.array(0), sequences, last_tokens, ended, cache, rng)
  return jax.lax.while_loop(not_done, decode_step, state)[1]


def brevity_penalty(length: jax.Array, length_penalty: float) -> jax.Array:
  """GNMT's length normalizer used by T5X: ((5 + length) / 6) ** length_penalty."""
  return ((5.0 + length) / 6.0) ** length_penalty


def beam_search(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int,
                max_decode_length: int, *, num_beams: int, length_penalty: float = 0.6,
                eos_id: int = 1, start_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Beam search; returns (sequences [batch, beams, length], scores [batch, beams]), best first.

  The cache must hold batch_size * num_beams rows, beam b of example i in row
  i * num_beams + b. A finished hypothesis (ended by EOS, or by reaching
  max_decode_length) scores log P / brevity_penalty(its length, length_penalty), T5X's
  `alpha`; length_penalty=0 ranks by log-probability alone, and then equals transformers'
  beam search with length_penalty=0 (which divides by length ** length_penalty). The
  search stops once no live beam can overtake the worst of the num_beams finished ones.
  """
  beams, length = num_beams, max_decode_length
  rows = batch_size * beams
  # Only beam 0 is live at first, so the first step does not pick one token num_beams times.
  alive_log_probs = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1)), (batch_size, 1))
  state = dict(
      step=jnp.array(0),
      alive_sequences=jnp.zeros((batch_size, beams, length), jnp.int32),
      alive_log_probs=alive_log_probs,
      last_tokens=jnp.full((batch_size, beams), start_id, jnp.int32),
      finished_sequences=jnp.zeros((batch_size, beams, length), jnp.int32),
      finished_scores=jnp.full((batch_size, beams), NEG_INF),
      cache=cache)

  def not_done(state):
    # Log-probabilities only fall as sequences grow and the penalty peaks at full
    # length, so this bounds every live beam's final score.
    best_reachable = (jnp.max(state["alive_log_probs"], axis=1)
                      / brevity_penalty(length, length_penalty))
    worst_finished = jnp.min(state["finished_scores"], axis=1)
    return (state["step"] < length) & ~jnp.all(worst_finished > best_reachable)

  def beam_step(state):
    step = state["step"]
    logits, cache = tokens_to_logits(state["last_tokens"].reshape(rows, 1), state["cache"])
    vocab_size = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch_size, beams, -1)
    # [batch, beams * vocab] -> the 2 * beams best extensions.
    extended = (state["alive_log_probs"][:, :, None] + log_probs).reshape(batch_size, -1)
    top_log_probs, top_index = jax.lax.top_k(extended, 2 * beams)
    source_beam, tokens = top_index // vocab_size, top_index % vocab_size
    sequences = jnp.take_along_axis(state["alive_sequences"], source_beam[:, :, None], axis=1)
    sequences = sequences.at[:, :, step].set(tokens)
    is_eos = tokens == eos_id

    # Live: the best beams that did not just end (at most `beams` of 2 * beams did).
    live_log_probs, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_log_probs), beams)
    keep_rows = (jnp.take_along_axis(source_beam, keep, axis=1)
                 + jnp.arange(batch_size)[:, None] * beams).reshape(rows)
    cache = jax.tree.map(lambda x: x[keep_rows] if x.ndim else x, cache)

    # Finished: the best of those already finished and those ending now. As in fairseq
    # and transformers (not T5X), only the top `beams` extensions may end: one ranked
    # lower would not have survived as a beam either.
    ends = (is_eos | (step + 1 == length)) & (jnp.arange(2 * beams) < beams)
    new_scores = jnp.where(ends, top_log_probs / brevity_penalty(step + 1, length_penalty), NEG_INF)
    finished_scores, best = jax.lax.top_k(
        jnp.concatenate([state["finished_scores"], new_scores], axis=1), beams)
    finished_sequences = jnp.take_along_axis(
        jnp.concatenate([state["finished_sequences"], sequences], axis=1), best[:, :, None],
        axis=1)
    return dict(
        step=step + 1,
        alive_sequences=jnp.take_along_axis(sequences, keep[:, :, None], axis=1),
        alive_log_probs=live_log_probs,
        last_tokens=jnp.take_along_axis(tokens, keep, axis=1),
        finished_sequences=finished_sequences,
        finished_scores=finished_scores,
        cache=cache)

  final = jax.lax.while_loop(not_done, beam_step, state)
  return final["finished_sequences"], final["finished_scores"]
