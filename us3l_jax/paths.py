"""Workdir paths on a local disk or in a cloud bucket (``gs://bucket/run``).

Everything a run keeps in its workdir goes through these functions (and ``fileio``'s writes
and checks, which call them for URLs); they take and return path strings: a local path uses
``os``, a URL goes through ``etils.epath``, the layer orbax and TFDS already use for buckets
(gcsfs, or TensorFlow's gfile where TensorFlow is installed).

Object storage is not a file system, and the functions hide the differences that matter here:

* there are no directories: ``makedirs`` is a no-op there, and a folder "exists" while an
  object lies below it;
* a write is an upload that becomes visible whole when it completes, so ``write_object``
  writes the final name directly (a temporary object and a rename would be a copy and a
  delete: slower and not atomic) and then checks the stored size;
* there is no append: ``append_text`` reads the object and writes it back longer;
* ``rename`` is a copy and a delete (not atomic): only use it where a half-moved folder is
  harmless (moving a corrupt checkpoint aside).

Only ``gs://`` is accepted as a URL (``SCHEMES``): it is the one orbax and the docs support.
"""
from __future__ import annotations

import importlib.util
import os
import posixpath
import time
from collections.abc import Iterator
from typing import IO

from etils import epath

SCHEMES = ("gs",)
# What a bucket workdir needs installed (the ``[gcs]`` spelling of docs/launch.md).
GCS_INSTALL = "pip install gcsfs google-cloud-storage"


def scheme(path: str | os.PathLike) -> str | None:
    """The URL scheme of ``path`` ("gs" for ``gs://b/x``), None for a local path."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head and "/" not in head else None


def is_local(path: str | os.PathLike) -> bool:
    """True for a path on this machine's file system, False for a URL such as ``gs://``."""
    return scheme(path) is None


def absolute(path: str | os.PathLike) -> str:
    """The path in the form kept for a run: local paths absolute (``~`` expanded), URLs with
    no doubled or trailing slashes (``gs://b//run/`` -> ``gs://b/run``)."""
    text = os.fspath(path)
    s = scheme(text)
    if s is None:
        return os.path.abspath(os.path.expanduser(text))
    rest = posixpath.normpath("/" + text.split("://", 1)[1]).lstrip("/")
    return f"{s}://{rest}" if rest != "." else f"{s}://"


def join(base: str | os.PathLike, *parts: str) -> str:
    """``os.path.join`` for local paths; ``/`` for URLs (also on Windows)."""
    base = os.fspath(base)
    return os.path.join(base, *parts) if is_local(base) else posixpath.join(base, *parts)


def as_epath(path: str | os.PathLike) -> epath.Path:
    return epath.Path(os.fspath(path))


def url_problem(path: str | os.PathLike) -> str | None:
    """Why URL ``path`` cannot be a workdir or report folder (None if it can), before any
    work: a scheme we support, a bucket that can be reached with the packages installed, and
    not an existing object. (``fileio.unusable_dir`` checks local paths, and calls this.)"""
    text = os.fspath(path)
    s = scheme(text)
    if s is None:
        raise ValueError(f"not a URL: {text}")
    if s not in SCHEMES:
        return (f"{s}:// is not supported; use a local path or "
                f"{', '.join(f'{x}://bucket/path' for x in SCHEMES)}")
    bucket = text.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        return f"no bucket named; use {s}://<bucket>/<path>"
    missing = missing_backend(text)
    if missing:
        return missing
    try:
        if not exists(f"{s}://{bucket}"):
            return f"bucket {s}://{bucket} does not exist or cannot be reached"
        if isfile(text):
            return "it exists and is an object (a file), not a folder"
    except Exception as e:  # noqa: BLE001 - no bucket, permission or network; gfile's
        # errors (TensorFlow installed) are not OSErrors
        return f"cannot reach it ({type(e).__name__}: {first_line(e)})"
    return None


def missing_backend(path: str | os.PathLike) -> str | None:
    """The install command a ``gs://`` path needs, or None when it can be reached: etils.epath
    reaches buckets through TensorFlow's gfile or fsspec's ``gcs`` protocol (gcsfs), and orbax
    lists a bucket's checkpoints with google-cloud-storage. Another implementation registered
    for the ``gcs`` protocol (a test's fake) is taken as it is."""
    if is_local(path):
        return None
    if importlib.util.find_spec("tensorflow") is not None:
        return None
    import fsspec
    try:
        cls = fsspec.get_filesystem_class("gcs")
    except (ImportError, ValueError):
        return f"reaching gs:// needs gcsfs and google-cloud-storage: {GCS_INSTALL}"
    if cls.__module__.startswith("gcsfs") and \
            importlib.util.find_spec("google.cloud.storage") is None:
        return f"orbax lists gs:// checkpoints with google-cloud-storage: {GCS_INSTALL}"
    return None


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error's text, at most ``limit`` characters (for one-line reports)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


