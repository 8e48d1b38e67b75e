"""Faults outside the training loop's happy path: a second process on a folder in use, a
killed holder's lock, a full disk during a checkpoint, and SIGINT/SIGTERM in each phase of
the long commands. Each ends in one line that says what happened and how to go on, and
loses nothing that was complete.

The end-to-end cases start `dsbs` in a subprocess beside the tiny finished run of
conftest.py (`uninterrupted`), hence slow; the units below them need no model.
"""
import errno
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import fake_teacher
from conftest import tiny_run_flags
from dsbs_jax import checkpoints
from dsbs_jax import cli
from dsbs_jax import folder_lock
from dsbs_jax import plots
from dsbs_jax import replay_teacher
from dsbs_jax import run_dir
from dsbs_jax import stop_signals
from test_cli import assert_refused
from test_cli import snapshot
from test_distill import QUESTIONS
from test_distill import TINY_STUDENT
from test_distill import distill_args
from test_distill import lines_of

REPO = pathlib.Path(__file__).resolve().parents[1]


def env(**extra) -> dict:
  """This process's environment (as the test set it), with this checkout first on the path."""
  return dict(os.environ, PYTHONPATH=str(REPO), **extra)


def dsbs_process(argv, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "dsbs_jax.cli", *map(str, argv)], cwd=REPO,
                          env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)


def signal_when(argv, marker: str, signum: int, timeout_s: float = 300) -> tuple[int, list[str]]:
  """Runs `dsbs ARGV`, sends `signum` once a line of its output holds `marker`; returns
  (exit code, the lines it printed after that one)."""
  process = dsbs_process(argv)
  seen = []
  for line in process.stdout:
    seen.append(line)
    if marker in line:
      process.send_signal(signum)
      break
  rest, _ = process.communicate(timeout=timeout_s)
  assert marker in "".join(seen), "".join(seen)[-3000:]
  return process.returncode, rest.splitlines()


@pytest.fixture
def finished_copy(uninterrupted, tmp_path):
  """A copy of the finished tiny run, to rerun or hold."""
  path = tmp_path / "run"
  shutil.copytree(uninterrupted, path)
  return path


# ------------------------------------------------------------------------------
# One process per folder.
# ------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from dsbs_jax import run_dir
    with run_dir.RunDir(sys.argv[1]).writing():
      print("held", flush=True)
      time.sleep(600)
