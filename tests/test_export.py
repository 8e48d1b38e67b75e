"""Tests for dsbs_jax.export: tiny students trained a few steps, exported as a Hugging Face
directory and as a TF SavedModel, loaded back, and proven to answer as `dsbs predict`
does on shipped CQA test and e-SNLI validation inputs; and clear errors."""
import gzip
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from conftest import xla_flags
from dsbs_jax import cli
from dsbs_jax import convert
from dsbs_jax import export
from dsbs_jax import infer
from dsbs_jax import resources
from dsbs_jax import run_dir
from dsbs_jax.models import t5
from test_convert import write_t5x_msgpack_checkpoint
from test_convert import write_t5x_style_gin

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY_TRAINING = [
    "--gin_file=quickstart.gin", "--gin.TRAIN_STEPS=4", "--gin.EVAL_PERIOD=4",
    "--gin.CHECKPOINT_PERIOD=4", "--gin.BATCH_SIZE=8", "--gin.train.eval_max_examples=16",
    "--gin.train.final_eval_max_examples=16",
    "--gin.T5Config.emb_dim=32", "--gin.T5Config.mlp_dim=64", "--gin.T5Config.head_dim=8",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}"]


def train_tiny(model_dir: pathlib.Path, *bindings: str) -> pathlib.Path:
  try:
    assert cli.main(["train", *TINY_TRAINING, f"--gin.MODEL_DIR='{model_dir}'", *bindings]) == 0
  finally:
    gin.clear_config()  # or later T5Config() calls, in any test, take this run's bindings
  return model_dir


@pytest.fixture(scope="session")
def v1_1_student(tmp_path_factory) -> pathlib.Path:
  """T5 v1.1 (gated GELU, own output layer), its parameters sharded (FSDP on 4 x 2)."""
  return train_tiny(tmp_path_factory.mktemp("v1_1") / "model",
                    "--gin.MESH_SHAPE=(4, 2)", "--gin.PARALLELISM='fsdp'")


@pytest.fixture(scope="session")
def v1_0_student(tmp_path_factory) -> pathlib.Path:
  """Original T5: ReLU, output through the scaled embedding."""
  return train_tiny(tmp_path_factory.mktemp("v1_0") / "model",
                    "--gin.T5Config.mlp_activations=('relu',)",
                    "--gin.T5Config.logits_via_embedding=True")


def read_inputs(path: pathlib.Path, count: int) -> list[str]:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line)["input"] for line in itertools.islice(f, count)]


# 16 CQA questions and 2 e-SNLI pairs whose premise and hypothesis are joined by "</s>".
INPUTS = (read_inputs(REPO / "rationales/cqa/test.jsonl.gz", 16)
          + read_inputs(REPO / "rationales/esnli/valid.jsonl.gz", 2))


def dsbs_predict(model_dir: pathlib.Path, tmp_path: pathlib.Path, *flags: str) -> list[dict]:
  inputs, outputs = tmp_path / "inputs.jsonl", tmp_path / "predictions.jsonl"
  inputs.write_text("".join(json.dumps({"input": text}) + "\n" for text in INPUTS))
  assert cli.main(["predict", "--checkpoint", str(model_dir), "--input", str(inputs),
                   "--output", str(outputs), *flags]) == 0
  return [json.loads(line) for line in outputs.read_text().splitlines()]


def dsbs_export(*argv) -> int:
  return cli.main(["export", *map(str, argv)])


def hf_generate(directory: pathlib.Path, texts: list[str]) -> list[str]:
  """Greedy outputs of transformers on the export, as a user would run it."""
  import transformers  # pylint: disable=import-outside-toplevel  (slow to import: only where used)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  model = transformers.T5ForConditionalGeneration.from_pretrained(directory,
                                                                  local_files_only=True)
  prefix = json.loads((directory / export.MANIFEST_FILE).read_text())["task_prefixes"]["label"]
  encoded = tokenizer([prefix + text for text in texts], return_tensors="pt", padding=True,
                      truncation=True)
  return tokenizer.batch_decode(model.generate(**encoded), skip_special_tokens=True)


