"""`dsbs` commands with every path on gs://, against the session's Cloud Storage emulator
(conftest.py): a run killed mid-checkpoint resumes to an uninterrupted run's losses, one
writer per run folder (a live lease refuses, a dead holder's is taken over), a bucket that
does not exist is refused in one line with nothing created, runs read their vocabulary,
records and initial checkpoint from gs://, and export, convert and distill read and write
there."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest
from google.cloud import storage as gcs

from conftest import tiny_run_flags
from test_train import assert_resumed_like_uninterrupted, logged_steps
from dsbs_jax import checkpoints
from dsbs_jax import convert
from dsbs_jax import cli
from dsbs_jax import folder_lock
from dsbs_jax import resources
from dsbs_jax import run_dir
from dsbs_jax import storage
from dsbs_jax.models import t5


def objects_under(url: str) -> list[str]:
  bucket, _, prefix = url[len("gs://"):].partition("/")
  return sorted(blob.name for blob in gcs.Client().list_blobs(bucket, prefix=prefix.rstrip("/") + "/"))


@pytest.mark.slow
def test_a_run_killed_mid_checkpoint_resumes_to_the_uninterrupted_runs_losses(
    uninterrupted, gcs_bucket, capsys):
  model_dir = f"{gcs_bucket}/runs/killed"
  process = subprocess.Popen([sys.executable, "-m", "dsbs_jax.cli", *tiny_run_flags(model_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  lock = storage.path(f"{model_dir}/{folder_lock.LOCK_NAME}")
  while time.time() < deadline and process.poll() is None and not lock.exists():
    pass
  # A second run on the folder while the first holds it (it compiles for seconds yet).
  assert cli.main(tiny_run_flags(model_dir)) == 2
  assert f"is in use by `dsbs train` (pid {process.pid} on " in capsys.readouterr().err
  gin.clear_config()
  while time.time() < deadline and process.poll() is None:
    if objects_under(f"{model_dir}/checkpoints/4"):  # the write of step 4 has begun
      break
  process.send_signal(signal.SIGKILL)
  output = process.communicate()[0]
  assert objects_under(f"{model_dir}/checkpoints/2"), output[-3000:]
  # Whatever of step 4 the kill let through, a step without orbax's commit marker is only
  # half written: take the marker away, as a kill a moment earlier would have.
  bucket = gcs.Client().bucket(gcs_bucket[len("gs://"):])
  for name in objects_under(f"{model_dir}/checkpoints/4"):
    if name.endswith("commit_success.txt"):
      bucket.blob(name).delete()
  # The killed run's lock is still there; its pid is gone from this host, so it is taken.
  assert storage.read_with_generation(str(lock)) is not None
  assert cli.main(tiny_run_flags(model_dir)) == 0
  assert_resumed_like_uninterrupted(model_dir, uninterrupted)
  results = json.loads(storage.path(f"{model_dir}/results.json").read_text())
  assert "accuracy" in results["test"]
  assert storage.path(f"{model_dir}/learning_curves.png").read_bytes().startswith(b"\x89PNG")
  assert not storage.path(f"{model_dir}/{folder_lock.LOCK_NAME}").exists()  # released


def write_lock(url: str, host: str, pid: int, lease_s: float) -> None:
  storage.path(url).write_text(json.dumps({"command": "dsbs train", "pid": pid, "host": host,
                                           "since": "2026-12-07 10:00:00", "lease_s": lease_s}))


@pytest.mark.slow
def test_one_writer_per_gcs_folder_and_a_dead_holders_lease_is_taken_over(gcs_bucket, capsys):
  model_dir = f"{gcs_bucket}/runs/shared"
  lock = f"{model_dir}/{folder_lock.LOCK_NAME}"
  write_lock(lock, "worker-7", 4242, lease_s=60)  # a live run on another host
  assert cli.main(tiny_run_flags(model_dir, train_steps=2)) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"dsbs train: error: MODEL_DIR {model_dir} is in use by `dsbs train` "
                        "(pid 4242 on worker-7, since 2026-12-07 10:00:00)"), err
  assert err.count("\n") == 1
  assert objects_under(model_dir) == [f"runs/shared/{folder_lock.LOCK_NAME}"]  # nothing else
  gin.clear_config()
  dead_pid = subprocess.Popen(["true"])  # a pid on this host that is gone
  dead_pid.wait()
  write_lock(lock, socket.gethostname(), dead_pid.pid, lease_s=60)
  assert cli.main(tiny_run_flags(model_dir, train_steps=2)) == 0
  assert logged_steps(model_dir) == [1, 2]
  gin.clear_config()
  write_lock(lock, "worker-7", 4242, lease_s=0.0)  # another host's, whose lease ran out
  assert cli.main(tiny_run_flags(model_dir, train_steps=4)) == 0
  assert logged_steps(model_dir) == [1, 2, 3, 4]


def test_a_lease_is_renewed_while_held_and_released_at_the_end(gcs_bucket, monkeypatch):
  monkeypatch.setattr(folder_lock, "LEASE_S", 0.4)
  url = f"{gcs_bucket}/run/{folder_lock.LOCK_NAME}"
  with folder_lock.lock_for(url, "MODEL_DIR x", "dsbs train"):
    generation = storage.read_with_generation(url)[1]
    deadline = time.time() + 10
    while storage.read_with_generation(url)[1] == generation:
      assert time.time() < deadline, "the lease was not renewed"
    assert folder_lock.holder(f"{gcs_bucket}/run").startswith("`dsbs train` (pid ")
    with pytest.raises(folder_lock.FolderInUseError, match="in use by `dsbs train`"):
      with folder_lock.lock_for(url, "MODEL_DIR x", "dsbs train"):
        pass
  assert storage.read_with_generation(url) is None
  assert folder_lock.holder(f"{gcs_bucket}/run") is None


def test_a_stale_lease_holds_nothing(gcs_bucket):
  folder = f"{gcs_bucket}/run"
  lock = f"{folder}/{folder_lock.LOCK_NAME}"
  write_lock(lock, "worker-7", 4242, lease_s=60)
  assert folder_lock.holder(folder) == "`dsbs train` (pid 4242 on worker-7, since 2026-12-07 10:00:00)"
  write_lock(lock, "worker-7", 4242, lease_s=0.0)
  assert folder_lock.holder(folder) is None


def test_a_missing_bucket_is_refused_in_one_line_and_nothing_is_created(tmp_path, monkeypatch,
                                                                        capsys):
  monkeypatch.chdir(tmp_path)
  url = "gs://no-such-bucket-here/runs/q1"
  assert cli.main(tiny_run_flags(url, train_steps=2)) == 2
  assert capsys.readouterr().err == f"dsbs train: error: {url}: no such bucket\n"
  assert os.listdir(tmp_path) == []


def test_another_scheme_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert cli.main(tiny_run_flags("s3://bucket/runs/q1", train_steps=2)) == 2
  assert capsys.readouterr().err == (
      "dsbs train: error: s3://bucket/runs/q1: s3:// is not supported; use a local path or "
      "gs://\n")
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_vocabulary_records_and_initial_checkpoint_read_from_gcs(uninterrupted, gcs_bucket,
                                                                 tmp_path, capsys):
  vocabulary = f"{gcs_bucket}/vocab/cqa_8k.model"
  storage.path(vocabulary).write_bytes(resources.VOCABULARY_FILE.read_bytes())
  records_url = f"{gcs_bucket}/data/mine.jsonl"
  lines = [json.dumps({"id": f"{i:03d}", "input": f"question {i}", "label": "yes" if i % 2 else "no",
                       "teacher_label": "yes", "rationale": f"because {i}",
                       "teacher_output": f"because {i}. So the answer is yes."})
           for i in range(40)]
  storage.path(records_url).write_text("\n".join(lines) + "\n")
  params, config, _ = run_dir.RunDir(uninterrupted).load_params("latest")
  pretrained = f"{gcs_bucket}/models/pretrained"
  checkpoints.save_model(pretrained, params, config)
  model_dir = f"{gcs_bucket}/runs/custom"
  flags = tiny_run_flags(model_dir, train_steps=2, extra=[
      f"--gin.TaskOptions.vocabulary_path='{vocabulary}'",
      f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained}'",
      "--gin.MIXTURE_OR_TASK_NAME='mine_dsbs_teacher'",
      f"--gin.register_custom_datasets.datasets=[{{'name': 'mine', 'rationales_file': "
      f"'{records_url}'}}]"])
  assert cli.main(flags) == 0
  out = capsys.readouterr().out
  assert f"initialized from {pretrained}" in out
  assert "mine_dsbs_teacher: every record read and checked" in out
  # The custom dataset's splits are laid out beside its record file, on gs://.
  assert sorted(objects_under(f"{gcs_bucket}/data/mine")) == [
      "data/mine/test.jsonl", "data/mine/train.jsonl", "data/mine/valid.jsonl"]
  assert (storage.path(f"{model_dir}/vocabulary.model").read_bytes()
          == resources.VOCABULARY_FILE.read_bytes())
  assert logged_steps(model_dir) == [1, 2]


# ------------------------------------------------------------------------------
# `dsbs export`, `convert` and `distill` on gs://.
# ------------------------------------------------------------------------------
def copy_tree(source, target) -> None:
  """Copies the files under `source` to `target`, either of them local or gs://."""
  for file in storage.files_under(source):
    copy = storage.path(f"{target}/{file.relative_to(storage.path(source))}")
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(file.read_bytes())


