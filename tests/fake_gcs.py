"""A fake ``gs://`` for tests: Google Cloud Storage's semantics on a local folder, offline.

``etils.epath`` reaches ``gs://`` through fsspec's ``gcs`` protocol when TensorFlow is not
installed (gcsfs in production). ``install(root)`` registers ``FakeGCS`` under that protocol,
so every ``epath.Path("gs://bucket/x")`` in the package, orbax's directory operations
included, reads and writes ``<root>/bucket/x``. It behaves as an object store, not as a file
system, where the difference could hide a bug:

* there are no directories: ``mkdir`` does nothing, and a "directory" exists while an object
  lies below it (a bucket exists when its folder was made by ``make_bucket``);
* an object appears whole when its writer closes (it is uploaded at close), never in part;
* there is no append (``open(..., "a")`` fails, as gcsfs refuses it);
* rename is copy then delete (two steps, not atomic).

orbax writes array data through tensorstore, whose GCS driver speaks HTTP to Google; there is
no public hook to redirect it, so ``install`` points orbax's GCS key-value store spec at the
same local folder (tensorstore's ``file`` driver) and answers orbax's "hierarchical namespace?"
question (a bucket metadata call) with no. Everything else orbax does for ``gs://`` (commit
files instead of renames, GCS deletion) runs as it would against a bucket. What this cannot
test: tensorstore's GCS driver itself, credentials, and network errors.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

PROTOCOLS = ("gs", "gcs")


class FakeGCS(AbstractFileSystem):
    """fsspec file system for ``gs://`` over ``FakeGCS.root`` (see the module docstring)."""

    protocol = PROTOCOLS
    root: str | None = None  # set by ``install``
    cachable = False

    def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close, ...) ignored
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path) -> str:
        path = os.fspath(path) if not isinstance(path, str) else path
        for p in ("gs://", "gcs://"):
            path = path.removeprefix(p)
        return path.rstrip("/")

    def _local(self, path) -> str:
        if self.root is None:
            raise RuntimeError("the fake gs:// is not installed (tests.fake_gcs.install)")
        key = self._strip_protocol(path)
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not an object name: {path!r}")
        bucket = key.split("/")[0]
        if not os.path.isdir(os.path.join(self.root, bucket)):
            raise FileNotFoundError(f"no bucket gs://{bucket}")
        return os.path.join(self.root, key)

    @staticmethod
    def _holds_objects(local: str) -> bool:
        return any(files for _, _, files in os.walk(local))

    def info(self, path, **kwargs):
        key = self._strip_protocol(path)
        local = self._local(path)
        if os.path.isfile(local):
            st = os.stat(local)
            return {"name": key, "size": st.st_size, "type": "file", "mtime": st.st_mtime}
        if os.path.isdir(local) and ("/" not in key or self._holds_objects(local)):
            return {"name": key, "size": 0, "type": "directory"}
        raise FileNotFoundError(f"gs://{key}")

    def ls(self, path, detail=True, **kwargs):
        key = self._strip_protocol(path)
        entry = self.info(path)
        if entry["type"] == "file":
            out = [entry]
        else:
            local = self._local(path)
            out = []
            for name in sorted(os.listdir(local)):
                try:
                    out.append(self.info(f"{key}/{name}"))
                except FileNotFoundError:  # an empty folder: no object, not listed
                    pass
        return out if detail else [e["name"] for e in out]

    def makedirs(self, path, exist_ok=False):
        self._local(path)  # the bucket must exist; below it there is nothing to create

    def mkdir(self, path, create_parents=True, **kwargs):
        self._local(path)

    def rmdir(self, path):
        pass

    def _prune(self, local: str) -> None:
        """Removes the empty folders a deletion leaves (no object, no directory)."""
        parent = os.path.dirname(local)
        while (os.path.abspath(os.path.dirname(parent)) != os.path.abspath(self.root)
               and os.path.isdir(parent) and not os.listdir(parent)):
            os.rmdir(parent)
            parent = os.path.dirname(parent)

    def rm_file(self, path):
        local = self._local(path)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"gs://{self._strip_protocol(path)}")
        os.remove(local)
        self._prune(local)

    def _rm(self, path):
        self.rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        paths = [path] if isinstance(path, str) else list(path)
        for p in paths:
            local = self._local(p)
            if os.path.isdir(local):
                if not recursive:
                    raise IsADirectoryError(p)
                shutil.rmtree(local)
                self._prune(local)
            else:
                self.rm_file(p)

    def cp_file(self, path1, path2, **kwargs):
        src, dst = self._local(path1), self._local(path2)
        if os.path.isdir(src):
            return  # a folder is no object: the objects below it are copied one by one
        with open(src, "rb") as f:
            data = f.read()
        _publish(dst, data)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
              **kwargs):
        local = self._local(path)
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"object storage has no mode {mode!r} (gs://"
                                      f"{self._strip_protocol(path)})")
        if "r" in mode:
            if not os.path.isfile(local):
                raise FileNotFoundError(f"gs://{self._strip_protocol(path)}")
            return open(local, "rb")
        if "x" in mode and os.path.exists(local):
            raise FileExistsError(f"gs://{self._strip_protocol(path)}")
        return _Upload(local)

    def created(self, path):
        return self.modified(path)

    def modified(self, path):
        import datetime
        return datetime.datetime.fromtimestamp(os.path.getmtime(self._local(path)))


