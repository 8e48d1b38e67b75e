"""A stand-in teacher: an OpenAI-compatible HTTP server that replays recorded teacher outputs.

Each prompt (a completion prompt or a chat message list) is answered with the recorded
`teacher_output` of the record whose query, built with its dataset's shipped prompt file,
ends the prompt, as a real teacher would continue it. It serves `dsbs rationales generate`
and `dsbs distill` without a model or a network, for trying the pipeline and for tests:

    python -m dsbs_jax.replay_teacher --dataset cqa --port 8000   # PaLM's shipped outputs

`ReplayTeacher` also injects faults (429, 500, slow replies, malformed JSON, dropped
connections) at chosen requests, and can require an API key, so that clients' retries
and redaction can be tested. A query it has no record of gets a 400.

This module must not generate text or send requests itself.
"""
import argparse
import contextlib
import http.server
import json
import socket
import sys
import threading
import time
from typing import Optional

from dsbs_jax import distillation
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources
from dsbs_jax import teacher

FAULTS = ("429", "500", "slow", "malformed", "drop")


class ReplayTeacher:
  """An OpenAI-compatible server on `host`:`port` (0: any free port) replaying records.

  records_by_dataset: {dataset: records}; each dataset's queries use its shipped prompt.
  api_key: when set, a request without `Authorization: Bearer <api_key>` gets a 401 that
    echoes the header it got (as careless servers do: clients must redact it).
  faults: {1-based request number: one of FAULTS}.
  tokens_per_reply: the `usage.total_tokens` of each reply (None: no `usage` field).
  """

  def __init__(self, records_by_dataset: dict, faults: Optional[dict] = None,
               delay_s: float = 0.0, tokens_per_reply: Optional[int] = 100, slow_s: float = 1.0,
               api_key: Optional[str] = None, host: str = "127.0.0.1", port: int = 0):
    self.queries = [(teacher.PromptTemplate.load(teacher.default_prompt_path(ds)).query(r.input), r)
                    for ds, dataset_records in records_by_dataset.items()
                    for r in dataset_records]
    self.faults = dict(faults or {})
    self.delay_s = delay_s
    self.slow_s = slow_s
    self.tokens_per_reply = tokens_per_reply
    self.api_key = api_key
    self.requests = 0
    self.served_ids = []  # ids answered with a 200, in order
    self.auth_headers = set()
    self.lock = threading.Lock()
    self.server = http.server.ThreadingHTTPServer((host, port), self._handler_class())
    self.server.daemon_threads = True
    self.url = f"http://{host}:{self.server.server_address[1]}/v1"
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
    replay = self

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
        with replay.lock:
          replay.requests += 1
          fault = replay.faults.get(replay.requests)
          replay.auth_headers.add(self.headers.get("Authorization"))
        if replay.api_key and self.headers.get("Authorization") != f"Bearer {replay.api_key}":
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
          time.sleep(replay.slow_s)
          return None
        time.sleep(replay.delay_s)
        record = replay.record_for(body)
        if record is None:
          return self._reply(400, b'{"error": "unknown query"}')
        choice = ({"message": {"role": "assistant", "content": record.teacher_output}}
                  if "messages" in body else {"text": record.teacher_output})
        reply = {"choices": [choice]}
        if replay.tokens_per_reply is not None:
          reply["usage"] = {"total_tokens": replay.tokens_per_reply}
        with replay.lock:
          replay.served_ids.append(record.id)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
          self._reply(200, json.dumps(reply).encode())

    return Handler


def shipped_records(dataset: str) -> list:
  """Every shipped record of `dataset` that has its input, over all splits."""
  return [r for split in distillation.SPLITS
          for r in records.read_split(str(resources.RATIONALES_DIR), dataset, split)
          if r.input is not None]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dsbs_jax.replay_teacher",
      description="Serves the shipped teacher outputs (PaLM's) behind an OpenAI-compatible "
                  "API: a stand-in teacher for `dsbs rationales generate` and `dsbs distill`.")
  parser.add_argument("--dataset", action="append", choices=sorted(rationales.PARSERS),
                      required=True, help="shipped dataset whose outputs to replay (repeatable)")
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
  parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
  args = parser.parse_args(argv)
  with ReplayTeacher({ds: shipped_records(ds) for ds in args.dataset},
                     host=args.host, port=args.port) as replay:
    print(f"replaying {len(replay.queries):,} teacher outputs ({', '.join(args.dataset)}) at "
          f"{replay.url}; Ctrl-C stops", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
      replay.thread.join()
  return 0


if __name__ == "__main__":
  sys.exit(main())
