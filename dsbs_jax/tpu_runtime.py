"""Where libtpu (the TPU runtime, `pip install -e ".[tpu]"`) loads, and where it must not.

With libtpu installed, JAX loads it in every process, TPU or not. On a host without TPU
chips that costs a screen of initialization errors (`TPU_WORKER_HOSTNAMES`, "could not
determine TPU accelerator type") and takes /tmp/libtpu_lockfile, a machine-wide lock: a
second process that needs libtpu (a TPU compile next to a run) then fails. So:
`keep_off_hosts_without_chips()`, called before JAX starts its backends, keeps libtpu from
loading there; `load_for_compilation()` loads it on demand for compiling ahead of time for a
TPU topology (`dsbs compile`), quietly and beside other processes. Hosts with TPU chips are
left as JAX sets them up.

This module reads the environment and the PCI bus only; it must not import JAX at import
time (it runs before JAX is configured).
"""
import glob
import importlib.util
import os

# PCI vendor id of Google, under which TPU chips appear on a Cloud TPU VM.
GOOGLE_PCI_VENDOR = "0x1ae0"
# What libtpu probes on start-up (the cloud metadata server, the slice's hosts and type) is
# given here instead, so that it has nothing to report; compile targets come from the
# topology name, not from these.
_COMPILE_ONLY_ENVIRONMENT = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # beside other processes that loaded it
}


def has_tpu_chips() -> bool:
  """Whether this host has TPU chips (a Cloud TPU VM)."""
  for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_file, encoding="ascii") as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def keep_off_hosts_without_chips() -> None:
  """On a host without TPU chips, tells libtpu not to load (unless TPU_LOAD_LIBRARY is set)."""
  if libtpu_installed() and not has_tpu_chips():
    os.environ.setdefault("TPU_LOAD_LIBRARY", "0")


class TpuRuntimeError(RuntimeError):
  """libtpu is missing, so nothing can be compiled for a TPU here."""


def load_for_compilation() -> None:
  """Lets libtpu load in this process to compile for TPU topologies; call before
  `jax.experimental.topologies.get_topology_desc(..., platform="tpu")`."""
  if not libtpu_installed():
    raise TpuRuntimeError('compiling for a TPU needs libtpu: pip install -e ".[tpu]" (or '
                          '"dsbs-jax[tpu]"), which pins the libtpu of the installed JAX')
  if has_tpu_chips():
    return
  os.environ["TPU_LOAD_LIBRARY"] = "1"
  for name, value in _COMPILE_ONLY_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
