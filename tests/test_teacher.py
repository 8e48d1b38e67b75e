"""Tests of stage 1: prompts, the teacher client, resumable generation and `dsbs rationales`.

A real HTTP server on 127.0.0.1 plays the teacher: it answers each prompt with the
recorded PaLM output of the shipped example whose query ends the prompt, and injects
faults (429, 500, slow replies, malformed JSON, dropped connections) at chosen requests.
"""
import contextlib
import dataclasses
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from dsbs_jax import cli
from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import teacher
from dsbs_jax import teacher_client

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "rationales")
SECRET = "sk-test-RECOGNIZABLE-s3cr3t-4242"
KEY_ENV = "DSBS_TEST_TEACHER_KEY"
FAST_RETRIES = ["--retry_base_delay", "0.01", "--retry_max_delay", "0.05"]


def shipped(dataset: str, split: str) -> list:
  file_name = {"validation": "valid"}.get(split, split)
  for suffix in (".jsonl", ".jsonl.gz"):
    path = os.path.join(SHIPPED, dataset, file_name + suffix)
    if os.path.exists(path):
      return rationales.read_records(path)
  raise FileNotFoundError(path)


def template(dataset: str) -> teacher.PromptTemplate:
  return teacher.PromptTemplate.load(teacher.default_prompt_path(dataset))


@pytest.fixture(scope="module")
def cqa_records():
  return shipped("cqa", "train")[200:240]


@pytest.fixture(scope="module")
def svamp_records():
  records = shipped("svamp", "train")
  failures = [r for r in records if r.parse_error][:6]  # keep the paper's fallbacks in view
  return failures + [r for r in records if not r.parse_error][:24]


class FakeTeacher:
  """An OpenAI-compatible server replaying shipped teacher outputs, with injected faults.

  `faults` maps a 1-based request number to "429", "500", "slow", "malformed" or "drop".
  """

  def __init__(self, records_by_dataset: dict, faults: dict = None, delay_s: float = 0.0,
               tokens_per_reply=100, slow_s: float = 1.0):
    self.queries = [(template(ds).query(r.input), r) for ds, records in records_by_dataset.items()
                    for r in records]
    self.faults = dict(faults or {})
    self.delay_s = delay_s
    self.slow_s = slow_s
    self.tokens_per_reply = tokens_per_reply
    self.requests = 0
    self.served_ids = []  # ids answered with a 200, in order
    self.auth_headers = set()
    self.lock = threading.Lock()
    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
    self.server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()

  def record_for(self, body: dict):
    query = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
    matches = [r for q, r in self.queries if query.endswith(q)]
    return matches[0] if len(matches) == 1 else None

  def _handler_class(self):
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):
        del args

      def _reply(self, status: int, payload: bytes, headers: dict = ()):
        self.send_response(status)
        for key, value in dict(headers).items():
          self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
          fake.requests += 1
          fault = fake.faults.get(fake.requests)
          fake.auth_headers.add(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {SECRET}":
          # Echoes the header, as careless servers do: the client must redact it.
          return self._reply(401, f"bad key: {self.headers.get('Authorization')}".encode())
        if fault == "429":
          return self._reply(429, b'{"error": "rate limited"}', {"Retry-After": "0.01"})
        if fault == "500":
          return self._reply(500, b'{"error": "overloaded"}')
        if fault == "malformed":
          return self._reply(200, b'{"choices": [{"text": "unterminated')
        if fault == "drop":
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)
          return None
        if fault == "slow":  # past the client's time-out; the late reply goes nowhere
          time.sleep(fake.slow_s)
          return None
        time.sleep(fake.delay_s)
        record = fake.record_for(body)
        if record is None:
          return self._reply(400, b'{"error": "unknown query"}')
        choice = ({"message": {"role": "assistant", "content": record.teacher_output}}
                  if "messages" in body else {"text": record.teacher_output})
        reply = {"choices": [choice]}
        if fake.tokens_per_reply is not None:
          reply["usage"] = {"total_tokens": fake.tokens_per_reply}
        with fake.lock:
          fake.served_ids.append(record.id)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
          self._reply(200, json.dumps(reply).encode())

    return Handler


def write_inputs(path, records) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps({"id": r.id, "input": r.input, "label": r.label}) + "\n")
  return str(path)


def generate_args(fake, inputs, out, dataset, *extra) -> list:
  return ["rationales", "generate", "--input", str(inputs), "--prompt", teacher.default_prompt_path(dataset),
          "--teacher", fake.url, "--model", "palm-replay", "--out", str(out), "--api_key_env", KEY_ENV,
          *FAST_RETRIES, *extra]


