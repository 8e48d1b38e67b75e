"""Every shipped gin file parses and configures what it claims; the README and CI agree."""
import dataclasses
import glob
import os
import re
import shlex
import sys
import types
from typing import Any, Optional

import gin
import pytest
import seqio

import tasks  # noqa: F401  (registers the tasks, as T5X's gin files do)
from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import gin_utils
from dsbs_jax import resources
from dsbs_jax import seqio_tasks
from dsbs_jax import train
from dsbs_jax.models import t5

GIN_DIR = str(resources.GIN_DIR)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's students (Table 2 onwards): T5 v1.1 small, base, large and XXL, by emb_dim.
PAPER_SIZES = {"t5_1_1_small": 512, "t5_1_1_base": 768, "t5_1_1_large": 1024, "t5_1_1_xxl": 4096}
PAPER_MIXTURES = [distillation.task_name(spec.name, method) for spec in datasets.BENCHMARKS
                  for method in distillation.MIXTURES]
PAPER_REQUIRED = ["MODEL_DIR = '/tmp/m'", "INITIAL_CHECKPOINT_PATH = '/tmp/ckpt'",
                  "VOCABULARY = '/tmp/spiece.model'"]


def train_binding(name):
  return gin.query_parameter(f"train.{name}")


def resolved(value):
  return value.scoped_configurable_fn() if hasattr(value, "scoped_configurable_fn") else value


def paper_experiment(size: str, mixture: str, bindings=PAPER_REQUIRED) -> None:
  """Parses one experiment of the paper as the README runs it."""
  gin_utils.parse_gin([f"models/{size}.gin", "runs/paper.gin"],
                      [f"MIXTURE_OR_TASK_NAME = '{mixture}'", *bindings])


def test_the_paper_grid_is_four_datasets_four_methods_four_sizes():
  assert len(PAPER_MIXTURES) * len(PAPER_SIZES) == 4 * 4 * 4
  for size in PAPER_SIZES:
    assert os.path.isfile(os.path.join(GIN_DIR, "models", f"{size}.gin")), size


@pytest.mark.parametrize("size", PAPER_SIZES)
@pytest.mark.parametrize("mixture", PAPER_MIXTURES)
def test_every_paper_experiment_parses_and_names_a_registered_mixture(mixture, size):
  paper_experiment(size, mixture)
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == mixture
  seqio.get_mixture_or_task(mixture)
  assert t5.T5Config().emb_dim == PAPER_SIZES[size]
  options = distillation.TaskOptions()
  assert options.vocabulary_path == "/tmp/spiece.model" and options.vocabulary_extra_ids == 100
  assert gin.query_parameter("%LEARNING_RATE") == 5e-5
  assert gin.query_parameter("%OPTIMIZER") == "adamw_hf"
  assert (gin.query_parameter("%BATCH_SIZE"), gin.query_parameter("%TRAIN_STEPS")) == (64, 10000)
  assert gin.query_parameter("train.batching") == "per_input"
  two_tasks = distillation.trains_rationales(mixture)
  run_options = options.for_run(mixture)
  assert run_options.label_prefix == ("predict: " if two_tasks else "")
  assert run_options.rationale_prefix == "explain: "


def test_paper_experiments_require_their_checkpoint_and_vocabulary():
  paper_experiment("t5_1_1_small", "anli1_distill", ["MODEL_DIR = '/tmp/m'"])
  with pytest.raises(gin_utils.GinConfigError, match="train.initial_checkpoint_path"):
    train.train()
  gin.bind_parameter("train.initial_checkpoint_path", "/tmp/ckpt")
  with pytest.raises(gin_utils.GinConfigError, match="TaskOptions.vocabulary_path"):
    train.train()


def test_readme_paper_command_is_one_command_that_parses():
  readme = open(os.path.join(REPO, "README.md")).read()
  section = readme[readme.index("### Paper-scale runs"):readme.index("### T5X")]
  command = next(block for block in re.findall(r"```bash\n(.*?)\n```", section, re.S)
                 if "dsbs train" in block)
  argv = shlex.split(command[command.index("dsbs train") + len("dsbs train"):].replace("\\\n", " "))
  flags, bindings = gin_utils.split_gin_bindings(argv)
  gin_utils.parse_gin([flag.split("=", 1)[1] for flag in flags], bindings)
  seqio.get_mixture_or_task(gin.query_parameter("%MIXTURE_OR_TASK_NAME"))
  assert gin.query_parameter("%OPTIMIZER") == "adamw_hf"


def test_quickstart_runs_needs_nothing_and_fits_the_shipped_vocabulary():
  gin_utils.parse_gin(["quickstart.gin"], [])
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "cqa_dsbs_teacher"
  assert t5.T5Config().vocab_size >= seqio_tasks.OptionsVocabulary().vocab_size
  assert distillation.TaskOptions().vocabulary_path == str(resources.VOCABULARY_FILE)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(GIN_DIR, "runs", "*.gin"))
                                        + glob.glob(os.path.join(GIN_DIR, "t5x", "*.gin"))),
                         ids=os.path.basename)
