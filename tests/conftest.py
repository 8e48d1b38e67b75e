"""Shared test fixtures: the tiny T5 config, tiny random Hugging Face T5 models, one tiny
finished training run (`uninterrupted`) that tests copy, or check they leave as it was, and
a small copy of the shipped records whose NLI train inputs are given, the records the
stand-in teacher (fake_teacher.py) replays, and a new bucket on the session's Cloud Storage
emulator (`gcs_bucket`; gcs_emulator.py)."""
import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import uuid

import gcs_emulator

# The CPU compiler without LLVM's costly optimizations: the tests' tiny programs compile in
# two thirds of the CPU time and run about as fast. TPU compiles ignore these two flags (the
# same memory and cost analysis of a train step on v5p:2x2x2 with and without them).
FAST_CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(device_count: int = 1) -> str:
  """XLA_FLAGS for a process of the tests: the fast CPU compiles, `device_count` CPU devices."""
  return f"{FAST_CPU_COMPILE_FLAGS} --xla_force_host_platform_device_count={device_count}"


# Set before anything imports jax, with eight simulated CPU devices for the sharding tests.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()

# One persistent compilation cache for the session, its pytest-xdist workers and the `dsbs`
# processes the tests start included: many tests train, evaluate and decode the same tiny
# model, and each program is then compiled once instead of once per run. The main process
# makes it (workers inherit its environment) and removes it at its end. A size limit turns
# on JAX's file lock, so that no process reads an entry another is still writing.
if "PYTEST_XDIST_WORKER" not in os.environ:
  COMPILATION_CACHE_DIR = tempfile.mkdtemp(prefix="dsbs_tests_jax_cache_")
  atexit.register(shutil.rmtree, COMPILATION_CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE_DIR
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  # One Cloud Storage emulator for the session, its workers and their `dsbs` processes (each
  # test makes a bucket of its own: `gcs_bucket`); started before anything reads the variables.
  gcs_emulator.use(gcs_emulator.start(pathlib.Path(COMPILATION_CACHE_DIR) / "fake-gcs-server.log"))

from dsbs_jax import gpu_runtime
from dsbs_jax import tpu_runtime

# Before jax starts: libtpu loads only to compile, the CUDA plugin without its driver check.
tpu_runtime.keep_off_hosts_without_chips()
gpu_runtime.quiet_on_hosts_without_gpus()

import filelock
import gin
import pytest

import fake_teacher
from dsbs_jax import cli
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources
from dsbs_jax.models import t5

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_VOCAB_SIZE = 128
NLI = ("esnli", "anli1")
SMALL_TRAIN = 300


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core, at most 4 (each holds JAX, TensorFlow and torch)."""
  del config
  return min(len(os.sched_getaffinity(0)), 4)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
  """Measured matmul peaks go to a cache of the session's own, not the user's."""
  os.environ["DSBS_CACHE_DIR"] = str(tmp_path_factory.mktemp("dsbs_cache"))


@pytest.fixture
def gcs_bucket() -> str:
  """gs://NAME of a new, empty bucket on the session's emulator."""
  from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  name = f"test-{uuid.uuid4().hex[:16]}"
  gcs.Client().create_bucket(name)
  return f"gs://{name}"


@pytest.fixture(autouse=True)
def clean_gin():
  """Every test starts and ends with an empty gin config."""
  gin.clear_config()
  yield
  gin.clear_config()


def modules_loaded_by(code: str, modules) -> list[str]:
  """Which of `modules` a fresh Python process has imported once it ran `code` (with this
  checkout first on its path); `code`'s own output comes before the list's line."""
  code += f"\nimport sys\nprint(sorted(m for m in {tuple(modules)!r} if m in sys.modules))"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
  return json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))


def tiny_run_flags(model_dir, train_steps=6, checkpoint_period=2, extra=()):
  """`dsbs train` flags for gin/quickstart.gin shrunk to a few steps of a very small model."""
  return ["train", "--gin_file=quickstart.gin", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={train_steps}", "--gin.BATCH_SIZE=8",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}",
          "--gin.T5Config.emb_dim=32", "--gin.T5Config.mlp_dim=64", "--gin.T5Config.head_dim=8",
          "--gin.T5Config.dropout_rate=0.1", "--gin.train.log_period=1",
          f"--gin.CHECKPOINT_PERIOD={checkpoint_period}", "--gin.EVAL_PERIOD=1000",
          "--gin.train.eval_max_examples=8", "--gin.train.final_eval_max_examples=8",
          "--gin.train.eval_batch_size=8", *extra]


