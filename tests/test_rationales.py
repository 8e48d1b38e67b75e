"""Tests for dsbs_jax.rationales: parsers against the paper's parsing, and record files."""
import gzip
import importlib.util
import json
import os
import re

import pytest

from dsbs_jax import distillation
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources
from dsbs_jax import text_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(REPO, os.pardir, "shared", "data", "dsbs-release")


# The paper's parsing (google-research/distilling-step-by-step, data_utils.py,
# `_parse_llm_output` of each loader), restated in its exception-driven form: the
# reference that the project's parsers must reproduce on every shipped output.
def paper_parse_cqa(output):
  rationale, label = output.split("Q:")[0].rstrip().split("So the answer is")
  rationale = rationale.rstrip()
  try:
    label = re.split(r"\(.\)", label)[1].strip()
    label = label[:-1] if label[-1] == "." else label
  except IndexError:
    label = " "
  return rationale, label


def paper_parse_svamp(output):
  try:
    rationale, label = output.split("Q:")[0].rstrip().split("The answer is")
  except ValueError:
    return " ", " "
  try:
    label = re.search(r"\(.*\)", label).group(0)
  except AttributeError:
    label = " "
  return rationale.rstrip(), label


def paper_parse_esnli(output):
  rationale = output.split("Answer:")[0].rstrip()
  try:
    label = output.split("Answer: ")[1].split("Premise")[0].rstrip()
  except IndexError:
    label = " "
  return rationale, label


def paper_parse_anli(output):
  try:
    rationale, label = output.split("Premise:")[0].rstrip().split("So the answer is")
  except ValueError:
    rationale, label = "", ""
  return rationale.rstrip(), label.lstrip()[:-1]


PAPER_PARSERS = {"cqa": paper_parse_cqa, "svamp": paper_parse_svamp,
                 "esnli": paper_parse_esnli, "anli1": paper_parse_anli}
SPLITS = [(dataset, split) for dataset in PAPER_PARSERS for split in distillation.SPLITS]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,split", SPLITS)
def test_shipped_records_match_paper_parsing(dataset, split):
  shipped = records.read_split(str(resources.RATIONALES_DIR), dataset, split)
  mismatches = []
  for record in shipped:
    expected = PAPER_PARSERS[dataset](record.teacher_output)
    parsed = rationales.PARSERS[dataset](record.teacher_output)
    if (parsed.rationale, parsed.label) != expected or (record.rationale, record.teacher_label) != expected:
      mismatches.append(record.id)
  assert not mismatches, f"{len(mismatches)} mismatches, first {mismatches[:5]}"
  # Every fallback of the paper's parsing is flagged, never silently blank.
  for record in shipped:
    if record.teacher_label.strip() == "":
      assert record.parse_error, record.id


def test_parse_failures_are_flagged_with_paper_values():
  assert rationales.parse_cqa("It is big. So the answer is wooded area.") == (
      "It is big.", " ", "no lettered choice such as '(a)' after 'So the answer is'")
  assert rationales.parse_svamp("They add 2 and 3.\n\nQ: next")[:2] == (" ", " ")
  assert rationales.parse_esnli("No answer here")[:2] == ("No answer here", " ")
  assert rationales.parse_anli("No phrase.\nPremise: x")[:2] == ("", "")
  for parser, text in ((rationales.parse_svamp, "x"), (rationales.parse_esnli, "x"),
                       (rationales.parse_anli, "x")):
    assert parser(text).error


def test_parsers_on_typical_outputs():
  cqa = rationales.parse_cqa("Beavers need wood. So the answer is (c) wooded area.\n\nQ: What is x?")
  assert cqa == ("Beavers need wood.", "wooded area", None)
  svamp = rationales.parse_svamp("10 * 45 is 450. The answer is (10 * 45).\n\nQ: There are")
  assert svamp == ("10 * 45 is 450.", "(10 * 45)", None)
  esnli = rationales.parse_esnli("Not all churches crack.\nAnswer: neutral\n\nPremise: A")
  assert esnli == ("Not all churches crack.", "neutral", None)
  anli = rationales.parse_anli("It says London. So the answer is contradiction.\n\nPremise: x")
  assert anli == ("It says London.", "contradiction", None)


def test_make_record_flags_blank_teacher_label():
  record = rationales.make_record("anli1", "x", None, None, "Hmm. So the answer is .")
  assert record.teacher_label == "" and record.parse_error == "the teacher label is blank"