def test_run_files_open_with_their_required_and_overridden_macros(path):
  header = open(path).read().split("\n\n")[0]
  assert "Required" in header and header.startswith("#"), path


def test_gin_typo_names_the_binding():
  with pytest.raises(gin_utils.GinConfigError, match="--gin.TaskOptions.alpah"):
    gin_utils.parse_gin(["quickstart.gin"], ["TaskOptions.alpah = 0.3"])


def test_readme_opens_with_the_main_job_and_the_test_command_that_ci_runs():
  readme = open(os.path.join(REPO, "README.md")).read()
  commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
  main_job, test_suite = commands[0], commands[1]
  assert "dsbs train --gin_file=quickstart.gin" in main_job
  assert test_suite.endswith("pytest")
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  assert test_suite in ci.splitlines()


def test_readme_pieces_name_modules_that_exist():
  readme = open(os.path.join(REPO, "README.md")).read()
  pieces = readme[readme.index("## The pieces"):readme.index("`dsbs --help` lists")]
  named = set(re.findall(r"`([a-z_]+\.py)`", pieces))
  assert {"run_dir.py", "encoder_decoder.py", "records.py", "seqio_tasks.py",
          "input_pipeline.py", "distillation.py"} <= named
  for name in named:
    assert os.path.isfile(os.path.join(REPO, "dsbs_jax", name)), name


# ------------------------------------------------------------------------------
# gin/t5x/: parsed after stand-ins for T5X's model and run files. T5X is not installable from
# the package index, so a module `t5x_standin` plays the T5X names those files bind (the
# model, the dataset config, the train/eval/infer entry points), and each entry point does
# what T5X does first with them: compare the task's vocabulary with the model's, and read
# the data through seqio with the plain EncDecFeatureConverter.
# ------------------------------------------------------------------------------
@dataclasses.dataclass
class DatasetConfig:
  mixture_or_task_name: str
  task_feature_lengths: Optional[dict]
  split: str
  use_cached: bool


@dataclasses.dataclass
class EncoderDecoderModel:
  input_vocabulary: Any
  output_vocabulary: Any


def standin_run(model: EncoderDecoderModel, dataset_cfg: DatasetConfig):
  provider = seqio.get_mixture_or_task(dataset_cfg.mixture_or_task_name)
  for feature in ("inputs", "targets"):
    if provider.output_features[feature].vocabulary != model.input_vocabulary:  # as T5X checks
      raise ValueError("Model and Task vocabularies do not match")
  return model, dataset_cfg


# Gin keeps what a file registers for the whole process: the entry points are named so
# that no selector of this project's (`train.model_dir`) can also match them.
STANDIN = types.ModuleType("t5x_standin")
STANDIN.DatasetConfig, STANDIN.EncoderDecoderModel = DatasetConfig, EncoderDecoderModel
STANDIN.run_train = STANDIN.run_evaluate = STANDIN.run_infer = standin_run

# What T5X's T5 v1.1 model files and its finetune/eval/infer run files bind that matters
# here, restated for the stand-ins.
STANDIN_MODEL = """
from __gin__ import dynamic_registration
import seqio
import t5x_standin as t5x
VOCABULARY = @seqio.SentencePieceVocabulary()
seqio.SentencePieceVocabulary.sentencepiece_model_file = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'
MODEL = @t5x.EncoderDecoderModel()
t5x.EncoderDecoderModel.input_vocabulary = %VOCABULARY
t5x.EncoderDecoderModel.output_vocabulary = %VOCABULARY
"""


def standin_run_file(entry: str, lengths: str, split: str, use_cached: str, scope: str = "") -> str:
  return f"""
MIXTURE_OR_TASK_NAME = %gin.REQUIRED
TASK_FEATURE_LENGTHS = {lengths}
USE_CACHED_TASKS = True
RUN = @t5x.{entry}()
t5x.{entry}.model = %MODEL
t5x.{entry}.dataset_cfg = @{scope}t5x.DatasetConfig()
{scope}t5x.DatasetConfig.mixture_or_task_name = %MIXTURE_OR_TASK_NAME
{scope}t5x.DatasetConfig.task_feature_lengths = %TASK_FEATURE_LENGTHS
{scope}t5x.DatasetConfig.split = '{split}'
{scope}t5x.DatasetConfig.use_cached = {use_cached}
"""


STANDIN_RUNS = {
    "train": standin_run_file("run_train", "%gin.REQUIRED", "train", "%USE_CACHED_TASKS", "train/"),
    "eval": standin_run_file("run_evaluate", "None", "test", "False"),  # lengths from the data
    "infer": standin_run_file("run_infer", "%gin.REQUIRED", "test", "False")}
T5X_MIXTURES = [distillation.task_name(spec.name, suffix) for spec in datasets.BENCHMARKS
                for suffix in distillation.MIXTURES]