def assert_matches_shipped(out_path, expected) -> None:
  generated = rationales.read_records(str(out_path))  # also refuses duplicate ids
  assert sorted(r.id for r in generated) == sorted(r.id for r in expected)
  by_id = {r.id: r for r in generated}
  for record in expected:
    assert by_id[record.id] == record, record.id


@pytest.fixture
def key_env(monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)


# --- prompts -------------------------------------------------------------------------------

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


# --- client ----------------------------------------------------------------------------------

def test_endpoint_urls_and_backoff_schedule():
  assert teacher_client.endpoint_url("http://h:1", "completions") == "http://h:1/v1/completions"
  assert teacher_client.endpoint_url("http://h:1/v1/", "chat") == "http://h:1/v1/chat/completions"
  assert teacher_client.endpoint_url("http://h/x/v1/completions", "chat") == "http://h/x/v1/completions"
  with pytest.raises(teacher_client.TeacherError):
    teacher_client.endpoint_url("localhost:8000", "chat")
  policy = teacher_client.RetryPolicy(base_delay_s=1.0, max_delay_s=5.0)
  rng = teacher_client.random.Random(0)
  delays = [policy.delay(attempt, rng) for attempt in range(6)]
  assert all(0.5 * min(5.0, 2 ** i) <= d <= min(5.0, 2 ** i) for i, d in enumerate(delays))
  assert policy.delay(0, rng, retry_after=3.0) == 3.0 and policy.delay(0, rng, retry_after=60) == 5.0
  assert teacher_client.estimate_tokens("a" * 10, "b" * 6) == 4


def test_connection_failures_count_in_a_row_and_any_reply_resets_them():
  budget = teacher_client.Budget(max_connection_failures=3)
  for error in ("refused", "refused", None, "refused", "reset"):  # None: the server answered
    budget.record_connection(error)
  assert budget.exhausted_reason() is None
  budget.record_connection("refused")
  assert budget.exhausted_reason() == ("3 attempts in a row could not connect "
                                       "(--max_connection_failures=3); last: refused")
  with pytest.raises(teacher_client.BudgetExhausted):
    budget.start_request()


def test_key_is_not_in_repr_and_is_redacted_from_errors(cqa_records, monkeypatch, capsys, tmp_path):
  client = teacher_client.TeacherClient("http://127.0.0.1:9/v1", "m", api_key=SECRET)
  assert SECRET not in repr(client) and "api_key=set" in repr(client)
  monkeypatch.setenv(KEY_ENV, SECRET + "-wrong")
  inputs = write_inputs(tmp_path / "in.jsonl", cqa_records[:2])
  with FakeTeacher({"cqa": cqa_records}) as fake:
    assert cli.main(generate_args(fake, inputs, tmp_path / "out.jsonl", "cqa")) == 2
  err = capsys.readouterr().err
  assert "HTTP 401" in err and "[API key]" in err and SECRET not in err


# --- generation ------------------------------------------------------------------------------

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


@pytest.mark.parametrize("dataset", ["esnli", "anli1"])
def test_chat_api_reproduces_shipped_nli_records(dataset, key_env, tmp_path):
  records = shipped(dataset, "validation")[:5]
  records += [r for r in shipped(dataset, "validation") if r.parse_error][:1]
  inputs = write_inputs(tmp_path / "in.jsonl", records)
  with FakeTeacher({dataset: records}) as fake:
    assert cli.main(generate_args(fake, inputs, tmp_path / "out.jsonl", dataset, "--api", "chat")) == 0
  assert_matches_shipped(tmp_path / "out.jsonl", records)


def test_dataset_flag_reads_shipped_inputs_and_default_prompt(key_env, tmp_path):
  records = shipped("svamp", "validation")
  with FakeTeacher({"svamp": records}) as fake:
    args = ["rationales", "generate", "--dataset", "svamp", "--split", "validation", "--teacher", fake.url,
            "--model", "m", "--out", str(tmp_path / "out.jsonl"), "--api_key_env", KEY_ENV]
    assert cli.main(args) == 0
  assert_matches_shipped(tmp_path / "out.jsonl", records)


@pytest.mark.slow  # two `dsbs` processes, each importing TensorFlow through the CLI
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


