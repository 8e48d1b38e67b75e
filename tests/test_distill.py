"""Tests for dsbs_jax.distill (`dsbs distill`): a labeled and an unlabeled input file through
every stage to an exported student that answers as `dsbs predict`; a run killed in stage 1
and again in training resuming to the uninterrupted run's parameters; a teacher that cannot
be reached or answers only errors stopped after the failures allowed; a dry run and a token
budget across resumes; bad input named in one line; five samples an input (self-consistency)
killed in stage 1, resumed, and reported one sample beside the vote. The teacher is the
replay stand-in (dsbs_jax.replay_teacher) that the README's example uses."""
import contextlib
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fake_teacher
from dsbs_jax import cli
from dsbs_jax import rationales
from dsbs_jax import replay_teacher
from dsbs_jax import run_dir
from dsbs_jax import teacher

REPO = pathlib.Path(__file__).resolve().parents[1]
QUESTIONS = str(REPO / "rationales/examples/distill/questions.jsonl")  # the README's: no labels
TEST = str(REPO / "rationales/examples/distill/test.jsonl")  # with gold labels
TINY_STUDENT = [
    "--student", "t5_1_1_tiny", "--steps", "6", "--gin.T5Config.vocab_size=8000",
    "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}",
    "--gin.CHECKPOINT_PERIOD=2", "--gin.train.eval_batch_size=8", "--gin.train.log_period=1"]


@pytest.fixture(scope="module")
def cqa_teacher():
  """The replay teacher over every shipped CQA record, and the key it requires set."""
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setenv(fake_teacher.KEY_ENV, fake_teacher.SECRET)
    with fake_teacher.FakeTeacher({"cqa": replay_teacher.shipped_records("cqa")}) as fake:
      yield fake


def distill_args(fake, out, inputs=QUESTIONS, *extra) -> list[str]:
  return ["distill", "--inputs", str(inputs), "--prompt", teacher.default_prompt_path("cqa"),
          "--teacher", fake.url, "--teacher_model", "palm-replay", "--api_key_env",
          fake_teacher.KEY_ENV, "--out", str(out), *fake_teacher.FAST_RETRIES, *extra]


def lines_of(path) -> list[str]:
  return pathlib.Path(path).read_text().splitlines() if os.path.exists(path) else []


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


# ------------------------------------------------------------------------------
# Stage 1 and its costs; bad input.
# ------------------------------------------------------------------------------
def test_dry_run_counts_requests_and_tokens_and_sends_none(cqa_teacher, tmp_path, capsys):
  before = cqa_teacher.requests
  out = tmp_path / "run"
  assert cli.main(distill_args(cqa_teacher, out, QUESTIONS, "--test", TEST, "--dry_run",
                               *TINY_STUDENT)) == 0
  printed = capsys.readouterr().out
  assert "dry run: 64 requests" in printed  # 48 inputs + 16 test examples
  assert "at most 16,384 completion tokens" in printed  # 64 x --max_tokens 256
  assert cqa_teacher.requests == before and not out.exists()


def test_a_dry_run_of_five_samples_counts_their_completion_tokens(cqa_teacher, tmp_path, capsys):
  assert cli.main(distill_args(cqa_teacher, tmp_path / "run", QUESTIONS, "--test", TEST,
                               "--samples", "5", "--dry_run", *TINY_STUDENT)) == 0
  printed = capsys.readouterr().out
  assert "--samples 5: one request an input where the endpoint honours `n`, else 5" in printed
  assert "at most 81,920 completion tokens (--max_tokens 256 each x 5 samples)" in printed


