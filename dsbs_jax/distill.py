"""`dsbs distill`: from a user's inputs and a teacher to an evaluated, exported student in one
resumable command, with or without gold labels.

Stages, each writing under --out (DIR) and skipped when its output is complete, so that a
rerun after a crash, a kill or Ctrl-C resumes at the stage, and the example or training
step, where the last run stopped:

  1. rationales  the teacher annotates --inputs (and --test): DIR/teacher/{inputs,test}.jsonl,
                 appended per example (with --samples K, once its K samples are in: the
                 teacher label is their vote); every request and token spent goes to
                 DIR/teacher/spend.jsonl, so --max_teacher_tokens holds across runs
  2. dataset     DIR/train.gin names the custom dataset (custom_tasks: validation, and test
                 without --test, carved from the inputs; laid out in DIR/data/<name>/) and
                 the run; `dsbs train --gin_file=DIR/train.gin` is the next stage by hand
  3. train       the <name>_dsbs_teacher mixture (_dsbs_gold with --use_gold) into
                 DIR/student, resuming from its latest checkpoint; its final evaluation
                 scores the best checkpoint on validation and test
  4. export      DIR/export/<format> for each --export format
  5. report      DIR/report.md, also printed

Inputs without gold labels train and validate on the teacher's labels (accuracy is then
agreement with the teacher); a --test file with gold labels gives true accuracy.

--out, --inputs, --test, --prompt, --vocabulary and a converted or gin --student may be
gs:// URLs. An object store cannot append: there the records are uploaded every 30 s and
when stage 1 ends (storage.Appender; a kill -9 loses the records since, which the rerun asks
for again), and the spend ledger after each request, so --max_teacher_tokens holds as on a
disk.

This module only composes the stages' own modules (teacher.py and teacher_command.py,
custom_tasks.py through gin, train.py, export.py, run_dir.py); it must not reimplement
generation, splitting, training, evaluation or export.
"""
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import re
import shlex
import sys
import tempfile
from typing import Optional

import gin

from dsbs_jax import checkpoints
from dsbs_jax import command_flags
from dsbs_jax import console
from dsbs_jax import datasets
from dsbs_jax import distillation
from dsbs_jax import export
from dsbs_jax import folder_lock
from dsbs_jax import gin_utils
from dsbs_jax import infer
from dsbs_jax import input_pipeline
from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources
from dsbs_jax import run_dir
from dsbs_jax import self_consistency
from dsbs_jax import stop_signals
from dsbs_jax import storage
from dsbs_jax import teacher
from dsbs_jax import teacher_client
from dsbs_jax import teacher_command
from dsbs_jax import train

TOKEN_CAP_FLAG = command_flags.DISTILL_TOKEN_CAP_FLAG
# Macros of DIR/train.gin that flags set, so that no --gin.NAME=VALUE may.
FLAG_OF_MACRO = {"MODEL_DIR": "--out", "MIXTURE_OR_TASK_NAME": "--name and --use_gold",
                 "TRAIN_STEPS": "--steps", "ALPHA": "--alpha", "INITIAL_CHECKPOINT_PATH": "--student",
                 "VOCABULARY": "--vocabulary"}
VALID_FRACTION = records.VALID_FRACTION  # custom_tasks' default too
# DIR/teacher/settings.json: what its records were made with, and the value of each setting
# in folders written before the setting was recorded.


class DistillError(ValueError):
  """Inputs, flags or an earlier run in --out that this run cannot go on with; names which."""


USER_ERRORS = ((DistillError, teacher_client.TeacherError, teacher.PromptFileError)
               + train.USER_ERRORS + export.USER_ERRORS + infer.USER_ERRORS)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The files of one distill run folder (DIR), on a disk or an object store."""
  root: storage.Path

  def __post_init__(self):
    object.__setattr__(self, "root", storage.path(self.root))

  teacher_dir = property(lambda self: self.root / "teacher")
  inputs_records = property(lambda self: self.teacher_dir / "inputs.jsonl")
  test_records = property(lambda self: self.teacher_dir / "test.jsonl")
  ledger = property(lambda self: self.teacher_dir / "spend.jsonl")
  teacher_settings = property(lambda self: self.teacher_dir / "settings.json")
  data_dir = property(lambda self: self.root / "data")
  train_gin = property(lambda self: self.root / "train.gin")
  student = property(lambda self: run_dir.RunDir(self.root / "student"))
  report = property(lambda self: self.root / "report.md")

  def export_dir(self, export_format: str) -> storage.Path:
    return self.root / "export" / export_format


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the flags and input files ask for, checked before anything is written or sent."""
  name: str
  template: teacher.PromptTemplate
  inputs: list  # teacher.Example
  test: Optional[list]
  inputs_gold: bool
  test_gold: bool
  metric: str  # a custom_tasks.METRICS key
  mixture: str
  student_gin: str  # the gin model file to include
  initial_checkpoint: Optional[str]
  export_formats: tuple