def serve(directory: pathlib.Path, texts: list[str]) -> dict[str, list[str]]:
  signature = tf.saved_model.load(str(directory)).signatures[export.SIGNATURE_NAME]
  outputs = signature(inputs=tf.constant(texts))
  return {name: [text.decode("utf-8") for text in values.numpy()]
          for name, values in outputs.items()}


# ------------------------------------------------------------------------------
# Hugging Face.
# ------------------------------------------------------------------------------
@pytest.mark.slow
def test_hf_export_of_sharded_v1_1_generates_as_dsbs_predict(v1_1_student, tmp_path):
  out = tmp_path / "hf"
  assert dsbs_export("--checkpoint", v1_1_student, "--format", "hf", "--out", out) == 0
  assert {p.name for p in out.iterdir()} == {
      "config.json", "model.safetensors", "generation_config.json", "spiece.model",
      "tokenizer_config.json", export.MANIFEST_FILE, export.MODEL_CARD_FILE}
  # Every file as the umask makes them, the weights too (safetensors writes 0600).
  assert len({p.stat().st_mode & 0o777 for p in out.iterdir()}) == 1
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  assert manifest["source"] == {"checkpoint": str(v1_1_student), "step": 4,
                                "mixture_or_task_name": "cqa_dsbs_teacher", "alpha": 0.5,
                                "train_fraction": 1.0, "subsample_seed": 0}
  results = json.loads((v1_1_student / "results.json").read_text())
  assert manifest["metrics"] == {"step": 4, "label_task": "cqa_label_teacher",
                                 "validation": results["validation"], "test": results["test"],
                                 "majority_baseline_test": results["majority_baseline_test"]}
  assert manifest["task_prefixes"] == {"label": "[label] ", "rationale": "[rationale] "}
  assert manifest["vocabulary"] == {"file": "spiece.model", "extra_ids": 0}
  assert manifest["feature_lengths"] == {"inputs": 64, "targets": 32}
  assert manifest["decoding"] == {"method": "greedy", "decode_length": 32, "with_rationales": False}
  expected = [record["prediction"] for record in dsbs_predict(v1_1_student, tmp_path)]
  assert hf_generate(out, INPUTS) == expected
  # The model card says what the manifest says; the generation config is what predict does.
  card = (out / export.MODEL_CARD_FILE).read_text()
  for fact in ("`cqa_dsbs_teacher` (alpha 0.5, training-data fraction 1.0", "`[label] `",
               "`[rationale] `", f"| test | accuracy {results['test']['accuracy']:.2%} |",
               f"| validation | accuracy {results['validation']['accuracy']:.2%} |",
               "greedy decoding of at\nmost 32 new tokens", "on validation (this export)"):
    assert fact in card, fact
  generation = pytest.importorskip("transformers").GenerationConfig.from_pretrained(out)
  assert (generation.max_new_tokens, generation.num_beams, generation.do_sample) == (32, 1, False)


@pytest.mark.slow
def test_hf_export_of_original_t5_generates_as_dsbs_predict(v1_0_student, tmp_path):
  out = tmp_path / "hf"
  assert dsbs_export("--checkpoint", v1_0_student, "--format", "hf", "--out", out) == 0
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["feed_forward_proj"] == "relu" and hf_config["tie_word_embeddings"]
  expected = [record["prediction"] for record in dsbs_predict(v1_0_student, tmp_path)]
  assert hf_generate(out, INPUTS) == expected