""")


@pytest.mark.slow
def test_a_folder_in_use_is_refused_at_once_and_a_killed_holders_lock_blocks_nothing(
    finished_copy, uninterrupted, tmp_path, capsys):
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(finished_copy)], env=env(),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    in_use = ["is in use by `dsbs train` (pid", f"{holder.pid} on {socket.gethostname()}"]
    assert_refused(capsys, tiny_run_flags(finished_copy),
                   [f"MODEL_DIR {finished_copy}", *in_use], finished_copy)
    assert_refused(capsys, ["export", "--checkpoint", uninterrupted, "--format", "hf", "--out",
                            finished_copy, "--overwrite"], [f"--out {finished_copy}", *in_use],
                   finished_copy, uninterrupted)
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("Where do fish live?\n")
    assert cli.main(["predict", "--checkpoint", str(finished_copy), "--input", str(inputs),
                     "--output", str(tmp_path / "predictions.jsonl")]) == 0
    assert re.search(r"1 predictions from step 6 \(the run is still training, by `dsbs train` "
                     rf"\(pid {holder.pid} .*\): its checkpoints complete so far were used\)",
                     capsys.readouterr().err)
  finally:
    holder.kill()  # SIGKILL: its lock file stays behind
    holder.wait()
  assert folder_lock.lock_path(finished_copy).exists()
  assert run_dir.RunDir(finished_copy).in_use_by() is None
  with run_dir.RunDir(finished_copy).writing():
    pass
  assert not folder_lock.lock_path(finished_copy).exists()


def test_distill_and_export_refuse_an_out_in_use(tmp_path, capsys):
  out = tmp_path / "distill"
  with folder_lock.FolderLock(folder_lock.lock_path(out), f"--out {out}", "dsbs distill"):
    inputs = REPO / "rationales/examples/distill/questions.jsonl"
    assert_refused(capsys, ["distill", "--inputs", inputs, "--prompt",
                            REPO / "rationales/prompts/cqa.json", "--teacher",
                            "http://127.0.0.1:9", "--teacher_model", "m", "--student",
                            "t5_1_1_tiny", "--out", out],
                   ["--out", "is in use by `dsbs distill`"], inputs)
  exported = tmp_path / "exported"
  beside = exported.parent / f".{exported.name}{folder_lock.LOCK_NAME}"
  with folder_lock.FolderLock(beside, f"--out {exported}", "dsbs export"):
    assert_refused(capsys, ["export", "--checkpoint", tmp_path / "missing", "--format", "hf",
                            "--out", exported], ["is in use by `dsbs export`"], inputs)
  assert list(tmp_path.iterdir()) == []


def test_a_lock_names_its_holder_and_removes_only_what_it_made(tmp_path):
  made = tmp_path / "a" / "b"
  lock = folder_lock.FolderLock(folder_lock.lock_path(made, 3), "the folder", "dsbs x")
  with lock:
    assert lock.path.name == ".dsbs.lock.3" and folder_lock.holder(made) is None
    with pytest.raises(folder_lock.FolderInUseError,
                       match=rf"the folder is in use by `dsbs x` \(pid {os.getpid()} on "):
      with folder_lock.FolderLock(lock.path, "the folder", "dsbs y"):
        pass
  assert not (tmp_path / "a").exists()
  (made / "kept").parent.mkdir(parents=True)
  with folder_lock.FolderLock(folder_lock.lock_path(made), "the folder", "dsbs x"):
    assert "`dsbs x`" in folder_lock.holder(made)
  assert [p.name for p in made.iterdir()] == []


# ------------------------------------------------------------------------------
# A full disk.
# ------------------------------------------------------------------------------
FILL_AND_STOP = """
set -e
mkdir -p "$MOUNT" && mount -t tmpfs -o size=20m tmpfs "$MOUNT"
cp -a "$SOURCE" "$MOUNT/run"
dd if=/dev/zero of="$MOUNT/filler" bs=1M 2> /dev/null || true
truncate -s -1M "$MOUNT/filler"
set +e
"$PYTHON" -m dsbs_jax.cli "$@" > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/code"
cp -a "$MOUNT/run" "$OUT/run"
"""


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes_after(uninterrupted,
                                                                            tmp_path):
  """A run stopped after its checkpoint of step 2, copied to a small tmpfs, the disk then
  filled to 1 MB of room, and the run continued to 4 steps: the save of step 4 is refused for
  want of room, step 2 stays intact, and the run copied to a disk with room resumes from it."""
  stopped = tmp_path / "stopped"
  shutil.copytree(uninterrupted, stopped)
  for step in ("4", "6"):
    shutil.rmtree(stopped / run_dir.CHECKPOINTS_DIR / step)
  mount = tmp_path / "small_disk"
  flags = tiny_run_flags(mount / "run", train_steps=4)
  result = subprocess.run(
      ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", FILL_AND_STOP, "sh",
       *flags], env=env(MOUNT=str(mount), OUT=str(tmp_path), SOURCE=str(stopped),
                        PYTHON=sys.executable),
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  stderr = (tmp_path / "stderr").read_text()
  assert (tmp_path / "code").read_text().strip() == "2", stderr
  assert stderr.count("\n") == 1, stderr
  assert re.fullmatch(
      rf"dsbs train: error: {mount}/run/checkpoints/4: not saved: [\d.,]+ MB free on its disk, "
      r"a checkpoint takes about [\d.,]+ MB \(as step 2 took\); the last complete checkpoint, "
      r"step 2, is intact\. "
      r"Free some space and rerun the same command to resume\n", stderr), stderr
  run = tmp_path / "run"
  checkpointer = run_dir.RunDir(run).checkpointer()
  assert checkpointer.all_steps() == [2]
  checkpointer.close()
  assert cli.main(tiny_run_flags(run, train_steps=4)) == 0
  rows = run_dir.RunDir(run).metrics()
  assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
  checkpointer = run_dir.RunDir(run).checkpointer()
  assert checkpointer.all_steps() == [2, 4]
  checkpointer.close()


def test_a_full_disk_met_anywhere_else_is_one_line(monkeypatch, capsys):
  def full(args):
    raise OSError(errno.ENOSPC, "No space left on device", "/data/predictions.jsonl")

  monkeypatch.setattr(plots, "run", full)
  assert cli.main(["plot", "runs", "--out", "plots"]) == 2
  assert capsys.readouterr().err == (
      "dsbs plot: error: [Errno 28] No space left on device: '/data/predictions.jsonl'\n")


def test_a_disk_that_fills_during_an_asynchronous_save_is_one_error(tmp_path, monkeypatch):
  checkpointer = checkpoints.TrainCheckpointer(tmp_path / "checkpoints")
  manager = checkpointer._manager  # pylint: disable=protected-access
  try:
    def full(*args, **kwargs):
      del args, kwargs
      try:
        raise OSError(errno.ENOSPC, "No space left on device")
      except OSError as cause:
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28']") from cause

    monkeypatch.setattr(manager, "wait_until_finished", full)
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"checkpoints: not saved: the disk is full \([\d.,]+ MB free\); "
                             "there is no earlier checkpoint"):
      checkpointer.wait()
    monkeypatch.setattr(manager, "wait_until_finished",
                        lambda: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="other"):
      checkpointer.wait()
  finally:
    monkeypatch.undo()
    checkpointer.close()


# ------------------------------------------------------------------------------
# SIGINT and SIGTERM outside the step loop.
# ------------------------------------------------------------------------------
def test_a_phase_that_raises_stays_the_one_reported():
  with stop_signals.sigterm_raising():
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    with stop_signals.phase("outer", resume="go on outside"):
      with stop_signals.phase("inner"):
        pass
      assert stop_signals.stopped_line(KeyboardInterrupt()) == (
          "stopped by SIGINT while outer; go on outside")
    with pytest.raises(stop_signals.Stopped) as stop:
      with stop_signals.phase("outer", resume="go on"):
        with stop_signals.phase("inner"):
          os.kill(os.getpid(), signal.SIGTERM)
    assert stop_signals.stopped_line(stop.value) == "stopped by SIGTERM while inner; go on"


class StoppedOnDelete:
  """Raises a stop from `__del__`, where Python would report it and carry on."""

  def __del__(self):
    raise stop_signals.Stopped()


def test_a_stop_raised_where_python_swallows_it_is_delivered_again():
  with pytest.raises(stop_signals.Stopped):
    with stop_signals.sigterm_raising():
      StoppedOnDelete()
      for _ in range(1000):
        time.sleep(0.001)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_the_final_evaluation_is_one_line_and_loses_nothing(
    finished_copy, signum, code):
  kept = {name: snapshot(finished_copy / name) for name in (
      run_dir.METRICS_FILE, run_dir.RESULTS_FILE, run_dir.CHECKPOINTS_DIR, run_dir.BEST_FILE)}
  returncode, after = signal_when(tiny_run_flags(finished_copy), "final evaluation of step 6",
                                  signum)
  name = signal.Signals(signum).name
  assert returncode == code and after == [
      f"dsbs train: stopped by {name} while the final evaluation of step 6; checkpoints 2, 4, "
      "6 are intact; rerun the same command to redo the final evaluation"], after
  assert {name: snapshot(finished_copy / name) for name in kept} == kept
  assert not folder_lock.lock_path(finished_copy).exists()


@pytest.mark.slow
def test_a_stop_during_start_up_is_one_line_and_leaves_no_folder(tmp_path):
  model_dir = tmp_path / "new" / "run"
  returncode, after = signal_when(tiny_run_flags(model_dir), "every record read and checked",
                                  signal.SIGINT)
  assert returncode == 130 and len(after) == 1, after
  assert re.fullmatch(r"dsbs train: stopped by SIGINT while (checking the data, the model and "
                      r"MODEL_DIR; nothing was written|building the trainer and its state; no "
                      r"checkpoint was written yet); rerun the same command( to start again)?",
                      after[0]), after
  assert not (tmp_path / "new").exists()


# Loaded in the command's process (a sitecustomize): prints a line as each XLA compilation
# starts (a cache miss), so that a signal can be sent while XLA compiles.
COMPILATION_MARKER = """\
import jax._src.compiler as compiler
compile_for_real = compiler.backend_compile_and_load
count = 0
def marked(*args, **kwargs):
  global count
  count += 1
  print(f"XLA compiling #{count}", flush=True)
  return compile_for_real(*args, **kwargs)
