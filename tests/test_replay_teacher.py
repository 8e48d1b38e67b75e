"""Tests for dsbs_jax.replay_teacher: `python -m dsbs_jax.replay_teacher`, as the README runs
it, answers a prompt with the shipped teacher output of its example. (Its fault injection
is exercised by the client tests, test_teacher_client.py.)"""
import os
import pathlib
import subprocess
import sys

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