@pytest.mark.slow
def test_sharded_checkpoint_exports_on_one_device(v1_1_student, tmp_path):
  # Trained on 8 devices (4 x 2 mesh); a fresh process sees one.
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "dsbs_jax.cli", "export", "--checkpoint", str(v1_1_student),
       "--format", "hf", "--out", str(tmp_path / "hf")],
      env=env, cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_scanned_run_exports_as_the_same_run_unrolled(v1_1_student, tmp_path):
  # A scanned run's checkpoints hold its layers stacked: the same training state written
  # that way exports the same Hugging Face weights and the same per-layer parameters.
  scanned_run = tmp_path / "scanned"
  shutil.copytree(v1_1_student, scanned_run)
  checkpointer = run_dir.RunDir(scanned_run).checkpointer(asynchronous=False)
  try:
    state, input_state = checkpointer.restore_on_one_device(4)
    checkpointer.delete_after(0)
    checkpointer.save(4, t5.params_in_layout(state, stacked=True), input_state)
  finally:
    checkpointer.close()
  for run, out in ((v1_1_student, tmp_path / "unrolled_hf"), (scanned_run, tmp_path / "hf")):
    assert dsbs_export("--checkpoint", run, "--format", "hf", "--out", out) == 0
  assert ((tmp_path / "hf" / "model.safetensors").read_bytes()
          == (tmp_path / "unrolled_hf" / "model.safetensors").read_bytes())
  scanned = export.load_student(scanned_run, "latest")
  assert t5.holds_stacked_layers(scanned.params) == t5.scans_layers(scanned.config)
  jax.tree.map(np.testing.assert_array_equal,
               t5.params_in_layout(scanned.params, stacked=False),
               t5.params_in_layout(export.load_student(v1_1_student, "latest").params,
                                   stacked=False))


# ------------------------------------------------------------------------------
# TF SavedModel.
# ------------------------------------------------------------------------------
# Run in a process of its own that imports TensorFlow and nothing else: the token-ids
# SavedModel loads and answers; the text one cannot load without tensorflow-text's ops.
PLAIN_TENSORFLOW_CLIENT = """
import json, sys
import numpy as np
import tensorflow as tf
export_dir, ids_file = sys.argv[1:]
model = tf.saved_model.load(export_dir + "/token_ids")
output = model.signatures["serving_default"](input_ids=tf.constant(np.load(ids_file)))
result = {"output_ids": output["output_ids"].numpy().tolist(),
          "tensorflow_text_imported": "tensorflow_text" in sys.modules}
try:
  tf.saved_model.load(export_dir)
  result["text_model_error"] = None
except Exception as error:  # pylint: disable=broad-except
  result["text_model_error"] = str(error)
print(json.dumps(result))
"""