def _gold_labels(examples: list, flag: str, path: str) -> bool:
  """Whether `examples` carry gold labels: all of them or none, else an error."""
  labeled = [e.label is not None for e in examples]
  if any(labeled) and not all(labeled):
    lacking = examples[labeled.index(False)]
    raise DistillError(f"{flag} {path}: example {labeled.index(False) + 1} ({lacking.id!r}) has "
                       f"no label but example {labeled.index(True) + 1} has one; give every "
                       "example a gold label or none")
  return all(labeled)


def _dataset_name(args) -> str:
  name = args.name or re.sub(r"[^a-z0-9_]+", "_", pathlib.Path(args.inputs).name.split(".")[0].lower())
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise DistillError(f"--name {name!r}: a dataset name is lowercase letters, digits and '_', "
                       "starting with a letter" + ("" if args.name else " (derived from --inputs; "
                                                   "give --name)"))
  if name in {spec.name for spec in datasets.BENCHMARKS}:
    raise DistillError(f"--name {name!r} is a shipped benchmark's; give another --name")
  return name


def _student(student: str) -> tuple[str, Optional[str]]:
  """(gin model file to include, converted checkpoint or None) for --student."""
  path = storage.path(student)
  if path.is_dir():
    if not (path / checkpoints.CONFIG_FILE).is_file():
      raise DistillError(f"--student {student}: a folder without {checkpoints.CONFIG_FILE}; give "
                         "a converted checkpoint (dsbs convert --out) or a gin model")
    return "", str(path)
  if path.suffix == ".gin":
    if not path.is_file():
      raise DistillError(f"--student {student}: no such gin file")
    return str(path), None
  if (resources.GIN_MODELS_DIR / f"{student}.gin").is_file():
    return f"models/{student}.gin", None
  known = ", ".join(sorted(p.stem for p in resources.GIN_MODELS_DIR.glob("*.gin")))
  raise DistillError(f"--student {student!r}: not a gin model ({known}), a .gin file or a "
                     "converted checkpoint folder")


def plan_run(args) -> Plan:
  template = teacher.PromptTemplate.load(args.prompt)
  inputs = teacher.read_examples(args.inputs)
  inputs_gold = _gold_labels(inputs, "--inputs", args.inputs)
  test = teacher.read_examples(args.test) if args.test else None
  test_gold = _gold_labels(test, "--test", args.test) if test else False
  if len(inputs) < (2 if test else 3):
    raise DistillError(f"--inputs {args.inputs}: {len(inputs)} example(s); at least "
                       f"{2 if test else 3} are needed for training, validation"
                       f"{'' if test else ' and test'} splits")
  if args.use_gold and not inputs_gold:
    raise DistillError(f"--use_gold: the examples of --inputs {args.inputs} carry no gold labels")
  if test and {e.id for e in test} & {e.id for e in inputs}:
    shared = sorted({e.id for e in test} & {e.id for e in inputs})
    raise DistillError(f"--test {args.test} and --inputs {args.inputs} share ids ({shared[0]!r}"
                       f"{' and others' if len(shared) > 1 else ''}); test examples must be apart")
  for binding in args.gin_bindings:
    macro = binding.split(" = ", 1)[0].strip()
    if macro in FLAG_OF_MACRO:
      raise DistillError(f"--gin.{macro}: dsbs distill sets it; use {FLAG_OF_MACRO[macro]}")
  formats = tuple(f for f in (args.export or "").split(",") if f)
  unknown = [f for f in formats if f not in export.FORMATS]
  if unknown:
    raise DistillError(f"--export {args.export!r}: {unknown[0]!r} is not one of {export.FORMATS}")
  if not 0.0 < args.alpha < 1.0:
    raise DistillError(f"--alpha {args.alpha}: must be in (0, 1)")
  teacher_command.temperature(args)
  equation = teacher.METRIC_FOR_PARSER.get(template.parser) is metrics.equation_accuracy
  name = _dataset_name(args)
  student_gin, initial_checkpoint = _student(args.student)
  return Plan(name=name, template=template, inputs=inputs, test=test, inputs_gold=inputs_gold,
              test_gold=test_gold, metric="equation" if equation else "exact_match",
              mixture=distillation.task_name(name, "dsbs_gold" if args.use_gold else "dsbs_teacher"),
              student_gin=student_gin, initial_checkpoint=initial_checkpoint,
              export_formats=formats)


