"""The model wrapper around the T5 network, T5X's EncoderDecoderModel in functions: the
training loss (cross-entropy with z-loss, with the label and rationale tasks' parts reported
apart), the summary of loss metrics, and generation (`predict_batch`: greedy, beam or
sampled decoding with the key/value cache, over a network that never decodes by itself).

How alpha acts: the mixtures sample label and rationale examples at alpha : 1 - alpha. With
'per_example' normalization every example (a packed segment) weighs the same whatever
its length, so the expected loss is alpha * L_label + (1 - alpha) * L_rationale, as in
the paper. 'per_token' (T5X's) weighs examples by their length instead, which lets the
~10x longer rationales drown the labels. Per-input batches (the paper's batching) carry
token scales that make the loss exactly the paper's code's, alpha * (label-task token
mean) + (1 - alpha) * (rationale-task token mean) over the batch.

This module holds no optimizer, sharding, data-pipeline or vocabulary code, and must not
import TensorFlow.
"""
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsbs_jax import decoding
from dsbs_jax import distillation
from dsbs_jax.models import t5

LABEL_TASK_ID = distillation.TASK_IDS["label"]
RATIONALE_TASK_ID = distillation.TASK_IDS["rationale"]

LOSS_NORMALIZATIONS = ("per_example", "per_token")

Batch = dict[str, jax.Array]


def cross_entropy_with_z_loss(logits: jax.Array, targets: jax.Array,
                              z_loss: float) -> tuple[jax.Array, jax.Array]:
  """Per-token (cross-entropy + z-loss, z-loss) [batch, length], in float32.

  The z-loss, z_loss * log(Z)^2 with Z the softmax normalizer, keeps logits from drifting.
  """
  logits = logits.astype(jnp.float32)
  # [batch, length]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot product rather than a gather, so that a vocab split over devices stays split.
  target_logits = jnp.sum(jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32) * logits,
                          axis=-1)
  token_z_loss = z_loss * jnp.square(log_z)
  return log_z - target_logits + token_z_loss, token_z_loss


def _logits(params, batch: Batch, config: t5.T5Config,
            dropout_rng: Optional[jax.Array]) -> jax.Array:
  enable_dropout = dropout_rng is not None
  return t5.Transformer(config).apply(
      {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], batch.get("encoder_segment_ids"),
      batch.get("decoder_segment_ids"), batch.get("encoder_positions"),
      batch.get("decoder_positions"), enable_dropout=enable_dropout,
      rngs={"dropout": dropout_rng} if enable_dropout else None)


def _loss_weights(batch: Batch) -> jax.Array:
  targets = batch["decoder_target_tokens"]
  return batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)


def nonzero(normalizer: jax.Array) -> jax.Array:
  """The normalizer, or 1 where it is 0 (an empty batch, whose sums are 0 too)."""
  return jnp.where(normalizer > 0, normalizer, 1.0)


