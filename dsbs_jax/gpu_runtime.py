"""Where JAX's CUDA plugin (`pip install -e ".[gpu]"`) loads, and how it compiles without a GPU.

With the plugin installed, JAX initializes it in every process. On a host without NVIDIA
GPUs its version check then fails (cuInit) and JAX logs a traceback for it, in every
command: `quiet_on_hosts_without_gpus()`, called before JAX starts its backends, skips that
check there, so the plugin finds no GPU and JAX goes on with the CPU in silence (GPU hosts
are left as JAX sets them up). `load_for_compilation()` checks the plugin is there before
`dsbs compile` asks it to describe GPUs that are not (deviceless compilation: the plugin's
topology description from a target configuration, `targets.gpu_target_config`).

This module reads the environment and the device nodes only; it must not import JAX at
import time (it runs before JAX is configured).
"""
import glob
import importlib.util
import os

# Set, the plugin skips its check of the CUDA libraries against the GPUs' driver.
SKIP_CUDA_CHECK = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"


def has_nvidia_gpus() -> bool:
  """Whether this host has NVIDIA GPUs (their driver's device nodes)."""
  return bool(glob.glob("/dev/nvidia[0-9]*"))


def cuda_plugin_installed() -> bool:
  return importlib.util.find_spec("jax_cuda12_plugin") is not None


def quiet_on_hosts_without_gpus() -> None:
  """On a host without NVIDIA GPUs, lets the CUDA plugin (if installed) start without its
  driver check, which there can only fail, and loudly."""
  if cuda_plugin_installed() and not has_nvidia_gpus():
    os.environ.setdefault(SKIP_CUDA_CHECK, "1")


class GpuRuntimeError(RuntimeError):
  """JAX's CUDA plugin is missing, so nothing can be compiled for a GPU here."""


def load_for_compilation() -> None:
  """Checks that the CUDA plugin can compile here; call before
  `jax.experimental.topologies.get_topology_desc(..., platform="cuda")`."""
  if not cuda_plugin_installed():
    raise GpuRuntimeError('compiling for a GPU needs JAX\'s CUDA plugin: pip install -e '
                          '".[gpu]" (or "dsbs-jax[gpu]"), which pins the plugin of the '
                          'installed JAX')
  quiet_on_hosts_without_gpus()