# ------------------------------------------------------------------------------
# Stage 1: rationales.
# ------------------------------------------------------------------------------
def _annotation_jobs(plan: Plan, layout: Layout) -> list[tuple[str, list, storage.Path]]:
  jobs = [("--inputs", plan.inputs, layout.inputs_records)]
  return jobs + ([("--test", plan.test, layout.test_records)] if plan.test else [])


def dry_run(args, plan: Plan, layout: Layout) -> int:
  """Prints the requests stage 1 would send and an estimate of their tokens; sends none."""
  build_prompt = plan.template.messages if args.api == "chat" else plan.template.prompt
  requests = prompt_tokens = 0
  for flag, examples, path in _annotation_jobs(plan, layout):
    done = teacher.resume_output(str(path), args.samples) if path.is_file() else {}
    pending = [e for e in examples if e.id not in done]
    requests += len(pending)
    prompt_tokens += sum(teacher_client.estimate_tokens(build_prompt(e.input), "") for e in pending)
    print(f"{flag} {getattr(args, flag[2:])}: {len(examples):,} examples, {len(done):,} already "
          f"annotated in {path}, {len(pending):,} to send")
  spent = teacher_client.read_ledger(str(layout.ledger))[1]
  completion_tokens = requests * args.max_tokens * args.samples
  cap = f"{args.max_tokens_total:,}" if args.max_tokens_total else "none"
  if args.samples > 1:
    print(f"--samples {args.samples}: one request an input where the endpoint honours `n`, else "
          f"{args.samples} (each with its prompt: up to {args.samples}x the prompt tokens below)")
  print(f"dry run: {requests:,} requests (retries not counted); about {prompt_tokens:,} prompt "
        f"tokens ({teacher_client.CHARS_PER_TOKEN_ESTIMATE} characters a token) + at most "
        f"{completion_tokens:,} completion tokens (--max_tokens {args.max_tokens} each"
        f"{f' x {args.samples} samples' if args.samples > 1 else ''}) = at most "
        f"~{prompt_tokens + completion_tokens:,} tokens; spent so far {spent:,}, {TOKEN_CAP_FLAG} "
        f"{cap}; nothing was sent")
  return 0


def _check_records_match(flag: str, source: str, examples: list, path: storage.Path) -> None:
  """Refuses records in `path` that no longer fit the examples (the input file changed)."""
  if not path.is_file():
    return
  by_id = {e.id: e for e in examples}
  for record in teacher.resume_output(str(path)).values():
    example = by_id.get(record.id)
    if example is None or (example.input, example.label) != (record.input, record.label):
      what = "lacks" if example is None else "has another input or label for"
      raise DistillError(f"{flag} {source} {what} id {record.id!r}, annotated in {path}; the "
                         "inputs changed since: restore them, or use a new --out")