@pytest.mark.slow
def test_saved_model_answers_and_explains_as_dsbs_predict(v1_1_student, tmp_path):
  out = tmp_path / "saved_model"
  assert dsbs_export("--checkpoint", v1_1_student, "--format", "saved_model", "--out", out,
                     "--with_rationales") == 0
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  text_model, token_ids_model = manifest["saved_models"]["."], manifest["saved_models"]["token_ids"]
  assert text_model["signatures"][export.SIGNATURE_NAME]["outputs"] == {
      "prediction": "[batch] string", "rationale": "[batch] string"}
  assert "tensorflow-text" in text_model["needs"] and "TensorFlow only" in token_ids_model["needs"]
  expected = dsbs_predict(v1_1_student, tmp_path, "--rationale")
  served = serve(out, INPUTS)
  assert served["prediction"] == [record["prediction"] for record in expected]
  assert served["rationale"] == [record["rationale"] for record in expected]
  # Any batch size: the batch dimension is polymorphic.
  assert serve(out, INPUTS[-3:])["prediction"] == served["prediction"][-3:]

  # Token ids in, ids out, with TensorFlow alone: the client tokenizes with the prefixes
  # and the vocabulary file the manifest names.
  vocabulary = seqio.SentencePieceVocabulary(str(out / manifest["vocabulary"]["file"]),
                                             extra_ids=manifest["vocabulary"]["extra_ids"])
  prefixes = manifest["task_prefixes"]
  texts = [prefixes["label"] + text for text in INPUTS] + [prefixes["rationale"] + text for text in INPUTS]
  input_ids = infer.tokenize_inputs(vocabulary, texts, manifest["feature_lengths"]["inputs"])
  np.save(tmp_path / "input_ids.npy", input_ids)
  result = subprocess.run(
      [sys.executable, "-c", PLAIN_TENSORFLOW_CLIENT, str(out), str(tmp_path / "input_ids.npy")],
      cwd=tmp_path, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  client = json.loads(result.stdout.strip().splitlines()[-1])
  assert not client["tensorflow_text_imported"]
  assert "Op type not registered 'Sentencepiece" in client["text_model_error"]
  decoded = [vocabulary.decode(ids) for ids in client["output_ids"]]
  assert decoded == served["prediction"] + served["rationale"]
  # The text SavedModel carries the same token-ids signature.
  signature = tf.saved_model.load(str(out)).signatures[export.TOKEN_IDS_SIGNATURE]
  np.testing.assert_array_equal(signature(input_ids=tf.constant(input_ids))["output_ids"].numpy(),
                                client["output_ids"])


@pytest.mark.slow
def test_saved_model_beam_search_answers_as_dsbs_predict(v1_0_student, tmp_path):
  out = tmp_path / "saved_model"
  assert dsbs_export("--checkpoint", v1_0_student, "--format", "saved_model", "--out", out,
                     "--decode", "beam", "--num_beams", "4") == 0
  expected = dsbs_predict(v1_0_student, tmp_path, "--method", "beam")
  served = serve(out, INPUTS[:6] + INPUTS[-2:])
  assert served == {"prediction": [r["prediction"] for r in expected[:6] + expected[-2:]]}
  assert json.loads((out / export.MANIFEST_FILE).read_text())["decoding"] == {
      "method": "beam", "num_beams": 4, "length_penalty": 0.6, "decode_length": 32,
      "with_rationales": False}


def test_length_penalty_is_the_flag_and_alpha_its_deprecated_alias(monkeypatch, capsys):
  received = []
  monkeypatch.setattr(export, "export", lambda model_dir, out, export_format, step, decode,
                      overwrite: received.append(decode) or pathlib.Path(out))
  beam = ["--checkpoint", "run", "--format", "saved_model", "--out", "out", "--decode", "beam"]
  assert dsbs_export(*beam) == 0
  assert dsbs_export(*beam, "--length_penalty", "0.2") == 0
  assert "deprecated" not in capsys.readouterr().err
  assert dsbs_export(*beam, "--alpha", "0.3") == 0
  assert ("dsbs export: warning: --alpha is deprecated and will be removed in the next release; "
          "use --length_penalty") in capsys.readouterr().err
  assert [decode.length_penalty for decode in received] == [0.6, 0.2, 0.3]


def test_top_k_by_sort_equals_lax_top_k_with_ties():
  values = jax.numpy.array([[3.0, 1.0, 3.0, -np.inf, 2.0, 3.0], [0.0, 0.0, 5.0, 1.0, 1.0, 0.0]])
  expected = jax.lax.top_k(values, 4)
  actual = export._top_k_by_sort(values, k=4, axis=1)  # pylint: disable=protected-access
  for got, want in zip(actual, expected):
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------
# Errors: one line naming the path or flag, and nothing left behind.
# ------------------------------------------------------------------------------
def assert_one_line_error(capsys, *fragments: str):
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith("dsbs export: error:"), err
  for fragment in fragments:
    assert fragment in err[-1]


def test_missing_checkpoint_is_named(tmp_path, capsys):
  out = tmp_path / "out"
  assert dsbs_export("--checkpoint", tmp_path / "nothing", "--format", "hf", "--out", out) == 2
  assert_one_line_error(capsys, str(tmp_path / "nothing"))
  assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_named(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    dsbs_export("--checkpoint", tmp_path, "--format", "onnx", "--out", tmp_path / "out")
  assert exit_info.value.code == 2
  assert "--format" in capsys.readouterr().err
  with pytest.raises(export.ExportError, match="--format 'onnx'"):
    export.export(tmp_path, tmp_path / "out", "onnx")


def test_existing_output_needs_overwrite(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert dsbs_export("--checkpoint", tmp_path / "nothing", "--format", "hf", "--out", out) == 2
  assert_one_line_error(capsys, str(out), "--overwrite")
  assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
# orbax's failed restore of a corrupt checkpoint leaves a closed event loop to the collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_named_and_overwrite_keeps_the_old_export(v1_1_student, tmp_path,
                                                                        capsys):
  out = tmp_path / "out"
  assert dsbs_export("--checkpoint", v1_1_student, "--format", "hf", "--out", out) == 0
  corrupt = tmp_path / "corrupt"
  shutil.copytree(v1_1_student, corrupt)
  for data_file in (corrupt / "checkpoints" / "4" / "state").rglob("d/*"):
    data_file.write_bytes(b"not an array")
  assert dsbs_export("--checkpoint", corrupt, "--format", "hf", "--out", out,
                     "--overwrite") == 2
  assert_one_line_error(capsys, str(corrupt / "checkpoints" / "4"))
  # The earlier export is untouched and no temporary directory is left beside it.
  assert json.loads((out / export.MANIFEST_FILE).read_text())["source"]["checkpoint"] == str(
      v1_1_student)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "out"]
  # --overwrite replaces a complete export.
  assert dsbs_export("--checkpoint", v1_1_student, "--format", "hf", "--out", out, "--step",
                     "latest", "--overwrite") == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "out"]


