"""Atomic file writes: a file is either complete or absent (never half-written).

Files get the mode an ordinary ``open(path, "w")`` would give them (0666 less the umask, so
0644 under the usual 022): results on a shared machine stay readable by others. ``mkstemp``
alone would leave them 0600.
"""
from __future__ import annotations

import os
import tempfile
import threading

from us3l_jax import paths

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read by setting and restoring it; the lock keeps our own threads
    from seeing the transient value)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


_VIRTUAL_FS = ("/proc", "/sys", "/dev")


def unusable_dir(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be (or become) a directory we write into, or None if it can: it is
    a file, lies under /proc, /sys or /dev, or its nearest existing ancestor is not a
    writable directory. Checked before any work so a bad path fails at once. A URL
    (``gs://bucket/run``) is checked by ``paths.url_problem``."""
    if not paths.is_local(path):
        return paths.url_problem(path)
    path = os.path.abspath(os.fspath(path))
    real = os.path.realpath(path)
    if any(real == v or real.startswith(v + "/") for v in _VIRTUAL_FS):
        return f"{real} is on a virtual file system ({real.split('/')[1]}), not a place to write"
    if os.path.lexists(path) and not os.path.isdir(path):
        return "it exists and is a file, not a directory"
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, so no directory can be created below it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file in the same directory, fsync and a
    rename; on any failure the previous file (if any) is untouched and no temporary remains.
    A URL (``gs://``) is written by ``paths.write_object``: one whole upload."""
    path = os.fspath(path)
    if not paths.is_local(path):
        paths.write_object(path, data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), default_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
