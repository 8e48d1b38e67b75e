"""CommonsenseQA (via CoS-E v1.11) with PaLM rationales: label is the chosen answer text."""
from dsbs_jax import data
from dsbs_jax import metrics

SPEC = data.DatasetSpec(name="cqa", metric_fn=metrics.exact_match_accuracy)
data.register_dataset(SPEC)
