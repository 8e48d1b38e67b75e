"""The stand-in teacher of the stage-1 and distill tests (dsbs_jax.replay_teacher, which
replays shipped PaLM outputs and injects faults, here requiring a test key) and the
helpers around it."""
import json
import os

from dsbs_jax import rationales
from dsbs_jax import replay_teacher
from dsbs_jax import teacher

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


class FakeTeacher(replay_teacher.ReplayTeacher):
  """The stand-in teacher, requiring the test key (which its 401 replies echo)."""

  def __init__(self, records_by_dataset: dict, **kwargs):
    super().__init__(records_by_dataset, api_key=SECRET, **kwargs)


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
