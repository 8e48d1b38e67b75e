"""Tests for dsbs_jax.replay_teacher: `python -m dsbs_jax.replay_teacher`, as the README runs
it, answers a prompt with the shipped teacher output of its example; its sampling mode draws
other answers at the set rate, seeded, with and without `n`. (Its fault injection
is exercised by the client tests, test_teacher_client.py.)"""
import json
import os
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request

from dsbs_jax import rationales
from dsbs_jax import replay_teacher
from dsbs_jax import teacher
from dsbs_jax import teacher_client

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_module_serves_shipped_outputs_over_http():
  process = subprocess.Popen([sys.executable, "-m", "dsbs_jax.replay_teacher", "--dataset", "cqa",
                              "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
  try:
    banner = process.stdout.readline()
    assert banner.startswith("replaying ") and " at http://127.0.0.1:" in banner, banner
    url = banner.split(" at ")[1].split(";")[0]
    record = replay_teacher.shipped_records("cqa")[123]
    template = teacher.PromptTemplate.load(teacher.default_prompt_path("cqa"))
    client = teacher_client.TeacherClient(url, "palm-replay")
    assert client.complete(template.prompt(record.input)).texts == (record.teacher_output,)
    chat = teacher_client.TeacherClient(url, "palm-replay", api="chat")
    assert chat.complete(template.messages(record.input)).texts == (record.teacher_output,)
  finally:
    process.terminate()
    process.wait(timeout=30)


def test_sampling_mode_draws_other_answers_at_the_error_rate_seeded():
  records = replay_teacher.shipped_records("cqa")[:40]
  template = teacher.PromptTemplate.load(teacher.default_prompt_path("cqa"))

  def draw(sampling, n=5, **kwargs):
    with replay_teacher.ReplayTeacher({"cqa": records}, sampling=sampling, **kwargs) as replay:
      client = teacher_client.TeacherClient(replay.url, "m", temperature=0.7)
      return [client.complete(template.prompt(r.input), n=n).texts for r in records]

  assert draw(None) == [(r.teacher_output,) * 5 for r in records]
  assert draw(replay_teacher.Sampling(0.0)) == draw(None)
  sampled = draw(replay_teacher.Sampling(0.3, seed=1))
  assert sampled == draw(replay_teacher.Sampling(0.3, seed=1))  # seeded
  assert sampled != draw(replay_teacher.Sampling(0.3, seed=2))
  # Without `n`, one completion a request; the draws are those of the same completions.
  assert draw(replay_teacher.Sampling(0.3, seed=1), honor_n=False) == [t[:1] for t in sampled]
  wrong = 0
  for record, texts in zip(records, sampled):
    for text in texts:
      parsed = rationales.parse_cqa(text)
      assert parsed.error is None and parsed.rationale == rationales.parse_cqa(
          record.teacher_output).rationale
      assert parsed.label == record.teacher_label or f") {parsed.label}\n" in record.input + "\n"
      wrong += parsed.label != record.teacher_label
  assert 0.2 < wrong / (5 * len(records)) < 0.4
  every = draw(replay_teacher.Sampling(1.0), n=3)
  assert all(rationales.parse_cqa(t).label != r.teacher_label for r, ts in zip(records, every)
             for t in ts)


def test_a_request_without_a_prompt_gets_a_400_naming_what_it_lacks():
  with replay_teacher.ReplayTeacher({"cqa": replay_teacher.shipped_records("cqa")[:3]}) as replay:
    for body, lacking in [({"model": "m"}, "'prompt'"), ({"messages": []}, "'messages'"),
                          ([1, 2], "JSON object"), ({"prompt": 3}, "'prompt'")]:
      request = urllib.request.Request(f"{replay.url}/completions",
                                       data=json.dumps(body).encode(), method="POST",
                                       headers={"Content-Type": "application/json"})
      try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError(f"{body} was answered")
      except urllib.error.HTTPError as error:
        assert error.code == 400
        reply = json.loads(error.read())
        assert lacking in reply["error"]["message"] and reply["error"]["type"] == \
            "invalid_request_error"
