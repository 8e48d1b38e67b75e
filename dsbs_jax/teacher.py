"""Stage 1: rationales from a teacher LLM by few-shot chain-of-thought prompting, resumably.

Holds the prompt files' format (`PromptTemplate`, files in rationales/prompts/), reading
the examples to annotate, the append-only output file keyed by example id, the generation
loop (bounded concurrency, request and token caps, progress bar), and the summary of a
record file that `dsbs rationales stats` prints. HTTP lives in `dsbs_jax.teacher_client`,
parsing of teacher outputs in `dsbs_jax.rationales`.

The output file only ever grows by whole records, each flushed as it completes, so a crash
loses at most the requests in flight and a rerun sends only what is missing. This module
must not import TensorFlow or SeqIO, nor see the API key.
"""
import collections
import dataclasses
import json
import logging
import queue
import threading
from typing import Callable, Iterable, Optional, Sequence

import tqdm

from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import resources
from dsbs_jax import self_consistency
from dsbs_jax import storage
from dsbs_jax import teacher_client
from dsbs_jax import text_files

# The teacher-label metric for each parser; parsers not named here use exact match.
METRIC_FOR_PARSER = {"svamp": metrics.equation_accuracy}
_POLL_S = 0.05  # how often the generation loop looks at the budget while requests are in flight

logger = logging.getLogger(__name__)


