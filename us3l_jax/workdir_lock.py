"""One run per workdir: an OS lock on ``<workdir>/.us3l.lock``.

``fcntl.flock`` is released by the kernel when its process ends, however it ends, so
``kill -9`` never leaves a stale lock behind. The file holds the holder's pid and host for the
message a second run prints. On several hosts only process 0 takes it (they share the
workdir). Re-entrant within one process: ``main`` holds it around pretraining and the final
sweep, and ``pretrain.train`` takes it again when called directly (notebooks, tests).

``check`` tells whether the run still owns its workdir: the directory at the workdir's path
must be the one the lock was taken in (same device and inode: not deleted, renamed, replaced
or unmounted), and the lock file at its path must be the file this process holds (not deleted
or replaced, which would let a second run take a new lock and train beside this one).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

from us3l_jax import paths, workdir_lease

LOCK_FILE = ".us3l.lock"
_held: dict[str, list] = {}  # lock path -> [file object, depth, (st_dev, st_ino) of workdir]


class WorkdirLockedError(RuntimeError):
    """Another live process is running in this workdir."""


class WorkdirLostError(RuntimeError):
    """The workdir or its lock was deleted, renamed, replaced or unmounted during the run; the
    run must stop without writing anything more (exit 4 in the command line)."""


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def check(workdir: str, when: str = "") -> None:
    """Raises ``WorkdirLostError`` if ``workdir`` is no longer the directory whose lock this
    process holds, or its lock file is no longer the held one. ``when`` (e.g. "at step 12")
    goes into the message. Does nothing where the lock is not held (processes other than 0).
    A bucket workdir (``gs://``) checks its lease instead (``workdir_lease.check``)."""
    if not paths.is_local(workdir):
        try:
            workdir_lease.check(workdir)
        except workdir_lease.WorkdirLeaseError as e:
            raise WorkdirLostError(f"{e}{' (' + when + ')' if when else ''}") from None
        return
    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    if path not in _held:
        return
    f, _, want = _held[path]
    stop = f"stopped{' ' + when if when else ''} without writing anything more"
    try:
        got = _identity(workdir)
    except OSError:
        got = None
    if got != want:
        detail = "it no longer exists" if got is None else "it is now another directory"
        raise WorkdirLostError(f"the workdir {workdir} was deleted, renamed, replaced or "
                               f"unmounted during the run ({detail}); {stop}")
    try:
        same = _identity(path) == _identity_of_fd(f.fileno())
    except OSError:
        same = False
    if not same:
        raise WorkdirLostError(f"the workdir lock {path} was deleted or replaced during the "
                               f"run, so another run may be using {workdir}; {stop}")


def _identity_of_fd(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Holds the workdir's lock (creating the workdir, and removing it again if nothing but
    the lock was written in it) for the ``with`` block; raises
    ``WorkdirLockedError`` naming the holder if another process has it, ``OSError`` if the
    workdir cannot be created. ``enabled=False`` (processes other than 0) does nothing.
    A bucket workdir (``gs://``), where no OS lock exists, gets a lease instead
    (``workdir_lease``, whose refusal is a ``UsageError``)."""
    if not enabled:
        yield
        return
    if not paths.is_local(workdir):
        with workdir_lease.hold(workdir):
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
    created = not os.path.exists(os.path.dirname(path))
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
    try:
        _held[path] = [f, 1, _identity(os.path.dirname(path))]
    except BaseException:
        f.close()
        raise
    try:
        yield
    finally:
        del _held[path]
        if created:
            _remove_if_unused(path)
        f.close()  # releases the lock; the file stays (removing it would race a new holder)


def _remove_if_unused(path: str) -> None:
    """A workdir this lock created and that holds nothing but the lock file (a run that
    stopped in setup, e.g. on an unprepared dataset) is removed, so a failed start leaves no
    trace. Done while the lock is still held: a second run that opened the old file gets its
    lock only after the directory is gone, and then stops (its workdir no longer exists)."""
    workdir = os.path.dirname(path)
    try:
        if os.listdir(workdir) != [LOCK_FILE]:
            return
        os.unlink(path)
        os.rmdir(workdir)  # fails (and is ignored) if something appeared meanwhile
    except OSError:
        pass