def session_root(tmp_path_factory) -> pathlib.Path:
  """The session's temporary folder, common to all its pytest-xdist workers."""
  basetemp = tmp_path_factory.getbasetemp()
  return basetemp.parent if "PYTEST_XDIST_WORKER" in os.environ else basetemp


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
  """A finished 6-step run of `tiny_run_flags` (checkpoints 2, 4, 6); copy it to change it.
  The first worker to need it trains it, and the others wait for it and use it too."""
  root = session_root(tmp_path_factory)
  model_dir = root / "uninterrupted"
  with filelock.FileLock(root / "uninterrupted.lock"):
    if not (model_dir / "results.json").exists():
      shutil.rmtree(model_dir, ignore_errors=True)  # what a failed worker left
      assert cli.main(tiny_run_flags(str(model_dir))) == 0
      gin.clear_config()
  return str(model_dir)


@pytest.fixture(scope="session")
def small_nli_dir(tmp_path_factory):
  """(rationales dir, {dataset: train inputs JSONL}): the shipped records, with NLI train
  splits cut to the first SMALL_TRAIN teacher outputs and a matching train-inputs file per
  NLI dataset (labels set so that most agree with the teacher)."""
  root = tmp_path_factory.mktemp("rationales")
  shipped = str(resources.RATIONALES_DIR)
  inputs = {}
  for dataset in ("cqa", "svamp", *NLI):
    shutil.copytree(os.path.join(shipped, dataset), root / dataset)
  for dataset in NLI:
    train = records.read_split(shipped, dataset, "train")[:SMALL_TRAIN]
    os.remove(records.split_path(str(root), dataset, "train"))
    rationales.write_records(str(root / dataset / "train.jsonl"), train)
    path = root / f"{dataset}_train.json"
    with open(path, "w") as f:
      for i, record in enumerate(train):
        label = (rationales.NLI_LABELS.index(record.teacher_label)
                 if record.teacher_label in rationales.NLI_LABELS else i % 3)
        f.write(json.dumps({"premise": f"premise {i}", "hypothesis": f"hypothesis {i}",
                            "label": label}) + "\n")
    inputs[dataset] = str(path)
  return str(root), inputs


@pytest.fixture(scope="module")
def cqa_records():
  return fake_teacher.shipped("cqa", "train")[200:240]


@pytest.fixture(scope="module")
def svamp_records():
  svamp = fake_teacher.shipped("svamp", "train")
  failures = [r for r in svamp if r.parse_error][:6]  # keep the paper's fallbacks in view
  return failures + [r for r in svamp if not r.parse_error][:24]


@pytest.fixture
def key_env(monkeypatch):
  monkeypatch.setenv(fake_teacher.KEY_ENV, fake_teacher.SECRET)


@pytest.fixture(scope="session")
def tiny_config() -> t5.T5Config:
  """A tiny T5 v1.1 (matches gin/models/t5_1_1_tiny.gin), without dropout."""
  return t5.T5Config(vocab_size=TINY_VOCAB_SIZE, emb_dim=32, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2, head_dim=8, mlp_dim=64,
                     mlp_activations=("gelu", "linear"), dropout_rate=0.0)


def make_hf_t5(version: str, seed: int = 0, eos_boost: float = 0.0):
  """A random transformers T5ForConditionalGeneration in eval mode, float32.

  version 'v1.1': gated GELU with its own output layer (as Flan-T5); 'v1.0': ReLU with
  the output tied to the scaled embedding. `eos_boost` raises EOS's output weights so
  that generated sequences end at varied lengths.
  """
  import torch  # pylint: disable=import-outside-toplevel  (slow to import: only where used)
  import transformers  # pylint: disable=import-outside-toplevel
  gated = version == "v1.1"
  hf_config = transformers.T5Config(
      vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
      num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=32,
      relative_attention_max_distance=128, dropout_rate=0.0,
      feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(hf_config)
  if gated:
    # transformers >= 5 always ties lm_head to the embedding; real Flan-T5 checkpoints
    # have their own, so give this model one too.
    model.lm_head = torch.nn.Linear(32, TINY_VOCAB_SIZE, bias=False)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
  model.eval()
  if eos_boost:
    # Point EOS's output row along the decoder's mean final state, so that its logit
    # is about eos_boost on typical states and higher on some.
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(2, TINY_VOCAB_SIZE, (8, 12), generator=generator)
    with torch.no_grad():
      states = model(input_ids=inputs, decoder_input_ids=inputs,
                     output_hidden_states=True).decoder_hidden_states[-1]
      mean_state = model.decoder.final_layer_norm(states).mean(dim=(0, 1))
      if not gated:
        mean_state = mean_state * 32**-0.5
      model.lm_head.weight[1] = eos_boost * mean_state / mean_state.square().sum()
  return model
