"""The HTTP client for a teacher LLM behind an OpenAI-compatible API, with retries and budgets.

`TeacherClient.complete` sends one prompt to `/v1/completions` or one message list to
`/v1/chat/completions` and returns the completion texts (up to `n`, the OpenAI `n`
parameter, sent only when above 1: an endpoint that ignores it gives one) and the tokens
they cost. It retries 429, 408, 5xx, time-outs, dropped connections and malformed replies
with capped, jittered exponential backoff; other HTTP errors (a bad key, an unknown model)
are fatal. Every attempt first draws on a shared `Budget` (requests, tokens, and connection
failures in a row, time-outs included, so that a teacher that is down or never answers
stops the run after those attempts rather than after every example's retries), so caps
hold across threads.

The API key is read from the environment by the caller and lives only in a private
attribute; it never appears in a repr, an exception or a log line (replies are redacted
too, in case a server echoes it). This module knows nothing of datasets, prompts or records.
"""
import dataclasses
import http.client
import json
import logging
import math
import random
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional, Union

from dsbs_jax import storage

APIS = ("completions", "chat")
CHARS_PER_TOKEN_ESTIMATE = 4  # OpenAI's rule of thumb for English, used when a reply has no `usage`
_MAX_ERROR_BODY_CHARS = 300

logger = logging.getLogger(__name__)

Prompt = Union[str, list]  # a completion prompt, or a list of chat messages


class TeacherError(RuntimeError):
  """A request that cannot succeed by retrying (bad key, unknown model, bad URL)."""


class RetriesExhausted(RuntimeError):
  """Every attempt at one request failed with a retryable error."""


class BudgetExhausted(RuntimeError):
  """A cap is reached (requests, tokens, connection failures in a row); no new request may start."""


class _RetryableError(Exception):
  """One failed attempt worth retrying; `retry_after` is the server's hint in seconds."""

  def __init__(self, message: str, retry_after: Optional[float] = None):
    super().__init__(message)
    self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """Attempt i (from 0) waits min(max_delay_s, base_delay_s * 2**i), scaled by a random
  factor in [0.5, 1] so that parallel workers do not retry in lockstep."""
  max_attempts: int = 6
  base_delay_s: float = 1.0
  max_delay_s: float = 30.0

  def delay(self, attempt: int, rng: random.Random, retry_after: Optional[float] = None) -> float:
    capped = min(self.max_delay_s, self.base_delay_s * 2 ** attempt)
    if retry_after is not None:
      return min(self.max_delay_s, max(retry_after, capped))
    return capped * (0.5 + 0.5 * rng.random())


def read_ledger(path: str) -> tuple[int, int, int]:
  """(requests, tokens, estimated tokens) that a spend ledger records, 0s if it is absent.

  A last line without its newline (a run killed mid-write) is cut off: at most one
  request's spending is forgotten.
  """
  if not storage.path(path).is_file():
    return 0, 0, 0
  content = storage.path(path).read_bytes()
  complete_end = content.rfind(b"\n") + 1
  if complete_end < len(content):
    storage.write_atomically(path, content[:complete_end])
  totals = [0, 0, 0]
  for number, line in enumerate(content[:complete_end].decode("utf-8").splitlines(), start=1):
    try:
      entry = json.loads(line)
      totals[0] += int(entry.get("requests", 0))
      totals[1] += int(entry.get("tokens", 0))
      totals[2] += int(entry.get("tokens", 0)) if entry.get("estimated") else 0
    except (ValueError, TypeError, AttributeError):
      raise TeacherError(f"{path}:{number}: not a spend ledger line ({line[:60]!r}); the file "
                         "must hold what earlier runs spent") from None
  return tuple(totals)


class FailuresInARow:
  """Failures counted in a row against a limit (None: no limit); a success resets them.

  Once the limit is reached the count stays there: failures and successes of requests
  still in flight then change nothing, so the limit reported is the limit that stopped
  the run, however many requests were in flight.
  """

  def __init__(self, limit: Optional[int], flag: str, what: str):
    self.limit, self.flag, self.what = limit, flag, what
    self.count = 0
    self.last_error = None

  def record(self, error: Optional[str]) -> None:
    """Counts a failure (`error`), or resets the count (None)."""
    if self.reached:
      return
    if error is None:
      self.count = 0
    else:
      self.count += 1
      self.last_error = error

  @property
  def reached(self) -> bool:
    return self.limit is not None and self.count >= self.limit

  def reason(self) -> str:
    return f"{self.count} {self.what} ({self.flag}={self.limit}); last: {self.last_error}"


