"""The lease that keeps one run per bucket workdir: a live lease refuses a second run in one
line, a stale one (old heartbeat, or a dead process on this host) is taken over, a takeover
stops the old holder at its next check, a finished run removes its lease. Each test runs on a
local folder and on the fake gs:// (tests/fake_gcs.py)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from us3l_jax import fileio, paths, workdir_lease
from us3l_jax.errors import UsageError
from tests.fake_gcs import bucket, local_or_gs  # noqa: F401 - fixtures


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def lease(workdir, clock, **kw):
    kw = {"stale_after": 600.0, "heartbeat": 0, "settle_s": 0, "clock": clock, **kw}
    return workdir_lease.Lease(workdir, **kw)


def read(workdir):
    return workdir_lease.read(paths.join(workdir, workdir_lease.LEASE_FILE))


def test_live_lease_refuses_a_second_run_in_one_line(local_or_gs):
    workdir = local_or_gs
    clock = Clock()
    first = lease(workdir, clock)
    first.acquire()
    record = read(workdir)
    assert record["run"] == first.token and record["pid"] == os.getpid()
    assert record["host"] == socket.gethostname() and record["heartbeat"] == clock.t
    clock.t += 100
    with pytest.raises(workdir_lease.WorkdirLeaseError) as e:
        lease(workdir, clock).acquire()
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, UsageError)
    assert msg == (
        f"{paths.absolute(workdir)} is in use by another run (pid {os.getpid()} on host "
        f"{socket.gethostname()}, heartbeat 100 s ago; lease {first.path}); wait for it to end "
        f"or use another --workdir. If that run is dead, its lease goes stale 500 s from now "
        f"(US3L_LEASE_STALE_S=600), or delete {first.path}")
    assert read(workdir)["run"] == first.token  # the refused run wrote nothing
    first.release()
    assert read(workdir) is None


def test_stale_lease_is_taken_over_and_the_old_holder_stops_at_its_check(local_or_gs,
                                                                       caplog):
    workdir = local_or_gs
    clock = Clock()
    old = lease(workdir, clock)
    old.acquire()
    clock.t += 601  # no heartbeat for longer than stale_after (e.g. the VM was lost)
    new = lease(workdir, clock)
    with caplog.at_level("WARNING", logger="us3l"):
        new.acquire()
    assert "its last heartbeat was 601 s ago (more than 600 s)" in caplog.text
    assert read(workdir)["run"] == new.token
    with pytest.raises(workdir_lease.WorkdirLeaseError, match=r"was taken over by another "
                       r"run \(pid \d+ on host .*, heartbeat 0 s ago; lease .*\) after this "
                       r"run's heartbeats stopped for more than 600 s"):
        old.check()
    old.release()  # not its lease any more: left in place
    assert read(workdir)["run"] == new.token
    clock.t += 5
    new.check()  # still ours; without a heartbeat thread the check renews it
    assert read(workdir)["heartbeat"] == clock.t
    clock.t += 5
    new.check()  # the lease is read at most every CHECK_EVERY_S: not now
    assert read(workdir)["heartbeat"] == clock.t - 5
    clock.t += workdir_lease.CHECK_EVERY_S
    new.check()
    assert read(workdir)["heartbeat"] == clock.t


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(local_or_gs):
    workdir = local_or_gs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    clock = Clock()
    fileio.atomic_write_text(paths.join(workdir, workdir_lease.LEASE_FILE), json.dumps(
        {"run": "killed-run", "host": socket.gethostname(), "pid": dead.pid,
         "started": clock.t, "heartbeat": clock.t}))
    new = lease(workdir, clock)
    new.acquire()  # heartbeat 0 s old, but its process is gone
    assert read(workdir)["run"] == new.token
    # The same record from another host is live: its process cannot be checked from here.
    fileio.atomic_write_text(new.path, json.dumps({"run": "other", "host": "elsewhere",
                                           "pid": dead.pid, "heartbeat": clock.t}))
    with pytest.raises(workdir_lease.WorkdirLeaseError, match="pid .* on host elsewhere"):
        lease(workdir, clock).acquire()


def test_unreadable_lease_is_taken_over(local_or_gs):
    workdir = local_or_gs
    fileio.atomic_write_text(paths.join(workdir, workdir_lease.LEASE_FILE), "not json")
    clock = Clock()
    new = lease(workdir, clock)
    new.acquire()
    assert read(workdir)["run"] == new.token


def test_two_runs_starting_together_the_later_write_wins(local_or_gs):
    """Both read no lease and write theirs; the one whose write was overwritten sees it when
    it reads back after settling, and stops."""
    workdir = local_or_gs
    clock = Clock()
    path = paths.join(workdir, workdir_lease.LEASE_FILE)
    # The other run read no lease too, and its write lands while this one settles.
    other = {"run": "other-run", "host": "worker-1", "pid": 7, "heartbeat": clock.t}
    first = lease(workdir, clock, settle_s=1.0,
                  sleep=lambda s: fileio.atomic_write_text(path, json.dumps(other)))
    with pytest.raises(workdir_lease.WorkdirLeaseError,
                       match=r"another run took the lease while this one started \(pid 7 on "
                             r"host worker-1, heartbeat 0 s ago; lease "):
        first.acquire()
    assert read(workdir)["run"] == "other-run"  # left to the run that won


def test_hold_is_reentrant_releases_and_does_nothing_off_process_0(local_or_gs):
    workdir = local_or_gs
    with workdir_lease.hold(workdir, heartbeat=0, settle_s=0) as held:
        with workdir_lease.hold(workdir) as again:  # main, then pretrain.train
            assert again is held
        workdir_lease.check(workdir)
        assert read(workdir)["run"] == held.token
    assert read(workdir) is None  # a rerun starts at once
    workdir_lease.check(workdir)  # holds none: nothing to check
    with workdir_lease.hold(workdir, enabled=False) as none:
        assert none is None and read(workdir) is None


def test_heartbeat_thread_renews_the_lease(local_or_gs):
    workdir = local_or_gs
    with workdir_lease.hold(workdir, heartbeat=0.05, stale_after=1.0, settle_s=0) as held:
        first = read(workdir)["heartbeat"]
        deadline = time.time() + 20
        while read(workdir)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert read(workdir)["heartbeat"] > first and read(workdir)["run"] == held.token
    assert read(workdir) is None


@pytest.mark.parametrize("env,value,msg", [
    ("US3L_LEASE_STALE_S", "soon", "US3L_LEASE_STALE_S='soon' must be a positive number"),
    ("US3L_LEASE_STALE_S", "0", "US3L_LEASE_STALE_S='0' must be a positive number"),
    ("US3L_LEASE_HEARTBEAT_S", "400", "US3L_LEASE_HEARTBEAT_S=400 must be at most half of "
                                      "US3L_LEASE_STALE_S=600"),
])
def test_bad_timeouts_are_refused(monkeypatch, tmp_path, env, value, msg):
    monkeypatch.setenv(env, value)
    with pytest.raises(UsageError, match=msg):
        workdir_lease.Lease(str(tmp_path))


def test_timeouts_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("US3L_LEASE_STALE_S", "120")
    monkeypatch.setenv("US3L_LEASE_HEARTBEAT_S", "10")
    held = workdir_lease.Lease(str(tmp_path))
    assert (held.stale_after, held.heartbeat) == (120.0, 10.0)
    monkeypatch.delenv("US3L_LEASE_STALE_S")
    monkeypatch.delenv("US3L_LEASE_HEARTBEAT_S")
    held = workdir_lease.Lease(str(tmp_path))
    assert (held.stale_after, held.heartbeat) == (600.0, 60.0)