def relative_files(folder) -> list[str]:
  return [str(file.relative_to(storage.path(folder))) for file in storage.files_under(folder)]


@pytest.mark.slow
def test_hf_export_of_a_run_on_gcs_to_gcs_is_the_local_export_and_overwrite_replaces_it(
    uninterrupted, gcs_bucket, tmp_path):
  from dsbs_jax import export  # pylint: disable=import-outside-toplevel  (loads TensorFlow)
  model_dir, out, local = f"{gcs_bucket}/runs/trained", f"{gcs_bucket}/exports/hf", tmp_path / "hf"
  copy_tree(uninterrupted, model_dir)
  for checkpoint, folder in ((model_dir, out), (uninterrupted, local)):
    assert cli.main(["export", "--checkpoint", checkpoint, "--format", "hf", "--out",
                     str(folder)]) == 0
  names = relative_files(local)
  assert relative_files(out) == names and export.MANIFEST_FILE in names
  for name in names:
    exported, expected = storage.path(f"{out}/{name}").read_bytes(), (local / name).read_bytes()
    if name in (export.MANIFEST_FILE, export.MODEL_CARD_FILE):  # they name the checkpoint
      exported = exported.replace(model_dir.encode(), str(uninterrupted).encode())
    assert exported == expected, name
  # An export there is replaced only with --overwrite; files the new one lacks go.
  storage.path(f"{out}/stale.bin").write_bytes(b"an older export's")
  flags = ["export", "--checkpoint", model_dir, "--format", "hf", "--out", out, "--step", "4"]
  assert cli.main(flags) == 2
  assert storage.path(f"{out}/stale.bin").exists()
  assert cli.main([*flags, "--overwrite"]) == 0
  manifest = json.loads(storage.path(f"{out}/{export.MANIFEST_FILE}").read_text())
  assert manifest["source"]["checkpoint"] == model_dir and manifest["source"]["step"] == 4
  # Nothing is left beside it: no lock, no staging.
  assert objects_under(f"{gcs_bucket}/exports") == [f"exports/hf/{name}" for name in names]


