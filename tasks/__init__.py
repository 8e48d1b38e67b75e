"""Importing this package registers every dataset's SeqIO tasks and mixtures: the paper's four
benchmarks and the custom datasets named in gin (dsbs_jax.datasets.register_all).

T5X's gin files import it (gin/t5x/tasks.gin), as scripts may; run-time choices (alpha,
training-data fraction, prefixes, vocabulary) come from gin through
dsbs_jax.distillation.TaskOptions. Custom datasets bound after this import are registered
when gin is finalized, as T5X does after parsing. Nothing else belongs here.
"""
from dsbs_jax import datasets

TASK_NAMES = datasets.register_all()