def annotate(args, plan: Plan, layout: Layout) -> int:
  """Stage 1; returns 0 when every example has its record, else the exit code."""
  teacher_command.check_teacher_settings(args, plan.template.path, layout.teacher_settings,
                                         str(layout.teacher_dir), model_flag="--teacher_model")
  for flag, examples, path in _annotation_jobs(plan, layout):
    _check_records_match(flag, getattr(args, flag[2:]), examples, path)
  budget = teacher_command.make_budget(args, str(layout.ledger), TOKEN_CAP_FLAG)
  api_key = teacher_command.api_key_from_env(args)
  for _, examples, path in _annotation_jobs(plan, layout):
    client = teacher_command.make_client(args, plan.template, budget, api_key)
    spent_before = (budget.requests, budget.tokens)
    result = teacher.generate(examples, plan.template, client, str(path),
                              concurrency=args.concurrency, progress=args.progress,
                              samples=args.samples)
    code = teacher_command.summarize_generation("dsbs distill", str(path), result, client,
                                                args.max_attempts, spent_before)
    if code:
      return code
  return 0


# ------------------------------------------------------------------------------
# Stages 2-4: the dataset and the run's gin, training, export.
# ------------------------------------------------------------------------------
def _gin_literal(value) -> str:
  """A string or path as a gin string literal."""
  return repr(str(value))


def train_gin_text(args, plan: Plan, layout: Layout) -> str:
  """DIR/train.gin: the dataset and the run, for `dsbs train --gin_file=DIR/train.gin`."""
  dataset = {"name": plan.name, "rationales_file": str(layout.inputs_records),
             "metric": plan.metric, "valid_fraction": VALID_FRACTION,
             "layout_dir": str(layout.data_dir)}
  if plan.test:
    dataset["test_file"] = str(layout.test_records)
  if args.drop_unparsed:
    dataset["drop_parse_failures"] = True
  lines = [f"# Written by `dsbs distill`; run it by hand with: dsbs train --gin_file={layout.train_gin}"]
  if plan.student_gin:
    lines.append(f"include {_gin_literal(plan.student_gin)}")
  lines += ["include 'runs/train.gin'", *(f"include {_gin_literal(_gin_file(f))}" for f in args.gin_file),
            "import dsbs_jax.custom_tasks", "",
            f"custom_tasks.register_custom_datasets.datasets = [{dataset!r}]",
            f"MIXTURE_OR_TASK_NAME = {plan.mixture!r}",
            f"MODEL_DIR = {_gin_literal(layout.student.path)}",
            f"TRAIN_STEPS = {args.steps}", f"ALPHA = {args.alpha}",
            f"CHECKPOINT_PERIOD = {max(1, min(1000, args.steps // 4))}",
            f"EVAL_PERIOD = {max(1, min(1000, args.steps // 2))}"]
  if args.vocabulary:
    lines.append(f"VOCABULARY = {_gin_literal(storage.path(args.vocabulary))}")
  if plan.initial_checkpoint:
    config = checkpoints.load_config(plan.initial_checkpoint)
    lines += [f"INITIAL_CHECKPOINT_PATH = {plan.initial_checkpoint!r}",
              "# The converted checkpoint's architecture (its config.json):"]
    lines += [f"T5Config.{field.name} = {getattr(config, field.name)!r}"
              for field in dataclasses.fields(config)
              if field.name not in run_dir.RUN_TIME_CONFIG_FIELDS]
  if args.gin_bindings:
    lines += ["# --gin.NAME=VALUE flags of dsbs distill:", *args.gin_bindings]
  return "\n".join(lines) + "\n"


def _gin_file(path: str) -> str:
  """A --gin_file as train.gin includes it: absolute when it names a file here."""
  return str(pathlib.Path(path).absolute()) if os.path.isfile(path) else path


@contextlib.contextmanager
def run_config(args, layout: Layout):
  """Parses DIR/train.gin as `dsbs train` would and registers the datasets; clears gin after."""
  try:
    gin_utils.parse_gin([str(layout.train_gin)], [], args.gin_search_path)
    gin_utils.check_macros_used(args.gin_bindings)
    datasets.register_all()
    yield
  finally:
    gin.clear_config()


def check_training_settings(args, plan: Plan, layout: Layout) -> None:
  """Parses the training gin of stage 3 before stage 1 sends anything, so that a setting it
  would refuse (a gin typo, a macro nothing uses, 'gold' rationales without gold labels)
  costs no teacher tokens."""
  with tempfile.TemporaryDirectory() as scratch:
    gin_path = pathlib.Path(scratch) / "train.gin"
    gin_path.write_text(train_gin_text(args, plan, layout))
    try:
      gin_utils.parse_gin([str(gin_path)], [], args.gin_search_path)
      gin_utils.check_macros_used(args.gin_bindings)
      options = distillation.TaskOptions()
    finally:
      gin.clear_config()
  if (options.train_rationales == self_consistency.TRAIN_AGREE_WITH_GOLD
      and not (plan.inputs_gold or args.use_gold)):
    raise DistillError(f"--gin.TaskOptions.train_rationales='gold': the examples of --inputs "
                       f"{args.inputs} carry no gold labels to select rationales by; nothing "
                       "was sent")


