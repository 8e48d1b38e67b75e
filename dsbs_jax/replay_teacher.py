"""A stand-in teacher: an OpenAI-compatible HTTP server that replays recorded teacher outputs.

Each prompt (a completion prompt or a chat message list) is answered with the recorded
`teacher_output` of the record whose query, built with its dataset's shipped prompt file,
ends the prompt, as a real teacher would continue it. It serves `dsbs rationales generate`
and `dsbs distill` without a model or a network, for trying the pipeline and for tests:

    python -m dsbs_jax.replay_teacher --dataset cqa --port 8000   # PaLM's shipped outputs

A request's `n` (OpenAI's number of completions) is honoured, or ignored with
`honor_n=False` (--ignore_n), as some endpoints do. In sampling mode (`Sampling`,
--error_rate) each completion is the recorded output or, with the set probability, the
recorded rationale followed by another answer: another choice (CQA), the equation plus 1
to 3 (SVAMP), another NLI label; an output that did not parse is always itself. Draws are
seeded by the seed, the record's id and the number of completions of it served before, so
a fresh server answers a run the same way, and a self-consistency vote over K samples can
be tested against a single sample. A real teacher's samples differ in their reasoning
too; these differ only in their answers.

`ReplayTeacher` also injects faults (429, 500, slow replies, malformed JSON, dropped
connections) at chosen requests, and can require an API key, so that clients' retries
and redaction can be tested. A query it has no record of gets a 400.

This module must not write text of its own (sampling mode only puts a recorded rationale
before another answer) or send requests itself.
"""
import argparse
import collections
import contextlib
import dataclasses
import http.server
import json
import random
import re
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


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Each completion states another answer than the recorded one with probability `error_rate`."""
  error_rate: float
  seed: int = 0


def _other_cqa_answer(parsed, record, rng):
  choices = re.findall(r"^\((\w)\) (.*)$", record.input, flags=re.MULTILINE)
  others = [(letter, text) for letter, text in choices if text.strip() != parsed.label.strip()]
  if not others:
    return None
  letter, text = rng.choice(others)
  return f"{parsed.rationale} So the answer is ({letter}) {text}."


def _other_svamp_answer(parsed, record, rng):
  del record
  return f"{parsed.rationale} The answer is ({parsed.label} + {rng.randint(1, 3)})."


def _other_nli_label(parsed, rng):
  return rng.choice([label for label in rationales.NLI_LABELS if label != parsed.label.strip()])


OTHER_ANSWER = {  # parser -> (parsed output, record, rng) -> an output with another answer
    "cqa": _other_cqa_answer,
    "svamp": _other_svamp_answer,
    "esnli": lambda parsed, record, rng: (f"{parsed.rationale}\nAnswer: "
                                          f"{_other_nli_label(parsed, rng)}"),
    "anli1": lambda parsed, record, rng: (f"{parsed.rationale} So the answer is "
                                          f"{_other_nli_label(parsed, rng)}."),
}


class ReplayTeacher:
  """An OpenAI-compatible server on `host`:`port` (0: any free port) replaying records.

  records_by_dataset: {dataset: records}; each dataset's queries use its shipped prompt.
  api_key: when set, a request without `Authorization: Bearer <api_key>` gets a 401 that
    echoes the header it got (as careless servers do: clients must redact it).
  faults: {1-based request number: one of FAULTS}.
  tokens_per_reply: the `usage.total_tokens` of each reply (None: no `usage` field).
  sampling: None replays the recorded outputs; see `Sampling`.
  honor_n: whether a reply has the `n` completions asked for, or one.
  """

  def __init__(self, records_by_dataset: dict, faults: Optional[dict] = None,
               delay_s: float = 0.0, tokens_per_reply: Optional[int] = 100, slow_s: float = 1.0,
               api_key: Optional[str] = None, host: str = "127.0.0.1", port: int = 0,
               sampling: Optional[Sampling] = None, honor_n: bool = True):
    self.queries = [(teacher.PromptTemplate.load(teacher.default_prompt_path(ds)).query(r.input),
                     ds, r)
                    for ds, dataset_records in records_by_dataset.items()
                    for r in dataset_records]
    self.sampling = sampling
    self.honor_n = honor_n
    self.completions_served = collections.Counter()  # by record id
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
    """(dataset, record) whose query ends the request's prompt, or None."""
    query = request_text(body)
    matches = [(ds, r) for q, ds, r in self.queries if query.endswith(q)]
    return matches[0] if len(matches) == 1 else None

  def completions(self, dataset: str, record, n: int) -> list[str]:
    """The next `n` completions of `record`'s query (its recorded output, or drawn)."""
    with self.lock:
      first = self.completions_served[record.id]
      self.completions_served[record.id] += n
    if self.sampling is None:
      return [record.teacher_output] * n
    parsed = rationales.PARSERS[dataset](record.teacher_output)
    outputs = []
    for number in range(first, first + n):
      rng = random.Random(f"{self.sampling.seed}:{record.id}:{number}")
      other = (OTHER_ANSWER[dataset](parsed, record, rng)
               if parsed.error is None and rng.random() < self.sampling.error_rate else None)
      outputs.append(other or record.teacher_output)
    return outputs

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
        try:
          body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
          request_text(body)
        except (ValueError, TypeError) as error:  # as an OpenAI server answers a bad request
          return self._reply(400, json.dumps({"error": {
              "message": str(error), "type": "invalid_request_error"}}).encode())
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
        found = replay.record_for(body)
        if found is None:
          return self._reply(400, b'{"error": "unknown query"}')
        dataset, record = found
        n = body.get("n", 1) if replay.honor_n else 1
        reply = {"choices": [
            {"index": i, **({"message": {"role": "assistant", "content": text}}
                            if "messages" in body else {"text": text})}
            for i, text in enumerate(replay.completions(dataset, record, n))]}
        if replay.tokens_per_reply is not None:
          reply["usage"] = {"total_tokens": replay.tokens_per_reply}
        with replay.lock:
          replay.served_ids.append(record.id)  # once per request, whatever its `n`
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
          self._reply(200, json.dumps(reply).encode())

    return Handler


