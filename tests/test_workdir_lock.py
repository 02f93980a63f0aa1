"""One run per workdir: a second process is refused with the holder's pid and host; the lock
dies with its process (kill -9 leaves none behind); re-entrant within one process."""
import os
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
