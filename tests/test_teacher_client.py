"""Tests of dsbs_jax.teacher_client: endpoint URLs and the backoff schedule, connection
failures counted in a row, the API key kept out of reprs and errors, and the request, token
and retry budgets, against a stand-in teacher (fake_teacher.py); a teacher that accepts connections
and never answers, and one that only errs, stopped at exactly the limits under concurrency."""
import contextlib
import socket
import threading
import time

import pytest

from dsbs_jax import cli
from dsbs_jax import rationales
from dsbs_jax import teacher_client
from fake_teacher import (FakeTeacher, KEY_ENV, SECRET, assert_matches_shipped, generate_args,
                          write_inputs)


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


def test_failed_examples_count_in_a_row_and_any_completed_example_resets_them():
  budget = teacher_client.Budget(max_failed_examples=2)
  for error in ("HTTP 500", None, "HTTP 500"):  # None: an example was completed
    budget.record_example(error)
  assert budget.exhausted_reason() is None and not budget.unreachable
  budget.record_example("HTTP 503")
  assert budget.unreachable
  assert budget.exhausted_reason() == ("2 examples in a row failed every attempt "
                                       "(--max_failed_examples=2); last: HTTP 503")


def test_key_is_not_in_repr_and_is_redacted_from_errors(cqa_records, monkeypatch, capsys, tmp_path):
  client = teacher_client.TeacherClient("http://127.0.0.1:9/v1", "m", api_key=SECRET)
  assert SECRET not in repr(client) and "api_key=set" in repr(client)
  monkeypatch.setenv(KEY_ENV, SECRET + "-wrong")
  inputs = write_inputs(tmp_path / "in.jsonl", cqa_records[:2])
  with FakeTeacher({"cqa": cqa_records}) as fake:
    assert cli.main(generate_args(fake, inputs, tmp_path / "out.jsonl", "cqa")) == 2
  err = capsys.readouterr().err
  assert "HTTP 401" in err and "[API key]" in err and SECRET not in err


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


def test_a_ledger_carries_spending_across_budgets_and_survives_a_torn_line(tmp_path):
  ledger = str(tmp_path / "spend.jsonl")
  first = teacher_client.Budget(max_tokens=250, ledger_path=ledger, token_flag="--cap")
  for _ in range(2):
    first.start_request()
    first.add_tokens(100, estimated=False)
  with open(ledger, "a") as f:
    f.write('{"tokens": 7')  # a run killed mid-write
  second = teacher_client.Budget(max_tokens=250, ledger_path=ledger, token_flag="--cap")
  assert (second.requests, second.tokens, second.earlier_tokens) == (2, 200, 200)
  second.start_request()
  second.add_tokens(60, estimated=True)
  assert second.exhausted_reason() == "token cap reached (--cap=250; 260 spent)"
  assert teacher_client.read_ledger(ledger) == (3, 260, 60)
  with open(ledger, "a") as f:
    f.write("garbage\n")
  with pytest.raises(teacher_client.TeacherError, match=r"spend.jsonl:7: not a spend ledger line"):
    teacher_client.read_ledger(ledger)


class SilentTeacher:
  """A server that accepts every connection and never answers."""

  def __init__(self):
    self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
    self.accepted = []
    threading.Thread(target=self._accept, daemon=True).start()

  def _accept(self):
    with contextlib.suppress(OSError):  # the socket closed
      while True:
        self.accepted.append(self.sock.accept()[0])

  def close(self):
    self.sock.close()
    for connection in self.accepted:
      connection.close()


def test_a_teacher_that_never_answers_stops_the_run_at_the_connection_limit(
    cqa_records, key_env, tmp_path, capsys):
  inputs = write_inputs(tmp_path / "in.jsonl", cqa_records)
  out = tmp_path / "out.jsonl"
  silent = SilentTeacher()
  try:
    started = time.monotonic()
    code = cli.main(generate_args(silent, inputs, out, "cqa", "--timeout", "0.2", "--concurrency",
                                  "4", "--max_connection_failures", "10", "--max_failed_examples",
                                  "10"))
    elapsed = time.monotonic() - started
  finally:
    silent.close()
  assert code == 2
  err = capsys.readouterr().err
  assert ("10 attempts in a row could not connect (--max_connection_failures=10); last: no reply "
          "within 0.2 s") in err, err
  # Ten attempts time out, and no attempt starts after the tenth: at most the three others
  # in flight then (with the 6 attempts of each of 4 examples, far more would be sent).
  assert 10 <= len(silent.accepted) <= 13
  assert elapsed < 10
  assert out.read_text() == ""


def test_failed_examples_stop_at_exactly_the_limit_under_concurrency(cqa_records, key_env,
                                                                     tmp_path, capsys):
  inputs = write_inputs(tmp_path / "in.jsonl", cqa_records)
  with FakeTeacher({"cqa": cqa_records}, faults=dict.fromkeys(range(1, 999), "500")) as fake:
    code = cli.main(generate_args(fake, inputs, tmp_path / "out.jsonl", "cqa", "--concurrency", "4",
                                  "--max_attempts", "2", "--max_failed_examples", "3"))
  assert code == 2
  err = capsys.readouterr().err
  assert "3 examples in a row failed every attempt (--max_failed_examples=3)" in err, err
  assert fake.requests <= 6 * 2  # the three that failed, and at most three in flight then
