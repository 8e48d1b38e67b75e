"""Tests of the `dsbs` command line: dispatch of each command to the module that owns it,
help that teaches each command without importing the others, a first screen free of library
chatter, and, for every command, a table of bad inputs that each end as one
`dsbs CMD: error: ...` line naming the culprit, exit code 2, and leave the files already on
disk byte-identical.

The tables of train, eval, predict and export refuse inputs against the finished tiny run
of conftest.py (which trains, hence slow); the others need no model.
"""
import argparse
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import modules_loaded_by, tiny_run_flags
from dsbs_jax import checkpoints
from dsbs_jax import cli
from dsbs_jax import command_flags
from dsbs_jax import plots
from dsbs_jax import run_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = REPO / "rationales"
CQA_PROMPT = str(SHIPPED / "prompts" / "cqa.json")
KEY_ENV = "DSBS_TEST_TEACHER_KEY"


def snapshot(*paths) -> dict:
  """{file: sha256} of every file under `paths` (files or folders)."""
  digests = {}
  for path in map(pathlib.Path, paths):
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
      digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
  return digests


def assert_refused(capsys, argv, fragments, *watched):
  """Runs `dsbs argv` in this process: exit code 2, one error line holding `fragments` (a
  string or several), and every file under `watched` as it was."""
  before = snapshot(*watched)
  assert before or not watched, f"nothing to watch in {watched}"
  capsys.readouterr()
  try:
    code = cli.main(list(map(str, argv)))
  except SystemExit as exit_info:  # a bad flag, refused while parsing
    code = exit_info.code
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  command = "dsbs " + " ".join(argv[:2] if argv[0] == "rationales" else argv[:1])
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), err
  assert len(lines[0]) < 800, lines[0]
  for library_text in ("tensorstore_spec", "pybind11", "<bound method"):
    assert library_text not in lines[0], lines[0]
  for fragment in [fragments] if isinstance(fragments, str) else fragments:
    assert fragment in lines[0], lines[0]
  assert snapshot(*watched) == before, "a refused run changed files on disk"