def test_the_readmes_command_runs_dry_against_the_stand_in(cqa_teacher, monkeypatch, capsys,
                                                           tmp_path):
  readme = (REPO / "README.md").read_text()
  command = readme[readme.index("dsbs distill --inputs"):]
  command = command[:command.index("\n", command.index("--out"))].replace("\\\n", " ")
  argv = shlex.split(command)[1:]
  argv[argv.index("--teacher") + 1] = cqa_teacher.url
  argv[argv.index("--out") + 1] = str(tmp_path / "run")
  monkeypatch.chdir(REPO)  # the README's paths are the checkout's
  assert cli.main([*argv, "--api_key_env", fake_teacher.KEY_ENV, "--dry_run"]) == 0
  assert "dry run: 64 requests" in capsys.readouterr().out


def test_token_budget_holds_across_resumes(cqa_teacher, tmp_path, capsys):
  out = tmp_path / "run"
  records = out / "teacher" / "inputs.jsonl"
  before = cqa_teacher.requests
  budget = lambda tokens: distill_args(cqa_teacher, out, QUESTIONS, "--concurrency", "1",
                                       "--max_teacher_tokens", str(tokens), *TINY_STUDENT)
  assert cli.main(budget(300)) == 1  # 100 tokens a reply: three replies reach the cap
  assert "token cap reached (--max_teacher_tokens=300" in capsys.readouterr().err
  assert len(lines_of(records)) == 3 and cqa_teacher.requests == before + 3
  assert cli.main(budget(300)) == 1  # the same budget, already spent: nothing is sent
  # This file's own spending now, apart from the folder's in all.
  assert ("0 requests, 0 tokens for this file now (in all: 3 requests, 300 tokens, 300 of "
          "them by earlier runs)") in capsys.readouterr().out
  assert len(lines_of(records)) == 3 and cqa_teacher.requests == before + 3
  assert cli.main(budget(500)) == 1
  assert len(lines_of(records)) == 5 and cqa_teacher.requests == before + 5
  assert cli.main(budget(500) + ["--dry_run"]) == 0
  assert "spent so far 500" in capsys.readouterr().out
  # Records of another teacher are not mixed in.
  other = budget(1000)
  other[other.index("palm-replay")] = "another-llm"
  assert cli.main(other) == 2
  assert "dsbs distill: error: --teacher_model: differs from what wrote" in capsys.readouterr().err
  assert len(lines_of(records)) == 5 and cqa_teacher.requests == before + 5


@pytest.mark.parametrize("failure", ["unreachable", "answers 500"])
def test_a_failing_teacher_stops_the_run_after_the_failures_allowed_keeping_the_records(
    cqa_teacher, tmp_path, capsys, failure):
  out = tmp_path / "run"
  assert cli.main(distill_args(cqa_teacher, out, QUESTIONS, "--concurrency", "1",
                               "--max_teacher_tokens", "200", *TINY_STUDENT)) == 1
  records = out / "teacher" / "inputs.jsonl"
  written = records.read_bytes()
  capsys.readouterr()
  with contextlib.ExitStack() as stack:
    if failure == "unreachable":
      failing = None
      url, limit = f"http://127.0.0.1:{free_port()}/v1", "--max_connection_failures"
      reason = "3 attempts in a row could not connect (--max_connection_failures=3)"
    else:
      failing = stack.enter_context(fake_teacher.FakeTeacher(
          {"cqa": replay_teacher.shipped_records("cqa")}, faults=dict.fromkeys(range(1, 99), "500")))
      url, limit = failing.url, "--max_failed_examples"
      reason = "3 examples in a row failed every attempt (--max_failed_examples=3)"
    argv = distill_args(cqa_teacher, out, QUESTIONS, limit, "3", "--max_attempts", "2",
                        "--concurrency", "1", *TINY_STUDENT)
    argv[argv.index(cqa_teacher.url)] = url
    assert cli.main(argv) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
  assert len(errors) == 1 and errors[0].startswith(f"dsbs distill: error: {url}"), errors
  assert reason in errors[0]
  assert "rerun the same command to resume" in errors[0]
  assert records.read_bytes() == written
  if failing is not None:  # three examples given both their attempts, then no more
    assert failing.requests == 3 * 2