@pytest.mark.slow
def test_saved_model_export_of_a_run_on_gcs_to_gcs_uploads_a_tree_that_serves(
    uninterrupted, gcs_bucket, tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from dsbs_jax import export  # pylint: disable=import-outside-toplevel
  model_dir, out = f"{gcs_bucket}/runs/trained", f"{gcs_bucket}/exports/saved_model"
  copy_tree(uninterrupted, model_dir)
  # TensorFlow, which must not be handed a URL, tokenizes with the run's vocabulary.
  assert cli.main(["export", "--checkpoint", model_dir, "--format", "saved_model",
                   "--out", out]) == 0
  names = relative_files(out)
  assert {"saved_model.pb", "token_ids/saved_model.pb", run_dir.VOCABULARY_FILE,
          export.MANIFEST_FILE} <= set(names)
  assert any(name.startswith("token_ids/variables/") for name in names)
  copy_tree(out, tmp_path / "saved_model")
  signature = tf.saved_model.load(str(tmp_path / "saved_model")).signatures[export.SIGNATURE_NAME]
  served = signature(inputs=tf.constant(["Where do you keep milk?", "What is round?"]))
  assert served["prediction"].shape == (2,)


def test_export_to_a_missing_bucket_is_refused_in_one_line_before_any_work(tmp_path, capsys):
  url = "gs://no-such-bucket-here/exports/hf"
  assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out",
                   url]) == 2
  assert capsys.readouterr().err == f"dsbs export: error: {url}: no such bucket\n"


