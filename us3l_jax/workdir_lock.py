"""One run per workdir: an OS lock on ``<workdir>/.us3l.lock``.

``fcntl.flock`` is released by the kernel when its process ends, however it ends, so
``kill -9`` never leaves a stale lock behind. The file holds the holder's pid and host for the
message a second run prints. On several hosts only process 0 takes it (they share the
workdir). Re-entrant within one process: ``main`` holds it around pretraining and the final
sweep, and ``pretrain.train`` takes it again when called directly (notebooks, tests).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

LOCK_FILE = ".us3l.lock"
_held: dict[str, list] = {}  # path -> [file object, depth]


class WorkdirLockedError(RuntimeError):
    """Another live process is running in this workdir."""


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Holds the workdir's lock (creating the workdir) for the ``with`` block; raises
    ``WorkdirLockedError`` naming the holder if another process has it, ``OSError`` if the
    workdir cannot be created. ``enabled=False`` (processes other than 0) does nothing."""
    if not enabled:
        yield
        return
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "an unknown process"
        f.close()
        raise WorkdirLockedError(
            f"{os.path.dirname(path)} is in use by another run ({holder}; lock {path}); wait "
            f"for it to end or use another --workdir") from None
    except BaseException:
        f.close()
        raise
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    _held[path] = [f, 1]
    try:
        yield
    finally:
        del _held[path]
        f.close()  # releases the lock; the file stays (removing it would race a new holder)