def test_cqa_parser_on_paper_crash_case_does_not_raise():
  parsed = rationales.parse_cqa("no phrase at all")
  assert parsed.error == "'So the answer is' appears 0 times"


GOOD = {"id": "a", "input": "x", "label": "y", "teacher_label": "y", "rationale": "r",
        "teacher_output": "r. So the answer is (a) y.", "parse_error": None}


def write_lines(path, lines):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def test_round_trip_plain_and_gzip(tmp_path):
  written = [rationales.record_from_dict(dict(GOOD, id=str(i)), "t") for i in range(3)]
  for name in ("r.jsonl", "r.jsonl.gz"):
    path = str(tmp_path / name)
    assert rationales.write_records(path, written) == 3
    assert rationales.read_records(path) == written


@pytest.mark.parametrize("lines,message", [
    ([json.dumps(GOOD), "{not json"], r"r\.jsonl:2: not valid JSON"),
    ([json.dumps({k: v for k, v in GOOD.items() if k != "rationale"})], r"r\.jsonl:1: missing field 'rationale'"),
    ([json.dumps(dict(GOOD, label=1))], r"r\.jsonl:1: field 'label' must be a string, got int"),
    ([json.dumps(dict(GOOD, extra=1))], r"r\.jsonl:1: unknown field"),
    (["[1, 2]"], r"r\.jsonl:1: expected a JSON object"),
    ([json.dumps(GOOD), "", json.dumps(GOOD)], r"id 'a' appears twice"),
    ([""], r"r\.jsonl: file holds no records"),
])
def test_malformed_files_name_file_and_line(tmp_path, lines, message):
  path = tmp_path / "r.jsonl"
  write_lines(path, lines)
  with pytest.raises(text_files.TextFileError, match=message):  # RationaleFileError's base
    rationales.read_records(str(path))


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    rationales.read_records(str(tmp_path / "nope.jsonl"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(RELEASE), reason="the paper's release is not beside the repo")
def test_shipped_rationales_equal_a_fresh_conversion(tmp_path):
  """rationales/ is exactly what tools/convert_release.py makes of the release."""
  spec = importlib.util.spec_from_file_location(
      "convert_release", os.path.join(REPO, "tools", "convert_release.py"))
  convert_release = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(convert_release)
  converted = convert_release.convert(RELEASE)
  for dataset, splits in converted.items():
    for split, split_records in splits.items():
      seqio_split = {"valid": "validation"}.get(split, split)
      shipped = records.read_split(str(resources.RATIONALES_DIR), dataset, seqio_split)
      assert list(shipped) == split_records, (dataset, split)


SAMPLED = dict(GOOD, agreement=0.5, samples=[
    {"teacher_label": "y", "rationale": "r", "teacher_output": "r. So the answer is (a) y.",
     "parse_error": None},
    {"teacher_label": " ", "rationale": " ", "teacher_output": "?", "parse_error": "no answer"}])


def test_a_record_of_several_samples_round_trips(tmp_path):
  record = rationales.record_from_dict(SAMPLED, "t")
  assert record.agreement == 0.5 and record.all_samples()[1].parse_error == "no answer"
  path = str(tmp_path / "r.jsonl")
  rationales.write_records(path, [record])
  assert rationales.read_records(path) == [record]
  assert json.loads(open(path).read()) == SAMPLED


@pytest.mark.parametrize("change, message", [
    ({"agreement": None}, "field 'agreement' must be a number in"),
    ({"agreement": 1.5}, "field 'agreement' must be a number in"),
    ({"samples": SAMPLED["samples"][:1]}, "field 'samples' must be a list of 2 or more"),
    ({"samples": [SAMPLED["samples"][0], {"teacher_label": "y"}]},
     r"samples\[1\] must be an object"),
    ({"samples": [SAMPLED["samples"][0], dict(SAMPLED["samples"][0], rationale=3)]},
     r"samples\[1\]\.rationale must be a string"),
])
def test_malformed_samples_name_file_and_line(tmp_path, change, message):
  path = tmp_path / "r.jsonl"
  write_lines(path, [json.dumps(GOOD), json.dumps(dict(SAMPLED, **change))])
  with pytest.raises(rationales.RationaleFileError, match=r"r\.jsonl:2: " + message):
    rationales.read_records(str(path))
  write_lines(path, [json.dumps({k: v for k, v in SAMPLED.items() if k != "agreement"})])
  with pytest.raises(rationales.RationaleFileError, match="'agreement' and 'samples' go together"):
    rationales.read_records(str(path))
