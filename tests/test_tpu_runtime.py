"""Where libtpu loads: kept off hosts without TPU chips, loaded on demand to compile."""
import os
import subprocess
import sys

import pytest

from dsbs_jax import tpu_runtime


@pytest.fixture
def environment(monkeypatch):
  for name in ("TPU_LOAD_LIBRARY", "TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES",
               "TPU_ACCELERATOR_TYPE", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_libtpu_is_kept_off_a_host_without_chips(environment):
  environment.setattr(tpu_runtime, "has_tpu_chips", lambda: False)
  tpu_runtime.keep_off_hosts_without_chips()
  assert os.environ["TPU_LOAD_LIBRARY"] == "0"
  tpu_runtime.load_for_compilation()
  assert os.environ["TPU_LOAD_LIBRARY"] == "1"
  assert os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"


def test_a_tpu_host_is_left_as_jax_sets_it_up(environment):
  environment.setattr(tpu_runtime, "has_tpu_chips", lambda: True)
  tpu_runtime.keep_off_hosts_without_chips()
  tpu_runtime.load_for_compilation()
  assert "TPU_LOAD_LIBRARY" not in os.environ and "TPU_WORKER_HOSTNAMES" not in os.environ


def test_compiling_for_a_tpu_without_libtpu_says_how_to_get_it(environment):
  environment.setattr(tpu_runtime, "libtpu_installed", lambda: False)
  with pytest.raises(tpu_runtime.TpuRuntimeError, match=r'pip install -e "\.\[tpu\]"'):
    tpu_runtime.load_for_compilation()


def test_the_test_environment_has_libtpu_and_this_host_no_chips():
  # CI compiles for TPUs (test_compile_report.py) with the test extra's libtpu.
  assert tpu_runtime.libtpu_installed() and not tpu_runtime.has_tpu_chips()


def test_a_cpu_process_with_libtpu_prints_nothing_from_it(environment):
  code = "from dsbs_jax import tpu_runtime; tpu_runtime.keep_off_hosts_without_chips()\n" \
         "import jax; print(jax.devices()[0].platform)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={k: v for k, v in os.environ.items()
                                           if not k.startswith("TPU_")})
  assert result.stdout.strip() == "cpu" and result.stderr == ""