compiler.backend_compile_and_load = marked
"""


@pytest.mark.slow
@pytest.mark.parametrize("command, compilation", [("train", 3), ("predict", 1)])
def test_a_stop_while_xla_compiles_is_one_line_and_no_crash(
    uninterrupted, tmp_path, command, compilation):
  # Each time, once the marked compilation has begun: the process must end as every stop
  # does. It died of a segmentation fault in the interpreter's teardown, with the quickstart's
  # model (not the tests' tiny one) stopped while XLA compiled its state (#3; #1 and #2 are
  # small programs of the data checks), and at times in predict's first decode compile.
  (tmp_path / "sitecustomize.py").write_text(COMPILATION_MARKER)
  inputs = tmp_path / "inputs.txt"
  inputs.write_text("Where would you put a plate after washing it?\n")
  argv = (["train", "--gin_file=quickstart.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'"]
          if command == "train" else
          ["predict", "--checkpoint", uninterrupted, "--input", inputs, "--output",
           tmp_path / "predictions.jsonl"])
  process = subprocess.Popen(
      [sys.executable, "-m", "dsbs_jax.cli", *map(str, argv)], cwd=REPO,
      env={**{name: value for name, value in env().items()
              if name != "JAX_COMPILATION_CACHE_DIR"},  # every compilation for real
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in process.stdout:
    seen.append(line)
    if line.startswith(f"XLA compiling #{compilation}"):
      process.send_signal(signal.SIGINT)
      break
  rest = process.communicate(timeout=300)[0].splitlines()
  assert f"XLA compiling #{compilation}" in "".join(seen), "".join(seen)[-3000:]
  after = [line for line in rest if not line.startswith("XLA compiling #")]
  assert process.returncode == 130, rest
  assert len(after) == 1 and re.match(
      rf"dsbs {command}: (stopped by SIGINT while |SIGINT at step )", after[0]), rest


@pytest.mark.slow
def test_a_stopped_export_is_one_line_and_leaves_nothing(uninterrupted, tmp_path):
  out = tmp_path / "exported"
  process = dsbs_process(["export", "--checkpoint", uninterrupted, "--format", "hf", "--out", out])
  beside = out.parent / f".{out.name}{folder_lock.LOCK_NAME}"
  while process.poll() is None and not beside.exists():
    time.sleep(0.01)
  time.sleep(0.3)  # into the export (restoring the checkpoint takes longer than this)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 143, output
  assert output.splitlines() == [f"dsbs export: stopped by SIGTERM while exporting to {out}; "
                                 f"{out} was not changed; rerun the same command"], output
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_stop_in_distills_teacher_stage_is_one_line_and_keeps_the_records(tmp_path,
                                                                            monkeypatch):
  out = tmp_path / "distill"
  records = out / "teacher" / "inputs.jsonl"
  monkeypatch.setenv(fake_teacher.KEY_ENV, fake_teacher.SECRET)
  with fake_teacher.FakeTeacher({"cqa": replay_teacher.shipped_records("cqa")},
                                delay_s=0.2) as slow_teacher:
    process = dsbs_process(distill_args(slow_teacher, out, QUESTIONS, *TINY_STUDENT))
    while process.poll() is None and len(lines_of(records)) < 3:
      time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
  written = lines_of(records)
  assert process.returncode == 143, output
  assert output.splitlines() == [
      f"dsbs distill: stopped by SIGTERM while asking the teacher for rationales; the records "
      f"in {out / 'teacher'} are kept; rerun the same command: the stages already done are "
      "skipped"], output
  assert 3 <= len(written) < 48 and all(json.loads(line)["id"] for line in written)
  assert not folder_lock.lock_path(out).exists()
