"""`dsbs rationales`: `generate` asks a teacher LLM for rationales; `stats` summarizes a record file.

Only argument handling and reporting live here; the work is in `dsbs_jax.teacher` and
`dsbs_jax.teacher_client`. The API key is read from the environment variable that
--api_key_env names and handed to the client; it is never printed.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import sys
from typing import Optional

from dsbs_jax import distillation
from dsbs_jax import flags
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources
from dsbs_jax import stop_signals
from dsbs_jax import storage
from dsbs_jax import teacher
from dsbs_jax import teacher_client
from dsbs_jax import text_files

EXIT_INCOMPLETE = 1
EXIT_UNREACHABLE = 2
USER_ERRORS = (teacher_client.TeacherError, teacher.PromptFileError)
# --temperature when --samples is above 1 and no temperature is given (Wang et al. 2022
# sample at 0.5 to 0.7); one sample is greedy by default, as the paper's PaLM outputs.
SAMPLING_TEMPERATURE = 0.7


def _teacher_url(text: str) -> str:
  try:
    teacher_client.endpoint_url(text, "completions")
  except teacher_client.TeacherError as error:
    raise argparse.ArgumentTypeError(str(error).removeprefix("--teacher ")) from None
  return text


def add_client_arguments(parser, model_flag: str = "--model",
                         token_cap_flag: str = "--max_tokens_total") -> None:
  """The teacher and client flags, shared with `dsbs distill` (which names two differently)."""
  parser.add_argument("--teacher", required=True, metavar="URL", type=_teacher_url,
                      help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
  parser.add_argument(model_flag, dest="model", required=True,
                      help="model name sent with each request")
  parser.add_argument("--api", choices=teacher_client.APIS, default="completions",
                      help="/v1/completions with the prompt text, or /v1/chat/completions with messages")
  parser.add_argument("--api_key_env", default="OPENAI_API_KEY", metavar="VAR",
                      help="environment variable holding the API key (default OPENAI_API_KEY)")
  parser.add_argument("--concurrency", type=flags.positive_int, default=4,
                      help="requests in flight (default 4)")
  parser.add_argument("--max_requests", type=flags.positive_int, default=None,
                      help="stop after this many HTTP requests, retries included")
  parser.add_argument(token_cap_flag, dest="max_tokens_total", type=flags.positive_int, default=None,
                      help="stop once this many tokens are spent (from replies' usage, else about "
                           f"{teacher_client.CHARS_PER_TOKEN_ESTIMATE} characters per token)")
  parser.add_argument("--samples", type=flags.positive_int, default=1, metavar="K",
                      help="completions per input (default 1); with K > 1 the record keeps all "
                           "K and its teacher label is their majority vote (self-consistency)")
  parser.add_argument("--temperature", type=float, default=None,
                      help="sampling temperature (default 0, greedy as the paper's PaLM outputs, "
                           f"with one sample; {SAMPLING_TEMPERATURE} with --samples above 1)")
  parser.add_argument("--max_tokens", type=flags.positive_int, default=256, help="completion length cap")
  parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                      help="stop sequence (repeatable; default: the prompt file's, e.g. '\\n\\nQ:')")
  parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one reply")
  parser.add_argument("--max_attempts", type=flags.positive_int, default=6, help="attempts per example")
  parser.add_argument("--max_connection_failures", type=flags.positive_int, default=10, metavar="N",
                      help="stop after N attempts in a row, across all requests, got no reply "
                           "from the teacher (connection refused or reset, unknown host, or no "
                           "reply within --timeout); default 10")
  parser.add_argument("--max_failed_examples", type=flags.positive_int, default=10, metavar="N",
                      help="stop after N examples in a row failed every attempt (a teacher "
                           "that answers only with errors); default 10")
  parser.add_argument("--retry_base_delay", type=float, default=1.0,
                      help="first backoff in seconds; doubles per attempt, with jitter")
  parser.add_argument("--retry_max_delay", type=float, default=30.0, help="backoff cap in seconds")
  parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="show a progress bar (default: when stderr is a terminal)")


def make_budget(args: argparse.Namespace, ledger_path=None,
                token_flag: str = "--max_tokens_total") -> teacher_client.Budget:
  return teacher_client.Budget(args.max_requests, args.max_tokens_total,
                               args.max_connection_failures, ledger_path, token_flag,
                               args.max_failed_examples)


def api_key_from_env(args: argparse.Namespace) -> Optional[str]:
  """The key in the variable --api_key_env names; a warning line if it is unset."""
  api_key = os.environ.get(args.api_key_env)
  if not api_key:
    print(f"{getattr(args, 'command_name', 'dsbs')}: warning: ${args.api_key_env} is not set; "
          "sending requests without an API key", file=sys.stderr)
  return api_key


def temperature(args: argparse.Namespace) -> float:
  """--temperature, or its default for --samples; refuses K greedy samples (all the same)."""
  if args.temperature is None:
    return 0.0 if args.samples == 1 else SAMPLING_TEMPERATURE
  if not math.isfinite(args.temperature):
    raise teacher_client.TeacherError(f"--temperature {args.temperature:g}: must be a number")
  if args.samples == 1 and args.temperature < 0:
    raise teacher_client.TeacherError(
        f"--temperature {args.temperature:g}: must be 0 (greedy) or above")
  if args.samples > 1 and args.temperature <= 0:
    raise teacher_client.TeacherError(
        f"--temperature {args.temperature:g}: must be above 0 with --samples {args.samples} "
        "(greedy decoding gives identical samples)")
  return args.temperature


# Beside `generate --out FILE`: the settings of the teacher that wrote FILE's records.
SETTINGS_SUFFIX = ".teacher.json"
# What a record file's teacher was: a file is finished with the same ones only. Files of
# settings written before the sampling flags existed lack those two.
SETTING_DEFAULTS = {"samples": 1, "temperature": 0.0}


def check_teacher_settings(args: argparse.Namespace, prompt_path: str, settings_path,
                           records_in: str, model_flag: str = "--model") -> None:
  """Writes the teacher's settings (model, prompt, API, samples, temperature) to
  `settings_path` for the records in `records_in`, or, when it is there, refuses other
  ones, naming the flag: the records of one file come from one teacher and sampling."""
  prompt = storage.path(prompt_path).read_bytes()
  settings = {"teacher_model": args.model, "prompt_sha256": hashlib.sha256(prompt).hexdigest(),
              "api": args.api, "samples": args.samples, "temperature": temperature(args)}
  path = storage.path(settings_path)
  if not path.is_file():
    storage.write_atomically(path, (json.dumps(settings, indent=1) + "\n").encode())
    return
  before = {**SETTING_DEFAULTS, **text_files.read_json(path)}
  flag_of = {"teacher_model": model_flag, "prompt_sha256": "--prompt", "api": "--api",
             "samples": "--samples", "temperature": "--temperature"}
  for key, value in settings.items():
    if before.get(key) != value:
      raise teacher_client.TeacherError(
          f"{flag_of[key]}: differs from what wrote the records in {records_in} "
          f"({key} {before.get(key)!r}, in {settings_path}); rerun with the same one, or use a "
          "new output")


def make_client(args: argparse.Namespace, template: teacher.PromptTemplate,
                budget: teacher_client.Budget, api_key: Optional[str]) -> teacher_client.TeacherClient:
  """The client that the flags of `add_client_arguments` describe, drawing on `budget`."""
  return teacher_client.TeacherClient(
      args.teacher, args.model, api=args.api, api_key=api_key, timeout_s=args.timeout,
      max_tokens=args.max_tokens, temperature=temperature(args),
      stop=template.stop if args.stop is None else args.stop,
      retry=teacher_client.RetryPolicy(args.max_attempts, args.retry_base_delay, args.retry_max_delay),
      budget=budget)


def summarize_generation(prog: str, out: str, result: teacher.GenerationResult,
                         client: teacher_client.TeacherClient, max_attempts: int,
                         spent_before: Optional[tuple[int, int]] = None) -> int:
  """Prints what a generation run did and, unless every example is done, why and how to go
  on; returns the exit code: 0 when done. `spent_before`: (requests, tokens) the budget had
  counted before this file, when it is shared with other files (dsbs distill's two): the
  line then gives this file's own and the total apart."""
  budget = client.budget
  estimated = f", {budget.estimated_tokens:,} of them estimated" if budget.estimated_tokens else ""
  earlier = f", {budget.earlier_tokens:,} of them by earlier runs" if budget.earlier_tokens else ""
  spent = f"{budget.requests:,} requests, {budget.tokens:,} tokens{estimated}{earlier}"
  if spent_before is not None:
    requests, tokens = budget.requests - spent_before[0], budget.tokens - spent_before[1]
    spent = (f"{requests:,} requests, {tokens:,} tokens for this file now (in all: "
             f"{spent})")
  print(f"{out}: {result.total - result.remaining:,} of {result.total:,} examples done "
        f"({result.written:,} written now, {result.already_done:,} already there); {spent}")
  if result.remaining == 0:
    return 0
  if budget.unreachable:
    print(f"{prog}: error: {client.url}: {budget.exhausted_reason()}; "
          f"{result.written:,} record(s) written to {out} this time, "
          f"{result.remaining:,} example(s) remain: rerun the same command to resume once the "
          "teacher answers", file=sys.stderr)
    return EXIT_UNREACHABLE
  if result.failed:
    print(f"{result.failed:,} example(s) failed after {max_attempts} attempts each (see the "
          "warnings above)", file=sys.stderr)
  if result.stopped:
    print(f"stopped early: {result.stopped}", file=sys.stderr)
  print(f"{result.remaining:,} example(s) remain; rerun the same command to continue", file=sys.stderr)
  return EXIT_INCOMPLETE


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "rationales", description="Stage 1: ask a teacher LLM for rationales (generate), or "
      "summarize rationale record files (stats).")
  actions = parser.add_subparsers(dest="action", required=True)

  generate = actions.add_parser(
      "generate", help="annotate inputs with a teacher's rationales (resumable)",
      description="Sends few-shot chain-of-thought prompts to an OpenAI-compatible endpoint and "
                  "appends one record per example to --out; rerun the same command to resume.")
  source = generate.add_mutually_exclusive_group(required=True)
  source.add_argument("--input", metavar="FILE.jsonl",
                      help='examples, one {"id", "input", "label"} per line')
  source.add_argument("--dataset",
                      help="read ids, inputs and gold labels from the shipped rationales/<DATASET>")
  generate.add_argument("--split", default="train", choices=distillation.SPLITS,
                        help="split of --dataset (default train)")
  generate.add_argument("--rationales_dir", default=None,
                        help="where --dataset lives (default: the shipped rationales/)")
  generate.add_argument("--prompt",
                        help="prompt file (default with --dataset: rationales/prompts/<DATASET>.json)")
  generate.add_argument("--parser", choices=sorted(rationales.PARSERS),
                        help="teacher-output parser (default: the prompt file's)")
  generate.add_argument("--out", required=True, metavar="FILE.jsonl", help="output records, appended to")
  add_client_arguments(generate)
  generate.add_argument("--verbose", action="store_true", help="log every retry")
  generate.set_defaults(func=run_generate)

  stats = actions.add_parser(
      "stats", help="counts, parse failures and teacher accuracy of record files",
      description="Counts records, parse failures and empty rationales, and scores the teacher's "
                  "labels against the gold ones, per file.",
      epilog="example: dsbs rationales stats rationales/cqa/valid.jsonl")
  stats.add_argument("files", nargs="+", metavar="FILE",
                     help="rationale record file(s), .jsonl or .jsonl.gz")
  stats.add_argument("--parser", choices=sorted(rationales.PARSERS),
                     help="picks the accuracy metric (svamp: equation value); "
                          "default: the file's folder name")
  stats.set_defaults(func=run_stats)