@pytest.fixture
def t5x_standin(monkeypatch, tmp_path):
  """A search path holding the stand-in T5X files, and the stand-in module importable."""
  monkeypatch.setitem(sys.modules, "t5x_standin", STANDIN)
  (tmp_path / "model.gin").write_text(STANDIN_MODEL)
  for run, text in STANDIN_RUNS.items():
    (tmp_path / f"{run}.gin").write_text("from __gin__ import dynamic_registration\n"
                                         "import t5x_standin as t5x\n" + text)
  return tmp_path


def t5x_run(search_path, run: str, *bindings: str):
  """Parses the stand-in model and run files, then gin/t5x/<run>.gin, as a T5X user would
  list them; returns what the stand-in entry point received."""
  gin_utils.parse_gin(["model.gin", f"{run}.gin", f"t5x/{run}.gin"],
                      ["VOCABULARY_FILE = %DSBS_VOCABULARY", *bindings], [str(search_path)])
  return resolved(gin.query_parameter("%RUN"))


@pytest.mark.parametrize("mixture", T5X_MIXTURES)
def test_t5x_train_file_trains_any_mixture_from_uncached_tasks(t5x_standin, mixture):
  model, dataset_cfg = t5x_run(t5x_standin, "train", f"MIXTURE_OR_TASK_NAME = '{mixture}'")
  assert dataset_cfg == DatasetConfig(mixture, {"inputs": 512, "targets": 256}, "train", False)
  # The model's vocabulary is a plain SentencePiece one, of the file the tasks read.
  assert type(model.input_vocabulary) is seqio.SentencePieceVocabulary
  assert model.input_vocabulary.sentencepiece_model_file == str(resources.VOCABULARY_FILE)


def test_t5x_train_file_sets_alpha_and_the_data_for_the_default_converter(t5x_standin):
  _, dataset_cfg = t5x_run(t5x_standin, "train", "MIXTURE_OR_TASK_NAME = 'cqa_dsbs_teacher'",
                           "ALPHA = 0.2", "TRAIN_FRACTION = 0.5",
                           "TASK_FEATURE_LENGTHS = {'inputs': 128, 'targets': 64}")
  mixture = seqio.get_mixture_or_task(dataset_cfg.mixture_or_task_name)
  assert [mixture.get_rate(task) for task in mixture.tasks] == pytest.approx([0.2, 0.8])
  assert mixture.tasks[0].num_input_examples("train") == 8766 // 2
  dataset = mixture.get_dataset(dataset_cfg.task_feature_lengths, split="train", shuffle=True,
                                seed=0, use_cached=dataset_cfg.use_cached)
  batch = next(seqio.EncDecFeatureConverter(pack=True)(dataset, dataset_cfg.task_feature_lengths)
               .batch(4).as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (4, 128)


def test_t5x_eval_file_evaluates_the_label_task_with_lengths_from_the_data(t5x_standin):
  model, dataset_cfg = t5x_run(t5x_standin, "eval", "MIXTURE_OR_TASK_NAME = 'svamp_dsbs_teacher'")
  assert dataset_cfg.task_feature_lengths is None and dataset_cfg.split == "test"
  evaluator = seqio.Evaluator(dataset_cfg.mixture_or_task_name,
                              seqio.EncDecFeatureConverter(pack=False), eval_split="test",
                              sequence_length=dataset_cfg.task_feature_lengths, logger_cls=())
  assert [task.name for task in evaluator.eval_tasks] == ["svamp_label_teacher"]


def test_t5x_infer_file_names_lengths_and_shares_the_vocabulary(t5x_standin):
  model, dataset_cfg = t5x_run(t5x_standin, "infer", "MIXTURE_OR_TASK_NAME = 'anli1_dsbs_teacher'",
                               "VOCABULARY_EXTRA_IDS = 100")
  assert dataset_cfg.task_feature_lengths == {"inputs": 512, "targets": 256}
  assert model.input_vocabulary.vocab_size == seqio_tasks.OptionsVocabulary().vocab_size == 8000 + 100


def test_t5x_vocabularies_that_differ_are_refused_as_t5x_refuses_them(t5x_standin):
  with pytest.raises(ValueError, match="vocabularies do not match"):
    t5x_run(t5x_standin, "infer", "MIXTURE_OR_TASK_NAME = 'cqa_distill'",
            "distillation.TaskOptions.vocabulary_extra_ids = 100")


def test_readme_t5x_commands_name_shipped_files():
  readme = open(os.path.join(REPO, "README.md")).read()
  section = readme[readme.index("### T5X"):]
  section = section[:section.index("\n## ", 1) if "\n## " in section else None]
  ours = set(re.findall(r"--gin_file=(t5x/(?:train|eval|infer)\.gin)", section))
  assert ours == {"t5x/train.gin", "t5x/eval.gin", "t5x/infer.gin"}
  for name in ours:
    assert os.path.isfile(os.path.join(GIN_DIR, name))
  for command in ("python -m t5x.train", "python -m t5x.eval", "python -m t5x.infer"):
    assert command in section
  assert "github.com/google-research/t5x" in section
