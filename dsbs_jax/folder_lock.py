"""One writer per output folder: the lock `dsbs train`, `dsbs distill` and `dsbs export` take
on what they write, so that a second process on a folder in use is refused at once instead
of interleaving its files with the first one's.

On a disk (`FolderLock`) the lock is `fcntl.flock` on a small file naming its holder (pid,
host, command, start). The kernel drops a flock when its holder's process ends, however it
ends (kill -9 and reboots included), so a lock file left behind by a killed run never blocks
the next one; on NFS, Linux maps flock to byte-range locks that every client sees.

An object store has no flock. There (`LeaseLock`) the lock is an object created only if
absent (a generation precondition, so of two racing processes one wins) holding a lease
that its holder renews every LEASE_S / 4 seconds. A holder that died stops renewing: its
lock is stale once the lease has run out, or at once for a process on the same host whose
pid is gone, and the next run takes it over (again by precondition, so only one does).

A multi-host run takes one lock per process (`process_index`), so the hosts of one run do
not refuse each other while a second run's hosts meet the first run's locks. `lock_for`
picks the kind of lock from the folder's path.

This module must not know what the folders hold.
"""
import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import socket
import threading
import time
from typing import Optional

from dsbs_jax import storage

LOCK_NAME = ".dsbs.lock"
# How long an object store's lock outlives its holder's last renewal.
LEASE_S = 60.0


class FolderInUseError(RuntimeError):
  """Another live process holds the folder; the message names it."""


def lock_path(folder, process_index: int = 0):
  """The lock file of `folder` held by the run's process `process_index`."""
  name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
  return storage.path(folder) / name


def lock_for(path, description: str, command: str):
  """The lock on the file `path`: a FolderLock on a disk, a LeaseLock on an object store."""
  if storage.is_url(path):
    return LeaseLock(str(path), description, command)
  return FolderLock(path, description, command)


def _holder_record(command: str) -> dict:
  return {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(holder: dict) -> str:
  return f"`{holder['command']}` (pid {holder['pid']} on {holder['host']}, since {holder['since']})"


def _holder_text(fd: int) -> str:
  """Who holds the lock open on `fd`, in words, from what its holder wrote there."""
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    return _describe(json.loads(os.read(fd, 4096).decode("utf-8")))
  except (ValueError, KeyError, TypeError):  # its holder is still writing it
    return "another process"


def holder(folder) -> Optional[str]:
  """Who holds `folder`'s lock now, in words; None when nobody does."""
  if storage.is_url(folder):
    lease = _lease(str(lock_path(folder)))
    return None if lease is None or lease[2] <= 0 else _describe(lease[0])
  try:
    fd = os.open(lock_path(folder), os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return _holder_text(fd)
  finally:
    os.close(fd)
  return None


@dataclasses.dataclass
class FolderLock:
  """Holds `path` (a lock file) while in a `with` block; creates its folder if needed and,
  if the block leaves that folder empty, removes what it created."""
  path: pathlib.Path
  description: str  # what the folder is to the user, e.g. "MODEL_DIR /runs/a"
  command: str  # what holds it, e.g. "dsbs train", for the message of a refused process

  def __post_init__(self):
    self.path = pathlib.Path(self.path).absolute()
    self._fd = None
    self._created = []

  def __enter__(self) -> "FolderLock":
    folder = self.path.parent
    missing = [folder, *folder.parents]
    self._created = missing[:next(i for i, p in enumerate(missing) if p.exists())]
    folder.mkdir(parents=True, exist_ok=True)
    try:
      self._acquire()
    except BaseException:
      self._remove_created()
      raise
    return self

  def _acquire(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        in_use = FolderInUseError(
            f"{self.description} is in use by {_holder_text(fd)}; wait for it to end or "
            "stop it (a stopped or killed process's lock is released with it)")
        os.close(fd)
        raise in_use from None
      try:
        if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)  # its last holder removed this file as we opened it: take a new one
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder_record(self.command)).encode())
    self._fd = fd

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      self.path.unlink(missing_ok=True)  # before the unlock: see the inode check above
      os.close(self._fd)
      self._fd = None
    self._remove_created()

  def _remove_created(self) -> None:
    for folder in self._created:
      try:
        folder.rmdir()
      except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
          raise
        return


def _pid_is_gone(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except (OSError, ValueError, TypeError):
    return False
  return False


def _lease(url: str) -> Optional[tuple[dict, int, float]]:
  """(holder, generation, seconds its lease has left) of the lock object `url`, 0 seconds
  once it is stale (see the module docstring); None when there is none."""
  found = storage.read_with_generation(url)
  if found is None:
    return None
  content, generation, age = found
  try:
    holder = json.loads(content.decode("utf-8"))
    lease = float(holder["lease_s"])
    _describe(holder)
  except (ValueError, KeyError, TypeError, AttributeError):  # damaged: it still expires
    holder = {"command": "an unknown process", "pid": "?", "host": "?", "since": "?"}
    lease = LEASE_S
  if holder["host"] == socket.gethostname() and _pid_is_gone(holder["pid"]):
    return holder, generation, 0.0
  return holder, generation, max(lease - age, 0.0)


class LeaseLock:
  """Holds the lock object `url` while in a `with` block, renewing its lease from a thread."""

  def __init__(self, url: str, description: str, command: str):
    self.url, self.description, self.command = url, description, command
    self._generation = None
    self._stop = threading.Event()
    self._renewer = None

  def __enter__(self) -> "LeaseLock":
    content = json.dumps({**_holder_record(self.command), "lease_s": LEASE_S}).encode()
    try:
      self._generation = storage.create_exclusive(self.url, content)
    except storage.PreconditionFailed:
      self._take_over_stale(content)
    self._renewer = threading.Thread(target=self._renew, args=(content,), daemon=True,
                                     name="lease-renewal")
    self._renewer.start()
    return self

  def _take_over_stale(self, content: bytes) -> None:
    lease = _lease(self.url)
    if lease is None:  # released meanwhile
      self._generation = storage.create_exclusive(self.url, content)
      return
    holder, generation, left = lease
    if left > 0:
      raise FolderInUseError(
          f"{self.description} is in use by {_describe(holder)}; wait for it to end or stop "
          f"it (a stopped run's lock goes with it; a killed one's lease runs out in "
          f"{left:.0f} s)")
    try:
      self._generation = storage.replace_if_generation(self.url, content, generation)
    except storage.PreconditionFailed:
      raise FolderInUseError(f"{self.description} was just taken by another process") from None

  def _renew(self, content: bytes) -> None:
    while not self._stop.wait(LEASE_S / 4):
      try:
        self._generation = storage.replace_if_generation(self.url, content, self._generation)
      except storage.PreconditionFailed:
        return  # taken over after a lapse longer than the lease: it is no longer ours
      except Exception:  # pylint: disable=broad-except  (a failed renewal is retried next time)
        continue

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join()
    if self._generation is not None:
      storage.delete_if_generation(self.url, self._generation)
      self._generation = None
