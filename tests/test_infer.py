"""Tests for dsbs_jax.infer: tokenization as training does it."""
import numpy as np
import seqio

from dsbs_jax import datasets
from dsbs_jax import infer


def test_raw_inputs_tokenize_as_the_training_pipeline_does():
  datasets.register_all()
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