def _read_examples(args: argparse.Namespace) -> list:
  if args.input:
    return teacher.read_examples(args.input)
  rationales_dir = args.rationales_dir or str(resources.RATIONALES_DIR)
  split = records.read_split(rationales_dir, args.dataset, args.split)
  return teacher.examples_from_records(split, records.split_path(rationales_dir, args.dataset,
                                                                 args.split))


def run_generate(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  prompt_path = args.prompt or (teacher.default_prompt_path(args.dataset) if args.dataset else None)
  if not prompt_path:
    print("dsbs rationales generate: error: --prompt is required with --input", file=sys.stderr)
    return 2
  storage.check(read=[prompt_path, args.input], write=[args.out])
  template = teacher.PromptTemplate.load(prompt_path)
  temperature(args)  # a bad one is refused before the inputs are read
  examples = _read_examples(args)
  done = teacher.resume_output(args.out, args.samples)  # refused before the settings are kept
  check_teacher_settings(args, prompt_path, f"{args.out}{SETTINGS_SUFFIX}", args.out)
  client = make_client(args, template, make_budget(args), api_key_from_env(args))
  with stop_signals.phase("asking the teacher for rationales",
                          resume=f"the records in {args.out} are kept; rerun the same command "
                                 "to go on"):
    result = teacher.generate(examples, template, client, args.out, parser=args.parser,
                              concurrency=args.concurrency, progress=args.progress,
                              samples=args.samples, done=done)
  return summarize_generation("dsbs rationales generate", args.out, result, client,
                              args.max_attempts)


def _default_stats_parser(path: str):
  folder = storage.path(path).parent.name
  return folder if folder in rationales.PARSERS else None


def _percent(value) -> str:
  return "" if value is None else f"{value:.2%}"


def run_stats(args: argparse.Namespace) -> int:
  all_stats = [teacher.record_stats(path, rationales.read_records(path),
                                    args.parser or _default_stats_parser(path))
               for path in args.files]
  sampled = any(s.samples > 1 for s in all_stats)
  columns = ("file", "records", "with gold", "parse failures", "empty rationales",
             *(("samples", "one-sample accuracy", "vote accuracy") if sampled
               else ("teacher accuracy",)), "metric")
  rows = [(s.path, f"{s.records:,}", f"{s.with_gold_labels:,}", f"{s.parse_failures:,}",
           f"{s.empty_rationales:,}",
           *((f"{s.samples}", _percent(s.single_sample_accuracy)) if sampled else ()),
           _percent(s.teacher_accuracy), s.metric) for s in all_stats]
  widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
  for row in rows:
    print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
  for s in all_stats:
    if s.samples > 1:
      print(f"  {s.path}: {s.sample_parse_failures:,} of {s.samples_in_all:,} samples did not "
            f"parse; {s.parse_failures:,} of {s.records:,} inputs have no sample that did")
    for reason, count in s.parse_failures_by_reason.items():
      print(f"  {s.path}: {count:,} x {reason}")
  for s in all_stats:
    if s.samples > 1:
      print(f"  {s.path}: vote accuracy by agreement: {agreement_buckets(s)}")
  for s in all_stats:
    print(s.to_json())
  return 0


def agreement_buckets(stats: teacher.RecordStats) -> str:
  """"5/5 93.1% (700 inputs), 4/5 ..." (no accuracy without gold labels)."""
  return ", ".join(f"{name}{' ' + _percent(b['accuracy']) if b['accuracy'] is not None else ''} "
                   f"({b['inputs']:,} inputs)" for name, b in stats.by_agreement.items())
