"""SVAMP math word problems with PaLM rationales: label is an equation, scored by its value."""
from dsbs_jax import data
from dsbs_jax import metrics

SPEC = data.DatasetSpec(name="svamp", metric_fn=metrics.equation_accuracy)
data.register_dataset(SPEC)