class Budget:
  """Caps shared by all workers: HTTP requests sent (retries included), tokens spent,
  attempts in a row, across workers, that could not connect to the server or had no reply in
  time, and examples in a row whose every attempt failed (a server that answers, but only
  with errors).

  With `ledger_path`, the requests and tokens of earlier runs recorded there count too, and
  every request and every reply's tokens are appended to it as they happen, so that caps
  hold across resumed runs, even killed ones. `token_flag` is the flag named when the token
  cap is reached.
  """

  def __init__(self, max_requests: Optional[int] = None, max_tokens: Optional[int] = None,
               max_connection_failures: Optional[int] = None, ledger_path: Optional[str] = None,
               token_flag: str = "--max_tokens_total", max_failed_examples: Optional[int] = None):
    self.max_requests = max_requests
    self.max_tokens = max_tokens
    self.token_flag = token_flag
    self.ledger_path = ledger_path
    self.requests, self.tokens, self.estimated_tokens = (
        read_ledger(ledger_path) if ledger_path else (0, 0, 0))  # estimated: from text lengths
    self.earlier_tokens = self.tokens  # what earlier runs spent
    # Any reply from the server resets the first; any completed example the second.
    self.connection_failures = FailuresInARow(
        max_connection_failures, "--max_connection_failures", "attempts in a row could not connect")
    self.failed_examples = FailuresInARow(
        max_failed_examples, "--max_failed_examples", "examples in a row failed every attempt")
    self._lock = threading.Lock()

  def _record(self, entry: dict) -> None:
    if self.ledger_path:  # on an object store, uploaded before the next request is counted
      with storage.Appender(self.ledger_path, upload_every_s=0.0) as ledger:
        ledger.write(json.dumps(entry) + "\n")

  def record_connection(self, error: Optional[str]) -> None:
    """Counts an attempt that could not connect or timed out (`error`), or resets the count
    (None)."""
    with self._lock:
      self.connection_failures.record(error)

  def record_example(self, error: Optional[str]) -> None:
    """Counts an example whose attempts all failed (`error`), or resets the count (None)."""
    with self._lock:
      self.failed_examples.record(error)

  @property
  def unreachable(self) -> bool:
    """Whether the teacher cannot be reached or answers only with errors."""
    return self.connection_failures.reached or self.failed_examples.reached

  def start_request(self) -> None:
    with self._lock:
      reason = self.exhausted_reason()
      if reason:
        raise BudgetExhausted(reason)
      self.requests += 1
      self._record({"requests": 1})

  def add_tokens(self, tokens: int, estimated: bool) -> None:
    with self._lock:
      self.tokens += tokens
      if estimated:
        self.estimated_tokens += tokens
      self._record({"tokens": tokens, "estimated": estimated})

  def exhausted_reason(self) -> Optional[str]:
    if self.max_requests is not None and self.requests >= self.max_requests:
      return f"request cap reached (--max_requests={self.max_requests})"
    if self.max_tokens is not None and self.tokens >= self.max_tokens:
      return f"token cap reached ({self.token_flag}={self.max_tokens}; {self.tokens:,} spent)"
    for failures in (self.connection_failures, self.failed_examples):
      if failures.reached:
        return failures.reason()
    return None


@dataclasses.dataclass(frozen=True)
class Completion:
  texts: tuple  # one or more completions of the prompt, as many as the reply's choices
  tokens: int
  tokens_estimated: bool  # True when the reply had no `usage` field
  attempts: int


def endpoint_url(teacher_url: str, api: str) -> str:
  """`http://host:8000`, `.../v1` or the full endpoint URL -> the endpoint for `api`."""
  parsed = urllib.parse.urlparse(teacher_url)
  if parsed.scheme not in ("http", "https") or not parsed.netloc:
    raise TeacherError(
        f"--teacher {teacher_url!r}: expected an http(s) URL such as http://localhost:8000/v1")
  base = teacher_url.rstrip("/")
  suffix = "chat/completions" if api == "chat" else "completions"
  if base.endswith("/completions"):
    return base
  return f"{base}/{suffix}" if base.endswith("/v1") else f"{base}/v1/{suffix}"


def estimate_tokens(prompt: Prompt, completion: str) -> int:
  prompt_chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
  return math.ceil((prompt_chars + len(completion)) / CHARS_PER_TOKEN_ESTIMATE)


