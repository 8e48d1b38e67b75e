"""Where the files that dsbs-jax ships live: gin configs, teacher rationales, prompts, vocabulary.

In a checkout (run from source or installed with `pip install -e .`) they are the
repository's `gin/` and `rationales/` folders beside `dsbs_jax/`. An installed wheel
carries the same folders as package data in `dsbs_jax/shipped/` (setup.py maps them
there), found through importlib.resources. Every module that reads a shipped file takes its path
from here; this module only locates, it must not read or parse anything.
"""
import importlib.resources
import pathlib


class MissingResourcesError(FileNotFoundError):
  """Neither the package nor the checkout around it holds the shipped folders."""


def _data_root() -> pathlib.Path:
  """The folder holding gin/ and rationales/: the installed package, or the checkout."""
  package = importlib.resources.files("dsbs_jax")
  if not isinstance(package, pathlib.Path):
    raise MissingResourcesError(
        f"dsbs_jax is imported from {package}, not from a folder; install it unzipped "
        "(pip install dsbs-jax) so its gin/ and rationales/ files can be opened")
  for root in (package / "shipped", package.parent):  # wheel, then checkout
    if (root / "gin").is_dir() and (root / "rationales").is_dir():
      return root
  raise MissingResourcesError(
      f"no gin/ and rationales/ folders in {package / 'shipped'} (an installed wheel) or "
      f"in {package.parent} (a checkout); reinstall dsbs-jax")


DATA_ROOT = _data_root()
GIN_DIR = DATA_ROOT / "gin"
GIN_MODELS_DIR = GIN_DIR / "models"
RATIONALES_DIR = DATA_ROOT / "rationales"
PROMPTS_DIR = RATIONALES_DIR / "prompts"
VOCABULARY_FILE = RATIONALES_DIR / "vocab" / "dsbs_spm_8k.model"
