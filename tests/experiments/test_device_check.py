"""experiments/device_check.py: its CPU path (install into a private folder, versions, the
timed-out and failed test step), the command runner's time limit, and the trace tables on a
synthetic profiler trace."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_experiment

dc = load_experiment("device_check")
SCRIPT = os.path.join(REPO, "experiments", "device_check.py")


def test_cpu_path_installs_and_reports_versions(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--smoke", "--skip",
                           "tests,bench,torch,profile"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "device_check.json").read_text())
    steps = summary["steps"]
    assert steps["install"]["status"] == "ok", steps["install"]
    assert steps["install"]["imports"] is True
    # The installed copy, not the checkout, is what the import check loaded.
    site = steps["install"]["site"]
    assert os.path.isfile(os.path.join(site, "us3l_jax", "slim.py"))
    v = steps["versions"]
    assert v["status"] == "ok" and v["backend"] == "cpu"
    assert v["packages"]["jax"] and v["packages"]["flax"] and v["python"].count(".") == 2
    for name in ("tests", "bench", "torch", "profile"):
        assert steps[name] == {"status": "skipped", "reason": "--skip"}
    assert "ab" not in steps  # only with --before
    assert (out / "device_check.log").read_text().count("==== ") == 3


def test_run_cmd_stops_at_its_limit(tmp_path):
    log = dc.Log(str(tmp_path / "log"))
    r = dc.run_cmd(log, [sys.executable, "-c", "import time; print('hi', flush=True); "
                         "time.sleep(30)"], 1.0)
    assert r["timed_out"] and r["rc"] is None and r["seconds"] < 10
    assert r["tail"] == ["hi"]
    r = dc.run_cmd(log, [sys.executable, "-c", "import sys; sys.exit(3)"], 30.0)
    assert r == dict(rc=3, seconds=r["seconds"], timed_out=False, tail=[])


def test_a_test_step_that_fails_or_times_out_is_an_error(tmp_path, monkeypatch):
    args = type("A", (), dict(smoke=True, test_files=[]))()
    log = dc.Log(str(tmp_path / "log"))
    monkeypatch.setattr(dc, "run_cmd", lambda *a, **k: dict(
        rc=None, seconds=1.0, timed_out=True, tail=["....", "...... [ 50%]", ".."]))
    with pytest.raises(RuntimeError, match=r"stopped at the time limit \(12 passed before it"):
        dc.step_tests(args, log, {}, 5.0)
    monkeypatch.setattr(dc, "run_cmd", lambda *a, **k: dict(
        rc=1, seconds=1.0, timed_out=False, tail=["1 failed, 3 passed in 2.0s"]))
    with pytest.raises(RuntimeError, match=r"failed \(1 failed, 3 passed in 2.0s\)"):
        dc.step_tests(args, log, {}, 5.0)


def test_trace_tables_sum_device_time_per_thread(tmp_path):
    meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/device:GPU:0")),
            dict(ph="M", pid=2, name="process_name", args=dict(name="/host:CPU")),
            dict(ph="M", pid=1, tid=7, name="thread_name", args=dict(name="Stream #14(Compute)")),
            dict(ph="M", pid=2, tid=8, name="thread_name", args=dict(name="python3"))]
    events = [dict(ph="X", pid=1, tid=7, name="conv", ts=0, dur=30),
              dict(ph="X", pid=1, tid=7, name="conv", ts=40, dur=30),
              dict(ph="X", pid=1, tid=7, name="fusion_1", ts=80, dur=6),
              dict(ph="X", pid=2, tid=8, name="host work", ts=0, dur=500)]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    t = dc._trace_tables(str(tmp_path), iterations=2)
    assert t["device_processes"] == ["/device:GPU:0"]
    stream = t["threads"]["stream"]
    assert stream["us_per_iteration"] == 33.0 and stream["events_per_iteration"] == 1.5
    assert stream["top"][0] == dict(name="conv", us_per_iteration=30.0, calls_per_iteration=1.0)
    assert set(t["threads"]) == {"stream"}  # host events are not device time
    assert dc._trace_tables(str(tmp_path / "none"), 1) == {"note": "no trace written"}
