"""Tests for dsbs_jax.data and the tasks/ registrations: batches, rates, subsampling, joins."""
import json
import math
import os
import shutil

import gin
import numpy as np
import pytest
import seqio

import tasks
from dsbs_jax import data
from dsbs_jax import input_pipeline
from dsbs_jax import rationales

LENGTHS = {"inputs": 256, "targets": 128}
NLI = ("esnli", "anli1")
SMALL_TRAIN = 300



def bind(**options):
  for key, value in options.items():
    gin.bind_parameter(f"TaskOptions.{key}", value)


@pytest.fixture(scope="module")
def small_nli_dir(tmp_path_factory):
  """A rationales dir whose NLI train splits hold the first SMALL_TRAIN teacher outputs, with a
  matching train-inputs JSONL per dataset (labels set so that most agree with the teacher)."""
  root = tmp_path_factory.mktemp("rationales")
  inputs = {}
  for spec in tasks.DATASETS:
    shutil.copytree(os.path.join(data.DEFAULT_RATIONALES_DIR, spec.name), root / spec.name)
  for dataset in NLI:
    records = data.read_split(data.DEFAULT_RATIONALES_DIR, dataset, "train")[:SMALL_TRAIN]
    os.remove(data.split_path(str(root), dataset, "train"))
    rationales.write_records(str(root / dataset / "train.jsonl"), records)
    path = root / f"{dataset}_train.json"
    with open(path, "w") as f:
      for i, record in enumerate(records):
        label = (rationales.NLI_LABELS.index(record.teacher_label)
                 if record.teacher_label in rationales.NLI_LABELS else i % 3)
        f.write(json.dumps({"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "label": label}) + "\n")
    inputs[dataset] = str(path)
  return str(root), inputs


def use_small_nli(small_nli_dir, **options):
  root, inputs = small_nli_dir
  bind(rationales_dir=root, train_inputs=inputs, **options)


def ids_of(name, split="train", **kwargs):
  dataset = seqio.get_mixture_or_task(name).get_dataset(
      LENGTHS, split=split, shuffle=False, use_cached=False, **kwargs)
  return [example["id"].decode() for example in dataset.as_numpy_iterator()]


ALL_NAMES = [data.task_name(spec.name, kind) for spec in tasks.DATASETS
             for kind in (*data.TARGETS, *data.MIXTURES)]


def test_registry_holds_four_datasets_of_three_tasks_and_four_mixtures():
  assert len(ALL_NAMES) == 28
  for name in ALL_NAMES:
    seqio.get_mixture_or_task(name)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_task_and_mixture_yields_packed_batches(name, small_nli_dir):
  use_small_nli(small_nli_dir)
  provider = seqio.get_mixture_or_task(name)
  dataset = provider.get_dataset(LENGTHS, split="train", shuffle=True, seed=1, use_cached=False)
  batches = seqio.EncDecFeatureConverter(pack=True)(dataset, LENGTHS).batch(4)
  batch = next(batches.as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (4, 256)
  assert batch["decoder_target_tokens"].shape == (4, 128)
  assert batch["encoder_segment_ids"].max() >= 2, "examples were not packed"
  assert (batch["decoder_loss_weights"] > 0).sum() > 0


@pytest.mark.parametrize("name,expected_ids", [
    ("cqa_dsbs_teacher", {0, data.TASK_IDS["label"], data.TASK_IDS["rationale"]}),
    ("svamp_dsbs_gold", {0, data.TASK_IDS["label"], data.TASK_IDS["rationale"]}),
    ("svamp_rationale", {0, data.TASK_IDS["rationale"]}),
    ("svamp_distill", {0, data.TASK_IDS["label"]})])
def test_training_batches_mark_each_target_token_with_its_task(name, expected_ids):
  batch = next(input_pipeline.train_batches(name, LENGTHS, 8, seed=0))
  task_ids = batch["decoder_task_ids"]
  np.testing.assert_array_equal(task_ids > 0, batch["decoder_loss_weights"] > 0)
  assert set(np.unique(task_ids)) == expected_ids
  # One task per packed example: the id is constant within each decoder segment.
  for row_ids, row_segments in zip(task_ids, batch["decoder_segment_ids"]):
    for segment in set(row_segments[row_segments > 0]):
      assert len(set(row_ids[row_segments == segment])) == 1


def test_tasks_work_with_the_plain_converter_and_lengths_inferred_from_the_data():
  # What T5X's evaluation does with TASK_FEATURE_LENGTHS = None: the task-id feature is
  # not an output feature, so it neither gets a length nor upsets EncDecFeatureConverter.
  evaluator = seqio.Evaluator("svamp_dsbs_teacher", seqio.EncDecFeatureConverter(pack=False),
                              eval_split="validation", sequence_length=None, logger_cls=())
  assert [task.name for task in evaluator.eval_tasks] == ["svamp_label_teacher"]
  assert set(evaluator.model_feature_shapes) == set(seqio.EncDecFeatureConverter.MODEL_FEATURES)
  assert set(seqio.get_mixture_or_task("svamp_dsbs_teacher").output_features) == {"inputs", "targets"}


def test_options_vocabulary_equals_the_sentencepiece_vocabulary_it_resolves_to(tmp_path):
  options_vocabulary = seqio.get_mixture_or_task("cqa_label_teacher").output_features["inputs"].vocabulary
  shipped = seqio.SentencePieceVocabulary(data.DEFAULT_VOCABULARY)
  copy = tmp_path / "copy.model"
  shutil.copy(data.DEFAULT_VOCABULARY, copy)
  assert options_vocabulary == shipped and shipped == options_vocabulary
  assert not options_vocabulary != shipped  # T5X's check: task vocabulary != model vocabulary
  assert options_vocabulary == seqio.SentencePieceVocabulary(str(copy))  # same model, other path
  assert options_vocabulary != seqio.SentencePieceVocabulary(data.DEFAULT_VOCABULARY, extra_ids=100)
  assert options_vocabulary != seqio.ByteVocabulary()
  bind(vocabulary_path=str(copy), vocabulary_extra_ids=100)
  assert options_vocabulary == seqio.SentencePieceVocabulary(data.DEFAULT_VOCABULARY, extra_ids=100)
  assert options_vocabulary.extra_ids == 100 and options_vocabulary.vocab_size == shipped.vocab_size + 100
  assert options_vocabulary.encode("[label] a cat") == shipped.encode("[label] a cat")


def test_mixture_rates_follow_alpha():
  bind(alpha=0.3)
  mixture = seqio.get_mixture_or_task("cqa_dsbs_teacher")
  rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
  assert rates == pytest.approx({"cqa_label_teacher": 0.3, "cqa_rationale": 0.7})
  dataset = mixture.get_dataset(LENGTHS, split="train", shuffle=True, seed=0, use_cached=False)
  vocabulary = mixture.output_features["inputs"].vocabulary
  label_piece = vocabulary.encode("[label]")[-1]
  firsts = [ex["inputs"][:2] for ex in dataset.take(2000).as_numpy_iterator()]
  label_share = np.mean([label_piece in first for first in firsts])
  assert abs(label_share - 0.3) < 0.04


def test_alpha_outside_open_interval_is_rejected():
  bind(alpha=1.0)
  with pytest.raises(ValueError, match="alpha must be in"):
    data.TaskOptions()


def test_subsampling_is_deterministic_and_shared_between_tasks():
  bind(train_fraction=0.25, subsample_seed=3)
  label_ids = ids_of("svamp_label_teacher")
  assert label_ids == ids_of("svamp_label_teacher")
  assert label_ids == ids_of("svamp_rationale")
  full = len(data.read_split(data.DEFAULT_RATIONALES_DIR, "svamp", "train"))
  assert len(label_ids) == full - math.ceil(0.75 * full)
  gin.clear_config()
  bind(train_fraction=0.25, subsample_seed=4)
  assert set(ids_of("svamp_rationale")) != set(label_ids)


def test_mixture_sees_the_same_examples_in_both_tasks():
  bind(train_fraction=0.5, subsample_seed=0)
  mixture = seqio.get_mixture_or_task("svamp_dsbs_gold")
  assert ids_of(mixture.tasks[0].name) == ids_of(mixture.tasks[1].name)


def test_subsample_matches_paper_split_rule():
  records = list(range(10))
  kept = data.subsample(records, 0.25, seed=0)
  permutation = np.random.default_rng(0).permutation(10)
  assert kept == list(permutation[math.ceil(0.75 * 10):])
  assert data.subsample(records, 1.0, seed=0) == records


def test_teacher_labels_train_and_gold_labels_evaluate():
  records = {r.id: r for r in data.read_split(data.DEFAULT_RATIONALES_DIR, "cqa", "train")}
  task = seqio.get_mixture_or_task("cqa_label_teacher")
  example = next(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
  assert example["targets_pretokenized"].decode() == records[example["id"].decode()].teacher_label
  valid = {r.id: r for r in data.read_split(data.DEFAULT_RATIONALES_DIR, "cqa", "validation")}
  example = next(task.get_dataset(LENGTHS, split="validation", shuffle=False).as_numpy_iterator())
  assert example["targets_pretokenized"].decode() == valid[example["id"].decode()].label


def test_prefixes_are_configurable_to_the_papers():
  bind(label_prefix=data.PAPER_PREFIXES[0], rationale_prefix=data.PAPER_PREFIXES[1])
  for name, prefix in (("cqa_label_gold", "predict: "), ("cqa_rationale", "explain: ")):
    dataset = seqio.get_mixture_or_task(name).get_dataset(LENGTHS, split="test", shuffle=False)
    assert next(dataset.as_numpy_iterator())["inputs_pretokenized"].decode().startswith(prefix)


def test_nli_separator_becomes_eos_between_premise_and_hypothesis():
  task = seqio.get_mixture_or_task("esnli_label_gold")
  example = next(task.get_dataset(LENGTHS, split="validation", shuffle=False).as_numpy_iterator())
  eos = task.output_features["inputs"].vocabulary.eos_id
  positions = np.flatnonzero(example["inputs"] == eos)
  assert len(positions) == 2 and positions[-1] == len(example["inputs"]) - 1
  premise, hypothesis = example["inputs_pretokenized"].decode().split(rationales.NLI_SEPARATOR)
  vocabulary = task.output_features["inputs"].vocabulary
  assert example["inputs"][:positions[0]].tolist() == vocabulary.encode(premise)
  assert example["inputs"][positions[0] + 1:-1].tolist() == vocabulary.encode(hypothesis)


def test_missing_nli_train_inputs_say_what_to_set():
  with pytest.raises(data.MissingTrainInputsError, match=r"TaskOptions.train_inputs = \{'esnli'"):
    ids_of("esnli_label_gold")


def test_joined_train_inputs_follow_the_teacher_order(small_nli_dir):
  use_small_nli(small_nli_dir)
  task = seqio.get_mixture_or_task("anli1_label_gold")
  examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
  assert len(examples) == SMALL_TRAIN
  first = examples[0]
  assert first["id"].decode() == "anli1-train-00000"
  assert first["inputs_pretokenized"].decode() == "[label] premise 0</s>hypothesis 0"


def test_misaligned_train_inputs_are_refused(small_nli_dir, tmp_path):
  root, inputs = small_nli_dir
  lines = open(inputs["anli1"]).read().splitlines()
  shuffled = tmp_path / "shuffled.json"
  # Rotate the labels against the examples: about chance-level agreement remains.
  with open(shuffled, "w") as f:
    for i, line in enumerate(lines):
      f.write(json.dumps(dict(json.loads(line), label=(json.loads(line)["label"] + 1) % 3)) + "\n")
  bind(rationales_dir=root, train_inputs={"anli1": str(shuffled)})
  with pytest.raises(ValueError, match="misaligned"):
    ids_of("anli1_rationale")


def test_train_inputs_of_wrong_length_are_refused(small_nli_dir, tmp_path):
  root, inputs = small_nli_dir
  short = tmp_path / "short.json"
  short.write_text("\n".join(open(inputs["anli1"]).read().splitlines()[:10]) + "\n")
  bind(rationales_dir=root, train_inputs={"anli1": str(short)})
  with pytest.raises(ValueError, match=r"10 examples, but the teacher outputs .* cover 300"):
    ids_of("anli1_rationale")


@pytest.mark.parametrize("line,message", [
    ('{"premise": "p", "hypothesis": "h", "label": 7}', "label 7 is not 0, 1 or 2"),
    ('{"premise": "p", "hypothesis": "h", "label": 1.5}', "'label' must be 0, 1, 2 or a label name"),
    ('{"premise": "p", "label": 0}', "field 'hypothesis' missing"),
    ('{"premise": "p", "hypothesis": "h"', "not valid JSON"),
])
def test_bad_train_input_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "inputs.json"
  path.write_text('{"premise": "p", "hypothesis": "h", "label": "neutral"}\n' + line + "\n")
  with pytest.raises(rationales.RationaleFileError, match=f"inputs.json:2: {message}"):
    data.read_train_inputs(str(path))


def test_drop_parse_failures_drops_from_both_tasks():
  bind(drop_parse_failures=True)
  kept = ids_of("svamp_label_teacher")
  assert kept == ids_of("svamp_rationale")
  failures = {r.id for r in data.read_split(data.DEFAULT_RATIONALES_DIR, "svamp", "train") if r.parse_error}
  assert failures and not failures & set(kept)


def test_missing_vocabulary_is_named(tmp_path):
  bind(vocabulary_path=str(tmp_path / "none.model"))
  with pytest.raises(FileNotFoundError, match="none.model"):
    ids_of("svamp_label_gold", split="test")


def test_missing_rationales_dir_is_named(tmp_path):
  bind(rationales_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="run tools/convert_release.py"):
    ids_of("cqa_label_gold", split="test")