def request_text(body) -> str:
  """The text a completions request's `prompt`, or a chat request's last message, holds;
  ValueError naming what the request lacks."""
  if not isinstance(body, dict):
    raise ValueError("the request body must be a JSON object")
  if "messages" in body:
    messages = body["messages"]
    if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
            and isinstance(messages[-1].get("content"), str)):
      raise ValueError("'messages' must be a list whose last message has a string 'content'")
    return messages[-1]["content"]
  if not isinstance(body.get("prompt"), str):
    raise ValueError("the request needs a string 'prompt' (completions) or 'messages' (chat)")
  return body["prompt"]


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
  parser.add_argument("--error_rate", type=float, default=None, metavar="RATE",
                      help="sampling mode: each completion states another answer than the "
                           "shipped one with probability RATE (in [0, 1])")
  parser.add_argument("--seed", type=int, default=0, help="seed of sampling mode (default 0)")
  parser.add_argument("--ignore_n", action="store_true",
                      help="answer one completion per request whatever `n` asks, as some "
                           "endpoints do")
  args = parser.parse_args(argv)
  if args.error_rate is not None and not 0 <= args.error_rate <= 1:
    parser.error(f"--error_rate {args.error_rate}: must be in [0, 1]")
  sampling = None if args.error_rate is None else Sampling(args.error_rate, args.seed)
  with ReplayTeacher({ds: shipped_records(ds) for ds in args.dataset}, host=args.host,
                     port=args.port, sampling=sampling, honor_n=not args.ignore_n) as replay:
    mode = (f", sampling with error rate {sampling.error_rate:g} (seed {sampling.seed})"
            if sampling else "")
    print(f"replaying {len(replay.queries):,} teacher outputs ({', '.join(args.dataset)}) at "
          f"{replay.url}{mode}; Ctrl-C stops", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
      replay.thread.join()
  return 0


if __name__ == "__main__":
  sys.exit(main())