def _per_example_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Sums of `values` [batch, length] over each row's segments -> [batch, length + 1].

  Column s holds segment s of that row (segment ids count from 1; a row has at most
  `length` of them). Rows stay rows, so a batch split over devices stays split.
  """
  num_segments = values.shape[1] + 1
  return jax.vmap(lambda row, ids: jax.ops.segment_sum(row, ids, num_segments))(
      values, segment_ids)


def loss_terms(params, batch: Batch, dropout_rng: Optional[jax.Array], config: t5.T5Config,
               *, z_loss: float = 1e-4,
               loss_normalization: str = "per_example") -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss_sum, metrics): the loss is loss_sum / metrics['loss_normalizer'].

  Kept apart so that sums over microbatches (or devices) divide by the total normalizer:
  'per_example' sums each example's mean token loss and counts examples, 'per_token' sums
  token losses and counts tokens. A batch that carries `decoder_loss_scales` (per-input
  batches, see per_input_batches.py) overrides both: its loss is the sum of token losses
  times those scales, which already hold the normalization (they sum to 1 over a whole
  batch), and its label and rationale losses are per token. Every metric is a float32
  sum, safe to add across microbatches and steps; `summarize_metrics` turns them into means.
  `dropout_rng=None` disables dropout.
  """
  if loss_normalization not in LOSS_NORMALIZATIONS:
    raise ValueError(f"unknown loss_normalization {loss_normalization!r}: expected one of "
                     f"{LOSS_NORMALIZATIONS}")
  logits = _logits(params, batch, config, dropout_rng)
  targets = batch["decoder_target_tokens"]
  # [batch, length]
  weights = _loss_weights(batch)
  token_loss, token_z_loss = cross_entropy_with_z_loss(logits, targets, z_loss)
  task_ids = batch.get("decoder_task_ids")
  if task_ids is None:
    task_ids = jnp.full(targets.shape, LABEL_TASK_ID)
  label_weights = weights * (task_ids == LABEL_TASK_ID)
  rationale_weights = weights * (task_ids == RATIONALE_TASK_ID)

  segment_ids = batch.get("decoder_segment_ids")
  if segment_ids is None:
    segment_ids = jnp.ones(targets.shape, jnp.int32)
  # [batch, length + 1]: each segment's number of target tokens.
  example_tokens = _per_example_sums(weights, segment_ids)
  count_examples = lambda mask: jnp.sum(_per_example_sums(mask, segment_ids) > 0).astype(
      jnp.float32)
  counts = {
      "tokens": jnp.sum(weights),
      "label_tokens": jnp.sum(label_weights),
      "rationale_tokens": jnp.sum(rationale_weights),
      "examples": jnp.sum(example_tokens > 0).astype(jnp.float32),
      "label_examples": count_examples(label_weights),
      "rationale_examples": count_examples(rationale_weights),
  }
  scales = batch.get("decoder_loss_scales")
  if loss_normalization == "per_token" or scales is not None:
    reduce = lambda values, mask: jnp.sum(values * mask)
    unit = "tokens"
  else:
    # Slots without tokens sum to 0 whatever they are divided by.
    inverse_example_tokens = 1.0 / jnp.where(example_tokens > 0, example_tokens, 1.0)
    reduce = lambda values, mask: jnp.sum(
        _per_example_sums(values * mask, segment_ids) * inverse_example_tokens)
    unit = "examples"

  if scales is None:
    loss_sum, normalizer = reduce(token_loss, weights), counts[unit]
    z_loss_sum = reduce(token_z_loss, weights)
  else:
    scales = scales.astype(jnp.float32) * weights
    loss_sum, normalizer = jnp.sum(token_loss * scales), jnp.sum(scales)
    z_loss_sum = jnp.sum(token_z_loss * scales)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {
      "loss_sum": loss_sum,
      "loss_normalizer": normalizer,
      "z_loss_sum": z_loss_sum,
      "label_loss_sum": reduce(token_loss, label_weights),
      "label_loss_normalizer": counts[f"label_{unit}"],
      "rationale_loss_sum": reduce(token_loss, rationale_weights),
      "rationale_loss_normalizer": counts[f"rationale_{unit}"],
      "correct_tokens": jnp.sum(correct * weights),
      **counts,
  }
  return loss_sum, metrics


def summarize_metrics(metric_sums: dict[str, Any]) -> dict[str, float]:
  """Means from metric sums of one or many steps (added key by key), as Python floats.

  loss, z_loss, label_loss, rationale_loss, accuracy, and the counts. A task without
  examples gets no loss entry rather than a misleading 0. Keys that are not sums
  (e.g. grad_norm, learning_rate) pass through.
  """
  values = {key: float(np.asarray(value)) for key, value in jax.device_get(metric_sums).items()}
  summary = {}
  for name in ("loss", "z_loss", "label_loss", "rationale_loss"):
    normalizer_key = "loss_normalizer" if name == "z_loss" else f"{name}_normalizer"
    if values.get(normalizer_key, 0.0) > 0:
      summary[name] = values[f"{name}_sum"] / values[normalizer_key]
  if values.get("tokens", 0.0) > 0:
    summary["accuracy"] = values["correct_tokens"] / values["tokens"]
  consumed = {f"{name}_sum" for name in ("loss", "z_loss", "label_loss", "rationale_loss")}
  consumed |= {"loss_normalizer", "label_loss_normalizer", "rationale_loss_normalizer",
               "correct_tokens"}
  summary.update({key: value for key, value in values.items() if key not in consumed})
  return summary