class TeacherClient:
  """Sends prompts to one model; safe to call from several threads at once."""

  def __init__(self, teacher_url: str, model: str, *, api: str = "completions",
               api_key: Optional[str] = None, timeout_s: float = 60.0, max_tokens: int = 256,
               temperature: float = 0.0, stop: tuple = (), retry: RetryPolicy = RetryPolicy(),
               budget: Optional[Budget] = None, stop_event: Optional[threading.Event] = None,
               seed: Optional[int] = None):
    if api not in APIS:
      raise TeacherError(f"--api {api!r}: expected one of {APIS}")
    self.url = endpoint_url(teacher_url, api)
    self.model = model
    self.api = api
    self.timeout_s = timeout_s
    self.max_tokens = max_tokens
    self.temperature = temperature
    self.stop = tuple(stop)
    self.retry = retry
    self.budget = budget or Budget()
    self.stop_event = stop_event or threading.Event()
    self._api_key = api_key or None
    self._rng = random.Random(seed)
    self._rng_lock = threading.Lock()

  def __repr__(self) -> str:
    key = "set" if self._api_key else "none"
    return f"TeacherClient(url={self.url!r}, model={self.model!r}, api={self.api!r}, api_key={key})"

  def _redact(self, text: str) -> str:
    return text.replace(self._api_key, "[API key]") if self._api_key else text

  def _body(self, prompt: Prompt, n: int) -> bytes:
    body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature}
    if n > 1:
      body["n"] = n
    if self.stop:
      body["stop"] = list(self.stop)
    body["messages" if self.api == "chat" else "prompt"] = prompt
    return json.dumps(body).encode("utf-8")

  def _send(self, payload: bytes) -> dict:
    """One HTTP attempt; raises _RetryableError or TeacherError, else the decoded reply."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        self.budget.record_connection(None)
        raw = response.read()
    except urllib.error.HTTPError as e:
      self.budget.record_connection(None)  # the server answered, if only with an error
      detail = self._redact(e.read(_MAX_ERROR_BODY_CHARS).decode("utf-8", "replace")).strip()
      message = f"HTTP {e.code} from {self.url}" + (f": {detail}" if detail else "")
      if e.code in (408, 429) or e.code >= 500:
        retry_after = e.headers.get("Retry-After") if e.headers else None
        try:
          hint = float(retry_after) if retry_after else None
        except ValueError:
          hint = None  # an HTTP date; the backoff schedule will do
        raise _RetryableError(message, hint) from None
      raise TeacherError(message) from None
    except (socket.timeout, TimeoutError) as e:
      raise self._connection_failed(f"no reply within {self.timeout_s:g} s ({e})") from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, (socket.timeout, TimeoutError)):
        raise self._connection_failed(
            f"no connection within {self.timeout_s:g} s ({e.reason})") from None
      if isinstance(e.reason, OSError):  # refused, reset, unreachable, name lookup failed
        raise self._connection_failed(f"connection failed: {e.reason}") from None
      raise TeacherError(f"{self.url}: {e.reason}") from None
    except ConnectionError as e:  # refused or reset outside urllib's wrapping
      raise self._connection_failed(f"connection failed: {type(e).__name__}: {e}") from None
    except (http.client.HTTPException, OSError) as e:
      raise _RetryableError(f"connection failed: {type(e).__name__}: {e}") from None
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
      start = self._redact(raw[:80].decode("utf-8", "replace"))
      raise _RetryableError(f"reply is not JSON: {start!r}") from None

  def _connection_failed(self, message: str) -> _RetryableError:
    self.budget.record_connection(message)
    return _RetryableError(message)

  def _completion_texts(self, reply, n: int) -> tuple:
    """The texts of the reply's first `n` choices (at least one)."""
    field = "message.content" if self.api == "chat" else "text"
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
      raise _RetryableError(f"reply lacks choices[0].{field}")
    texts = []
    for i, choice in enumerate(choices[:n]):
      try:
        text = choice["message"]["content"] if self.api == "chat" else choice["text"]
      except (KeyError, TypeError):
        raise _RetryableError(f"reply lacks choices[{i}].{field}") from None
      if not isinstance(text, str):
        raise _RetryableError(f"completion {i} is {type(text).__name__}, not text")
      texts.append(text)
    return tuple(texts)

  @staticmethod
  def _reported_tokens(reply) -> Optional[int]:
    usage = reply.get("usage") if isinstance(reply, dict) else None
    if not isinstance(usage, dict):
      return None
    total = usage.get("total_tokens")
    if isinstance(total, int):
      return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    return sum(parts) if all(isinstance(p, int) for p in parts) else None

  def complete(self, prompt: Prompt, n: int = 1) -> Completion:
    """Up to `n` completions of `prompt` in one request (fewer where the endpoint ignores
    `n`); raises RetriesExhausted, BudgetExhausted or TeacherError."""
    payload = self._body(prompt, n)
    last_error = None
    for attempt in range(self.retry.max_attempts):
      if self.stop_event.is_set():
        raise BudgetExhausted("generation is stopping")
      self.budget.start_request()
      try:
        reply = self._send(payload)
        texts = self._completion_texts(reply, n)
      except _RetryableError as e:
        last_error = e
        if attempt + 1 < self.retry.max_attempts:
          with self._rng_lock:
            delay = self.retry.delay(attempt, self._rng, e.retry_after)
          logger.info("attempt %d failed (%s); retrying in %.1f s", attempt + 1, e, delay)
          self.stop_event.wait(delay)
        continue
      reported = self._reported_tokens(reply)
      # Without `usage`: the prompt once (as `n` bills it) and every completion.
      tokens = reported if reported is not None else estimate_tokens(prompt, "".join(texts))
      self.budget.add_tokens(tokens, estimated=reported is None)
      return Completion(texts=texts, tokens=tokens, tokens_estimated=reported is None,
                        attempts=attempt + 1)
    raise RetriesExhausted(f"{self.retry.max_attempts} attempts failed; last: {last_error}")
