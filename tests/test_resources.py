"""Tests for dsbs_jax.resources: the shipped files are found in a checkout, and a wheel built
from the checkout carries them, installs outside it, lists its tasks and trains a step."""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import xla_flags
from dsbs_jax import resources

REPO = pathlib.Path(__file__).resolve().parents[1]
# What setup.py builds the wheel from.
SOURCES = ("setup.py", "README.md", "dsbs_jax", "tasks", "gin", "rationales")


def shipped_files(root: pathlib.Path) -> set[str]:
  return {str(path.relative_to(root)) for folder in ("gin", "rationales")
          for path in (root / folder).rglob("*") if path.is_file() and "__pycache__" not in path.parts}


def test_a_checkout_finds_its_own_folders():
  assert resources.DATA_ROOT == REPO
  assert resources.GIN_DIR == REPO / "gin" and (resources.GIN_DIR / "quickstart.gin").is_file()
  assert (resources.GIN_MODELS_DIR / "t5_1_1_base.gin").is_file()
  assert (resources.RATIONALES_DIR / "cqa").is_dir()
  assert (resources.PROMPTS_DIR / "svamp.json").is_file()
  assert resources.VOCABULARY_FILE.is_file()


def run(command: list, cwd: pathlib.Path, env: dict) -> str:
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
  return result.stdout


@pytest.mark.slow
def test_wheel_ships_gin_and_rationales_and_trains_outside_the_checkout(tmp_path):
  # Built from a copy, so no build/ folder is left in (or reused from) the checkout.
  source = tmp_path / "source"
  source.mkdir()
  for name in SOURCES:
    if (REPO / name).is_dir():
      shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(REPO / name, source / name)
  # One device, as a user's machine has, and the suite's fast CPU compiles.
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  env["XLA_FLAGS"] = xla_flags(1)
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
  run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source],
      tmp_path, env)
  (wheel,) = (tmp_path / "dist").glob("dsbs_jax-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    packaged = {name[len("dsbs_jax/shipped/"):] for name in archive.namelist()
                if name.startswith("dsbs_jax/shipped/")}
  assert packaged == shipped_files(REPO)

  # Installed beside the dependencies already installed, and run from elsewhere.
  target, work = tmp_path / "site", tmp_path / "work"
  work.mkdir()
  run([*pip, "install", "--no-deps", "-q", "--target", target, wheel], tmp_path, env)
  env["PYTHONPATH"] = str(target)
  located = run([sys.executable, "-c",
                 "import importlib.util, dsbs_jax; from dsbs_jax import resources; "
                 "print(dsbs_jax.__file__); print(importlib.util.find_spec('tasks').origin); "
                 "print(resources.DATA_ROOT)"], work, env).split()
  assert located == [str(target / "dsbs_jax" / "__init__.py"), str(target / "tasks" / "__init__.py"),
                     str(target / "dsbs_jax" / "shipped")]
  dsbs = [str(target / "bin" / "dsbs")]
  listing = run([*dsbs, "tasks", "--dataset", "svamp"], work, env)
  assert "svamp_dsbs_teacher" in listing and "1,440" in listing
  model_dir = tmp_path / "model"
  run([*dsbs, "train", "--gin_file=quickstart.gin", f"--gin.MODEL_DIR='{model_dir}'",
       "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=1", "--gin.CHECKPOINT_PERIOD=1",
       "--gin.train.eval_max_examples=8", "--gin.train.final_eval_max_examples=8",
       "--gin.T5Config.emb_dim=32", "--gin.T5Config.mlp_dim=64", "--gin.T5Config.head_dim=8",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}"], work, env)
  assert (model_dir / "results.json").is_file() and (model_dir / "checkpoints" / "1").is_dir()

