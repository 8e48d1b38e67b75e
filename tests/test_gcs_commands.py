"""`dsbs eval`, `predict`, `plot`, `rationales generate` and `compile --json / --write_gin`
reading and writing gs:// on the session's Cloud Storage emulator (conftest.py): the same
outputs as on a local disk."""
import json
import pathlib
import sys

import gin
import pytest

from dsbs_jax import cli
from dsbs_jax import gin_utils
from dsbs_jax import rationales
from dsbs_jax import storage
from dsbs_jax import teacher
from fake_teacher import FakeTeacher, assert_matches_shipped, generate_args, shipped


def upload_tree(local_folder, url: str) -> None:
  """Copies a local folder to `url`, file by file."""
  for file in storage.files_under(local_folder):
    target = storage.path(f"{url}/{file.relative_to(local_folder)}")
    target.write_bytes(file.read_bytes())


@pytest.mark.slow
def test_eval_and_predict_read_a_run_on_gcs_and_write_there(uninterrupted, gcs_bucket, tmp_path,
                                                           capsys):
  model_dir = f"{gcs_bucket}/runs/trained"
  upload_tree(uninterrupted, model_dir)
  inputs = f"{gcs_bucket}/in/questions.jsonl"
  storage.path(inputs).write_text('{"id": "a", "input": "Where do you keep milk?"}\n'
                                  '{"id": "b", "input": "What is round?"}\n')
  output = f"{gcs_bucket}/out/answers.jsonl"
  local_output = tmp_path / "answers.jsonl"
  for checkpoint, out in ((model_dir, output), (uninterrupted, str(local_output))):
    assert cli.main(["predict", "--checkpoint", checkpoint, "--input", inputs,
                     "--output", out, "--step", "6"]) == 0
  assert storage.path(output).read_bytes() == local_output.read_bytes()
  assert [json.loads(line)["id"] for line in local_output.read_text().splitlines()] == ["a", "b"]
  capsys.readouterr()
  assert cli.main(["eval", "--checkpoint", model_dir, "--split", "validation", "--step", "6",
                   "--batch_size", "64"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["step"] == 6 and "accuracy" in result
  written = storage.path(f"{model_dir}/predictions_validation_step6.jsonl").read_text()
  assert len(written.splitlines()) == 975  # CQA's validation split
  assert cli.main(["plot", f"{gcs_bucket}/runs", "--out", f"{gcs_bucket}/figures"]) == 0
  figure = storage.path(f"{gcs_bucket}/figures/learning_curves_trained.png")
  assert figure.read_bytes().startswith(b"\x89PNG")


def test_predict_refuses_a_missing_output_bucket_before_any_work(uninterrupted, capsys):
  assert cli.main(["predict", "--checkpoint", uninterrupted, "--input", "x.txt",
                   "--output", "gs://no-such-bucket-here/answers.jsonl"]) == 2
  assert capsys.readouterr().err == (
      "dsbs predict: error: gs://no-such-bucket-here/answers.jsonl: no such bucket\n")


def test_generate_writes_and_resumes_records_on_gcs(key_env, gcs_bucket, tmp_path):
  records = shipped("svamp", "validation")[:12]
  inputs = f"{gcs_bucket}/inputs/svamp.jsonl"
  storage.path(inputs).write_text("".join(
      json.dumps({"id": r.id, "input": r.input, "label": r.label}) + "\n" for r in records))
  out = f"{gcs_bucket}/records/svamp.jsonl"
  # A run stopped after four records, its last line torn by the kill.
  done = "".join(r.to_json() + "\n" for r in records[:4])
  storage.path(out).write_text(done + records[4].to_json()[:20])
  prompt = f"{gcs_bucket}/prompts/svamp.json"
  storage.path(prompt).write_bytes(pathlib.Path(teacher.default_prompt_path("svamp")).read_bytes())
  with FakeTeacher({"svamp": records}) as fake:
    args = generate_args(fake, inputs, out, "svamp")
    args[args.index("--prompt") + 1] = prompt
    assert cli.main(args) == 0
    assert fake.requests == 8  # only the records not already there
  local = tmp_path / "svamp.jsonl"
  local.write_bytes(storage.path(out).read_bytes())
  assert_matches_shipped(local, records)
  assert len(rationales.read_records(out)) == 12
  # The teacher's settings are kept beside the records, in the bucket too.
  assert json.loads(storage.path(f"{out}.teacher.json").read_text())["teacher_model"] == \
      "palm-replay"


def test_compile_appends_its_json_report_to_gcs(gcs_bucket, capfd):
  report, fits = f"{gcs_bucket}/reports/compile.jsonl", f"{gcs_bucket}/reports/fits.gin"
  flags = ["compile", "--topology=cpu:2", "--gin_file=quickstart.gin", "--steps", "train",
           "--no_knobs", f"--json={report}", f"--write_gin={fits}",
           "--gin.T5Config.vocab_size=128", "--gin.T5Config.emb_dim=32",
           "--gin.T5Config.mlp_dim=64", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}",
           "--gin.BATCH_SIZE=4"]
  for _ in range(2):
    assert cli.main(flags) == 0
  rows = [json.loads(line) for line in storage.path(report).read_text().splitlines()]
  assert len(rows) == 2 and rows[0]["steps"][0]["step"] == "train"
  assert "BATCH_SIZE = 4" in storage.path(fits).read_text().splitlines()
  capfd.readouterr()


@pytest.mark.slow
def test_the_checkpoint_benchmark_reports_the_store_against_the_local_disk(gcs_bucket, tmp_path,
                                                                         capsys):
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
  import bench_checkpoint_storage  # pylint: disable=g-import-not-at-top
  out = tmp_path / "bench.jsonl"
  url = f"{gcs_bucket}/bench"
  assert bench_checkpoint_storage.main(["--url", url, "--saves", "1", "--out", str(out)]) == 0
  local, remote = [json.loads(line) for line in out.read_text().splitlines()]
  assert (local["store"], remote["store"]) == ("local", url)
  assert remote["blocking_ratio_to_local"] == remote["blocking_s"] / local["blocking_s"]
  assert local["state_bytes"] == remote["state_bytes"] > 0
  assert url in capsys.readouterr().out


def test_a_gin_file_is_read_from_gcs(gcs_bucket):
  config = f"{gcs_bucket}/configs/steps.gin"
  storage.path(config).write_text("include 'quickstart.gin'\nTRAIN_STEPS = 7\n")
  gin_utils.parse_gin([config], [])
  assert gin.query_parameter("%TRAIN_STEPS") == 7
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "cqa_dsbs_teacher"


def test_tasks_refuses_a_missing_bucket_that_gin_names_before_reading(capsys):
  assert cli.main(["tasks", "--gin.TaskOptions.rationales_dir='gs://no-such-bucket-here/r'"]) == 2
  assert capsys.readouterr().err == (
      "dsbs tasks: error: gs://no-such-bucket-here/r: no such bucket\n")
