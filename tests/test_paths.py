"""Workdir paths behave alike on a local disk and in a bucket (the fake gs:// of
tests/fake_gcs.py, which keeps object storage's rules: no directories, whole uploads, no
append, rename as copy + delete)."""
import os

import fsspec
import pytest

from us3l_jax import fileio, paths
from tests import fake_gcs
from tests.fake_gcs import bucket, local_or_gs  # noqa: F401 - fixtures


def test_scheme_and_absolute():
    assert paths.scheme("gs://b/x") == "gs" and paths.scheme("/tmp/x") is None
    assert paths.scheme("./a://b") is None  # a local name that contains ://
    assert paths.is_local("runs/x") and not paths.is_local("gs://b/x")
    assert paths.absolute("gs://b//run/") == "gs://b/run"
    assert paths.absolute("gs://b/run/../other") == "gs://b/other"
    assert paths.absolute("runs/x") == os.path.join(os.getcwd(), "runs", "x")
    assert paths.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert paths.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"


def test_write_read_append_list_walk_rename_remove(local_or_gs):
    base = local_or_gs
    assert not paths.exists(base) and not paths.isdir(base)
    paths.makedirs(base)
    f = paths.join(base, "config.json")
    fileio.atomic_write_text(f, '{"a": 1}')
    fileio.atomic_write_text(f, '{"a": 2}')  # replaced whole
    assert paths.read_text(f) == '{"a": 2}' and paths.size(f) == 8
    assert paths.isfile(f) and not paths.isdir(f) and paths.isdir(base)
    m = paths.join(base, "metrics.jsonl")
    for i in range(3):
        paths.append_text(m, f"{i}\n")
    assert paths.read_text(m) == "0\n1\n2\n"
    fileio.atomic_write_bytes(paths.join(base, "ck", "3", "state", "d", "x"), b"\x00\x01\x02")
    fileio.atomic_write_bytes(paths.join(base, "ck", "3", "meta"), b"{}")
    assert paths.listdir(base) == ["ck", "config.json", "metrics.jsonl"]
    assert sorted(paths.walk_files(paths.join(base, "ck"))) == [
        os.path.join("3", "meta"), os.path.join("3", "state", "d", "x")]
    assert list(paths.walk_files(paths.join(base, "missing"))) == []
    paths.rename(paths.join(base, "ck", "3"), paths.join(base, "ck", "corrupt-3"))
    assert paths.listdir(paths.join(base, "ck")) == ["corrupt-3"]
    assert paths.read_bytes(paths.join(base, "ck", "corrupt-3", "state", "d", "x")) == \
        b"\x00\x01\x02"
    paths.remove(m)
    paths.remove(m, missing_ok=True)
    with pytest.raises(FileNotFoundError):
        paths.remove(m)
    with pytest.raises(FileNotFoundError):
        paths.read_text(m)


def test_a_bucket_has_no_directories(bucket):
    """mkdir creates nothing; a folder exists while an object lies below it."""
    folder = bucket + "/run/eval"
    paths.makedirs(folder)
    assert not paths.exists(folder)
    fileio.atomic_write_text(folder + "/sweep.json", "[]")
    assert paths.isdir(folder) and paths.isdir(bucket + "/run")
    paths.remove(folder + "/sweep.json")
    assert not paths.exists(folder) and not paths.exists(bucket + "/run")


def test_fake_uploads_whole_and_refuses_append(bucket, tmp_path):
    fs = fsspec.filesystem("gcs")
    f = fs.open(bucket + "/obj", "wb")
    f.write(b"half")
    assert not paths.exists(bucket + "/obj")  # not visible before the upload completes
    f.close()
    assert paths.read_bytes(bucket + "/obj") == b"half"
    with pytest.raises(NotImplementedError, match="no mode 'ab'"):
        fs.open(bucket + "/obj", "ab")
    assert fake_gcs.objects(str(tmp_path / "fake_gcs"), "test-bucket") == ["obj"]


def test_unusable_dir_for_urls(bucket):
    assert fileio.unusable_dir(bucket + "/run") is None
    fileio.atomic_write_text(bucket + "/file", "x")
    assert fileio.unusable_dir(bucket + "/file") == \
        "it exists and is an object (a file), not a folder"
    assert fileio.unusable_dir("gs://no-such-bucket/run") == \
        "bucket gs://no-such-bucket does not exist or cannot be reached"
    assert fileio.unusable_dir("gs:///run") == "no bucket named; use gs://<bucket>/<path>"
    assert fileio.unusable_dir("s3://b/run") == \
        "s3:// is not supported; use a local path or gs://bucket/path"


def test_missing_backend_names_the_install(monkeypatch):
    """Without TensorFlow, gcsfs or another gcs implementation, a gs:// workdir is refused
    with the pip command, before any work."""
    import importlib.util
    real_find_spec = importlib.util.find_spec

    def no_gcs(name):
        raise ImportError("Install gcsfs to access Google Storage")
    monkeypatch.setattr(fsspec, "get_filesystem_class", no_gcs)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else
                        real_find_spec(name, *a))
    msg = fileio.unusable_dir("gs://b/run")
    assert msg == "reaching gs:// needs gcsfs and google-cloud-storage: " + paths.GCS_INSTALL
    assert paths.missing_backend("/tmp/x") is None


def test_append_file_uploads_at_most_every_interval_and_at_close(local_or_gs, monkeypatch):
    """A log file in a bucket is uploaded whole (no append there), at most every
    ``min_interval_s`` and always at close; locally it is an ordinary appended file."""
    path = paths.join(local_or_gs, "metrics.jsonl")
    fileio.atomic_write_text(path, "0\n")  # an earlier run's lines are kept
    clock = [100.0]
    monkeypatch.setattr(paths.time, "monotonic", lambda: clock[0])
    f = paths.AppendFile(path, min_interval_s=30)
    f.write("1\n")
    f.flush()
    remote = not paths.is_local(path)
    assert paths.read_text(path) == ("0\n" if remote else "0\n1\n")  # 0 s since opening
    clock[0] += 31
    f.write("2\n")
    f.flush()
    assert paths.read_text(path) == "0\n1\n2\n"
    f.write("3\n")
    f.flush()
    assert paths.read_text(path) == ("0\n1\n2\n" if remote else "0\n1\n2\n3\n")
    f.close()
    assert paths.read_text(path) == "0\n1\n2\n3\n"
    f.close()  # idempotent


def test_rename_with_replace_overwrites_a_file(local_or_gs):
    a, b = paths.join(local_or_gs, "config.json"), paths.join(local_or_gs, "old.json")
    fileio.atomic_write_text(a, "new")
    fileio.atomic_write_text(b, "old")
    paths.rename(a, b, replace=True)
    assert paths.read_text(b) == "new" and not paths.exists(a)
    with pytest.raises(ValueError, match="one is local, the other a URL"):
        paths.rename("/tmp/x", "gs://b/x")