def exists(path: str | os.PathLike) -> bool:
    """Whether anything is at ``path`` (locally a dangling symbolic link counts: a name that
    is taken)."""
    return os.path.lexists(path) if is_local(path) else as_epath(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) if is_local(path) else as_epath(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
    if is_local(path):
        return os.path.isfile(path)
    p = as_epath(path)
    return p.exists() and not p.is_dir()


def makedirs(path: str | os.PathLike) -> None:
    """Creates the folder and its parents if missing (on object storage: nothing to do but
    what the backend does)."""
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        as_epath(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in folder ``path``, sorted."""
    if is_local(path):
        return sorted(os.listdir(path))
    return sorted(p.name for p in as_epath(path).iterdir())


def read_bytes(path: str | os.PathLike) -> bytes:
    if is_local(path):
        with open(path, "rb") as f:
            return f.read()
    return as_epath(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_object(path: str | os.PathLike, data: bytes) -> None:
    """Writes URL ``path`` so that it holds either its old content or all of ``data``: one
    upload to the final name (object storage publishes an object only once it is complete; a
    temporary object and a rename would be a copy and a delete), then a check that the store
    holds ``len(data)`` bytes (``OSError`` if not). ``fileio.atomic_write_bytes`` calls this
    for URLs."""
    if is_local(path):
        raise ValueError(f"not a URL: {path} (use fileio.atomic_write_bytes)")
    p = as_epath(path)
    with p.open("wb") as f:
        f.write(data)
    stored = p.stat().length
    if stored is not None and stored != len(data):
        raise OSError(f"{path}: wrote {len(data)} bytes, the store holds {stored}")


def append_text(path: str | os.PathLike, text: str) -> None:
    """Adds ``text`` at the end of ``path`` (created if missing). Object storage has no
    append: the object is read and written back whole, so keep such files small or append
    rarely."""
    if is_local(path):
        with open(path, "a") as f:
            f.write(text)
        return
    old = read_bytes(path) if exists(path) else b""
    write_object(path, old + text.encode("utf-8"))


def remove(path: str | os.PathLike, missing_ok: bool = False) -> None:
    try:
        if is_local(path):
            os.remove(path)
        else:
            as_epath(path).unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def rename(src: str | os.PathLike, dst: str | os.PathLike, replace: bool = False) -> None:
    """Moves ``src`` to ``dst``: a file or folder to a ``dst`` that must not exist, or with
    ``replace`` a file over an existing one (``os.replace``). Atomic on a local file system;
    a copy and a delete on object storage."""
    if is_local(src) != is_local(dst):
        raise ValueError(f"cannot move {src} to {dst}: one is local, the other a URL")
    if is_local(src):
        (os.replace if replace else os.rename)(src, dst)
    elif replace:
        as_epath(src).replace(as_epath(dst))
    else:
        as_epath(src).rename(as_epath(dst))


def size(path: str | os.PathLike) -> int:
    if is_local(path):
        return os.path.getsize(path)
    return int(as_epath(path).stat().length)


def walk_files(root: str | os.PathLike) -> Iterator[str]:
    """Every file below folder ``root`` as a path relative to it (``/``-separated on object
    storage), in no particular order; nothing if ``root`` is missing."""
    root = os.fspath(root)
    if is_local(root):
        for d, _, files in os.walk(root):
            for name in files:
                yield os.path.relpath(os.path.join(d, name), root)
        return
    base = as_epath(root)
    if not base.exists():
        return
    # Backends name the folders they walk without the scheme (``bucket/run/x``).
    top = _key(base)
    for d, _, files in base.walk():
        for name in files:
            yield posixpath.relpath(posixpath.join(_key(d), name), top)


def _key(path: epath.Path) -> str:
    """``bucket/a/b`` for ``gs://bucket/a/b`` and for a backend's ``bucket/a/b``."""
    return str(path).split("://", 1)[-1].strip("/")


def open_read(path: str | os.PathLike) -> IO[bytes]:
    """``path`` opened for reading bytes (a stream: large checkpoint files are not loaded
    whole)."""
    return open(path, "rb") if is_local(path) else as_epath(path).open("rb")


class AppendFile:
    """A log file that only grows (``metrics.jsonl``, TensorBoard events), opened for
    appending. Locally an ordinary file in append mode. On object storage, which has no
    append, the whole content is kept and uploaded again at ``flush``, at most every
    ``min_interval_s`` seconds (a log line per step must not mean an upload per step), and
    always at ``close``; a crash loses at most that interval of lines."""

    def __init__(self, path: str | os.PathLike, binary: bool = False,
                 min_interval_s: float = 30.0):
        self.path, self.binary = os.fspath(path), binary
        self.min_interval_s = min_interval_s
        self._local = open(self.path, "ab" if binary else "a") if is_local(self.path) \
            else None
        if self._local is None:
            self._data = bytearray(read_bytes(self.path) if exists(self.path) else b"")
            self._uploaded = len(self._data)
            self._last = time.monotonic()
        self.closed = False

    def write(self, data: str | bytes) -> int:
        if self._local is not None:
            return self._local.write(data)
        self._data += data if isinstance(data, bytes) else data.encode("utf-8")
        return len(data)

    def flush(self, force: bool = False) -> None:
        if self._local is not None:
            self._local.flush()
            return
        due = force or time.monotonic() - self._last >= self.min_interval_s
        if due and len(self._data) != self._uploaded:
            write_object(self.path, bytes(self._data))
            self._uploaded, self._last = len(self._data), time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        if self._local is not None:
            self._local.close()
        else:
            self.flush(force=True)
        self.closed = True

    def __enter__(self) -> "AppendFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tensorboard_on_buckets(min_interval_s: float = 30.0) -> None:
    """Lets tensorboardX write ``gs://`` event files through etils.epath (``AppendFile``)
    instead of its own google-cloud-storage writer, which re-uploads the whole file at every
    flush and cannot reach a bucket that only epath knows. Idempotent."""
    from tensorboardX import record_writer

    class Factory:
        def open(self, path: str) -> AppendFile:
            return AppendFile(path, binary=True, min_interval_s=min_interval_s)

        def directory_check(self, path: str) -> None:
            pass  # a bucket has no folders to create

    for s in SCHEMES:
        record_writer.register_writer_factory(s, Factory())