def training_done(layout: Layout, steps: int) -> bool:
  student = layout.student
  if student.results() is None:
    return False
  checkpointer = student.checkpointer()
  try:
    return (checkpointer.latest_step() or 0) >= steps
  finally:
    checkpointer.close()


def train_student(args, layout: Layout, gin_text: str) -> int:
  """Stage 3 (with its final evaluation); skipped when DIR/train.gin is as the finished run's."""
  unchanged = layout.train_gin.is_file() and layout.train_gin.read_text() == gin_text
  if unchanged and training_done(layout, args.steps):
    print(f"train: done ({layout.student.path}), skipped")
    return 0
  storage.write_atomically(layout.train_gin, gin_text.encode())
  with run_config(args, layout):
    try:
      train.train()
    except train.TrainingInterrupted as interrupted:
      print(f"dsbs distill: {console.one_line(interrupted)}", file=sys.stderr)
      return interrupted.exit_code
  return 0


def export_student(plan: Plan, layout: Layout) -> dict[str, str]:
  """Stage 4: {format: folder}; an export of the run's best step already there is kept."""
  best_step = layout.student.results()["best_step"]
  folders = {}
  for export_format in plan.export_formats:
    out = layout.export_dir(export_format)
    manifest = out / export.MANIFEST_FILE
    if manifest.is_file() and json.loads(manifest.read_text())["source"]["step"] == best_step:
      print(f"export {export_format}: done ({out}), skipped")
    else:
      out.parent.mkdir(parents=True, exist_ok=True)
      export.export(layout.student.path, out, export_format, overwrite=True)
      print(f"export {export_format}: wrote {out}")
    folders[export_format] = str(out)
  return folders


# ------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------
def _percent(value) -> str:
  return "n/a" if value is None else f"{value:.1%}"


def _train_examples(train_sizes: dict, options: distillation.TaskOptions, samples: int) -> str:
  """"40 label and 40 rationale training examples" and, for K samples, how they were chosen."""
  label_task, rationale_task = train_sizes  # the mixture's two tasks, label first
  text = (f"{train_sizes[label_task]:,} label and {train_sizes[rationale_task]:,} rationale "
          "training examples")
  if samples > 1:
    text += (f" (TaskOptions.train_rationales {options.train_rationales!r} of each input's "
             f"{samples} rationales, TaskOptions.min_agreement {options.min_agreement:g})")
  return text


def _absolute(path: str) -> str:
  return path if storage.is_url(path) else os.path.abspath(path)


def commands(args, plan: Plan, layout: Layout) -> list[tuple[str, str]]:
  """(what, shell command) that redo each stage by hand."""
  teacher_flags = ["--prompt", _absolute(args.prompt), "--teacher", args.teacher,
                   "--model", args.model, "--api", args.api, "--api_key_env", args.api_key_env]
  if args.samples > 1:
    teacher_flags += ["--samples", str(args.samples),
                      "--temperature", f"{teacher_command.temperature(args):g}"]
  listed = [(f"rationales for {flag}", shlex.join(
      ["dsbs", "rationales", "generate", "--input", _absolute(getattr(args, flag[2:])),
       *teacher_flags,
       "--out", str(path)])) for flag, _, path in _annotation_jobs(plan, layout)]
  search = [f"--gin_search_path={p}" for p in args.gin_search_path]
  gin_flags = [f"--gin_file={layout.train_gin}", *search]
  student = str(layout.student.path)
  listed.append(("dataset and training (resumes from the latest checkpoint)",
                 shlex.join(["dsbs", "train", *gin_flags])))
  listed += [(f"evaluation of the best checkpoint on {split}", shlex.join(
      ["dsbs", "eval", "--checkpoint", student, "--split", split, *gin_flags]))
             for split in ("validation", "test")]
  listed += [(f"export ({export_format})", shlex.join(
      ["dsbs", "export", "--checkpoint", student, "--format", export_format, "--out",
       str(layout.export_dir(export_format)), "--overwrite"])) for export_format in plan.export_formats]
  listed.append(("predictions for new inputs", shlex.join(
      ["dsbs", "predict", "--checkpoint", student, "--input", "INPUTS.jsonl", "--output",
       "PREDICTIONS.jsonl"])))
  return listed


