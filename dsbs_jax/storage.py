"""Every path a user names, on a local disk or in Cloud Storage (`gs://bucket/...`): opened,
listed, written, replaced and checked here. No other module calls `open`, `pathlib` or
`os.replace` on a user path; they ask `path(p)`, which is a `pathlib.Path` on a local disk and
an etils `epath.Path` for a URL, with the same methods.

The library is etils `epath` (orbax's own, for its checkpoint folders) over fsspec's gcsfs.
epath would go through TensorFlow's file system whenever TensorFlow is importable; this
module turns that off (`EPATH_USE_TF=false`, before any path is made), because TensorFlow's
Cloud Storage client has its endpoints compiled in, so nothing can test it, while gcsfs,
google-cloud-storage (which orbax deletes old steps with) and tensorstore (which writes
orbax's arrays) all honour an emulator. TensorFlow is never handed a URL: what must be a
local file for a library (a SentencePiece model) is read from `local_copy`, and files that
grow (metrics, TensorBoard) are written in a `Mirror` and uploaded whole.

What an object store cannot do, done its own way:
- no rename: `write_atomically` is one upload there (an object appears whole or not at
  all), a temporary file and `os.replace` on a disk;
- no append: `Mirror` keeps a local copy and uploads each changed file whole (`Appender`
  appends through one);
- no flock: `create_exclusive`, `replace_if_generation` and `delete_if_generation` hold
  generation preconditions, on which folder_lock.py builds its lease.

An emulator is used when STORAGE_EMULATOR_HOST is set (google-cloud-storage's and gcsfs's
variable); tensorstore's own, TENSORSTORE_GCS_HTTP_URL, is set from it when unset, and so
is a stand-in token for tensorstore, which the emulator does not check.

This module must not know what the files mean.
"""
import contextlib
import functools
import hashlib
import os
import pathlib
import shutil
import tempfile
import time
from typing import Iterable, Iterator, Optional, Union

os.environ.setdefault("EPATH_USE_TF", "false")  # read once, when epath first picks a backend
# gcsfs's experimental layer asks the storage-control API about each bucket before use.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
if os.environ.get("STORAGE_EMULATOR_HOST"):
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", os.environ["STORAGE_EMULATOR_HOST"])
  # An emulator takes any token; without one, tensorstore logs that it found no credentials.
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")

import fsspec  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

# Listings cached by gcsfs would hide the objects that tensorstore (another client) writes.
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    fsspec.config.conf[_protocol]["token"] = "anon"

URL_SCHEMES = ("gs://",)
PathLike = Union[str, os.PathLike]
Path = Union[pathlib.Path, epath.Path]
# How long the start-up checks wait for Cloud Storage before calling it unreachable.
CHECK_DEADLINE_S = 20.0


class StorageError(ValueError):
  """A URL that cannot be used, named with the cause in one line."""


class PreconditionFailed(RuntimeError):
  """An object's generation was not the one a conditional write or delete expected."""


def is_url(p: PathLike) -> bool:
  """Whether `p` names an object store location (scheme://...) rather than a local path."""
  return "://" in str(p)


def path(p: PathLike) -> Path:
  """`p` as a path object: an absolute pathlib.Path on a local disk, an epath.Path for a
  gs:// URL. Another scheme is a StorageError, not a local folder named after it."""
  text = os.fspath(p)
  if not is_url(text):
    return pathlib.Path(text).absolute()
  if not text.startswith(URL_SCHEMES):
    raise StorageError(f"{text}: {text.split('://')[0]}:// is not supported; use a local path "
                       f"or {' or '.join(URL_SCHEMES)}")
  _bucket_and_name(text)
  return epath.Path(text)


def _bucket_and_name(url: str) -> tuple[str, str]:
  rest = url[len("gs://"):]
  bucket, _, name = rest.partition("/")
  if not bucket:
    raise StorageError(f"{url}: no bucket named (gs://BUCKET/PATH)")
  return bucket, name.strip("/")


# ------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------
def open_binary(p: PathLike):
  """`p` opened for reading bytes."""
  return path(p).open("rb")