@pytest.mark.parametrize("problem, flags, message", [
    ("bad_json", [], "bad.jsonl:2: not valid JSON"),
    ("mixed_labels", [], "example 2 ('b') has no label but example 1 has one"),
    ("unlabeled", ["--use_gold"], "--use_gold: the examples of --inputs"),
    ("unlabeled", ["--student", "t5_9_tiny"], "--student 't5_9_tiny': not a gin model"),
    ("unlabeled", ["--gin.TRAIN_STEPS=5"], "--gin.TRAIN_STEPS: dsbs distill sets it; use --steps"),
    ("unlabeled", ["--export", "onnx"], "--export 'onnx': 'onnx' is not one of"),
    # Settings of the training stage, refused before the teacher is asked anything.
    ("unlabeled", ["--samples", "3", "--gin.TaskOptions.train_rationales='gold'"],
     "--gin.TaskOptions.train_rationales='gold': the examples of --inputs"),
    ("unlabeled", ["--gin.TaskOptions.alpah=0.3"], "alpah"),
])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(cqa_teacher, tmp_path, capsys,
                                                            problem, flags, message):
  lines = {"bad_json": ['{"id": "a", "input": "x"}', '{"id": "b", "input": '],
           "mixed_labels": ['{"id": "a", "input": "x", "label": "y"}', '{"id": "b", "input": "z"}'],
           "unlabeled": [json.dumps({"id": i, "input": i}) for i in "abc"]}[problem]
  inputs = tmp_path / "bad.jsonl"
  inputs.write_text("\n".join(lines) + "\n")
  out = tmp_path / "run"
  requests = cqa_teacher.requests
  assert cli.main(distill_args(cqa_teacher, out, inputs, *TINY_STUDENT, *flags)) == 2
  assert cqa_teacher.requests == requests
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("dsbs distill: error: ") and message in err[0], err
  assert not out.exists()


# ------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------
def report_commands(out) -> list[list[str]]:
  """The commands of the report's "by hand" section, as argv lists."""
  text = (out / "report.md").read_text()
  return [shlex.split(block.split("\n")[1]) for block in text.split("```bash")[1:]]


def dsbs_predict(model_dir, tmp_path, texts) -> list[str]:
  inputs, outputs = tmp_path / "predict_inputs.jsonl", tmp_path / "predictions.jsonl"
  inputs.write_text("".join(json.dumps({"input": text}) + "\n" for text in texts))
  assert cli.main(["predict", "--checkpoint", str(model_dir), "--input", str(inputs),
                   "--output", str(outputs)]) == 0
  return [json.loads(line)["prediction"] for line in outputs.read_text().splitlines()]


@pytest.fixture(scope="module")
def unlabeled_run(cqa_teacher, tmp_path_factory):
  """The README's flow: unlabeled questions, a gold-labeled test file, a SavedModel export."""
  out = tmp_path_factory.mktemp("distill") / "unlabeled"
  assert cli.main(distill_args(cqa_teacher, out, QUESTIONS, "--test", TEST, "--export",
                               "saved_model", *TINY_STUDENT)) == 0
  return out


