"""One run per workdir: a second process is refused with the holder's pid and host; the lock
dies with its process (kill -9 leaves none behind); re-entrant within one process."""
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from us3l_jax import workdir_lock
from tests.helpers import REPO

HOLD = ("import sys, time; from us3l_jax import workdir_lock\n"
        "with workdir_lock.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")


def test_second_process_is_refused_until_the_holder_dies(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirLockedError,
                           match=rf"in use by another run \(pid {holder.pid} on host "
                                 rf"{socket.gethostname()}; lock "):
            with workdir_lock.hold(workdir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir_lock.hold(workdir):  # the kernel released it: no stale lock
        with workdir_lock.hold(workdir):  # re-entrant (main, then pretrain.train)
            pass
        assert f"pid {os.getpid()}" in open(os.path.join(workdir, workdir_lock.LOCK_FILE)).read()
    with workdir_lock.hold(str(tmp_path / "other"), enabled=False):
        assert not os.path.exists(tmp_path / "other")  # processes other than 0: no lock


@pytest.mark.parametrize("fault,detail", [
    ("delete", "it no longer exists"), ("rename", "it no longer exists"),
    ("replace", "it is now another directory")])
def test_check_notices_a_workdir_that_is_gone_or_replaced(tmp_path, fault, detail):
    workdir = str(tmp_path / "run")
    with workdir_lock.hold(workdir):
        workdir_lock.check(workdir, "at step 3")  # intact: nothing raised
        if fault == "delete":
            shutil.rmtree(workdir)
        elif fault == "rename":
            os.rename(workdir, str(tmp_path / "moved"))
        else:  # what an unmount looks like from the path: another directory there
            os.rename(workdir, str(tmp_path / "moved"))
            os.mkdir(workdir)
        with pytest.raises(workdir_lock.WorkdirLostError) as e:
            workdir_lock.check(workdir, "at step 3")
    assert str(e.value) == (f"the workdir {workdir} was deleted, renamed, replaced or unmounted "
                            f"during the run ({detail}); stopped at step 3 without writing "
                            f"anything more")
    assert os.path.exists(workdir) == (fault == "replace")  # nothing recreated


@pytest.mark.parametrize("fault", ["delete", "replace"])
def test_check_notices_a_deleted_or_replaced_lock(tmp_path, fault):
    workdir = str(tmp_path / "run")
    lock = os.path.join(workdir, workdir_lock.LOCK_FILE)
    with workdir_lock.hold(workdir):
        os.remove(lock)
        if fault == "replace":  # a second run creates a new lock file and takes it
            open(lock, "w").close()
        with pytest.raises(workdir_lock.WorkdirLostError,
                           match=rf"the workdir lock {lock} was deleted or replaced during the "
                                 rf"run, so another run may be using {workdir}; stopped at step "
                                 rf"5 without writing anything more"):
            workdir_lock.check(workdir, "at step 5")
    workdir_lock.check(str(tmp_path / "never_held"))  # not held here: nothing to check


def test_a_failed_start_leaves_no_workdir_behind(tmp_path):
    """A workdir the lock created and nobody wrote in (setup failed) is removed with its lock;
    one that existed before, or that holds anything else, stays as it was."""
    new = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with workdir_lock.hold(str(new)):
            assert os.listdir(new) == [workdir_lock.LOCK_FILE]
            raise RuntimeError("dataset not prepared")
    assert not new.exists() and (tmp_path / "new").is_dir()  # only the folder it made goes

    with workdir_lock.hold(str(new)):
        (new / "config.json").write_text("{}")
    assert sorted(os.listdir(new)) == [workdir_lock.LOCK_FILE, "config.json"]

    old = tmp_path / "old"
    old.mkdir()
    with workdir_lock.hold(str(old)):
        pass
    assert os.listdir(old) == [workdir_lock.LOCK_FILE]