def write_atomically(p: PathLike, content: bytes) -> None:
  """Writes `content` to `p` so that a reader (or a kill) sees the old file or the new one,
  never a part."""
  target = path(p)
  if isinstance(target, pathlib.Path):
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, target)
  else:
    target.write_bytes(content)


def write_if_changed(p: PathLike, content: bytes) -> None:
  """`write_atomically`, leaving an identical file untouched."""
  target = path(p)
  if target.is_file() and target.read_bytes() == content:
    return
  write_atomically(target, content)


def modified_time(p: PathLike) -> float:
  """When `p` was last written, in seconds since the epoch."""
  target = path(p)
  return target.stat().st_mtime if isinstance(target, pathlib.Path) else target.stat().mtime


def free_bytes(p: PathLike) -> Optional[int]:
  """Free bytes on the disk that holds `p` (or, before it exists, its nearest ancestor);
  None on an object store, which has no such limit to check."""
  if is_url(p):
    return None
  folder = path(p)
  while not folder.exists():
    folder = folder.parent
  return shutil.disk_usage(folder).free


def files_under(p: PathLike) -> list[Path]:
  """The files under a folder, at any depth (none if it does not exist)."""
  folder = path(p)
  if isinstance(folder, pathlib.Path):
    return sorted(f for f in folder.rglob("*") if f.is_file())
  files = []
  if folder.is_dir():
    for entry in folder.iterdir():
      files += files_under(entry) if entry.is_dir() else [entry]
  return sorted(files)


def _files_of(p: Path) -> list[Path]:
  """`p` itself if it is a file, else the files under it (none if it does not exist)."""
  return [p] if p.is_file() else files_under(p)


def bytes_under(p: PathLike) -> int:
  """The size of the files under a folder."""
  return sum(f.stat().st_size for f in files_under(p))


def cache_dir() -> pathlib.Path:
  """This machine's cache of dsbs: $DSBS_CACHE_DIR, else the user's cache folder."""
  return pathlib.Path(os.environ.get("DSBS_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsbs_jax"))


def local_copy(p: PathLike) -> str:
  """A local file with the content of `p`: `p` itself on a local disk; for a URL, a copy in
  the user's cache, fetched again when the object changes (its generation is in the name),
  for libraries that read through TensorFlow's file system (SentencePiece models)."""
  if not is_url(p):
    return str(path(p))
  blob = _blob(str(p))
  try:
    blob.reload(retry=_retry())
  except _not_found_errors() as error:
    raise FileNotFoundError(f"{p}: no such object") from error
  digest = hashlib.sha256(str(p).encode()).hexdigest()[:16]
  copy = cache_dir() / "objects" / digest / f"{blob.generation}-{path(p).name}"
  if not copy.is_file():
    copy.parent.mkdir(parents=True, exist_ok=True)
    tmp = copy.with_name(copy.name + f".{os.getpid()}.tmp")
    blob.download_to_filename(str(tmp), retry=_retry())
    os.replace(tmp, copy)
  return str(copy)


@contextlib.contextmanager
def temporary_local_copy(p: PathLike) -> Iterator[pathlib.Path]:
  """`p` as a local file while the block reads it: itself on a disk; for a URL, a copy in a
  temporary folder removed after the block (for files too big to keep, as model weights)."""
  if not is_url(p):
    yield path(p)
    return
  with tempfile.TemporaryDirectory(prefix="dsbs-copy-") as folder:
    copy = pathlib.Path(folder) / path(p).name
    with open_binary(p) as source, open(copy, "wb") as target:
      shutil.copyfileobj(source, target)
    yield copy


def replace_folder(target: PathLike, local: pathlib.Path, last: str) -> None:
  """Makes the folder `target` on an object store hold what the local folder `local` holds,
  file by file, as it has no folder rename: `target/last` is deleted first and uploaded
  last, so that while it is missing the folder is known to be incomplete, and the files
  only the old folder had are deleted once every new one is uploaded."""
  target = path(target)
  old = {str(file.relative_to(target)) for file in files_under(target)}
  new = sorted((str(file.relative_to(local)) for file in files_under(local)),
               key=lambda relative: relative == last)
  (target / last).unlink(missing_ok=True)
  for relative in new:
    with open(local / relative, "rb") as source, (target / relative).open("wb") as upload:
      shutil.copyfileobj(source, upload)
  for relative in sorted(old - set(new)):
    (target / relative).unlink(missing_ok=True)