def write_report(args, plan: Plan, layout: Layout, exports: dict[str, str]) -> str:
  """DIR/report.md from the files the stages wrote; returns its text."""
  results, spec = layout.student.results(), layout.student.spec()
  lengths = {"inputs": spec.input_length, "targets": spec.target_length}
  with run_config(args, layout), distillation.options_in_use(distillation.TaskOptions()) as options:
    baseline_validation = train.majority_baseline(results["label_task"], lengths, "validation")
    train_sizes = {task: sizes["train"] for task, sizes in
                   input_pipeline.split_sizes(plan.mixture, ("train",)).items()}
  split_dir = layout.data_dir / plan.name
  # Per split: its size and the teacher's accuracy against gold labels (None without them).
  splits = {split: teacher.record_stats(path, rationales.read_records(path), plan.template.parser)
            for split, path in ((split, str(split_dir / f"{file}.jsonl")) for split, file in
                                (("train", "train"), ("validation", "valid"), ("test", "test")))}
  inputs_records = rationales.read_records(str(layout.inputs_records))
  stats = teacher.record_stats(str(layout.inputs_records), inputs_records, plan.template.parser)
  requests, tokens, estimated = teacher_client.read_ledger(str(layout.ledger))
  unparsed = [r for r in inputs_records if not r.parsed()]
  against = {"validation": plan.inputs_gold,
             "test": plan.test_gold if plan.test else plan.inputs_gold}
  trained_on = "gold" if args.use_gold else "the teacher's"
  sampled = stats.samples > 1
  lines = [
      f"# dsbs distill: {plan.name}", "",
      f"Run folder `{layout.root}`, written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}.", "",
      "## Teacher (stage 1)", "",
      f"- Teacher `{args.model}` at {args.teacher} ({args.api}), prompt `{args.prompt}` "
      f"(parser {plan.template.parser}).",
      f"- Inputs `{args.inputs}`: {stats.records:,} examples, "
      f"{'with' if plan.inputs_gold else 'without'} gold labels. Teacher outputs parsed: "
      f"{stats.records - stats.parse_failures:,} of {stats.records:,} "
      f"({_percent(1 - stats.parse_failures / stats.records)}).",
  ]
  if unparsed:
    shown = "; ".join(f"`{r.id}`: {r.parse_error}" for r in unparsed[:5])
    kept = ("dropped from every split (--drop_unparsed)" if args.drop_unparsed else
            "no sample parsed: left out of training, kept with blank labels elsewhere"
            if sampled else
            "kept with blank labels, as the paper keeps them; --drop_unparsed leaves them out")
    lines.append(f"- Unparsed ({len(unparsed):,}, {kept}): "
                 f"{shown}{' ...' if len(unparsed) > 5 else ''}")
  if sampled and stats.sample_parse_failures:
    lines.append(f"- Samples that did not parse: {stats.sample_parse_failures:,} of "
                 f"{stats.samples_in_all:,}; they neither vote nor train a rationale.")
  if sampled:
    lines.append(f"- {stats.samples} samples an input at temperature "
                 f"{teacher_command.temperature(args):g}; the teacher label is their majority "
                 "vote (a tie goes to the answer sampled first).")
  if plan.inputs_gold and sampled:
    lines += [f"- Teacher accuracy against the inputs' gold labels, on the same inputs: one sample "
              f"{_percent(stats.single_sample_accuracy)}, vote of {stats.samples} "
              f"{_percent(stats.teacher_accuracy)}.",
              f"- The vote's accuracy by agreement: {teacher_command.agreement_buckets(stats)}."]
  elif plan.inputs_gold:
    lines.append(f"- Teacher accuracy against the inputs' gold labels: {_percent(stats.teacher_accuracy)}.")
  elif sampled:
    lines.append(f"- Inputs by agreement of the vote: {teacher_command.agreement_buckets(stats)}.")
  lines += [
      f"- Tokens spent on the teacher, over every run in this folder: {tokens:,}"
      f"{f' ({estimated:,} estimated from text length)' if estimated else ''} in {requests:,} "
      f"requests (retries included){f'; {TOKEN_CAP_FLAG} {args.max_tokens_total:,}' if args.max_tokens_total else ''}.",
      "", "## Data (stage 2)", "",
      f"- Custom dataset `{plan.name}` in `{split_dir}`: train {splits['train'].records:,}, "
      f"validation {splits['validation'].records:,} ({VALID_FRACTION:.0%} of the inputs, held out), "
      f"test {splits['test'].records:,} "
      + (f"(`{args.test}`)." if plan.test else f"({VALID_FRACTION:.0%} of the rest of the inputs, held out)."),
      f"- Trained on `{plan.mixture}`: {trained_on} labels and the teacher's rationales, alpha "
      f"{args.alpha}: {_train_examples(train_sizes, options, stats.samples)}.",
      "", "## Student (stages 3 and 4)", "",
      f"Best step {results['best_step']} (by validation) of {args.steps}. "
      f"Metric: {plan.metric} accuracy.", "",
      "| split | scored against | student | teacher"
      + (", one sample | teacher, vote" if sampled else "") + " | majority baseline |",
      "| --- | --- | --- | --- |" + (" --- |" if sampled else "") + " --- |",
  ]
  baselines = {"validation": baseline_validation, "test": results["majority_baseline_test"]}
  for split in ("validation", "test"):
    gold = against[split]
    if gold:  # with K samples, the first one's accuracy beside the vote's
      teacher_values = ([splits[split].single_sample_accuracy] if sampled else []) + [
          splits[split].teacher_accuracy]
      teacher_cells = " | ".join(_percent(value) for value in teacher_values)
    else:
      teacher_cells = ("n/a | " if sampled else "") + "100% (the reference)"
    lines.append(f"| {split} | {'gold labels' if gold else 'teacher labels: agreement with the teacher'} | "
                 f"{_percent(results[split].get('accuracy'))} | {teacher_cells} | "
                 f"{_percent(baselines[split].get('accuracy'))} |")
  if not all(against.values()):
    lines += ["", "Without gold labels, accuracy is agreement with the teacher's labels, not "
              "correctness" + ("" if plan.test_gold else "; a --test file with gold labels gives true accuracy") + "."]
  lines += ["", f"- Learning curves: `{layout.student.learning_curves_path}`",
            f"- Predictions: `{layout.student.predictions_path('validation')}`, "
            f"`{layout.student.predictions_path('test')}`"]
  lines += [f"- Export ({export_format}): `{folder}`" for export_format, folder in exports.items()]
  lines += ["", "## Each stage by hand", ""]
  for what, command in commands(args, plan, layout):
    lines += [f"{what}:", "", "```bash", command, "```", ""]
  text = "\n".join(lines)
  storage.write_atomically(layout.report, text.encode())
  return text


# ------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------
def run(args) -> int:
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  storage.check(read=[args.inputs, args.test, args.prompt, args.student, args.vocabulary],
                write=[args.out])
  layout = Layout(args.out)
  plan = plan_run(args)
  check_training_settings(args, plan, layout)
  if args.dry_run:
    return dry_run(args, plan, layout)
  resume = "rerun the same command: the stages already done are skipped"
  with folder_lock.lock_for(folder_lock.lock_path(layout.root), f"--out {layout.root}",
                            "dsbs distill"):
    layout.teacher_dir.mkdir(parents=True, exist_ok=True)
    with stop_signals.phase("asking the teacher for rationales",
                            resume=f"the records in {layout.teacher_dir} are kept; {resume}"):
      code = annotate(args, plan, layout)
    if code:
      return code
    code = train_student(args, layout, train_gin_text(args, plan, layout))
    if code:
      return code
    with stop_signals.phase("exporting the student", resume=resume):
      exports = export_student(plan, layout)
    print(write_report(args, plan, layout, exports))
  print(f"report: {layout.report}")
  return 0
