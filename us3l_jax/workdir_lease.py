"""One run per workdir on object storage (``gs://``): a lease file with a heartbeat.

``workdir_lock``'s ``fcntl`` lock needs a file system and a kernel that releases it when its
process dies; a bucket has neither. There, process 0 keeps ``<workdir>/.us3l.lease``, a JSON
object naming the run holding the workdir (a random token, host, pid, start time) and a
heartbeat time it rewrites every ``heartbeat_s`` seconds from a background thread (default
60 s, ``US3L_LEASE_HEARTBEAT_S``).

* At start a run reads the lease. Another run's lease is *live*, and the run stops with one
  line naming its holder, unless it is *stale*: its heartbeat is older than ``stale_after_s``
  (default 600 s, ``US3L_LEASE_STALE_S``; a run killed with ``kill -9`` or a lost VM leaves
  such a lease), or it names a process on this host that no longer runs (a crash on the same
  VM is taken over at once). A stale lease is taken over with a warning.
* Taking it: write the lease, wait ``settle_s`` (2 s), read it back. A bucket has no
  exclusive create, so two runs starting together both write; the later write wins and the
  other run, reading back a lease that is not its own, stops. Reads after writes are
  consistent on Cloud Storage, so this holds unless the two writes are more than
  ``settle_s`` apart after both runs read the lease, which the checks below then catch.
* At every checkpoint (``check``) the run reads the lease again: if another run has taken it
  over (this run's heartbeats stopped long enough to look stale), this run stops before it
  writes, so two runs never write the same workdir for long.
* A run that ends (finished, preempted, failed) deletes its lease, so a rerun starts at once.

Clocks: staleness compares the writer's clock with the reader's; hosts on NTP (Cloud VMs)
agree to well under the 600 s default. Only process 0 takes the lease; other processes do
nothing (``enabled=False``), as with ``workdir_lock``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from us3l_jax import fileio, paths
from us3l_jax.errors import UsageError

log = logging.getLogger("us3l")

LEASE_FILE = ".us3l.lease"
STALE_ENV, HEARTBEAT_ENV = "US3L_LEASE_STALE_S", "US3L_LEASE_HEARTBEAT_S"
DEFAULT_STALE_AFTER_S = 600.0
DEFAULT_HEARTBEAT_S = 60.0
SETTLE_S = 2.0
# ``check`` runs at every log step and save; reading the lease more often than this gains
# nothing (a takeover needs ``stale_after`` seconds without heartbeats) and costs requests.
CHECK_EVERY_S = 10.0


class WorkdirLeaseError(UsageError):
    """Another live run holds the workdir's lease, or took it over from this run."""


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{name}={raw!r} must be a positive number of seconds")
    return value


def stale_after_s() -> float:
    """Seconds without a heartbeat after which a lease is taken over (``US3L_LEASE_STALE_S``)."""
    return _env_seconds(STALE_ENV, DEFAULT_STALE_AFTER_S)


def heartbeat_s() -> float:
    """Seconds between heartbeats (``US3L_LEASE_HEARTBEAT_S``)."""
    return _env_seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)


def read(path: str) -> dict[str, Any] | None:
    """The lease at ``path``; None if there is none. A lease that is not a JSON object with a
    ``run`` and a numeric ``heartbeat`` (written by hand, or by something else) reads as
    ``{"unreadable": <why>}``."""
    try:
        text = paths.read_text(path)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or not isinstance(record.get("run"), str) or \
                not isinstance(record.get("heartbeat"), (int, float)):
            raise ValueError("not a lease")
    except ValueError as e:
        return {"unreadable": f"{type(e).__name__}: {str(e)[:100]}"}
    return record


def describe(record: dict[str, Any], now: float) -> str:
    """``pid 12 on host h, heartbeat 30 s ago`` for messages."""
    if "unreadable" in record:
        return f"an unreadable lease ({record['unreadable']})"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, heartbeat "
            f"{now - float(record['heartbeat']):.0f} s ago")


