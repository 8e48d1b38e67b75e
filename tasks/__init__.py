"""Importing this package registers every dataset's SeqIO tasks and mixtures.

Per dataset <ds>: tasks <ds>_label_gold, <ds>_label_teacher, <ds>_rationale and mixtures
<ds>_finetune, <ds>_distill, <ds>_dsbs_gold, <ds>_dsbs_teacher. Run-time choices (alpha,
training-data fraction, prefixes, vocabulary) come from gin through
dsbs_jax.data.TaskOptions. Custom datasets named in gin (register_custom_datasets.datasets)
are registered here too, and again when gin is finalized (as T5X does after parsing), for
bindings parsed after this import. Nothing else belongs here.
"""
from dsbs_jax import custom_tasks
from tasks import anli1
from tasks import cqa
from tasks import esnli
from tasks import svamp

DATASETS = (cqa.SPEC, svamp.SPEC, esnli.SPEC, anli1.SPEC)
CUSTOM_TASK_NAMES = custom_tasks.register_custom_datasets()
