"""Tests for dsbs_jax.seqio_tasks: every task and mixture yields packed batches, rates follow
alpha, both tasks see the same examples, prefixes, separators, the vocabulary TaskOptions
names, the options a command puts in use winning over gin's, and records of K teacher
samples expanded, filtered and dropped as TaskOptions choose (counted per task)."""
import collections
import dataclasses
import itertools
import math
import random
import shutil

import gin
import numpy as np
import pytest
import seqio

from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import gin_utils
from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import replay_teacher
from dsbs_jax import resources
from dsbs_jax import self_consistency
from dsbs_jax import seqio_tasks

LENGTHS = {"inputs": 256, "targets": 128}
VOCABULARY = str(resources.VOCABULARY_FILE)
RATIONALES = str(resources.RATIONALES_DIR)
datasets.register_all()


def bind(**options):
  """Binds TaskOptions fields in gin: what the tasks read when no command put options in use."""
  for key, value in options.items():
    gin.bind_parameter(f"TaskOptions.{key}", value)


def use_small_nli(small_nli_dir, **options):
  root, inputs = small_nli_dir
  bind(rationales_dir=root, train_inputs=inputs, **options)


def ids_of(name, split="train", **kwargs):
  dataset = seqio.get_mixture_or_task(name).get_dataset(
      LENGTHS, split=split, shuffle=False, use_cached=False, **kwargs)
  return [example["id"].decode() for example in dataset.as_numpy_iterator()]


ALL_NAMES = [distillation.task_name(spec.name, kind) for spec in datasets.BENCHMARKS
             for kind in (*distillation.TASK_KINDS, *distillation.MIXTURES)]


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
  shipped = seqio.SentencePieceVocabulary(VOCABULARY)
  copy = tmp_path / "copy.model"
  shutil.copy(VOCABULARY, copy)
  assert options_vocabulary == shipped and shipped == options_vocabulary
  assert not options_vocabulary != shipped  # T5X's check: task vocabulary != model vocabulary
  assert options_vocabulary == seqio.SentencePieceVocabulary(str(copy))  # same model, other path
  assert options_vocabulary != seqio.SentencePieceVocabulary(VOCABULARY, extra_ids=100)
  assert options_vocabulary != seqio.ByteVocabulary()
  bind(vocabulary_path=str(copy), vocabulary_extra_ids=100)
  assert options_vocabulary == seqio.SentencePieceVocabulary(VOCABULARY, extra_ids=100)
  assert options_vocabulary.extra_ids == 100 and options_vocabulary.vocab_size == shipped.vocab_size + 100
  assert options_vocabulary.encode("[label] a cat") == shipped.encode("[label] a cat")


def label_share(mixture, num_examples=2000) -> float:
  dataset = mixture.get_dataset(LENGTHS, split="train", shuffle=True, seed=0, use_cached=False)
  label_piece = mixture.output_features["inputs"].vocabulary.encode("[label]")[-1]
  firsts = [ex["inputs"][:2] for ex in dataset.take(num_examples).as_numpy_iterator()]
  return np.mean([label_piece in first for first in firsts])


def test_mixture_rates_follow_alpha():
  bind(alpha=0.3)
  mixture = seqio.get_mixture_or_task("cqa_dsbs_teacher")
  rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
  assert rates == pytest.approx({"cqa_label_teacher": 0.3, "cqa_rationale": 0.7})
  assert abs(label_share(mixture) - 0.3) < 0.04


def test_options_put_in_use_win_over_gin():
  bind(alpha=0.3, label_prefix="gin: ")
  mixture = seqio.get_mixture_or_task("cqa_dsbs_teacher")
  with distillation.options_in_use(distillation.TaskOptions(alpha=0.8, label_prefix="[label] ")):
    assert [mixture.get_rate(task) for task in mixture.tasks] == pytest.approx([0.8, 0.2])
    assert abs(label_share(mixture, 1000) - 0.8) < 0.05
  assert [mixture.get_rate(task) for task in mixture.tasks] == pytest.approx([0.3, 0.7])


def test_subsampling_is_deterministic_and_shared_between_tasks():
  bind(train_fraction=0.25, subsample_seed=3)
  label_ids = ids_of("svamp_label_teacher")
  assert label_ids == ids_of("svamp_label_teacher")
  assert label_ids == ids_of("svamp_rationale")
  full = len(records.read_split(RATIONALES, "svamp", "train"))
  assert len(label_ids) == full - math.ceil(0.75 * full)
  gin.clear_config()
  bind(train_fraction=0.25, subsample_seed=4)
  assert set(ids_of("svamp_rationale")) != set(label_ids)


