"""One writer per output folder: the lock `dsbs train`, `dsbs distill` and `dsbs export` take
on what they write, so that a second process on a folder in use is refused at once instead
of interleaving its files with the first one's.

The lock is `fcntl.flock` on a small file naming its holder (pid, host, command, start). The
kernel drops a flock when its holder's process ends, however it ends (kill -9 and reboots
included), so a lock file left behind by a killed run never blocks the next one; on NFS,
Linux maps flock to byte-range locks that every client sees. A multi-host run takes one
lock per process (`process_index`), so the hosts of one run do not refuse each other while
a second run's hosts meet the first run's locks.

This module must not know what the folders hold.
"""
import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import socket
import time
from typing import Optional

LOCK_NAME = ".dsbs.lock"


class FolderInUseError(RuntimeError):
  """Another live process holds the folder; the message names it."""


def lock_path(folder: pathlib.Path, process_index: int = 0) -> pathlib.Path:
  """The lock file of `folder` held by the run's process `process_index`."""
  name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
  return pathlib.Path(folder) / name


def _holder_text(fd: int) -> str:
  """Who holds the lock open on `fd`, in words, from what its holder wrote there."""
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    holder = json.loads(os.read(fd, 4096).decode("utf-8"))
    return (f"`{holder['command']}` (pid {holder['pid']} on {holder['host']}, since "
            f"{holder['since']})")
  except (ValueError, KeyError, TypeError):  # its holder is still writing it
    return "another process"


def holder(folder) -> Optional[str]:
  """Who holds `folder`'s lock now, in words; None when nobody does."""
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
    os.write(fd, json.dumps({
        "command": self.command, "pid": os.getpid(),
        "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
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
