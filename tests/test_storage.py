"""The storage layer on a local disk and on the session's Cloud Storage emulator."""
import os
import pathlib

import pytest

from dsbs_jax import storage


def test_local_paths_stay_pathlib_paths(tmp_path):
  assert storage.path(tmp_path / "a") == pathlib.Path(tmp_path / "a")
  assert isinstance(storage.path("relative/x"), pathlib.Path)
  assert storage.path("relative/x") == pathlib.Path("relative/x").absolute()


def test_a_url_is_not_taken_for_a_local_folder(gcs_bucket):
  url = f"{gcs_bucket}/runs/q1"
  assert str(storage.path(url)) == url
  assert storage.is_url(url)


def test_other_schemes_are_refused_in_one_line():
  with pytest.raises(storage.StorageError, match=r"s3://b/x: s3:// is not supported"):
    storage.path("s3://b/x")
  with pytest.raises(storage.StorageError, match="no bucket named"):
    storage.path("gs:///x")


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_atomic_writes_and_reads(where, tmp_path, gcs_bucket):
  folder = str(tmp_path) if where == "local" else gcs_bucket
  target = storage.path(f"{folder}/sub/file.json")
  target.parent.mkdir(parents=True, exist_ok=True)
  storage.write_atomically(target, b"one")
  assert target.read_bytes() == b"one"
  storage.write_if_changed(target, b"two")
  with storage.open_binary(target) as f:
    assert f.read() == b"two"
  assert [p.name for p in target.parent.iterdir()] == ["file.json"]  # no temporary left


def test_free_bytes_only_on_disks(tmp_path, gcs_bucket):
  assert storage.free_bytes(tmp_path / "not" / "yet") > 0
  assert storage.free_bytes(f"{gcs_bucket}/x") is None


def test_generation_preconditions(gcs_bucket):
  url = f"{gcs_bucket}/run/.dsbs.lock"
  first = storage.create_exclusive(url, b"a")
  with pytest.raises(storage.PreconditionFailed):
    storage.create_exclusive(url, b"b")
  content, generation, age = storage.read_with_generation(url)
  assert (content, generation) == (b"a", first) and 0 <= age < 60
  second = storage.replace_if_generation(url, b"c", first)
  with pytest.raises(storage.PreconditionFailed):
    storage.replace_if_generation(url, b"d", first)  # a stale writer loses
  storage.delete_if_generation(url, first)  # not its generation any more: left alone
  assert storage.read_with_generation(url)[0] == b"c"
  storage.delete_if_generation(url, second)
  assert storage.read_with_generation(url) is None


def test_local_copy_follows_the_objects_generation(gcs_bucket, tmp_path):
  url = f"{gcs_bucket}/vocab/spm.model"
  storage.path(url).write_bytes(b"v1")
  first = storage.local_copy(url)
  assert pathlib.Path(first).read_bytes() == b"v1"
  storage.path(url).write_bytes(b"v2")
  assert pathlib.Path(storage.local_copy(url)).read_bytes() == b"v2"
  assert storage.local_copy(tmp_path / "x") == str(tmp_path / "x")
  with pytest.raises(FileNotFoundError, match="no such object"):
    storage.local_copy(f"{gcs_bucket}/vocab/missing.model")


def test_a_mirror_uploads_changed_files_whole_and_resumes_from_them(gcs_bucket):
  folder = f"{gcs_bucket}/run"
  mirror = storage.Mirror(folder, ["metrics.jsonl", "tb"])
  (mirror.local / "metrics.jsonl").write_text("1\n")
  (mirror.local / "tb").mkdir()
  (mirror.local / "tb" / "events").write_bytes(b"e1")
  (mirror.local / "other").write_text("not mirrored")
  storage.path(f"{folder}/checkpoints/1/big").parent.mkdir(parents=True, exist_ok=True)
  storage.path(f"{folder}/checkpoints/1/big").write_bytes(b"not downloaded")
  mirror.sync()
  assert not storage.path(f"{folder}/other").exists()
  assert storage.path(f"{folder}/metrics.jsonl").read_text() == "1\n"
  with open(mirror.local / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write("2\n")
  mirror.close()
  assert storage.path(f"{folder}/metrics.jsonl").read_text() == "1\n2\n"
  assert not mirror.local.exists()
  again = storage.Mirror(folder, ["metrics.jsonl", "tb"])
  assert (again.local / "tb" / "events").read_bytes() == b"e1"
  assert sorted(p.name for p in again.local.iterdir()) == ["metrics.jsonl", "tb"]
  (again.local / "tb" / "events").unlink()
  again.close()
  assert not storage.path(f"{folder}/tb/events").exists()


def test_a_local_mirror_is_the_folder_itself(tmp_path):
  mirror = storage.Mirror(tmp_path, ["x"])
  assert mirror.local == tmp_path
  (tmp_path / "x").write_text("kept")
  mirror.close()
  assert (tmp_path / "x").read_text() == "kept"


def test_checks_name_the_url_and_the_cause(gcs_bucket, tmp_path):
  storage.check(read=[f"{gcs_bucket}/vocab.model", None, tmp_path],
                write=[f"{gcs_bucket}/runs/a"])
  with pytest.raises(storage.StorageError, match=r"^gs://nope-nope-nope/run: no such bucket$"):
    storage.check(write=["gs://nope-nope-nope/run"])


def test_an_unreachable_store_is_one_line(gcs_bucket, monkeypatch):
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # the discard port
  monkeypatch.setattr(storage, "CHECK_DEADLINE_S", 1.0)
  storage._client.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(storage.StorageError,
                       match=rf"^{gcs_bucket}/x: cannot reach http://127.0.0.1:9 "):
      storage.check(read=[f"{gcs_bucket}/x"])
  finally:
    monkeypatch.undo()
    storage._client.cache_clear()  # pylint: disable=protected-access


def test_no_credentials_is_one_line(monkeypatch, tmp_path):
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("NO_GCE_CHECK", "true")
  with pytest.raises(storage.StorageError, match=r"^gs://bucket-x/run: no Cloud Storage credentials"):
    storage.check(write=["gs://bucket-x/run"])
  assert os.listdir(tmp_path) == []