def test_mixture_sees_the_same_examples_in_both_tasks():
  bind(train_fraction=0.5, subsample_seed=0)
  mixture = seqio.get_mixture_or_task("svamp_dsbs_gold")
  assert ids_of(mixture.tasks[0].name) == ids_of(mixture.tasks[1].name)


def test_teacher_labels_train_and_gold_labels_evaluate():
  train = {r.id: r for r in records.read_split(RATIONALES, "cqa", "train")}
  task = seqio.get_mixture_or_task("cqa_label_teacher")
  example = next(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
  assert example["targets_pretokenized"].decode() == train[example["id"].decode()].teacher_label
  valid = {r.id: r for r in records.read_split(RATIONALES, "cqa", "validation")}
  example = next(task.get_dataset(LENGTHS, split="validation", shuffle=False).as_numpy_iterator())
  assert example["targets_pretokenized"].decode() == valid[example["id"].decode()].label


def test_prefixes_are_configurable_to_the_papers():
  bind(label_prefix=distillation.PAPER_PREFIXES[0], rationale_prefix=distillation.PAPER_PREFIXES[1])
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


@pytest.mark.parametrize("name", ["esnli_label_gold", "cqa_rationale"])
def test_token_counts_of_a_sources_texts_are_the_lengths_the_task_tokenizes_to(name):
  task = seqio.get_mixture_or_task(name)
  unbounded = {"inputs": 100_000, "targets": 100_000}
  dataset = task.get_dataset(unbounded, split="validation", shuffle=False, use_cached=False)
  examples = list(itertools.islice(dataset.as_numpy_iterator(), 20))
  texts = task.source.texts("validation")
  for feature in ("inputs", "targets"):
    counts = seqio_tasks.token_counts(task.output_features[feature].vocabulary,
                                      texts[feature][:20])
    assert counts == [len(example[feature]) - 1 for example in examples]  # - 1: the final EOS


def test_tasks_read_joined_nli_train_inputs_with_their_prefix(small_nli_dir):
  use_small_nli(small_nli_dir)
  task = seqio.get_mixture_or_task("anli1_label_gold")
  examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
  assert len(examples) == len(records.read_split(small_nli_dir[0], "anli1", "train"))
  assert examples[0]["id"].decode() == "anli1-train-00000"
  assert examples[0]["inputs_pretokenized"].decode() == "[label] premise 0</s>hypothesis 0"


def test_missing_nli_train_inputs_stop_the_task_saying_what_to_set():
  with pytest.raises(records.MissingTrainInputsError, match=r"TaskOptions.train_inputs = \{'esnli'"):
    ids_of("esnli_label_gold")


def test_drop_parse_failures_drops_from_both_tasks():
  bind(drop_parse_failures=True)
  kept = ids_of("svamp_label_teacher")
  assert kept == ids_of("svamp_rationale")
  failures = {r.id for r in records.read_split(RATIONALES, "svamp", "train") if r.parse_error}
  assert failures and not failures & set(kept)


def test_missing_vocabulary_is_named(tmp_path):
  bind(vocabulary_path=str(tmp_path / "none.model"))
  with pytest.raises(FileNotFoundError, match="none.model"):
    ids_of("svamp_label_gold", split="test")


def test_missing_rationales_dir_is_named(tmp_path):
  bind(rationales_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="run tools/convert_release.py"):
    ids_of("cqa_label_gold", split="test")


@pytest.fixture(scope="module")
def sampled_cqa_dir(tmp_path_factory):
  """(rationales dir, train records): the shipped CQA splits, with 120 train records of 3
  samples in four patterns, S the shipped output and W, W' other answers:
  [S S S] (agreement 1, vote S), [S W S] (2/3, S), [W W S] (2/3, W), [W S W'] (1/3, W)."""
  root = tmp_path_factory.mktemp("sampled")
  shutil.copytree(f"{RATIONALES}/cqa", root / "cqa")
  same = self_consistency.same_answer_for(metrics.exact_match_accuracy)
  train = []
  for i, record in enumerate(r for r in records.read_split(RATIONALES, "cqa", "train")
                             if r.parse_error is None and r.teacher_label == r.label):
    if len(train) == 120:
      break
    parsed = rationales.parse_cqa(record.teacher_output)
    other = lambda seed: replay_teacher.OTHER_ANSWER["cqa"](parsed, record, random.Random(seed))
    wrong, wrong_too = other(0), next(o for o in map(other, range(1, 99)) if o != other(0))
    pattern = [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 2]][len(train) % 4]
    outputs = [[record.teacher_output, wrong, wrong_too][p] for p in pattern]
    train.append(self_consistency.make_record("cqa", same, record.id, record.input, record.label,
                                              outputs))
  for path in (root / "cqa").glob("train.jsonl*"):
    path.unlink()
  rationales.write_records(str(root / "cqa" / "train.jsonl"), train)
  return str(root), train


