"""Every shipped gin file parses and configures what it claims; the README and CI agree."""
import glob
import os
import re

import gin
import pytest
import seqio

import tasks
from dsbs_jax import data
from dsbs_jax import gin_utils
from dsbs_jax import resources
from dsbs_jax import train
from dsbs_jax.models import t5

GIN_DIR = str(resources.GIN_DIR)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_FILES = sorted(glob.glob(os.path.join(GIN_DIR, "paper", "*.gin")))
PAPER_REQUIRED = ["MODEL_DIR = '/tmp/m'", "INITIAL_CHECKPOINT_PATH = '/tmp/ckpt'",
                  "VOCABULARY = '/tmp/spiece.model'"]



def train_binding(name):
  return gin.query_parameter(f"train.{name}")


def resolved(value):
  return value.scoped_configurable_fn() if hasattr(value, "scoped_configurable_fn") else value


def test_one_paper_file_per_dataset_method_and_size():
  assert len(PAPER_FILES) == 4 * 4 * 4
  for path in PAPER_FILES:
    dataset, rest = os.path.basename(path).split("_", 1)
    assert dataset in {spec.name for spec in tasks.DATASETS}, path


@pytest.mark.parametrize("path", PAPER_FILES, ids=os.path.basename)
def test_paper_files_parse_and_name_a_registered_mixture(path):
  gin_utils.parse_gin([path], PAPER_REQUIRED)
  name = os.path.basename(path)
  mixture = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
  assert name.startswith(mixture + "_t5"), (name, mixture)
  seqio.get_mixture_or_task(mixture)
  config = t5.T5Config()
  size = name[len(mixture) + 1:-len(".gin")]
  assert config.emb_dim == {"t5_1_1_small": 512, "t5_1_1_base": 768, "t5_1_1_large": 1024,
                            "t5_1_1_xxl": 4096}[size]
  options = data.TaskOptions()
  assert options.vocabulary_path == "/tmp/spiece.model" and options.vocabulary_extra_ids == 100
  assert gin.query_parameter("%LEARNING_RATE") == 5e-5
  assert gin.query_parameter("%OPTIMIZER") == "adamw"


def test_paper_files_require_their_checkpoint_and_vocabulary():
  gin_utils.parse_gin([PAPER_FILES[0]], ["MODEL_DIR = '/tmp/m'"])
  with pytest.raises(gin_utils.GinConfigError, match="train.initial_checkpoint_path"):
    train.train()
  gin.bind_parameter("train.initial_checkpoint_path", "/tmp/ckpt")
  with pytest.raises(gin_utils.GinConfigError, match="TaskOptions.vocabulary_path"):
    train.train()


def test_quickstart_runs_needs_nothing_and_fits_the_shipped_vocabulary():
  gin_utils.parse_gin(["quickstart.gin"], [])
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "cqa_dsbs_teacher"
  assert t5.T5Config().vocab_size >= data.OptionsVocabulary().vocab_size
  assert data.TaskOptions().vocabulary_path == data.DEFAULT_VOCABULARY


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(GIN_DIR, "runs", "*.gin"))),
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