def test_request_cap_stops_cleanly_and_resumes(cqa_records, key_env, tmp_path, capsys):
  records = cqa_records[:8]
  inputs = write_inputs(tmp_path / "in.jsonl", records)
  out = tmp_path / "out.jsonl"
  with FakeTeacher({"cqa": records}) as fake:
    assert cli.main(generate_args(fake, inputs, out, "cqa", "--concurrency", "1", "--max_requests", "3")) == 1
    assert "request cap reached (--max_requests=3)" in capsys.readouterr().err
    assert len(rationales.read_records(str(out))) == 3
    assert cli.main(generate_args(fake, inputs, out, "cqa")) == 0
  assert fake.requests == len(records)
  assert_matches_shipped(out, records)


def test_token_cap_counts_usage_and_falls_back_to_an_estimate(cqa_records, key_env, tmp_path, capsys):
  records = cqa_records[:8]
  inputs = write_inputs(tmp_path / "in.jsonl", records)
  out = tmp_path / "out.jsonl"
  with FakeTeacher({"cqa": records}, tokens_per_reply=1000) as fake:
    args = generate_args(fake, inputs, out, "cqa", "--concurrency", "1", "--max_tokens_total", "2500")
    assert cli.main(args) == 1
  captured = capsys.readouterr()
  assert "token cap reached" in captured.err and "3,000 tokens" in captured.out
  assert len(rationales.read_records(str(out))) == 3
  with FakeTeacher({"cqa": records}, tokens_per_reply=None) as fake:
    assert cli.main(generate_args(fake, inputs, out, "cqa")) == 0
  assert "estimated" in capsys.readouterr().out
  assert_matches_shipped(out, records)


def test_exhausted_retries_leave_the_example_for_a_rerun(cqa_records, key_env, tmp_path, capsys):
  records = cqa_records[:3]
  inputs = write_inputs(tmp_path / "in.jsonl", records)
  out = tmp_path / "out.jsonl"
  with FakeTeacher({"cqa": records}, faults={n: "500" for n in range(1, 4)}) as fake:
    args = generate_args(fake, inputs, out, "cqa", "--concurrency", "1", "--max_attempts", "3")
    assert cli.main(args) == 1
    assert "1 example(s) failed" in capsys.readouterr().err
    assert cli.main(args) == 0
  assert_matches_shipped(out, records)


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


# --- stats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, split, file_name", [("svamp", "test", "svamp/test.jsonl"),
                                                       ("svamp", "train", "svamp/train.jsonl"),
                                                       ("cqa", "valid", "cqa/valid.jsonl")])
def test_stats_reproduce_the_readme_figures(dataset, split, file_name, capsys):
  with open(os.path.join(SHIPPED, "README.md"), encoding="utf-8") as f:
    row = next(line for line in f if line.startswith(f"| {dataset} | {split} |"))
  cells = [c.strip() for c in row.strip().strip("|").split("|")]
  examples, failures, empty, accuracy = cells[3], cells[5], cells[6], cells[7]
  assert cli.main(["rationales", "stats", os.path.join(SHIPPED, file_name)]) == 0
  output = capsys.readouterr().out
  summary = json.loads(output.strip().splitlines()[-1])
  assert f"{summary['records']:,}" == examples
  assert f"{summary['parse_failures']:,}" == failures and f"{summary['empty_rationales']:,}" == empty
  assert f"{summary['teacher_accuracy']:.2%}" == accuracy and accuracy in output


# --- custom datasets -------------------------------------------------------------------------

def test_custom_dataset_becomes_trainable_mixtures(svamp_records, tmp_path):
  import gin
  import seqio
  from dsbs_jax import custom_tasks
  records_file = tmp_path / "mine.jsonl"
  rationales.write_records(str(records_file), [dataclasses.replace(r, id=f"m{i}")
                                               for i, r in enumerate(svamp_records)])
  gin.clear_config()
  try:
    gin.parse_config("register_custom_datasets.datasets = [{'name': 'custom_teacher_test', "
                     f"'rationales_file': '{records_file}', 'metric': 'equation', "
                     f"'layout_dir': '{tmp_path / 'dir'}'}}]")
    names = custom_tasks.register_custom_datasets()
    assert "custom_teacher_test_dsbs_teacher" in names
    assert len(rationales.read_records(str(tmp_path / "dir/custom_teacher_test/valid.jsonl"))) == 3
    mixture = seqio.get_mixture_or_task("custom_teacher_test_dsbs_teacher")
    dataset = mixture.get_dataset({"inputs": 128, "targets": 128}, split="train", shuffle=False,
                                  use_cached=False)
    examples = list(dataset.take(4).as_numpy_iterator())
    assert len(examples) == 4 and all(len(e["inputs"]) and len(e["targets"]) for e in examples)
  finally:
    gin.clear_config()