def test_rationales_of_k_samples_expand_into_examples_as_the_options_choose(sampled_cqa_dir):
  root, train = sampled_cqa_dir
  assert [r.agreement for r in train[:4]] == pytest.approx([1, 2 / 3, 2 / 3, 1 / 3])
  # Per pattern of four inputs: rationale examples, and how many agree with the vote or gold.
  expected = {"first": 4, "all": 12, "vote": 3 + 2 + 2 + 1, "gold": 3 + 2 + 1 + 1}
  for which, per_four in expected.items():
    gin.clear_config()
    bind(rationales_dir=root, train_rationales=which)
    rationale_ids = ids_of("cqa_rationale")
    assert len(rationale_ids) == per_four * 30, which
    assert seqio.get_mixture_or_task("cqa_rationale").num_input_examples("train") == per_four * 30
    assert len(ids_of("cqa_label_teacher")) == 120  # one label example per input, always
    assert ids_of("cqa_rationale", split="validation") == ids_of("cqa_label_teacher",
                                                                  split="validation")
  # Filtering keeps exactly the rationales of the samples that agree with the vote.
  gin.clear_config()
  bind(rationales_dir=root, train_rationales="vote")
  task = seqio.get_mixture_or_task("cqa_rationale")
  targets = collections.Counter(
      (ex["id"].decode(), ex["targets_pretokenized"].decode())
      for ex in task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
  wanted = collections.Counter((r.id, s.rationale) for r in train for s in r.samples
                               if s.teacher_label == r.teacher_label)
  assert targets == wanted


def test_min_agreement_drops_inputs_from_both_tasks(sampled_cqa_dir):
  root, train = sampled_cqa_dir
  for threshold, per_four in ((0.5, 3), (0.9, 1), (0.0, 4)):
    gin.clear_config()
    bind(rationales_dir=root, min_agreement=threshold, train_rationales="all")
    assert len(ids_of("cqa_label_teacher")) == per_four * 30
    assert len(ids_of("cqa_rationale")) == per_four * 30 * 3
  gin.clear_config()
  with pytest.raises(gin_utils.GinConfigError, match="min_agreement must be in"):
    distillation.TaskOptions(min_agreement=1.5)
  with pytest.raises(gin_utils.GinConfigError, match="train_rationales must be one of"):
    distillation.TaskOptions(train_rationales="best")


def test_k_rationales_an_input_keep_the_mixture_at_alpha(sampled_cqa_dir):
  root, _ = sampled_cqa_dir
  bind(rationales_dir=root, train_rationales="all", alpha=0.3)
  assert abs(label_share(seqio.get_mixture_or_task("cqa_dsbs_teacher"), 1000) - 0.3) < 0.05


def test_a_text_of_megabytes_is_cut_before_tokenizing_to_the_same_features(tmp_path):
  # A CQA validation record with an input of 2 MB: the task tokenizes its first
  # TaskOptions.max_text_chars characters only, and the features keep the same tokens.
  shutil.copytree(f"{RATIONALES}/cqa", tmp_path / "cqa")
  for path in (tmp_path / "cqa").glob("valid.jsonl*"):
    path.unlink()
  record = records.read_split(RATIONALES, "cqa", "validation")[0]
  words = " ".join(f"{('plate', 'cupboard', 'sink', 'dish')[i % 7 % 4]}{i % 97}"
                   for i in range(200_000))
  huge = dataclasses.replace(record, input=words[:2_000_000])
  rationales.write_records(str(tmp_path / "cqa" / "valid.jsonl"), [huge])
  most = 4096
  bind(rationales_dir=str(tmp_path), max_text_chars=most)
  task = seqio.get_mixture_or_task("cqa_label_gold")
  inputs, = task.source.texts("validation")["inputs"]
  assert len(inputs) == len("[label] ") + most
  length = most // distillation.CHARS_PER_TOKEN
  example, = task.get_dataset({"inputs": length, "targets": 16}, split="validation",
                              shuffle=False, use_cached=False).as_numpy_iterator()
  vocabulary = task.output_features["inputs"].vocabulary
  whole = vocabulary.tokenizer.EncodeAsIds("[label] " + huge.input[:100_000])
  assert list(example["inputs"][:length - 1]) == whole[:length - 1]
  # Feature lengths the cut would reach are refused, naming both settings.
  options = distillation.TaskOptions(max_text_chars=most)
  options.check_covers({"inputs": length, "targets": 16})
  with pytest.raises(gin_utils.GinConfigError,
                     match="TASK_FEATURE_LENGTHS up to 256 tokens need TaskOptions.max_text_chars"):
    options.check_covers({"inputs": 2 * length, "targets": 16})