# ------------------------------------------------------------------------------
# Generation with the key/value cache.
# ------------------------------------------------------------------------------
def init_decode_cache(params, config: t5.T5Config, encoded, encoder_input_tokens,
                      max_decode_length: int):
  """The 'cache' collection for decoding up to max_decode_length tokens.

  Cross-attention keys and values are computed here, once, from `encoded`.
  """
  dummy_targets = jnp.ones((encoded.shape[0], max_decode_length), jnp.int32)
  _, variables = t5.Transformer(config).apply(
      {"params": params}, encoded, encoder_input_tokens, dummy_targets, dummy_targets,
      enable_dropout=False, decode=True, max_decode_length=max_decode_length,
      mutable=["cache"], method=t5.Transformer.decode)
  return variables["cache"]


def make_tokens_to_logits(params, config: t5.T5Config, encoded, encoder_input_tokens,
                          max_decode_length: int):
  """The `tokens_to_logits(ids [batch, 1], cache) -> (logits [batch, vocab], cache)` step."""
  model = t5.Transformer(config)

  def tokens_to_logits(ids, cache):
    logits, variables = model.apply(
        {"params": params, "cache": cache}, encoded, encoder_input_tokens, ids, ids,
        enable_dropout=False, decode=True, max_decode_length=max_decode_length,
        mutable=["cache"], method=t5.Transformer.decode)
    return logits[:, 0], variables["cache"]

  return tokens_to_logits


@functools.partial(jax.jit, static_argnames=(
    "config", "max_decode_length", "method", "num_beams", "top_k"))
def predict_batch(params, config: t5.T5Config, encoder_input_tokens, max_decode_length: int,
                  method: str = "greedy", num_beams: int = 4, length_penalty: float = 0.6,
                  temperature: float = 1.0, top_k: int = 0,
                  rng: Optional[jax.Array] = None) -> jax.Array:
  """Generated ids [batch, max_decode_length]: no start token, 0 after EOS.

  method: 'greedy', 'beam' (best of num_beams, ranked with `length_penalty`), or 'sample'
  (temperature, optional top_k; needs rng).
  """
  batch_size = encoder_input_tokens.shape[0]
  encoded = t5.Transformer(config).apply(
      {"params": params}, encoder_input_tokens, enable_dropout=False,
      method=t5.Transformer.encode)
  if method == "beam":
    # Beam b of example i lives in row i * num_beams + b of everything the decoder sees.
    encoded = jnp.repeat(encoded, num_beams, axis=0)
    encoder_input_tokens = jnp.repeat(encoder_input_tokens, num_beams, axis=0)
  cache = init_decode_cache(params, config, encoded, encoder_input_tokens, max_decode_length)
  tokens_to_logits = make_tokens_to_logits(params, config, encoded, encoder_input_tokens,
                                           max_decode_length)
  if method == "greedy":
    return decoding.greedy_search(tokens_to_logits, cache, batch_size, max_decode_length,
                                  eos_id=t5.EOS_ID)
  if method == "sample":
    if rng is None:
      raise ValueError("method='sample' needs rng")
    return decoding.temperature_sample(
        tokens_to_logits, cache, rng, batch_size, max_decode_length,
        temperature=temperature, top_k=top_k, eos_id=t5.EOS_ID)
  if method == "beam":
    sequences, _ = decoding.beam_search(
        tokens_to_logits, cache, batch_size, max_decode_length, num_beams=num_beams,
        length_penalty=length_penalty, eos_id=t5.EOS_ID)
    return sequences[:, 0]
  raise ValueError(f"unknown decoding method {method!r}: expected greedy, beam or sample")