@pytest.mark.slow
def test_convert_reads_hf_and_t5x_checkpoints_on_gcs_and_writes_models_there(gcs_bucket, tmp_path,
                                                                            tiny_config):
  import test_convert  # pylint: disable=import-outside-toplevel  (its T5X writer; loads torch)
  from conftest import make_hf_t5  # pylint: disable=import-outside-toplevel
  make_hf_t5("v1.0", seed=2).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
  copy_tree(tmp_path / "hf", f"{gcs_bucket}/pretrained/hf")
  converted = f"{gcs_bucket}/models/from_hf"
  for source, out in ((f"{gcs_bucket}/pretrained/hf", converted),
                      (tmp_path / "hf", tmp_path / "from_hf")):
    assert cli.main(["convert", "--from", "hf", str(source), "--out", str(out)]) == 0
  (params, config), (local_params, local_config) = map(
      checkpoints.load_model, (converted, tmp_path / "from_hf"))
  assert config == local_config
  jax.tree.map(np.testing.assert_array_equal, params, local_params)
  assert cli.main(["convert", "--from", "hf", f"{gcs_bucket}/pretrained/hf", "--out",
                   converted]) == 2  # already holds a model

  t5x_params = t5.init_params(tiny_config, jax.random.key(3))
  test_convert.write_t5x_msgpack_checkpoint(t5x_params, tmp_path / "t5x" / "checkpoint_1000")
  copy_tree(tmp_path / "t5x", f"{gcs_bucket}/t5x")
  # A model directory: the latest checkpoint_<step> is taken, its arrays read by tensorstore.
  assert cli.main(["convert", "--from", "t5x", f"{gcs_bucket}/t5x", "--config", "t5_1_1_tiny",
                   "--out", f"{gcs_bucket}/models/from_t5x"]) == 0
  imported, _ = checkpoints.load_model(f"{gcs_bucket}/models/from_t5x")
  jax.tree.map(np.testing.assert_array_equal, imported, t5x_params)
  # With the T5X run's config.gin, its run files are written there too, for predict/export.
  import test_export  # pylint: disable=import-outside-toplevel
  test_convert.write_t5x_style_gin(tmp_path / "t5x_root")
  config_gin = tmp_path / "config.gin"
  config_gin.write_text(test_export.T5X_RUN_CONFIG.format(vocabulary=resources.VOCABULARY_FILE))
  run_params = t5.init_params(convert.config_from_gin(config_gin, [tmp_path / "t5x_root"]),
                              jax.random.key(4))
  test_convert.write_t5x_msgpack_checkpoint(run_params, tmp_path / "t5x_run" / "checkpoint_1004")
  copy_tree(tmp_path / "t5x_run", f"{gcs_bucket}/t5x_run")
  served = f"{gcs_bucket}/models/from_t5x_run"
  assert cli.main(["convert", "--from", "t5x", f"{gcs_bucket}/t5x_run/checkpoint_1004",
                   f"--gin_file={config_gin}", f"--gin_search_path={tmp_path / 't5x_root'}",
                   "--out", served]) == 0
  run = run_dir.RunDir(served)
  assert run.spec().label_prefix == "predict: " and run.spec().input_length == 64
  assert json.loads(run.source_path.read_text())["step"] == 1004
  assert run.vocabulary_path.read_bytes() == resources.VOCABULARY_FILE.read_bytes()


@pytest.mark.slow
def test_distill_with_inputs_and_out_on_gcs_runs_every_stage_there_and_a_rerun_skips_them(
    gcs_bucket, monkeypatch, capsys):
  import fake_teacher  # pylint: disable=import-outside-toplevel
  from dsbs_jax import replay_teacher  # pylint: disable=import-outside-toplevel
  from dsbs_jax import teacher  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(fake_teacher.KEY_ENV, fake_teacher.SECRET)
  inputs, test = f"{gcs_bucket}/inputs/questions.jsonl", f"{gcs_bucket}/inputs/test.jsonl"
  out = f"{gcs_bucket}/distill/questions"
  copy_tree(resources.RATIONALES_DIR / "examples" / "distill", f"{gcs_bucket}/inputs")
  with fake_teacher.FakeTeacher({"cqa": replay_teacher.shipped_records("cqa")}) as fake:
    argv = ["distill", "--inputs", inputs, "--test", test,
            "--prompt", teacher.default_prompt_path("cqa"),
            "--teacher", fake.url, "--teacher_model", "palm-replay", "--api_key_env",
            fake_teacher.KEY_ENV, "--out", out, "--export", "hf", "--student", "t5_1_1_tiny",
            # Not the name test_distill.py's runs register in this worker process.
            "--name", "gcs_questions",
            "--steps", "2", "--gin.T5Config.vocab_size=8000", "--gin.BATCH_SIZE=8",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}",
            "--gin.train.eval_batch_size=8", *fake_teacher.FAST_RETRIES]
    assert cli.main(argv) == 0
    written = relative_files(out)
    for name in ("teacher/inputs.jsonl", "teacher/test.jsonl", "teacher/spend.jsonl",
                 "teacher/settings.json", "train.gin", "data/gcs_questions/train.jsonl",
                 "data/gcs_questions/test.jsonl", "student/results.json",
                 "export/hf/dsbs_export.json", "export/hf/model.safetensors", "report.md"):
      assert name in written, name
    assert any(name.startswith("student/checkpoints/2/") for name in written)
    assert not any(folder_lock.LOCK_NAME in name for name in written)
    assert len(storage.path(f"{out}/teacher/inputs.jsonl").read_text().splitlines()) == 48
    report = storage.path(f"{out}/report.md").read_text()
    assert "over every run in this folder: 6,400 in 64 requests" in report  # the ledger's
    assert "| test | gold labels |" in report
    assert f"--input {inputs}" in report and f"--input {test}" in report
    assert f"{out}/export/hf" in report
    requests = fake.requests
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: done" in printed and "export hf: done" in printed
    assert fake.requests == requests
