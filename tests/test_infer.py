"""Tests for dsbs_jax.infer: tokenization as training does it, and padding trimmed for decoding."""
import jax
import numpy as np
import seqio

import tasks  # noqa: F401  (registers the tasks)
from dsbs_jax import infer
from dsbs_jax.models import t5


def test_raw_inputs_tokenize_as_the_training_pipeline_does():
  task = seqio.get_mixture_or_task("esnli_label_gold")
  lengths = {"inputs": 96, "targets": 8}
  examples = list(task.get_dataset(lengths, split="validation", shuffle=False).take(4)
                  .as_numpy_iterator())
  vocabulary = task.output_features["inputs"].vocabulary
  texts = [example["inputs_pretokenized"].decode() for example in examples]
  tokens = infer.tokenize_inputs(vocabulary, texts, lengths["inputs"])
  for row, example in zip(tokens, examples):
    np.testing.assert_array_equal(row[:len(example["inputs"])], example["inputs"])
    assert not row[len(example["inputs"]):].any()


def test_trim_padding_keeps_every_token_in_a_bucket():
  tokens = np.zeros((3, 256), np.int32)
  tokens[0, :40] = 5
  tokens[1, :70] = 5
  trimmed = infer.trim_padding(tokens)
  assert trimmed.shape == (3, 96)
  np.testing.assert_array_equal(trimmed, tokens[:, :96])
  assert infer.trim_padding(np.zeros((2, 256), np.int32)).shape == (2, 32)


def test_decoding_does_not_depend_on_trailing_padding(tiny_config):
  params = t5.init_params(tiny_config, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = np.zeros((4, 128), np.int32)
  for row, length in enumerate((5, 17, 30, 9)):
    tokens[row, :length] = rng.integers(2, tiny_config.vocab_size, length)
  full = t5.predict_batch(params, tiny_config, tokens, 12)
  trimmed = t5.predict_batch(params, tiny_config, infer.trim_padding(tokens), 12)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(trimmed))
