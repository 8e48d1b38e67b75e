"""Tests of dsbs_jax.teacher, stage 1: the prompt files (exemplars parse back, come from
train, end with the query), and generation against a stand-in teacher (fake_teacher.py):
the shipped records reproduced through faults (byte for byte with one sample), over both
APIs, a killed run resumed without loss or duplicates (with one sample and with three), the
vote of five samples more accurate than one on CQA and SVAMP, and bad input and output
lines named."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dsbs_jax import cli
from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import replay_teacher
from dsbs_jax import self_consistency
from dsbs_jax import teacher
from fake_teacher import (FakeTeacher, KEY_ENV, REPO, SECRET, assert_matches_shipped,
                          generate_args, shipped, template, write_inputs)


@pytest.mark.parametrize("dataset", sorted(rationales.PARSERS))
def test_exemplars_parse_back_to_their_rationale_and_answer(dataset):
  prompt = template(dataset)
  assert prompt.parser == dataset and len(prompt.exemplars) >= 6
  for exemplar in prompt.exemplars:
    parsed = rationales.PARSERS[dataset](prompt.output(exemplar).lstrip())
    assert parsed.error is None and parsed.rationale == exemplar["rationale"]
    expected = re.sub(r"^\(.\) ", "", exemplar["answer"]) if dataset == "cqa" else exemplar["answer"]
    assert parsed.label == expected


@pytest.mark.parametrize("dataset", ["cqa", "svamp"])
def test_exemplars_are_train_examples_with_their_gold_label(dataset):
  train = {r.id: r for r in shipped(dataset, "train")}
  metric = teacher.METRIC_FOR_PARSER.get(dataset, metrics.exact_match_accuracy)
  prompt = template(dataset)
  for exemplar in prompt.exemplars:
    record = train[exemplar["id"]]
    assert record.input == exemplar["input"]
    answer = rationales.PARSERS[dataset](prompt.output(exemplar).lstrip()).label
    assert metric([record.label], [answer])["accuracy"] == 1.0, exemplar["id"]


@pytest.mark.parametrize("dataset", sorted(rationales.PARSERS))
def test_no_exemplar_comes_from_validation_or_test(dataset):
  held_out = [r.input for split in ("validation", "test") for r in shipped(dataset, split)]
  for exemplar in template(dataset).exemplars:
    for part in exemplar["input"].split(rationales.NLI_SEPARATOR):
      assert not any(part in text for text in held_out), part


def test_prompt_ends_with_the_query_so_the_completion_is_the_rationale():
  prompt = template("cqa")
  record = shipped("cqa", "validation")[0]
  text = prompt.prompt(record.input)
  assert text.endswith("\n\nQ: " + record.input + "\nA:")
  assert text.count("So the answer is") == len(prompt.exemplars)
  nli = template("esnli").prompt("A dog runs.</s>An animal moves.")
  assert nli.endswith("\n\nPremise: A dog runs.\nHypothesis: An animal moves.\nReasonings:")
  messages = template("anli1").messages("P.</s>H.")
  assert messages[0]["role"] == "system" and messages[-1] == {
      "role": "user", "content": "Premise: P.\nHypothesis: H.\nAnswer:"}
  assert [m["role"] for m in messages[1:3]] == ["user", "assistant"]


def test_broken_prompt_file_is_named(tmp_path):
  path = tmp_path / "p.json"
  path.write_text(json.dumps({"parser": "cqa", "input_fields": ["q"], "query_template": "Q: {question}",
                              "output_template": " {rationale}", "exemplars": [
                                  {"input": "x", "rationale": "r", "answer": "a"}]}))
  with pytest.raises(teacher.PromptFileError, match=r"p\.json: exemplars\[0\]"):
    teacher.PromptTemplate.load(str(path))


def test_generation_reproduces_shipped_records_through_faults(cqa_records, svamp_records, key_env,
                                                              tmp_path, capsys):
  faults = {2: "429", 4: "500", 6: "malformed", 8: "drop", 10: "slow", 13: "500", 14: "500"}
  for dataset, records in (("cqa", cqa_records), ("svamp", svamp_records)):
    inputs = write_inputs(tmp_path / f"{dataset}.jsonl", records)
    out = tmp_path / f"{dataset}_out.jsonl"
    with FakeTeacher({dataset: records}, faults=faults, slow_s=1.0) as fake:
      code = cli.main(generate_args(fake, inputs, out, dataset, "--concurrency", "3", "--timeout", "0.5"))
    assert code == 0
    assert_matches_shipped(out, records)
    assert fake.requests == len(records) + len(faults)
  captured = capsys.readouterr()
  assert SECRET not in captured.out + captured.err


def test_one_sample_writes_the_shipped_file_byte_for_byte(key_env, tmp_path):
  shipped_path = os.path.join(REPO, "rationales", "svamp", "valid.jsonl")
  with open(shipped_path, "rb") as f:
    lines = f.readlines()[:30]
  records = [rationales.record_from_dict(json.loads(line), "") for line in lines]
  inputs = write_inputs(tmp_path / "in.jsonl", records)
  out = tmp_path / "out.jsonl"
  # Four at a time, the first reply slow: records complete out of order, and the finished
  # file is in input order all the same.
  with FakeTeacher({"svamp": records}, faults={1: "slow"}, slow_s=0.5) as fake:
    assert cli.main(generate_args(fake, inputs, out, "svamp", "--concurrency", "4")) == 0
  assert out.read_bytes() == b"".join(lines)


@pytest.mark.parametrize("dataset, count", [("cqa", 200), ("svamp", 80)])
def test_the_vote_of_five_samples_beats_one_sample_with_or_without_n(dataset, count, key_env,
                                                                     tmp_path, capsys):
  records = shipped(dataset, "validation")[:count]
  inputs = write_inputs(tmp_path / "in.jsonl", records)
  outs = {}
  for honor_n in (True, False):
    outs[honor_n] = tmp_path / f"out_{honor_n}.jsonl"
    with FakeTeacher({dataset: records}, sampling=replay_teacher.Sampling(0.3, seed=0),
                     honor_n=honor_n) as fake:
      assert cli.main(generate_args(fake, inputs, outs[honor_n], dataset, "--samples", "5")) == 0
    assert fake.requests == count * (1 if honor_n else 5)
  # An endpoint that ignores `n` is asked five times; the samples are the same.
  assert sorted(outs[True].read_text().splitlines()) == sorted(outs[False].read_text().splitlines())
  generated = rationales.read_records(str(outs[True]))
  assert {r.id for r in generated} == {r.id for r in records}
  assert all(len(r.samples) == 5 for r in generated)
  capsys.readouterr()
  assert cli.main(["rationales", "stats", str(outs[True]), "--parser", dataset]) == 0
  printed = capsys.readouterr().out
  stats = json.loads(printed.splitlines()[-1])
  assert stats["samples"] == 5
  assert stats["teacher_accuracy"] > stats["single_sample_accuracy"] + 0.05, stats
  assert "vote accuracy by agreement: 5/5" in printed
  assert sum(b["inputs"] for b in stats["by_agreement"].values()) == count


@pytest.mark.parametrize("dataset", ["esnli", "anli1"])
def test_chat_api_reproduces_shipped_nli_records(dataset, key_env, tmp_path):
  records = shipped(dataset, "validation")[:5]
  records += [r for r in shipped(dataset, "validation") if r.parse_error][:1]
  inputs = write_inputs(tmp_path / "in.jsonl", records)
  with FakeTeacher({dataset: records}) as fake:
    assert cli.main(generate_args(fake, inputs, tmp_path / "out.jsonl", dataset, "--api", "chat")) == 0
  assert_matches_shipped(tmp_path / "out.jsonl", records)


@pytest.mark.slow  # two `dsbs` processes, one of them killed mid-run
def test_killed_run_resumes_without_loss_or_duplicates(cqa_records, tmp_path):
  inputs = write_inputs(tmp_path / "in.jsonl", cqa_records)
  out = tmp_path / "out.jsonl"
  env = {**os.environ, KEY_ENV: SECRET}
  faults = {3: "429", 5: "500", 7: "malformed", 9: "drop", 11: "slow"}
  with FakeTeacher({"cqa": cqa_records}, faults=faults, delay_s=0.1, slow_s=1.0) as fake:
    command = [sys.executable, "-m", "dsbs_jax.cli", *generate_args(
        fake, inputs, out, "cqa", "--concurrency", "2", "--timeout", "0.5", "--verbose")]
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 12):
      time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first_out, first_err = first.communicate(timeout=10)
    written_before = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert 12 <= len(written_before) < len(cqa_records)
    with open(out, "a", encoding="utf-8") as f:  # as if killed in the middle of a write
      f.write('{"id": "' + cqa_records[-1].id + '", "input": "torn')
    served_before = len(fake.served_ids)
    second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, timeout=60)
    resent = set(fake.served_ids[served_before:]) & set(written_before)
  assert second.returncode == 0, second.stderr.decode()
  assert b"torn last line" in second.stderr
  assert not resent
  assert_matches_shipped(out, cqa_records)
  assert SECRET in fake.auth_headers.pop().removeprefix("Bearer ")  # the key was really sent
  for text in (first_out, first_err, second.stdout, second.stderr, out.read_bytes()):
    assert SECRET.encode() not in text


@pytest.mark.slow  # two `dsbs` processes, one of them killed mid-run
def test_killed_run_of_several_samples_resumes_without_duplicates_or_lost_samples(cqa_records,
                                                                                  tmp_path):
  inputs = write_inputs(tmp_path / "in.jsonl", cqa_records)
  out = tmp_path / "out.jsonl"
  env = {**os.environ, KEY_ENV: SECRET}
  # An endpoint that ignores `n`: three requests an input, so the kill falls between them.
  with FakeTeacher({"cqa": cqa_records}, delay_s=0.05, honor_n=False,
                   sampling=replay_teacher.Sampling(0.3)) as fake:
    command = [sys.executable, "-m", "dsbs_jax.cli", *generate_args(
        fake, inputs, out, "cqa", "--samples", "3", "--concurrency", "2")]
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
      time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    written_before = out.read_text().splitlines()
    assert 8 <= len(written_before) < len(cqa_records)
    second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, timeout=60)
  assert second.returncode == 0, second.stderr.decode()
  # What was written before the kill stays as it was; every input has one record of 3 samples.
  assert set(written_before) <= set(out.read_text().splitlines())
  generated = rationales.read_records(str(out))  # refuses duplicate ids
  assert sorted(r.id for r in generated) == sorted(r.id for r in cqa_records)
  same = self_consistency.same_answer_for(metrics.exact_match_accuracy)
  for record in generated:
    assert len(record.samples) == 3
    winner, votes = self_consistency.vote(record.samples, same)
    assert record.teacher_label == record.samples[winner].teacher_label
    assert record.agreement == votes / 3
  # Inputs killed in flight were asked again: at most the 2 in flight lost their samples.
  assert len(cqa_records) * 3 <= fake.requests <= (len(cqa_records) + 2) * 3


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "input": "x"', "not valid JSON"),
    ('{"id": "b"}', "field 'input'"),
    ('{"id": "a", "input": "y"}', "already used at line 1"),
    ('{"id": "b", "input": "y", "gold": 1}', "unknown field"),
])
def test_malformed_input_line_names_file_and_line(line, message, tmp_path, capsys):
  inputs = tmp_path / "in.jsonl"
  inputs.write_text('{"id": "a", "input": "x", "label": "y"}\n' + line + "\n")
  args = ["rationales", "generate", "--input", str(inputs), "--prompt", teacher.default_prompt_path("cqa"),
          "--teacher", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path / "out.jsonl")]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert f"{inputs}:2" in err and message in err


def test_corrupt_line_inside_output_is_an_error_not_dropped(tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_text("not json\n{}\n")
  with pytest.raises(rationales.RationaleFileError, match=r"out\.jsonl:1"):
    teacher.resume_output(str(out))


def test_stats_count_parse_failures_per_sample_and_per_input():
  same = self_consistency.same_answer_for(metrics.exact_match_accuracy)
  good = "Because. So the answer is (a) contentment."
  records = [  # the first sample failed, the vote did not; no sample parsed; all parsed
      self_consistency.make_record("cqa", same, "a", "q", "contentment", [" ", good, good]),
      self_consistency.make_record("cqa", same, "b", "q", "x", ["no", "nor", "neither"]),
      self_consistency.make_record("cqa", same, "c", "q", "contentment", [good, good, good])]
  assert [r.parsed() for r in records] == [True, False, True]
  stats = teacher.record_stats("f.jsonl", records, "cqa")
  assert (stats.parse_failures, stats.sample_parse_failures, stats.samples_in_all) == (1, 4, 9)
  assert sum(stats.parse_failures_by_reason.values()) == 4
  assert records[0].teacher_label == "contentment" and records[0].agreement == 2 / 3


def test_a_file_is_finished_only_by_the_teacher_and_sampling_that_began_it(key_env, tmp_path,
                                                                           capsys):
  records = shipped("cqa", "validation")[:4]
  inputs = write_inputs(tmp_path / "in.jsonl", records[:2])
  out = tmp_path / "out.jsonl"
  with FakeTeacher({"cqa": records}, sampling=replay_teacher.Sampling(0.3, seed=0)) as fake:
    assert cli.main(generate_args(fake, inputs, out, "cqa", "--samples", "3",
                                  "--temperature", "0.7")) == 0
    begun = out.read_bytes()
    inputs = write_inputs(tmp_path / "in.jsonl", records)
    capsys.readouterr()
    for extra, refused in [(["--temperature", "1.5"], "--temperature: differs from what wrote "
                             f"the records in {out} (temperature 0.7"),
                           (["--temperature", "0.7", "--model", "other-model"],
                            "--model: differs from what wrote the records in")]:
      argv = generate_args(fake, inputs, out, "cqa", "--samples", "3", *extra)
      assert cli.main(argv) == 2
      err = capsys.readouterr().err.strip()
      assert err.startswith("dsbs rationales generate: error: ") and refused in err, err
      assert len(err.splitlines()) == 1 and out.read_bytes() == begun
    # A settings file that is not JSON is named in one line.
    settings = tmp_path / "out.jsonl.teacher.json"
    settings.write_text("{not json")
    assert cli.main(generate_args(fake, inputs, out, "cqa", "--samples", "3",
                                  "--temperature", "0.7")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dsbs rationales generate: error: {settings}") and "\n" not in err
    assert out.read_bytes() == begun
    requests = fake.requests
  assert requests == 2  # nothing was sent for the refused runs


@pytest.mark.parametrize("samples, value, message", [
    ("1", "nan", "--temperature nan: must be a number"),
    ("3", "inf", "--temperature inf: must be a number"),
    ("1", "-1", "--temperature -1: must be 0 (greedy) or above"),
    ("3", "0", "--temperature 0: must be above 0 with --samples 3")])
def test_a_temperature_that_cannot_be_sent_is_refused(samples, value, message, key_env, tmp_path,
                                                      capsys):
  inputs = write_inputs(tmp_path / "in.jsonl", shipped("cqa", "validation")[:1])
  with FakeTeacher({"cqa": []}) as fake:
    assert cli.main(generate_args(fake, inputs, tmp_path / "out.jsonl", "cqa", "--samples",
                                  samples, "--temperature", value)) == 2
    assert fake.requests == 0
  assert message in capsys.readouterr().err