class Mirror:
  """A local working copy of some entries (files or folders) of a folder on an object store,
  for files that grow: they are written locally as on a disk and `sync` uploads each changed
  one whole, so the store holds every file as of the last sync (an upload replaces an object
  atomically). On a local disk the mirror is the folder itself and `sync` does nothing."""

  def __init__(self, folder: PathLike, entries: Iterable[str]):
    self.remote = path(folder)
    self._entries = tuple(entries)
    self._uploaded: dict[str, tuple] = {}
    if isinstance(self.remote, pathlib.Path):
      self.local = self.remote
      return
    self.local = pathlib.Path(tempfile.mkdtemp(prefix="dsbs-mirror-"))
    for entry in self._entries:
      for file in _files_of(self.remote / entry):
        relative = str(file.relative_to(self.remote))
        target = self.local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
        self._uploaded[relative] = self._signature(target)

  @staticmethod
  def _signature(file: pathlib.Path) -> tuple:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns

  def sync(self) -> None:
    if self.local == self.remote:
      return
    for file in [f for entry in self._entries for f in _files_of(self.local / entry)]:
      if file.name.endswith(".tmp"):
        continue
      relative = str(file.relative_to(self.local))
      signature = self._signature(file)
      if self._uploaded.get(relative) != signature:
        (self.remote / relative).write_bytes(file.read_bytes())
        self._uploaded[relative] = signature
    for relative in [r for r in self._uploaded if not (self.local / r).exists()]:
      (self.remote / relative).unlink(missing_ok=True)
      del self._uploaded[relative]

  def close(self) -> None:
    self.sync()
    if self.local != self.remote:
      shutil.rmtree(self.local, ignore_errors=True)