def _publish(local: str, data: bytes) -> None:
    """Makes an object visible whole: a temporary file beside it, then a rename."""
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), prefix=".upload-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, local)


class _Upload(io.BytesIO):
    """A write to an object: nothing is visible until ``close`` uploads it whole."""

    def __init__(self, local: str):
        super().__init__()
        self._target = local

    def close(self) -> None:
        if not self.closed:
            _publish(self._target, self.getvalue())
        super().close()


def make_bucket(root: str, bucket: str) -> str:
    """Creates bucket ``bucket`` under ``root``; returns ``gs://<bucket>``."""
    os.makedirs(os.path.join(root, bucket), exist_ok=True)
    return f"gs://{bucket}"


@contextlib.contextmanager
def install(root: str) -> Iterator[None]:
    """Serves ``gs://`` from ``root`` for the ``with`` block (see the module docstring)."""
    from etils.epath import gpath
    from orbax.checkpoint._src.path import gcs_utils  # no public hook for these two

    def kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(FakeGCS.root, bucket, key)}

    saved = (gcs_utils.get_kvstore_for_gcs, gcs_utils.is_hierarchical_namespace_enabled,
             FakeGCS.root, os.environ.get("EPATH_USE_TF"))
    # With TensorFlow installed, epath sends gs:// to TensorFlow's gfile, which would try the
    # real Google Cloud Storage: this switch (read by epath, inherited by subprocesses) keeps
    # it on fsspec, where the fake is registered.
    os.environ["EPATH_USE_TF"] = "false"
    gpath._is_tf_installed.cache_clear()
    for name in PROTOCOLS:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    FakeGCS.root = root
    gcs_utils.get_kvstore_for_gcs = kvstore
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
    try:
        yield
    finally:
        (gcs_utils.get_kvstore_for_gcs, gcs_utils.is_hierarchical_namespace_enabled,
         FakeGCS.root, use_tf) = saved
        if use_tf is None:
            os.environ.pop("EPATH_USE_TF", None)
        else:
            os.environ["EPATH_USE_TF"] = use_tf
        gpath._is_tf_installed.cache_clear()


def objects(root: str, bucket: str) -> list[str]:
    """Every object name in ``bucket`` (sorted), for assertions."""
    base = os.path.join(root, bucket)
    return sorted(os.path.relpath(os.path.join(d, f), base)
                  for d, _, files in os.walk(base) for f in files
                  if not f.startswith(".upload-"))



@pytest.fixture
def bucket(tmp_path) -> Iterator[str]:
    """A fresh fake bucket, ``gs://test-bucket``, served for one test (import this fixture
    into a test module to use it)."""
    root = str(tmp_path / "fake_gcs")
    url = make_bucket(root, "test-bucket")
    with install(root):
        yield url


@pytest.fixture(params=["local", "gs"])
def local_or_gs(request, tmp_path) -> str:
    """A folder that does not exist yet, once on the local disk (``<tmp>/run``) and once in
    the fake bucket (``gs://test-bucket/run``)."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("bucket") + "/run"
