"""A stand-in teacher for the tests of stage 1: an OpenAI-compatible HTTP server on 127.0.0.1
that answers each prompt with the recorded PaLM output of the shipped example whose query
ends the prompt, and injects faults (429, 500, slow replies, malformed JSON, dropped
connections) at chosen requests; and the helpers around it."""
import contextlib
import http.server
import json
import os
import socket
import threading
import time

from dsbs_jax import rationales
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