class Appender:
  """Appends text to the file `p`: on a disk, a file opened to append and flushed at each
  write; on an object store, which cannot append, a Mirror of it uploaded whole at most every
  `upload_every_s` seconds and at `close` (a kill loses what came after the last upload)."""

  def __init__(self, p: PathLike, upload_every_s: float = 30.0):
    target = path(p)
    self._mirror = Mirror(target.parent, [target.name])
    self._file = open(self._mirror.local / target.name, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._upload_every_s = upload_every_s
    self._uploaded_at = time.monotonic()

  def write(self, text: str) -> None:
    self._file.write(text)
    self._file.flush()
    if time.monotonic() - self._uploaded_at >= self._upload_every_s:
      self._mirror.sync()
      self._uploaded_at = time.monotonic()

  def close(self) -> None:
    self._file.close()
    self._mirror.close()

  def __enter__(self) -> "Appender":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------
# Objects with generation preconditions (what a lock on an object store stands on).
# ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _client():
  from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  return gcs.Client()  # anonymous against an emulator (STORAGE_EMULATOR_HOST)


def _retry():
  from google.cloud.storage import retry as gcs_retry  # pylint: disable=g-import-not-at-top
  return gcs_retry.DEFAULT_RETRY.with_deadline(CHECK_DEADLINE_S)


def _not_found_errors():
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  return (exceptions.NotFound,)


def _precondition_errors():
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  return (exceptions.PreconditionFailed, exceptions.NotFound)


def _blob(url: str):
  bucket, name = _bucket_and_name(url)
  return _client().bucket(bucket).blob(name)


def read_with_generation(url: str) -> Optional[tuple[bytes, int, float]]:
  """(content, generation, seconds since it was last written, by the store's clock) of an
  object; None when there is none."""
  import datetime  # pylint: disable=g-import-not-at-top
  bucket, name = _bucket_and_name(url)
  while True:
    blob = _client().bucket(bucket).get_blob(name, retry=_retry())
    if blob is None:
      return None
    try:  # the content of the generation the metadata describe, or a look again
      content = blob.download_as_bytes(if_generation_match=blob.generation, retry=_retry())
    except _precondition_errors():
      continue
    age = (datetime.datetime.now(datetime.timezone.utc) - blob.updated).total_seconds()
    return content, blob.generation, age


def create_exclusive(url: str, content: bytes) -> int:
  """Creates the object `url` if there is none (its generation); PreconditionFailed if one
  exists."""
  return replace_if_generation(url, content, 0)


def replace_if_generation(url: str, content: bytes, generation: int) -> int:
  """Writes `url` if its generation is still `generation` (0: if it does not exist); the
  new generation, or PreconditionFailed."""
  blob = _blob(url)
  try:
    blob.upload_from_string(content, if_generation_match=generation)
  except _precondition_errors() as error:
    raise PreconditionFailed(url) from error
  return blob.generation


def delete_if_generation(url: str, generation: int) -> None:
  """Deletes `url` if its generation is still `generation`; nothing if it changed or is gone."""
  blob = _blob(url)
  try:
    # Cloud Storage holds the precondition itself; the look first serves stores that ignore
    # it on deletes (fake-gcs-server does).
    blob.reload(retry=_retry())
    if blob.generation == generation:
      blob.delete(if_generation_match=generation)
  except _precondition_errors():
    pass


# ------------------------------------------------------------------------------
# Start-up checks of URLs, before anything is built or written.
# ------------------------------------------------------------------------------
READ_PERMISSIONS = ("storage.objects.get", "storage.objects.list")
WRITE_PERMISSIONS = READ_PERMISSIONS + ("storage.objects.create", "storage.objects.delete")


def _credentials_problem() -> Optional[str]:
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return None
  import google.auth  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions  # pylint: disable=g-import-not-at-top
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError:
    return ("no Cloud Storage credentials (a Cloud TPU VM has its service account's; elsewhere "
            "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS)")
  return None


def check(read: Iterable[Optional[PathLike]] = (),
          write: Iterable[Optional[PathLike]] = ()) -> None:
  """Checks each URL among those read and those written (None and local paths are left to
  their readers): that there are credentials, that Cloud Storage answers, that its bucket
  exists and that they may read it (and write, where asked). A failure is one StorageError
  naming the URL and the cause; nothing is created."""
  wanted = {str(p): False for p in read if p is not None and is_url(p)}
  wanted.update({str(p): True for p in write if p is not None and is_url(p)})
  if not wanted:
    return
  for url in wanted:
    path(url)  # refuses a scheme other than gs://
  problem = _credentials_problem()
  if problem:
    raise StorageError(f"{next(iter(wanted))}: {problem}")
  for url, writing in wanted.items():
    _check_bucket(url, _bucket_and_name(url)[0], writing)


def _check_bucket(url: str, bucket_name: str, writing: bool) -> None:
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions as auth_exceptions  # pylint: disable=g-import-not-at-top
  import requests  # pylint: disable=g-import-not-at-top
  unreachable = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                 auth_exceptions.TransportError, exceptions.RetryError)
  try:
    bucket = _client().lookup_bucket(bucket_name, timeout=CHECK_DEADLINE_S, retry=_retry())
    if bucket is None:
      raise StorageError(f"{url}: no such bucket")
    wanted = WRITE_PERMISSIONS if writing else READ_PERMISSIONS
    try:
      granted = set(bucket.test_iam_permissions(list(wanted), timeout=CHECK_DEADLINE_S,
                                                retry=_retry()))
    except exceptions.NotFound:  # an emulator without IAM: there is nothing to check
      return
    missing = [p for p in wanted if p not in granted]
    if missing:
      raise StorageError(f"{url}: no permission to {'write' if writing else 'read'} bucket "
                         f"{bucket_name} (missing {', '.join(missing)})")
  except exceptions.Forbidden as error:
    raise StorageError(f"{url}: no permission to use bucket {bucket_name} "
                       f"({error.message})") from None
  except unreachable as error:
    where = os.environ.get("STORAGE_EMULATOR_HOST", "Cloud Storage")
    raise StorageError(f"{url}: cannot reach {where} ({type(error).__name__})") from None
