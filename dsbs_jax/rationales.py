"""Teacher rationale records: the schema, validated reading and writing, and output parsers.

A record is one example with the teacher's chain-of-thought: its stable `id`, the model
`input` text, the gold `label` (text), the `teacher_label` and `rationale` parsed from the
teacher's raw `teacher_output`, and `parse_error` (None, or why the parse fell back).
A record of K > 1 teacher samples (self-consistency) also holds all K parsed `samples`
and the vote's winning share, `agreement`; its `teacher_label` is the vote's answer and
its other fields are the first sample's (dsbs_jax.self_consistency builds such records).
A record of one sample has neither field, so it reads and writes as before they existed.

Each parser gives, for every raw output, the same rationale and label as the paper's code
(google-research/distilling-step-by-step, data_utils.py), fallbacks included; where the
paper's code falls back to a blank, the record keeps that blank and says why in
`parse_error`. Teacher outputs are untrusted text: they are only split and matched here.

This module must not read ../shared, build SeqIO tasks, or touch TensorFlow.
"""
import dataclasses
import gzip
import io
import json
import re
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

from dsbs_jax import storage
from dsbs_jax import text_files

NLI_LABELS = ("entailment", "neutral", "contradiction")
# Separates premise from hypothesis in NLI inputs: the paper joins the two with the
# tokenizer's EOS token, and the data pipeline turns this marker back into EOS.
NLI_SEPARATOR = "</s>"


class RationaleFileError(text_files.TextFileError):
  """A rationale or input file that cannot be read; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One teacher completion for an example, parsed as a record's fields of the same names."""
  teacher_label: str
  rationale: str
  teacher_output: str
  parse_error: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RationaleRecord:
  """One example with its teacher rationale.

  `input` and `label` are None only for splits whose inputs the paper's release lacks
  (e-SNLI and ANLI R1 train); `dsbs_jax.records` joins them from a source the user names.
  """
  id: str
  input: Optional[str]
  label: Optional[str]
  teacher_label: str
  rationale: str
  teacher_output: str
  parse_error: Optional[str] = None
  agreement: Optional[float] = None  # the vote's winning share of `samples`; None: one sample
  samples: Optional[tuple] = None  # of Sample, K > 1 of them; None: the record's own fields

  def all_samples(self) -> tuple:
    """The record's K samples; one, from its own fields, when it has no `samples`."""
    if self.samples is not None:
      return self.samples
    return (Sample(self.teacher_label, self.rationale, self.teacher_output, self.parse_error),)

  def parsed(self) -> bool:
    """Whether the teacher's answer was read: from its one output, or from any of its K
    samples (a file written before records said so kept the first sample's error)."""
    return any(sample.parse_error is None for sample in self.all_samples())

  def to_json(self) -> str:
    fields = dataclasses.asdict(self)
    for field in _SAMPLING_FIELDS:
      if fields[field] is None:
        del fields[field]
    return json.dumps(fields, ensure_ascii=False)


_REQUIRED_STRINGS = ("id", "teacher_label", "rationale", "teacher_output")
_OPTIONAL_STRINGS = ("input", "label", "parse_error")
_SAMPLING_FIELDS = ("agreement", "samples")  # both or neither


def _samples_from_list(value, where: str) -> tuple:
  if not isinstance(value, list) or len(value) < 2:
    raise RationaleFileError(f"{where}: field 'samples' must be a list of 2 or more samples")
  samples = []
  for i, obj in enumerate(value):
    if not isinstance(obj, dict) or set(obj) != {f.name for f in dataclasses.fields(Sample)}:
      raise RationaleFileError(f"{where}: samples[{i}] must be an object with exactly the fields "
                               "teacher_label, rationale, teacher_output, parse_error")
    for field, text in obj.items():
      if not isinstance(text, str) and not (field == "parse_error" and text is None):
        raise RationaleFileError(f"{where}: samples[{i}].{field} must be a string")
    samples.append(Sample(**obj))
  return tuple(samples)


def record_from_dict(obj, where: str) -> RationaleRecord:
  """Validates a decoded JSON object; `where` ("file:line") prefixes every error."""
  if not isinstance(obj, dict):
    raise RationaleFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  unknown = set(obj) - set(_REQUIRED_STRINGS) - set(_OPTIONAL_STRINGS) - set(_SAMPLING_FIELDS)
  if unknown:
    raise RationaleFileError(f"{where}: unknown field(s) {sorted(unknown)}")
  for field in _REQUIRED_STRINGS:
    if field not in obj:
      raise RationaleFileError(f"{where}: missing field {field!r}")
  for field in _REQUIRED_STRINGS + _OPTIONAL_STRINGS:
    value = obj.get(field)
    if value is None and field in _OPTIONAL_STRINGS:
      continue
    if not isinstance(value, str):
      raise RationaleFileError(
          f"{where}: field {field!r} must be a string, got {type(value).__name__} ({value!r:.40})")
  if not obj["id"]:
    raise RationaleFileError(f"{where}: field 'id' is empty")
  sampled = {}
  if any(field in obj for field in _SAMPLING_FIELDS):
    if not all(field in obj for field in _SAMPLING_FIELDS):
      raise RationaleFileError(f"{where}: fields 'agreement' and 'samples' go together")
    agreement = obj["agreement"]
    if isinstance(agreement, bool) or not isinstance(agreement, (int, float)) \
        or not 0 <= agreement <= 1:
      raise RationaleFileError(f"{where}: field 'agreement' must be a number in [0, 1], "
                               f"got {agreement!r:.40}")
    sampled = {"agreement": float(agreement), "samples": _samples_from_list(obj["samples"], where)}
  return RationaleRecord(**{k: obj.get(k) for k in _REQUIRED_STRINGS + _OPTIONAL_STRINGS},
                         **sampled)