def _process_ended(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def stale_reason(record: dict[str, Any], now: float, stale_after: float,
                 host: str | None = None) -> str | None:
    """Why another run's lease may be taken over, or None while it is live."""
    if "unreadable" in record:
        return f"it is unreadable ({record['unreadable']})"
    age = now - float(record["heartbeat"])
    if age > stale_after:
        return f"its last heartbeat was {age:.0f} s ago (more than {stale_after:.0f} s)"
    if record.get("host") == (host or socket.gethostname()) and _process_ended(
            record.get("pid")):
        return f"its process (pid {record.get('pid')} on this host) has ended"
    return None


class Lease:
    """The lease of one workdir, held by this process (see the module docstring)."""

    def __init__(self, workdir: str, *, stale_after: float | None = None,
                 heartbeat: float | None = None, settle_s: float = SETTLE_S,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.workdir = paths.absolute(workdir)
        self.path = paths.join(self.workdir, LEASE_FILE)
        self.stale_after = stale_after_s() if stale_after is None else stale_after
        self.heartbeat = heartbeat_s() if heartbeat is None else heartbeat
        if self.heartbeat > 0 and 2 * self.heartbeat > self.stale_after:
            raise UsageError(f"{HEARTBEAT_ENV}={self.heartbeat:g} must be at most half of "
                             f"{STALE_ENV}={self.stale_after:g}, or a live run looks stale")
        self.settle_s, self._clock, self._sleep = settle_s, clock, sleep
        self.token = uuid.uuid4().hex
        self.started = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: dict[str, Any] | None = None  # another run's lease seen by a heartbeat
        self._checked = -float("inf")  # clock time of the last check that read the lease

    def _record(self) -> dict[str, Any]:
        return {"run": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self.started, "heartbeat": self._clock(),
                "stale_after_s": self.stale_after}

    def _refuse(self, record: dict[str, Any], now: float) -> WorkdirLeaseError:
        left = self.stale_after - (now - float(record.get("heartbeat", now)))
        return WorkdirLeaseError(
            f"{self.workdir} is in use by another run ({describe(record, now)}; lease "
            f"{self.path}); wait for it to end or use another --workdir. If that run is dead, "
            f"its lease goes stale {max(left, 0):.0f} s from now ({STALE_ENV}="
            f"{self.stale_after:g}), or delete {self.path}")

    def acquire(self) -> None:
        """Takes the lease or raises ``WorkdirLeaseError`` naming the live holder."""
        now = self._clock()
        record = read(self.path)
        if record is not None and record.get("run") != self.token:
            why = stale_reason(record, now, self.stale_after)
            if why is None:
                raise self._refuse(record, now)
            log.warning("taking over the lease of %s from %s: %s", self.workdir,
                        describe(record, now), why)
        self.started = now
        fileio.atomic_write_text(self.path, json.dumps(self._record()))
        self._sleep(self.settle_s)
        record = read(self.path)
        if record is None or record.get("run") != self.token:
            raise WorkdirLeaseError(
                f"{self.workdir}: another run took the lease while this one started "
                f"({describe(record, self._clock()) if record else 'and removed it'}; lease "
                f"{self.path}); use another --workdir or start one run at a time")
        if self.heartbeat > 0:
            self._thread = threading.Thread(target=self._beat, name="us3l-lease-heartbeat",
                                            daemon=True)
            self._thread.start()

    def _renew(self, write: bool = True) -> None:
        """Reads the lease: remembers a takeover, or (``write``) rewrites the heartbeat if it
        is still ours."""
        with self._lock:
            if self._lost is not None:
                return
            record = read(self.path)
            if record is None or record.get("run") != self.token:
                self._lost = record or {"unreadable": "the lease was deleted"}
            elif write:
                fileio.atomic_write_text(self.path, json.dumps(self._record()))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._renew()
            except Exception as e:  # noqa: BLE001 - a network blip: the next beat retries
                log.warning("lease heartbeat for %s failed (%s: %s); retrying in %g s",
                            self.workdir, type(e).__name__, str(e)[:200], self.heartbeat)
            if self._lost is not None:
                return

    def check(self) -> None:
        """At a checkpoint (and log step): raises ``WorkdirLeaseError`` if another run has
        taken the lease. Reads it at most every ``CHECK_EVERY_S`` seconds; renews the heartbeat
        only where no heartbeat thread runs (the thread does that)."""
        now = self._clock()
        if self._lost is None and now - self._checked < CHECK_EVERY_S:
            return
        self._checked = now
        self._renew(write=self._thread is None)
        if self._lost is not None:
            now = self._clock()
            raise WorkdirLeaseError(
                f"{self.workdir} was taken over by another run ({describe(self._lost, now)}; "
                f"lease {self.path}) after this run's heartbeats stopped for more than "
                f"{self.stale_after:g} s; this run stops so that two runs never write one "
                f"workdir")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours (errors are logged:
        a failed delete leaves a lease that goes stale)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with self._lock:
                record = read(self.path)
                if record is not None and record.get("run") == self.token:
                    paths.remove(self.path, missing_ok=True)
        except Exception as e:  # noqa: BLE001 - never hide the error that ended the run
            log.warning("could not remove the lease %s (%s: %s); it goes stale in %g s",
                        self.path, type(e).__name__, str(e)[:200], self.stale_after)


_held: dict[str, list] = {}  # workdir -> [Lease, depth]


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True, **lease_options: Any) -> Iterator[Lease | None]:
    """Holds ``workdir``'s lease for the ``with`` block (re-entrant within a process, like
    ``workdir_lock.hold``); ``enabled=False`` (processes other than 0) does nothing.
    ``lease_options`` go to ``Lease`` (tests shorten the times)."""
    if not enabled:
        yield None
        return
    key = paths.absolute(workdir)
    if key in _held:
        _held[key][1] += 1
        try:
            yield _held[key][0]
        finally:
            _held[key][1] -= 1
        return
    lease = Lease(key, **lease_options)
    lease.acquire()
    _held[key] = [lease, 1]
    try:
        yield lease
    finally:
        del _held[key]
        lease.release()


def check(workdir: str) -> None:
    """``Lease.check`` for the lease this process holds on ``workdir``; nothing if it holds
    none (a local workdir, whose lock the kernel keeps, or a process other than 0)."""
    entry = _held.get(paths.absolute(workdir))
    if entry is not None:
        entry[0].check()