@pytest.mark.slow
def test_unlabeled_inputs_go_through_every_stage_to_a_served_student(unlabeled_run, cqa_teacher,
                                                                     tmp_path, capsys):
  out = unlabeled_run
  report = (out / "report.md").read_text()
  assert "without gold labels" in report
  assert "| validation | teacher labels: agreement with the teacher |" in report
  assert "| test | gold labels |" in report
  assert "Tokens spent on the teacher, over every run in this folder: 6,400 in 64 requests" in report
  results = json.loads((out / "student" / "results.json").read_text())
  assert results["mixture_or_task_name"] == "questions_dsbs_teacher"
  validation = [json.loads(line) for line in lines_of(out / "student" / "predictions_validation.jsonl")]
  records = {json.loads(line)["id"]: json.loads(line) for line in lines_of(out / "teacher" / "inputs.jsonl")}
  # Validation is held out from the inputs and scored against the teacher's labels.
  assert validation and all(p["gold"] == records[p["id"]]["teacher_label"] for p in validation)
  assert (out / "student" / "learning_curves.png").is_file()
  assert str(out / "export" / "saved_model") in report
  import test_export  # pylint: disable=import-outside-toplevel  (TensorFlow serving helpers)
  texts = [json.loads(line)["input"] for line in lines_of(TEST)]
  served = test_export.serve(out / "export" / "saved_model", texts)["prediction"]
  assert served == dsbs_predict(out / "student", tmp_path, texts)
  # A rerun of a finished run skips every stage: no request, no training, no export.
  requests = cqa_teacher.requests
  capsys.readouterr()
  assert cli.main(distill_args(cqa_teacher, out, QUESTIONS, "--test", TEST, "--export",
                               "saved_model", *TINY_STUDENT)) == 0
  printed = capsys.readouterr().out
  assert "train: done" in printed and "export saved_model: done" in printed
  assert cqa_teacher.requests == requests


@pytest.mark.slow
def test_labeled_inputs_go_through_every_stage_and_the_report_commands_work(cqa_teacher, tmp_path):
  labeled = fake_teacher.write_inputs(tmp_path / "labeled.jsonl",
                                      replay_teacher.shipped_records("cqa")[300:340])
  out = tmp_path / "run"
  assert cli.main(distill_args(cqa_teacher, out, labeled, "--export", "hf", *TINY_STUDENT)) == 0
  report = (out / "report.md").read_text()
  assert "Teacher accuracy against the inputs' gold labels:" in report
  assert "| validation | gold labels |" in report and "| test | gold labels |" in report
  assert "agreement" not in report
  import test_export  # pylint: disable=import-outside-toplevel  (transformers helpers)
  texts = [json.loads(line)["input"] for line in lines_of(labeled)][:8]
  assert test_export.hf_generate(out / "export" / "hf", texts) == dsbs_predict(
      out / "student", tmp_path, texts)
  # The report's command for the test split, run by hand, scores it as the run did.
  commands = report_commands(out)
  assert [argv[:3] for argv in commands] == [
      ["dsbs", "rationales", "generate"], ["dsbs", "train", f"--gin_file={out / 'train.gin'}"],
      ["dsbs", "eval", "--checkpoint"], ["dsbs", "eval", "--checkpoint"],
      ["dsbs", "export", "--checkpoint"], ["dsbs", "predict", "--checkpoint"]]
  test_eval = commands[3]
  assert test_eval[test_eval.index("--split") + 1] == "test"
  assert cli.main(test_eval[1:]) == 0
  results = json.loads((out / "student" / "results.json").read_text())
  step = results["best_step"]
  rescored = run_dir.RunDir(out / "student").predictions_path("test", step)
  assert ([json.loads(line)["prediction"] for line in lines_of(rescored)]
          == [json.loads(line)["prediction"] for line in lines_of(out / "student" / "predictions.jsonl")])