def test_saved_model_options_are_refused_for_hf(tmp_path, capsys):
  assert dsbs_export("--checkpoint", tmp_path, "--format", "hf", "--out", tmp_path / "out",
                     "--with_rationales") == 2
  assert_one_line_error(capsys, "--with_rationales")
  assert not (tmp_path / "out").exists()


def test_bad_step_is_named(tmp_path, capsys):
  with pytest.raises(SystemExit):
    dsbs_export("--checkpoint", tmp_path, "--format", "hf", "--out", tmp_path / "o",
                "--step", "last")
  assert "--step" in capsys.readouterr().err


# A T5X run's operative config.gin as T5X writes it for gin/t5x/train.gin: the model it
# trained (T5X's network.T5Config), the mixture, the feature lengths, the vocabulary and the
# task options it bound.
T5X_RUN_CONFIG = """
from __gin__ import dynamic_registration
import seqio
from dsbs_jax import distillation
from t5x.examples.t5 import network
include 'models/base_like.gin'

MIXTURE_OR_TASK_NAME = 'cqa_dsbs_teacher'
TASK_FEATURE_LENGTHS = {{'inputs': 64, 'targets': 32}}
VOCABULARY_FILE = '{vocabulary}'
VOCABULARY_EXTRA_IDS = 0
network.T5Config.vocab_size = 8000
network.T5Config.emb_dim = 32
distillation.TaskOptions.label_prefix = 'predict: '
seqio.SentencePieceVocabulary.sentencepiece_model_file = %VOCABULARY_FILE
distillation.TaskOptions.vocabulary_path = %VOCABULARY_FILE
distillation.TaskOptions.vocabulary_extra_ids = %VOCABULARY_EXTRA_IDS
train/utils.DatasetConfig.mixture_or_task_name = %MIXTURE_OR_TASK_NAME
"""


@pytest.mark.slow
def test_a_t5x_runs_checkpoint_reaches_predict_and_export_as_the_readme_shows(tmp_path):
  t5x_root = tmp_path / "t5x_root"
  write_t5x_style_gin(t5x_root)
  config_gin = tmp_path / "t5x_run" / "config.gin"
  config_gin.parent.mkdir()
  config_gin.write_text(T5X_RUN_CONFIG.format(vocabulary=resources.VOCABULARY_FILE))
  config = convert.config_from_gin(config_gin, [t5x_root])
  params = t5.init_params(config, jax.random.key(3))
  write_t5x_msgpack_checkpoint(params, tmp_path / "t5x_run" / "checkpoint_1004")
  converted = tmp_path / "conv"
  assert cli.main(["convert", "--from", "t5x", str(tmp_path / "t5x_run" / "checkpoint_1004"),
                   f"--gin_file={config_gin}", f"--gin_search_path={t5x_root}",
                   "--dtype", "float32",  # as transformers runs it, to compare greedy outputs
                   "--out", str(converted)]) == 0
  predictions = dsbs_predict(converted, tmp_path)
  assert len(predictions) == len(INPUTS)
  out = tmp_path / "hf"
  assert dsbs_export("--checkpoint", converted, "--format", "hf", "--out", out) == 0
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  assert manifest["task_prefixes"]["label"] == "predict: "  # the T5X run's, not the default
  assert manifest["source"]["step"] == 1004
  assert manifest["feature_lengths"] == {"inputs": 64, "targets": 32}
  # The exported model answers as dsbs predict did on the converted checkpoint.
  assert hf_generate(out, INPUTS) == [record["prediction"] for record in predictions]