def iter_json_lines(path: str) -> Iterator[tuple[str, object]]:
  """Yields ("file:line", decoded object) for each non-blank line of a JSONL(.gz) file;
  errors name the line."""
  for line_number, line in text_files.iter_lines(path):
    if line.strip():
      yield f"{path}:{line_number}", text_files.parse_json_line(line, path, line_number)


def read_records(path: str) -> list[RationaleRecord]:
  """Reads a rationale JSONL(.gz) file; raises RationaleFileError naming file and line."""
  records = [record_from_dict(obj, where) for where, obj in iter_json_lines(path)]
  if not records:
    raise RationaleFileError(f"{path}: file holds no records")
  seen = {}
  for line_number, record in enumerate(records, start=1):
    if record.id in seen:
      raise RationaleFileError(
          f"{path}: id {record.id!r} appears twice (records {seen[record.id]} and {line_number})")
    seen[record.id] = line_number
  return records


def write_records(path: str, records: Iterable[RationaleRecord]) -> int:
  """Writes records as JSONL (gzip when `path` ends in .gz, reproducibly), replacing the
  file atomically; returns the count."""
  count = 0
  raw = io.BytesIO()
  stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.endswith(".gz") else raw
  for record in records:
    stream.write((record.to_json() + "\n").encode("utf-8"))
    count += 1
  if stream is not raw:
    stream.close()
  storage.write_atomically(path, raw.getvalue())
  return count


class ParsedOutput(NamedTuple):
  rationale: str
  label: str
  error: Optional[str]


def parse_cqa(output: str) -> ParsedOutput:
  """CommonsenseQA: '<rationale> So the answer is (c) <choice>.' then maybe a next 'Q:'."""
  answer_part = output.split("Q:")[0].rstrip()
  pieces = answer_part.split("So the answer is")
  if len(pieces) != 2:
    # The paper's code raises here; no shipped output takes this path.
    return ParsedOutput(" ", " ", f"'So the answer is' appears {len(pieces) - 1} times")
  rationale, answer = pieces[0].rstrip(), pieces[1]
  after_letter = re.split(r"\(.\)", answer)
  if len(after_letter) < 2:
    return ParsedOutput(rationale, " ", "no lettered choice such as '(a)' after 'So the answer is'")
  label = after_letter[1].strip()
  if not label:
    return ParsedOutput(rationale, " ", "nothing after the lettered choice")
  return ParsedOutput(rationale, label[:-1] if label.endswith(".") else label, None)


def parse_svamp(output: str) -> ParsedOutput:
  """SVAMP: '<rationale> The answer is (<equation>).' then maybe a next 'Q:'."""
  answer_part = output.split("Q:")[0].rstrip()
  pieces = answer_part.split("The answer is")
  if len(pieces) != 2:
    return ParsedOutput(" ", " ", f"'The answer is' appears {len(pieces) - 1} times, expected once")
  equation = re.search(r"\(.*\)", pieces[1])
  if equation is None:
    return ParsedOutput(pieces[0].rstrip(), " ", "no parenthesized equation after 'The answer is'")
  return ParsedOutput(pieces[0].rstrip(), equation.group(0), None)


def parse_esnli(output: str) -> ParsedOutput:
  """e-SNLI: '<rationale>\\nAnswer: <label>' then maybe a next 'Premise:'."""
  rationale = output.split("Answer:")[0].rstrip()
  pieces = output.split("Answer: ")
  if len(pieces) < 2:
    return ParsedOutput(rationale, " ", "no 'Answer: ' in the output")
  return ParsedOutput(rationale, pieces[1].split("Premise")[0].rstrip(), None)


def parse_anli(output: str) -> ParsedOutput:
  """ANLI: '<rationale> So the answer is <label>.' then maybe a next 'Premise:'.

  As in the paper, the label is what follows the phrase minus its last character (the
  full stop), and an output without the phrase exactly once gives blank strings.
  """
  pieces = output.split("Premise:")[0].rstrip().split("So the answer is")
  if len(pieces) != 2:
    return ParsedOutput("", "", f"'So the answer is' appears {len(pieces) - 1} times, expected once")
  return ParsedOutput(pieces[0].rstrip(), pieces[1].lstrip()[:-1], None)


PARSERS: dict[str, Callable[[str], ParsedOutput]] = {
    "cqa": parse_cqa,
    "svamp": parse_svamp,
    "esnli": parse_esnli,
    "anli1": parse_anli,
}


def parse_sample(dataset: str, teacher_output: str) -> Sample:
  """Parses one teacher output with the dataset's parser; a blank label is a parse error."""
  if not isinstance(teacher_output, str):
    raise TypeError(f"teacher output must be a string, got {type(teacher_output).__name__}")
  parsed = PARSERS[dataset](teacher_output)
  if parsed.error is None and not parsed.label.strip():
    parsed = parsed._replace(error="the teacher label is blank")
  return Sample(parsed.label, parsed.rationale, teacher_output, parsed.error)


def make_record(dataset: str, example_id: str, input_text: Optional[str],
                label: Optional[str], teacher_output: str) -> RationaleRecord:
  """Parses `teacher_output` with the dataset's parser and returns the full record."""
  try:
    sample = parse_sample(dataset, teacher_output)
  except TypeError as e:
    raise TypeError(f"{example_id}: {e}") from None
  return RationaleRecord(id=example_id, input=input_text, label=label, **dataclasses.asdict(sample))