def run_until(argv, done, timeout_s=300) -> None:
  """Runs `dsbs ARGV` in a subprocess and kills it (SIGKILL) once `done()` holds."""
  process = subprocess.Popen([sys.executable, "-m", "dsbs_jax.cli", *argv], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
  deadline = time.time() + timeout_s
  while time.time() < deadline and process.poll() is None and not done():
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  output = process.communicate()[0]
  assert done(), output


@pytest.mark.slow
def test_a_run_killed_in_stage_1_and_in_training_resumes_to_the_same_student(
    unlabeled_run, tmp_path):
  out = tmp_path / "killed"
  records = out / "teacher" / "inputs.jsonl"
  checkpoints = out / "student" / run_dir.CHECKPOINTS_DIR
  with fake_teacher.FakeTeacher({"cqa": replay_teacher.shipped_records("cqa")},
                                delay_s=0.1) as slow_teacher:
    argv = distill_args(slow_teacher, out, QUESTIONS, "--test", TEST, *TINY_STUDENT)
    run_until(argv, lambda: len(lines_of(records)) >= 5)
    assert len(lines_of(records)) < 48, "stage 1 finished before the kill"
    run_until(argv, lambda: (checkpoints / "2").is_dir())
    assert lines_of(records) and not (out / "student" / "results.json").exists()
    result = subprocess.run([sys.executable, "-m", "dsbs_jax.cli", *argv], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    served = slow_teacher.served_ids
    # Each example was asked for once, but those in flight at the kill (4 at most).
    assert len(served) - len(set(served)) <= 4 and len(set(served)) == 64
  resumed, _, resumed_step = run_dir.RunDir(out / "student").load_params("latest")
  reference, _, reference_step = run_dir.RunDir(unlabeled_run / "student").load_params("latest")
  assert resumed_step == reference_step == 6
  for got, want in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_five_samples_an_input_killed_in_stage_1_resume_and_report_one_sample_beside_the_vote(
    tmp_path, monkeypatch):
  monkeypatch.setenv(fake_teacher.KEY_ENV, fake_teacher.SECRET)
  shipped = replay_teacher.shipped_records("cqa")
  labeled = fake_teacher.write_inputs(tmp_path / "labeled.jsonl", shipped[300:360])
  test = fake_teacher.write_inputs(tmp_path / "test.jsonl", shipped[400:420])
  out = tmp_path / "run"
  records = out / "teacher" / "inputs.jsonl"
  # An endpoint that ignores `n`, so that the kill falls between an input's five requests.
  with fake_teacher.FakeTeacher({"cqa": shipped}, delay_s=0.05, honor_n=False,
                                sampling=replay_teacher.Sampling(0.3)) as sampling_teacher:
    argv = distill_args(sampling_teacher, out, labeled, "--test", test, "--samples", "5",
                        "--gin.TaskOptions.train_rationales='vote'", *TINY_STUDENT)
    run_until(argv, lambda: len(lines_of(records)) >= 5)
    written_before = lines_of(records)
    assert len(written_before) < 60, "stage 1 finished before the kill"
    result = subprocess.run([sys.executable, "-m", "dsbs_jax.cli", *argv], cwd=REPO,
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
  # Every record written before the kill is kept as it was (the finished file is in input
  # order, so not necessarily where it was).
  assert set(written_before) <= set(lines_of(records))
  generated = rationales.read_records(str(records))  # refuses duplicate ids
  assert sorted(r.id for r in generated) == sorted(r.id for r in shipped[300:360])
  assert all(len(r.samples) == 5 for r in generated)
  stats = teacher.record_stats(str(records), generated, "cqa")
  assert stats.teacher_accuracy > stats.single_sample_accuracy
  report = (out / "report.md").read_text()
  assert "- 5 samples an input at temperature 0.7;" in report
  assert (f"on the same inputs: one sample {stats.single_sample_accuracy:.1%}, vote of 5 "
          f"{stats.teacher_accuracy:.1%}.") in report
  assert "| split | scored against | student | teacher, one sample | teacher, vote |" in report
  # The rationale task holds the train inputs' samples that agree with their vote.
  train = rationales.read_records(str(out / "data" / "labeled" / "train.jsonl"))
  agreeing = sum(s.teacher_label == r.teacher_label for r in train for s in r.samples)
  assert (f"{len(train)} label and {agreeing} rationale training examples "
          "(TaskOptions.train_rationales 'vote' of each input's 5 rationales") in report
  assert "--samples 5 --temperature 0.7" in report  # the command that redoes stage 1
  assert json.loads((out / "student" / "results.json").read_text())["best_step"] > 0