class PromptFileError(ValueError):
  """A prompt file that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One input to annotate: its id, the model input text and the gold label (None if unknown)."""
  id: str
  input: str
  label: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A few-shot prompt: exemplars, then the query for one example (see rationales/prompts/README.md).

  An input is split at `input_separator` into `input_fields`, which `query_template` names;
  an exemplar is its query followed by `output_template` filled with its rationale and answer.
  """
  path: str
  parser: str
  input_fields: tuple
  query_template: str
  output_template: str
  exemplars: tuple
  exemplar_separator: str = "\n\n"
  input_separator: str = rationales.NLI_SEPARATOR
  stop: tuple = ()
  chat_instruction: str = ""

  @classmethod
  def load(cls, path: str) -> "PromptTemplate":
    try:
      spec = text_files.read_json(path)
    except FileNotFoundError:
      raise FileNotFoundError(f"{path}: no such prompt file") from None
    if not isinstance(spec, dict):
      raise PromptFileError(f"{path}: expected a JSON object")
    required = ("parser", "input_fields", "query_template", "output_template", "exemplars")
    optional = ("exemplar_separator", "input_separator", "stop", "chat_instruction", "description")
    missing = [k for k in required if k not in spec]
    unknown = set(spec) - set(required) - set(optional)
    if missing or unknown:
      raise PromptFileError(f"{path}: missing field(s) {missing}, unknown field(s) {sorted(unknown)}")
    if spec["parser"] not in rationales.PARSERS:
      raise PromptFileError(f"{path}: parser {spec['parser']!r} is not one of {sorted(rationales.PARSERS)}")
    exemplars = tuple(spec["exemplars"])
    for i, exemplar in enumerate(exemplars):
      if not all(isinstance(exemplar.get(k), str) for k in ("input", "rationale", "answer")):
        raise PromptFileError(f"{path}: exemplars[{i}] needs string fields input, rationale and answer")
    fields = {k: spec[k] for k in required + optional if k in spec and k != "description"}
    template = cls(path=path, **{**fields, "input_fields": tuple(spec["input_fields"]),
                                 "stop": tuple(spec.get("stop", ())), "exemplars": exemplars})
    for i, exemplar in enumerate(exemplars):
      try:
        template.exemplar_text(exemplar)
      except (KeyError, ValueError) as e:
        raise PromptFileError(f"{path}: exemplars[{i}] does not fit the templates: {e}") from None
    return template

  def _fields(self, input_text: str) -> dict:
    if len(self.input_fields) == 1:
      return {self.input_fields[0]: input_text}
    values = input_text.split(self.input_separator)
    if len(values) != len(self.input_fields):
      raise ValueError(f"input has {len(values)} part(s) separated by {self.input_separator!r}, "
                       f"the prompt expects {len(self.input_fields)} ({', '.join(self.input_fields)})")
    return dict(zip(self.input_fields, values))

  def query(self, input_text: str) -> str:
    return self.query_template.format(**self._fields(input_text))

  def output(self, exemplar: dict) -> str:
    return self.output_template.format(rationale=exemplar["rationale"], answer=exemplar["answer"])

  def exemplar_text(self, exemplar: dict) -> str:
    return self.query(exemplar["input"]) + self.output(exemplar)

  def prompt(self, input_text: str) -> str:
    """The completion prompt: exemplars then the query, which the completion continues."""
    blocks = [self.exemplar_text(e) for e in self.exemplars] + [self.query(input_text)]
    return self.exemplar_separator.join(blocks)

  def messages(self, input_text: str) -> list:
    """The chat form: exemplars as user/assistant turns, then the query as the last user turn."""
    turns = [{"role": "system", "content": self.chat_instruction}] if self.chat_instruction else []
    for exemplar in self.exemplars:
      turns.append({"role": "user", "content": self.query(exemplar["input"])})
      turns.append({"role": "assistant", "content": self.output(exemplar).strip()})
    turns.append({"role": "user", "content": self.query(input_text)})
    return turns


def default_prompt_path(dataset: str) -> str:
  return str(resources.PROMPTS_DIR / f"{dataset}.json")


def read_examples(path: str) -> list[Example]:
  """Reads a JSONL of {"id", "input", "label"?}; errors name file and line."""
  examples, seen = [], {}
  for where, obj in rationales.iter_json_lines(path):
    if not isinstance(obj, dict):
      raise rationales.RationaleFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "input", "label"}
    if unknown:
      raise rationales.RationaleFileError(
          f"{where}: unknown field(s) {sorted(unknown)}; expected id, input, label")
    for field in ("id", "input"):
      if not isinstance(obj.get(field), str) or not obj[field]:
        raise rationales.RationaleFileError(f"{where}: field {field!r} must be a non-empty string")
    if obj.get("label") is not None and not isinstance(obj["label"], str):
      raise rationales.RationaleFileError(f"{where}: field 'label' must be a string or null")
    if obj["id"] in seen:
      raise rationales.RationaleFileError(
          f"{where}: id {obj['id']!r} already used at line {seen[obj['id']]}")
    seen[obj["id"]] = where.rsplit(":", 1)[1]
    examples.append(Example(obj["id"], obj["input"], obj.get("label")))
  if not examples:
    raise rationales.RationaleFileError(f"{path}: file holds no examples")
  return examples


def examples_from_records(records: Iterable[rationales.RationaleRecord], source: str) -> list[Example]:
  """Examples from shipped records (ids, inputs, gold labels); all must have inputs."""
  examples = [Example(r.id, r.input, r.label) for r in records]
  lacking = sum(e.input is None for e in examples)
  if lacking:
    raise rationales.RationaleFileError(
        f"{source}: {lacking:,} records have no input (the paper's release lacks them); "
        "give the inputs with --input FILE.jsonl instead")
  return examples


def resume_output(path: str,
                  samples: Optional[int] = None) -> dict[str, rationales.RationaleRecord]:
  """Records already in the output file, by id, after dropping a torn last line.

  A line without its newline can only come from a crash mid-write: it is cut off (with a
  warning) and its example generated again. Any other bad line is an error naming it, as
  is a record of another number of samples than `samples` (when given).
  """
  if not storage.path(path).exists():
    return {}
  content = storage.path(path).read_bytes()
  complete_end = content.rfind(b"\n") + 1
  if complete_end < len(content):
    logger.warning("%s: dropping a torn last line (%d bytes, from an interrupted run); "
                   "its example will be generated again", path, len(content) - complete_end)
    storage.write_atomically(path, content[:complete_end])
  done = {}
  for line_number, line in enumerate(content[:complete_end].decode("utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path}:{line_number}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise rationales.RationaleFileError(
          f"{where}: not valid JSON ({e.msg}); fix or remove the line") from None
    record = rationales.record_from_dict(obj, where)
    if samples is not None and len(record.all_samples()) != samples:
      found = len(record.all_samples())
      raise rationales.RationaleFileError(
          f"{where}: record {record.id!r} has {found} sample(s), but --samples is {samples}; "
          f"rerun with --samples {found} or use a new output file")
    if record.id in done:
      raise rationales.RationaleFileError(f"{where}: id {record.id!r} appears twice")
    done[record.id] = record
  return done


@dataclasses.dataclass
class GenerationResult:
  total: int
  already_done: int
  written: int = 0
  failed: int = 0
  stopped: Optional[str] = None  # why generation stopped early, if it did

  @property
  def remaining(self) -> int:
    return self.total - self.already_done - self.written


def generate(examples: Sequence[Example], template: PromptTemplate, client: teacher_client.TeacherClient,
             out_path: str, parser: Optional[str] = None, concurrency: int = 4,
             progress: Optional[bool] = None, samples: int = 1,
             done: Optional[dict] = None) -> GenerationResult:
  """Annotates every example not yet in `out_path`, appending one record per example once
  all its `samples` completions are in (self_consistency.make_record: one sample gives
  the record of one completion, as it always was). `done`: the records already in
  `out_path`, when the caller has read them (resume_output); else they are read here.

  An example's samples come from one request with the `n` parameter, and from more
  requests for those an endpoint that ignores `n` did not give. At most `concurrency`
  examples are in flight. Examples whose retries run out are counted as failed and left for
  a rerun. A cap in `client.budget`, a fatal client error or a stop (SIGINT or SIGTERM,
  raised on to the caller) ends new requests; what has completed is already written.
  Requests in flight are waited for after a request or token cap (they are paid for), and
  abandoned when the teacher is unreachable or on Ctrl-C, in threads that do not hold up
  the process's exit.
  """
  parser = parser or template.parser
  same_answer = self_consistency.same_answer_for(
      METRIC_FOR_PARSER.get(parser, metrics.exact_match_accuracy))
  if done is None:
    done = resume_output(out_path, samples)
  pending = [e for e in examples if e.id not in done]
  result = GenerationResult(total=len(examples), already_done=len(examples) - len(pending))
  build_prompt = template.messages if client.api == "chat" else template.prompt

  def annotate(example: Example) -> rationales.RationaleRecord:
    prompt = build_prompt(example.input)
    outputs = []
    while len(outputs) < samples:
      outputs += client.complete(prompt, n=samples - len(outputs)).texts
    # Completions continue "A:" with a space; the shipped PaLM outputs start at the rationale.
    return self_consistency.make_record(parser, same_answer, example.id, example.input,
                                        example.label, [output.lstrip() for output in outputs])

  finished = queue.Queue()  # (example, record or None, exception or None)

  def work(example: Example) -> None:
    try:
      finished.put((example, annotate(example), None))
    except Exception as e:  # pylint: disable=broad-except  (the loop below sorts them)
      finished.put((example, None, e))

  bar = tqdm.tqdm(total=result.total, initial=result.already_done, unit="ex", dynamic_ncols=True,
                  disable=None if progress is None else not progress, desc="rationales",
                  postfix={"failed": 0})
  pending, in_flight = iter(pending), 0
  try:
    with storage.Appender(out_path) as out:
      while True:
        while in_flight < concurrency and not client.stop_event.is_set():
          example = next(pending, None)
          if example is None:
            break
          threading.Thread(target=work, args=(example,), daemon=True).start()
          in_flight += 1
        if not in_flight:
          break
        try:
          example, record, error = finished.get(timeout=_POLL_S)
        except queue.Empty:
          # A limit on failures in a row may be reached by an attempt still retrying.
          if client.budget.unreachable:
            result.stopped = client.budget.exhausted_reason()
            client.stop_event.set()
            break
          continue
        in_flight -= 1
        if isinstance(error, teacher_client.BudgetExhausted):
          result.stopped = result.stopped or str(error)
          client.stop_event.set()
        elif isinstance(error, (teacher_client.RetriesExhausted, ValueError)):
          result.failed += 1
          if isinstance(error, teacher_client.RetriesExhausted):  # not a bad input
            client.budget.record_example(str(error))
          logger.warning("%s: failed: %s", example.id, error)
          bar.set_postfix(failed=result.failed)
        elif error is not None:
          raise error
        else:
          out.write(record.to_json() + "\n")
          client.budget.record_example(None)
          result.written += 1
          bar.update(1)
        if client.budget.exhausted_reason() and not client.stop_event.is_set():
          result.stopped = client.budget.exhausted_reason()
          client.stop_event.set()
        if client.budget.unreachable:
          break  # what is still in flight is abandoned: the teacher is down
  finally:  # a stop (KeyboardInterrupt) passes on to the command, which reports it
    client.stop_event.set()
    bar.close()
  if result.remaining == 0:
    write_in_input_order(out_path, examples)
  return result


def write_in_input_order(path: str, examples: Sequence[Example]) -> None:
  """Rewrites a finished record file (at once, whole) with its records in the order of
  `examples`, as they were written as they completed: the file is then the same whatever
  the concurrency or the resumes that made it."""
  content = storage.path(path).read_bytes()
  lines = content.decode("utf-8").splitlines(keepends=True)
  line_of = {json.loads(line)["id"]: line for line in lines if line.strip()}
  ordered = "".join(line_of[e.id] for e in examples if e.id in line_of).encode("utf-8")
  if ordered != content and len(ordered) == len(content):
    storage.write_atomically(path, ordered)


@dataclasses.dataclass(frozen=True)
class RecordStats:
  """What `dsbs rationales stats` reports about one record file.

  With K > 1 samples per record, `teacher_accuracy` is the vote's and
  `single_sample_accuracy` the first sample's, on the same inputs (equal when K is 1);
  `by_agreement` maps "votes/K" of the winning answer to the inputs with that agreement and
  the vote's accuracy on them (None without gold labels), highest agreement first.
  `parse_failures` counts records none of whose samples parsed, `sample_parse_failures`
  (by reason in `parse_failures_by_reason`) the samples that did not, of `samples_in_all`.
  """
  path: str
  records: int
  with_gold_labels: int
  parse_failures: int
  sample_parse_failures: int
  samples_in_all: int
  parse_failures_by_reason: dict
  empty_rationales: int
  teacher_accuracy: Optional[float]  # None when no record has a gold label
  metric: str
  samples: int
  single_sample_accuracy: Optional[float]
  by_agreement: dict

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def record_stats(path: str, records: Sequence[rationales.RationaleRecord],
                 parser: Optional[str] = None) -> RecordStats:
  """Counts, parse failures and teacher-label accuracy against gold labels where known."""
  metric_fn: Callable = METRIC_FOR_PARSER.get(parser, metrics.exact_match_accuracy)

  def accuracy(scored: Sequence[rationales.RationaleRecord], answer: Callable) -> Optional[float]:
    with_gold = [r for r in scored if r.label is not None]
    return metric_fn([r.label for r in with_gold],
                     [answer(r) for r in with_gold])["accuracy"] if with_gold else None

  buckets = collections.defaultdict(list)
  for record in records:
    k = len(record.all_samples())
    votes = k if record.agreement is None else round(record.agreement * k)
    buckets[(votes / k, f"{votes}/{k}")].append(record)
  reasons = collections.Counter(sample.parse_error for r in records for sample in r.all_samples()
                                if sample.parse_error is not None)
  return RecordStats(
      path=path, records=len(records), with_gold_labels=sum(r.label is not None for r in records),
      parse_failures=sum(not r.parsed() for r in records),
      sample_parse_failures=sum(reasons.values()),
      samples_in_all=sum(len(r.all_samples()) for r in records),
      parse_failures_by_reason=dict(reasons.most_common()),
      empty_rationales=sum(not r.rationale.strip() for r in records),
      teacher_accuracy=accuracy(records, lambda r: r.teacher_label), metric=metric_fn.__name__,
      samples=max(len(r.all_samples()) for r in records) if records else 1,
      single_sample_accuracy=accuracy(records, lambda r: r.all_samples()[0].teacher_label),
      by_agreement={name: {"inputs": len(bucket),
                           "accuracy": accuracy(bucket, lambda r: r.teacher_label)}
                    for (_, name), bucket in sorted(buckets.items(), reverse=True)})
