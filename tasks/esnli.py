"""e-SNLI with PaLM rationales; train inputs are not in the paper's release and are joined."""
from dsbs_jax import data
from dsbs_jax import metrics

SPEC = data.DatasetSpec(
    name="esnli", metric_fn=metrics.exact_match_accuracy,
    train_inputs_hint=("the JSONL that the paper's data_utils.py writes from Hugging Face's "
                       "`esnli` train split (esnli_train.json: premise, hypothesis, label), "
                       "or 'tfds:esnli'"))
data.register_dataset(SPEC)