# ------------------------------------------------------------------------------
# Help and the first screen.
# ------------------------------------------------------------------------------
def test_help_lists_every_command_without_importing_them():
  code = ("import sys\nfrom dsbs_jax import cli\n"
          "try:\n  cli.main(['--help'])\nexcept SystemExit:\n  pass\n"
          "print(sorted(m for m in ('jax', 'tensorflow', 'seqio', 'orbax') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
  assert result.stdout.strip().endswith("[]"), result.stdout
  for name, (_, summary) in cli.SUBCOMMANDS.items():
    assert name in result.stdout and summary.split()[0] in result.stdout, name


def test_every_command_and_flag_has_help():
  for command in cli.SUBCOMMANDS:
    parser, _ = cli.build_parser(command)
    for leaf in cli._leaf_parsers(parser):  # pylint: disable=protected-access
      assert leaf.description, leaf.prog
      for action in leaf._actions:  # pylint: disable=protected-access
        assert action.help or isinstance(action, argparse._SubParsersAction), (  # pylint: disable=protected-access
            leaf.prog, action.option_strings or action.dest)


@pytest.mark.parametrize("command", cli.SUBCOMMANDS)
def test_every_command_and_subcommand_prints_its_help(command, capsys):
  """argparse formats help text with %, so a stray '%' in a help string crashes --help."""
  parser, _ = cli.build_parser(command)
  leaves = list(cli._leaf_parsers(parser))  # pylint: disable=protected-access
  assert leaves
  for leaf in leaves:
    with pytest.raises(SystemExit) as exit_info:
      cli.main([*leaf.prog.split()[1:], "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, leaf.prog
    assert out.startswith(f"usage: {leaf.prog}") and "--verbose" in out, (leaf.prog, out)


def test_train_help_teaches_gin_flags_and_the_macros(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  text = capsys.readouterr().out
  for taught in ("--gin.NAME=VALUE", "--gin_file", "MIXTURE_OR_TASK_NAME", "MODEL_DIR",
                 "TRAIN_STEPS", "BATCH_SIZE", "ALPHA", "dsbs train --gin_file=quickstart.gin",
                 "resumes"):
    assert taught in text, taught


def test_first_screen_holds_no_library_chatter():
  result = subprocess.run(
      [sys.executable, "-m", "dsbs_jax.cli", "tasks", "--gin_file=quickstart.gin",
       "--dataset", "svamp"], capture_output=True, text=True, cwd=REPO,
      env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stderr == "", result.stderr  # no banners, cuInit, gin probing or advice
  assert result.stdout.startswith("name ")


# ------------------------------------------------------------------------------
# Dispatch: each command to the module that owns it, and what its errors become.
# ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", cli.SUBCOMMANDS)
def test_each_command_is_run_by_the_module_the_table_names(command):
  module_name = cli.SUBCOMMANDS[command][0]
  parser, _ = cli.build_parser(command)
  leaves = [leaf for leaf in cli._leaf_parsers(parser)  # pylint: disable=protected-access
            if leaf.prog.split()[:2] == ["dsbs", command]]
  assert leaves
  for leaf in leaves:
    func, user_errors = cli.runner(argparse.Namespace(command=command,
                                                      func=leaf.get_default("func")))
    assert func.__module__ == module_name, leaf.prog
    assert leaf.get_default("command_name") == leaf.prog
    module = sys.modules[module_name]
    assert set(getattr(module, "USER_ERRORS", ())) <= set(user_errors)
    assert set(cli.BASE_USER_ERRORS) <= set(user_errors)


def test_python_m_train_is_dsbs_train(capsys, monkeypatch):
  monkeypatch.setenv("COLUMNS", "100")  # argparse's width, whatever the terminal
  module = subprocess.run([sys.executable, "-m", "dsbs_jax.train", "--help"], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          check=True).stdout
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  assert module == capsys.readouterr().out and "dsbs train" in module


def test_a_command_imports_its_own_module_only():
  code = "from dsbs_jax import cli\ntry:\n  cli.main(['plot', '--help'])\nexcept SystemExit:\n  pass"
  assert modules_loaded_by(code, ("tensorflow", "seqio", "dsbs_jax.train", "dsbs_jax.infer",
                                  "dsbs_jax.export", "dsbs_jax.teacher_command")) == []


@pytest.mark.parametrize("command", command_flags.PARSERS)
def test_a_bad_flag_is_refused_before_the_commands_heavy_module_loads(command):
  code = ("from dsbs_jax import cli\ntry:\n"
          f"  print(cli.main(['{command}', '--no_such_flag']))\nexcept SystemExit as e:\n"
          "  print(e.code)")
  loaded = modules_loaded_by(code, ("jax", "tensorflow", "seqio", "matplotlib",
                                    cli.SUBCOMMANDS[command][0]))
  assert loaded == []  # `dsbs eval --step abc` took ~16 s to say so, now ~0.2 s


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
  def user_error(args):
    raise run_dir.ModelDirError(f"{args.runs_dir}/results.json: expected a JSON object")
  monkeypatch.setattr(plots, "run", user_error)
  argv = ["plot", str(tmp_path), "--out", str(tmp_path / "figures")]
  assert cli.main(argv) == 2
  assert capsys.readouterr().err == (f"dsbs plot: error: {tmp_path}/results.json: expected a "
                                     "JSON object\n")
  assert cli.main([*argv, "--verbose"]) == 2
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and err.endswith("JSON object\n")
  def bug(args):
    raise KeyError("a bug")
  monkeypatch.setattr(plots, "run", bug)
  with pytest.raises(KeyError, match="a bug"):
    cli.main(argv)


# ------------------------------------------------------------------------------
# Commands that need no trained model.
# ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["--dataset", "nope"], "--dataset nope: no such dataset"),
    (["--gin.TaskOptions.alpha=1.5"], "TaskOptions.alpha must be in (0, 1)"),
    (["--gin_file=quickstart.gin", "--gin.TRAIN_FRACTION=0"], "TRAIN_FRACTION"),
    (["--gin_file=quickstart.gin", "--gin.ALPA=0.3"], "did you mean ALPHA?"),
    (["--gin.TaskOptions.alpha"], "expected --gin.NAME=VALUE"),
    (["--gin_file=nope.gin"], "--gin_file=nope.gin: no such gin file"),
    (["--examples", "0"], "argument --examples"),
])
def test_tasks_refuses_bad_input(argv, fragment, capsys):
  assert_refused(capsys, ["tasks", *argv], fragment)


def test_plot_refuses_bad_input(tmp_path, capsys):
  run = tmp_path / "runs" / "a"
  run.mkdir(parents=True)
  (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 2.0}\nnot json\n')
  a_file = tmp_path / "a_file"
  a_file.write_text("mine")
  for argv, fragment in [
      ([tmp_path / "missing", "--out", tmp_path / "figures"], "no run folders"),
      ([tmp_path / "runs", "--out", tmp_path / "figures"], f"{run / 'metrics.jsonl'}:2"),
      ([tmp_path / "runs", "--out", a_file], "is not a folder")]:
    assert_refused(capsys, ["plot", *argv], fragment, tmp_path)


def test_convert_refuses_bad_input(tmp_path, capsys):
  garbage = tmp_path / "garbage"
  garbage.mkdir()
  (garbage / "config.json").write_text("{not json")
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / checkpoints.CONFIG_FILE).write_text("{}")
  for argv, fragment in [
      (["--from", "hf", tmp_path / "missing", "--out", tmp_path / "out"], "no Hugging Face config"),
      (["--from", "hf", garbage, "--out", tmp_path / "out"],
       f"{garbage / 'config.json'}:1: not valid JSON"),
      (["--from", "t5x", garbage, "--config", "t5_1_1_nano", "--out", tmp_path / "out"], "t5_1_1_nano.gin"),
      (["--from", "hf", garbage, "--out", existing], "pass --overwrite"),
      (["--from", "onnx", garbage, "--out", tmp_path / "out"], "argument --from")]:
    assert_refused(capsys, ["convert", *argv], fragment, tmp_path)
  assert not (tmp_path / "out").exists()


def test_rationales_stats_refuses_bad_input(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "1", "teacher_label": "a"}\n')
  latin1 = tmp_path / "latin1.jsonl.gz"
  latin1.write_bytes(gzip.compress(b'\n{"id": "caf\xe9"}\n'))
  for argv, fragment in [([tmp_path / "missing.jsonl"], "missing.jsonl: no such file"),
                         ([bad], f"{bad}:1: missing field"),
                         ([latin1], f"{latin1}:2: not UTF-8 text (byte 0xe9 at byte offset 12"),
                         ([bad, "--parser", "nope"], "argument --parser")]:
    assert_refused(capsys, ["rationales", "stats", *argv], fragment, tmp_path)


def refused_port() -> int:
  """A local port nothing listens on: connecting to it is refused."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def test_rationales_generate_refuses_bad_input(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(KEY_ENV, "sk-test")
  inputs = tmp_path / "inputs.jsonl"
  inputs.write_text("".join(f'{{"id": "{i}", "input": "question {i}", "label": "a"}}\n'
                            for i in range(20)))
  out = tmp_path / "out.jsonl"  # records a previous run wrote, which must survive
  shutil.copyfile(SHIPPED / "cqa" / "valid.jsonl", out)
  dead_teacher = f"http://127.0.0.1:{refused_port()}/v1"
  common = ["--input", inputs, "--model", "m", "--out", out, "--api_key_env", KEY_ENV]
  for argv, fragment in [
      (["--teacher", "localhost:8000", "--prompt", CQA_PROMPT], "argument --teacher: 'localhost:8000'"),
      (["--teacher", dead_teacher, "--prompt", inputs],
       (f"{inputs}:2: not valid JSON (Extra data at column 1)")),
      (["--teacher", dead_teacher, "--prompt", CQA_PROMPT, "--concurrency", "0"], "--concurrency"),
      (["--teacher", dead_teacher, "--prompt", CQA_PROMPT, "--samples", "0"], "--samples"),
      (["--teacher", dead_teacher, "--prompt", CQA_PROMPT, "--samples", "3", "--temperature", "0"],
       "--temperature 0: must be above 0 with --samples 3"),
      (["--teacher", dead_teacher, "--prompt", CQA_PROMPT, "--samples", "3"],
       f"{out}:1: record 'a1bad13c86aca08528bc8803da576df1' has 1 sample(s), but --samples is 3"),
      (["--teacher", dead_teacher, "--prompt", CQA_PROMPT, "--max_connection_failures", "3",
        "--retry_base_delay", "0.01"], "in a row could not connect (--max_connection_failures=3)")]:
    assert_refused(capsys, ["rationales", "generate", *common, *argv], fragment, out)
  missing = ["--input", tmp_path / "missing.jsonl", "--model", "m", "--out", out,
             "--teacher", dead_teacher, "--prompt", CQA_PROMPT]
  assert_refused(capsys, ["rationales", "generate", *missing], "missing.jsonl: no such file", out)


def test_a_dead_teacher_stops_early_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(KEY_ENV, "sk-test")
  inputs = tmp_path / "inputs.jsonl"
  inputs.write_text("".join(f'{{"id": "{i}", "input": "q{i}", "label": "a"}}\n' for i in range(50)))
  argv = ["rationales", "generate", "--input", inputs, "--prompt", CQA_PROMPT, "--model", "m",
          "--teacher", f"http://127.0.0.1:{refused_port()}", "--out", tmp_path / "out.jsonl",
          "--api_key_env", KEY_ENV, "--retry_base_delay", "0.01", "--max_connection_failures", "4"]
  assert cli.main(list(map(str, argv))) == 2
  captured = capsys.readouterr()
  assert "0 of 50 examples done" in captured.out
  assert "50 example(s) remain: rerun the same command to resume" in captured.err
  assert "Connection refused" in captured.err


# ------------------------------------------------------------------------------
# Commands that take a trained MODEL_DIR: refused inputs leave it byte-identical.
# ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrupt_run(uninterrupted, tmp_path_factory):
  """A copy of the finished run whose latest checkpoint (6) lost its array data."""
  model_dir = tmp_path_factory.mktemp("corrupt") / "run"
  shutil.copytree(uninterrupted, model_dir)
  for data_file in (model_dir / run_dir.CHECKPOINTS_DIR / "6" / "state").rglob("d/*"):
    data_file.unlink()
  return model_dir


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, uninterrupted):
  """Files that bad rows point to: garbage models, a corrupt validation split, a file."""
  root = tmp_path_factory.mktemp("bad_inputs")
  (root / "garbage_config").mkdir()
  (root / "garbage_config" / checkpoints.CONFIG_FILE).write_text("{not json")
  params = root / "garbage_params" / checkpoints.PARAMS_DIR
  params.mkdir(parents=True)
  shutil.copyfile(pathlib.Path(uninterrupted) / checkpoints.CONFIG_FILE,
                  root / "garbage_params" / checkpoints.CONFIG_FILE)
  for name in ("_METADATA", "manifest.ocdbt"):
    (params / name).write_text("garbage")
  cqa = root / "rationales" / "cqa"
  cqa.mkdir(parents=True)
  for name in ("train.jsonl.gz", "test.jsonl.gz"):
    shutil.copyfile(SHIPPED / "cqa" / name, cqa / name)
  valid_lines = (SHIPPED / "cqa" / "valid.jsonl").read_text().splitlines(keepends=True)
  (cqa / "valid.jsonl").write_text("".join(valid_lines[:5]) + '{"id": "x", "rationale": 3}\n')
  (root / "a_file").write_text("mine")
  (root / "bad_inputs.jsonl").write_text('{"input": "fine"}\n{"text": "no input"}\n')
  (root / "inputs.txt").write_text("Where do fish live?\n")
  (root / "latin1.txt").write_bytes("Where?\nA café?\n".encode("latin-1"))
  run = pathlib.Path(uninterrupted)
  config = json.loads((run / checkpoints.CONFIG_FILE).read_text())
  for name, changed in [("config_empty", {}), ("config_string", dict(config, emb_dim="32")),
                        ("config_negative", dict(config, num_heads=-4)),
                        ("config_unknown", dict(config, colour=1)),
                        ("config_wider", dict(config, emb_dim=64))]:
    model_dir = root / name  # config.json is read before any checkpoint, which only one needs
    model_dir.mkdir()
    for file in (run_dir.SPEC_FILE, run_dir.VOCABULARY_FILE, run_dir.BEST_FILE):
      shutil.copyfile(run / file, model_dir / file)
    (model_dir / checkpoints.CONFIG_FILE).write_text(json.dumps(changed))
  shutil.copytree(run / run_dir.CHECKPOINTS_DIR / "6",
                  root / "config_wider" / run_dir.CHECKPOINTS_DIR / "6")
  return root


TRAIN_ROWS = [  # (extra flags, given the bad_inputs folder; fragment of the error)
    (lambda bad: ["--gin.T5Config.emb_dim=64"], "T5Config.emb_dim is 32 in config.json, 64 now"),
    (lambda bad: ["--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}"],
     "TASK_FEATURE_LENGTHS['inputs'] is 64 in run.json, 32 now"),
    (lambda bad: ["--gin.BATCH_SIZE=4"], "BATCH_SIZE is 8 in checkpoints/6, 4 now"),
    (lambda bad: ["--gin.TRAIN_STEP=5"], "uses the macro TRAIN_STEP; did you mean TRAIN_STEPS?"),
    (lambda bad: ["--gin.TRAIN_STEPS"], "expected --gin.NAME=VALUE"),
    (lambda bad: ["--gin.TRAIN_STEPS=0"], "TRAIN_STEPS must be a positive integer, got 0"),
    (lambda bad: ["--gin.BATCH_SIZE=0"], "BATCH_SIZE must be a positive integer, got 0"),
    (lambda bad: ["--gin.ALPHA=1.5"], "the ALPHA macro"),
    (lambda bad: ["--gin.TRAIN_FRACTION=0"], "the TRAIN_FRACTION macro"),
    (lambda bad: ["--gin.MIXTURE_OR_TASK_NAME='cqa_dsbs'"], "`dsbs tasks` lists them"),
    (lambda bad: ["--gin.EVAL_PERIOD=abc"], "abc is not a gin literal"),
    (lambda bad: ["--gin_file=nope.gin"], "--gin_file=nope.gin: no such gin file"),
    (lambda bad: ["--gin.OPTIMIZER='sgd'"], "unknown optimizer 'sgd'"),
    (lambda bad: ["--gin.train.batching='paired'"],
     "train.batching must be one of ('mixture', 'per_input'), got 'paired'"),
    (lambda bad: ["--gin.T5Config.dtype='bf16'"], "T5Config: data type 'bf16'"),
    (lambda bad: ["--gin.train.restore_step=3"], "no such checkpoint; available steps: [2, 4, 6]"),
    (lambda bad: [f"--gin.INITIAL_CHECKPOINT_PATH='{bad / 'garbage_config'}'"],
     "config.json:1: not valid JSON"),
    (lambda bad: [f"--gin.INITIAL_CHECKPOINT_PATH='{bad / 'garbage_params'}'"],
     "holds none of a T5's parameters"),
    (lambda bad: [f"--gin.TaskOptions.rationales_dir='{bad / 'rationales'}'"],
     "valid.jsonl:6: missing field"),
    (lambda bad: [f"--gin.MODEL_DIR='{bad / 'a_file' / 'run'}'"], "cannot write there"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, fragment", TRAIN_ROWS, ids=[f for _, f in TRAIN_ROWS])
def test_train_refuses_bad_input(extra, fragment, uninterrupted, bad_inputs, capsys):
  assert_refused(capsys, tiny_run_flags(uninterrupted, extra=extra(bad_inputs)), fragment,
                 uninterrupted, bad_inputs)


EVAL_ROWS = [  # (flags, given the finished run, its corrupt copy and bad_inputs; fragment)
    (lambda run, corrupt, bad: ["--checkpoint", run, "--step", "abc"], "argument --step: 'abc'"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--step", "5"], "no such checkpoint"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--task", "nope"],
     "--task='nope': no such task or mixture"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--task", "cqa_rationale"],
     "--task='cqa_rationale' has no label task with metrics to evaluate"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--batch_size", "0"], "argument --batch_size"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--output", bad / "missing" / "p.jsonl"],
     "does not exist"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--gin.ALPA=0.3"], "uses the macro ALPA"),
    (lambda run, corrupt, bad: ["--checkpoint", bad / "a_file"], "run.json: not found"),
    (lambda run, corrupt, bad: ["--checkpoint", corrupt, "--step", "latest"],
     ("checkpoints/6: checkpoint is corrupt or incomplete", "restore an earlier one with --step 4")),
    (lambda run, corrupt, bad: ["--checkpoint", bad / "config_empty"],
     "config_empty/config.json: not a T5 model config (no field 'vocab_size' and 14 more)"),
    (lambda run, corrupt, bad: ["--checkpoint", bad / "config_wider"],
     (f"config_wider/{run_dir.CHECKPOINTS_DIR}/6 does not match", "config_wider/config.json: "
      "decoder/decoder_norm/scale: (32,) stored, (64,) in the config")),
]
PREDICT_ROWS = [
    (lambda run, corrupt, bad: ["--checkpoint", run, "--input", bad / "missing.txt"], "no such file"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--input", bad / "bad_inputs.jsonl"],
     "bad_inputs.jsonl:2: expected an object with a string 'input'"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--input", bad / "inputs.txt", "--step", "x"],
     "argument --step"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--input", bad / "inputs.txt",
                                "--decode_length", "0"], "argument --decode_length"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--input", bad / "inputs.txt",
                                "--gin.ALPHA=0.3"], "takes no --gin.NAME=VALUE flags"),
    (lambda run, corrupt, bad: ["--checkpoint", corrupt, "--input", bad / "inputs.txt",
                                "--step", "6"], "restore an earlier one with --step 4"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--input", bad / "latin1.txt"],
     "latin1.txt:2: not UTF-8 text (byte 0xe9 at byte offset 12)"),
    (lambda run, corrupt, bad: ["--checkpoint", bad / "config_string", "--input",
                                bad / "inputs.txt"],
     "config_string/config.json: not a T5 model config (T5Config.emb_dim='32': expected a "
     "positive integer)"),
    (lambda run, corrupt, bad: ["--checkpoint", bad / "config_negative", "--input",
                                bad / "inputs.txt"], "T5Config.num_heads=-4: expected a positive"),
]
EXPORT_ROWS = [
    (lambda run, corrupt, bad: ["--checkpoint", corrupt, "--step", "6", "--format", "hf"],
     "restore an earlier one with --step 4"),
    (lambda run, corrupt, bad: ["--checkpoint", bad / "config_unknown", "--format", "hf"],
     "config_unknown/config.json: not a T5 model config (unknown T5Config fields: ['colour'])"),
    (lambda run, corrupt, bad: ["--checkpoint", bad / "config_wider", "--format", "hf"],
     "decoder/decoder_norm/scale: (32,) stored, (64,) in the config"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--format", "hf", "--out", bad],
     "exists; pass --overwrite"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--step", "last", "--format", "hf"],
     "argument --step: 'last'"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--format", "hf", "--with_rationales"],
     "--with_rationales"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--format", "onnx"], "argument --format"),
    (lambda run, corrupt, bad: ["--checkpoint", run, "--format", "saved_model", "--decode",
                                "beam", "--num_beams", "0"], "argument --num_beams"),
]


@pytest.mark.slow
# orbax's failed read of a corrupt checkpoint leaves its closed event loop to the collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("command, flags, fragment", [
    *(("eval", flags, fragment) for flags, fragment in EVAL_ROWS),
    *(("predict", flags, fragment) for flags, fragment in PREDICT_ROWS),
    *(("export", flags, fragment) for flags, fragment in EXPORT_ROWS)])
def test_eval_predict_and_export_refuse_bad_input(command, flags, fragment, uninterrupted,
                                                  corrupt_run, bad_inputs, tmp_path, capsys):
  output = {"predict": ["--output", tmp_path / "out.jsonl"],
            "export": ["--out", tmp_path / "export"]}.get(command, [])  # a row may name its own
  assert_refused(capsys, [command, *output, *flags(uninterrupted, corrupt_run, bad_inputs)],
                 fragment, uninterrupted, corrupt_run, bad_inputs)
  assert not list(tmp_path.iterdir())


def test_predicting_an_empty_input_file_warns_and_writes_an_empty_output(uninterrupted, tmp_path,
                                                                          capsys):
  inputs, output = tmp_path / "empty.txt", tmp_path / "out.jsonl"
  inputs.write_text("\n  \n")
  assert cli.main(["predict", "--checkpoint", str(uninterrupted), "--input", str(inputs),
                   "--output", str(output)]) == 0
  err = capsys.readouterr().err
  assert f"dsbs predict: warning: {inputs} holds no inputs" in err
  assert output.read_text() == ""


@pytest.mark.parametrize("command", ["train", "compile", "export", "distill"])
def test_help_answers_before_the_commands_heavy_module_loads(command):
  code = f"from dsbs_jax import cli\ntry:\n  cli.main(['{command}', '--help'])\nexcept SystemExit:\n  pass"
  assert modules_loaded_by(code, ("jax", "tensorflow", "seqio", cli.SUBCOMMANDS[command][0])) == []
