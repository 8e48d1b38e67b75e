"""Tests for dsbs_jax.host_allocator: when it re-executes, and that the new process keeps
the command line and gets the settings."""
import json
import os
import subprocess
import sys

import pytest

from dsbs_jax import host_allocator

SCRIPT = """
import json, os, sys
from dsbs_jax import host_allocator
host_allocator.reexec_with_tuned_allocator()
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:]}))
"""


def run(environ):
  result = subprocess.run([sys.executable, "-c", SCRIPT, "--flag", "a b"], env=environ,
                          capture_output=True, text=True, check=True)
  return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux's")
def test_a_command_is_run_again_with_the_tunables_and_its_arguments():
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  assert run(environ) == {"tunables": host_allocator.TUNABLES, "argv": ["--flag", "a b"]}


def test_a_users_own_setting_wins_even_empty():
  assert host_allocator.tuned_environment({"GLIBC_TUNABLES": ""}) is None
  assert run(dict(os.environ, GLIBC_TUNABLES="")) == {"tunables": "", "argv": ["--flag", "a b"]}
