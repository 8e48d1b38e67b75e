"""Where JAX's CUDA plugin loads: quiet on hosts without GPUs, checked before compiling."""
import os
import subprocess
import sys

import pytest

from dsbs_jax import gpu_runtime


@pytest.fixture
def environment(monkeypatch):
  monkeypatch.delenv(gpu_runtime.SKIP_CUDA_CHECK, raising=False)
  return monkeypatch


def test_the_driver_check_is_skipped_on_a_host_without_gpus(environment):
  environment.setattr(gpu_runtime, "has_nvidia_gpus", lambda: False)
  gpu_runtime.quiet_on_hosts_without_gpus()
  assert os.environ[gpu_runtime.SKIP_CUDA_CHECK] == "1"


def test_a_gpu_host_is_left_as_jax_sets_it_up(environment):
  environment.setattr(gpu_runtime, "has_nvidia_gpus", lambda: True)
  gpu_runtime.quiet_on_hosts_without_gpus()
  gpu_runtime.load_for_compilation()
  assert gpu_runtime.SKIP_CUDA_CHECK not in os.environ


def test_compiling_for_a_gpu_without_the_plugin_says_how_to_get_it(environment):
  environment.setattr(gpu_runtime, "cuda_plugin_installed", lambda: False)
  with pytest.raises(gpu_runtime.GpuRuntimeError, match=r'pip install -e "\.\[gpu\]"'):
    gpu_runtime.load_for_compilation()


def test_the_test_environment_has_the_plugin_and_this_host_no_gpus():
  # CI compiles for GPUs (test_compile_report.py) with the test extra's CUDA plugin.
  assert gpu_runtime.cuda_plugin_installed() and not gpu_runtime.has_nvidia_gpus()


def test_a_cpu_process_with_the_plugin_prints_nothing_from_it():
  code = ("from dsbs_jax import gpu_runtime, tpu_runtime\n"
          "tpu_runtime.keep_off_hosts_without_chips(); gpu_runtime.quiet_on_hosts_without_gpus()\n"
          "import jax; print(jax.devices()[0].platform)")
  environment = {k: v for k, v in os.environ.items()
                 if k != gpu_runtime.SKIP_CUDA_CHECK and not k.startswith("TPU_")}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=environment)
  assert result.stdout.strip() == "cpu" and result.stderr == ""
  # Without it, the plugin's failed driver check is a traceback in every process.
  code = code.replace("gpu_runtime.quiet_on_hosts_without_gpus()", "pass")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=environment)
  assert "Jax plugin configuration error" in result.stderr
