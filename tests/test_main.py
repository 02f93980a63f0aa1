"""The command line: config errors, and a 2-process (multi-host) run matching one process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from us3l_jax import build, checkpointing
from tests.helpers import REPO, run_main, xla_flags


@pytest.mark.parametrize("flags,message", [
    (["--config.optim.lrr=0.1"], "config.optim has no field 'lrr'; the closest valid key is "
                                "config.optim.lr"),
    (["--config.optim.batch_size=0.5"], "--config.optim.batch_size=0.5: invalid literal for int()"),
    (["--config.method.tau=-1"], "config.method.tau must be > 0, got -1.0"),
    (["--config.sampler.width_range=(1.0,0.25)"], "width_range (1.0, 0.25) is invalid"),
    (["--config.method.base_loss=l2"], "base_loss='l2' is not one of ('infonce', 'mse', "),
    (["--config.optim.batch_size=48"], "batch_size=48 is not a multiple of "
                                       "config.method.group_size=32"),
    (["--config.eval.sweep_widths=(1.0,0.1)"], "width 0.1 is outside the allowed range"),
    (["--config.data.dataset=cifar10", "--config.data.data_dir=/nonexistent"],
     "dataset 'cifar10' is not available in /nonexistent"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, flags, message):
    out = run_main("configs/demo.py:smoke", str(tmp_path / "w"), *flags)
    assert out.returncode == 2, out.stdout[-2000:]
    assert message in out.stdout
    assert "Traceback" not in out.stdout
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_missing_config_file_and_workdir(tmp_path):
    out = run_main("configs/nope.py", str(tmp_path))
    assert out.returncode == 2 and "No such file or directory: 'configs/nope.py'" in out.stdout
    out = run_main("configs/demo.py:smoke", "")
    assert out.returncode == 2 and "--workdir is required" in out.stdout


# main.run() with pretrain.train replaced by one that raises the named error.
RAISE_IN_TRAIN = (
    "import sys\n"
    "from us3l_jax import errors, main, pretrain\n"
    "kind = {'ValueError': ValueError, 'UsageError': errors.UsageError}[sys.argv.pop(1)]\n"
    "def train(*args, **kwargs):\n"
    "    raise kind('raised inside train')\n"
    "pretrain.train = train\n"
    "main.run()\n")


@pytest.mark.parametrize("kind,code", [("ValueError", 1), ("UsageError", 2)])
def test_only_user_errors_are_one_line(tmp_path, kind, code):
    """A ``ValueError`` from inside the library is a bug: its traceback and exit 1. A
    ``UsageError`` (something the user can fix) is one line and exit 2."""
    out = subprocess.run(
        [sys.executable, "-c", RAISE_IN_TRAIN, kind, "--config=configs/demo.py:smoke",
         f"--workdir={tmp_path / 'w'}", "--config.eval.final_sweep=False"], cwd=REPO,
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                 PYTHONPATH=REPO))
    assert out.returncode == code, out.stderr[-3000:]
    if kind == "ValueError":
        assert "Traceback (most recent call last)" in out.stderr
        assert out.stderr.rstrip().endswith("ValueError: raised inside train")
    else:
        assert out.stderr.strip() == "error: raised inside train"


def test_coordinator_without_process_count_is_a_usage_error(tmp_path):
    out = run_main("configs/demo.py:smoke", str(tmp_path / "w"),
                   "--coordinator_address=localhost:1")
    assert out.returncode == 2 and "Traceback" not in out.stdout
    assert "error: --coordinator_address needs --num_processes and --process_id" in out.stdout


def test_help_exits_0_and_lists_configs_and_protocols():
    import subprocess
    import sys

    from tests.helpers import REPO
    run = lambda *args: subprocess.run([sys.executable, "-m", "us3l_jax.main", *args], cwd=REPO,
                                       capture_output=True, text=True,
                                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
    out = run("--help")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    configs = {ln.split()[0] for ln in lines if ln.startswith("  configs/")}
    assert configs == {f"configs/{f}" for f in os.listdir(os.path.join(REPO, "configs"))
                       if f.endswith(".py")}
    # Each summary is whole, wrapped under its own column (it was cut at the line's end).
    assert "tiny slimmable ResNet pretrained with the full US3L recipe on the offline digits " \
        "set." in " ".join(out.stdout.split())
    assert "  --workdir: Run directory (checkpoints, logs, results)." in lines
    assert "Final sweep protocols (--config.eval.sweep_protocol): fast, knn, paper, top1, " \
        "finetune;" in out.stdout
    out = run("--config=configs/demo.py:smoke", "--workdir=/tmp/x", "extra")
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: unexpected arguments ['extra']; see "
                                  "python -m us3l_jax.main --help")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir):
    return [(r["step"], r["loss/total"]) for r in map(json.loads, open(
        os.path.join(workdir, "metrics.jsonl")))]


# ------------------------------------------------------------------ two processes (multi-host)

PREEMPT_STEPS = 12
PREEMPT_FLAGS = [f"--config.train.max_steps={PREEMPT_STEPS}",
                 "--config.train.checkpoint_every_steps=1000",  # only preemption and the end
                 "--config.train.log_every_steps=1", "--config.train.compile_ahead=False",
                 "--config.sampler.schedule=none", "--config.eval.final_sweep=False"]


# On a busy machine (other jobs on the 2 cores) one process can be minutes behind the other
# while it loads and compiles: the processes meet at a barrier before their first gloo
# collective (us3l_jax.data.feeding.wait_for_peers) and these tests wait up to 20 minutes.
TWO_PROCESS_TIMEOUT_S = 1200


def _two_processes(workdir, flags=PREEMPT_FLAGS):
    port = _free_port()
    return [run_main("configs/demo.py:smoke", workdir, *flags,
                     f"--coordinator_address=localhost:{port}", "--num_processes=2",
                     f"--process_id={i}", wait=False) for i in range(2)]


def _logged_step(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line)["step"] for line in open(path) if line.strip()]
    return steps[-1] if steps else 0


def _signal_at(procs, workdir, schedule, timeout=TWO_PROCESS_TIMEOUT_S):
    """Sends SIGTERM to ``procs[i]`` once process 0 has logged ``step``, for each
    ``(step, i)`` of ``schedule``; returns the outputs and the logged step at each signal."""
    import signal
    import time
    t0 = time.time()
    sent = []
    for step, i in schedule:
        while _logged_step(workdir) < step:
            assert time.time() - t0 < timeout, "timed out waiting for the run"
            assert all(p.poll() is None for p in procs), "a process ended early"
            time.sleep(0.01)
        assert procs[i].poll() is None, f"process {i} ended before its signal"
        procs[i].send_signal(signal.SIGTERM)
        sent.append(_logged_step(workdir))
    return [p.communicate(timeout=timeout)[0] for p in procs], sent


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two processes through PREEMPT_STEPS steps: (workdir, their outputs)."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    procs = _two_processes(workdir)
    outs = [p.communicate(timeout=TWO_PROCESS_TIMEOUT_S)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return workdir, outs


@pytest.mark.slow
def test_two_processes_match_one_process(uninterrupted, tmp_path):
    """Two local CPU processes (one device each, gloo collectives; the module's uninterrupted
    run) train on the same global batch as one process: bitwise the same parameters as one
    process with the same device layout (2 forced CPU devices). (One device against several
    agrees to float32 reassociation: ``tests/engine/test_engine.py::test_one_and_eight_devices_agree``.)"""
    multi, outs = uninterrupted
    two_devices = str(tmp_path / "two_devices")
    out = run_main("configs/demo.py:smoke", two_devices, *PREEMPT_FLAGS,
                   env={"XLA_FLAGS": xla_flags(2)})
    assert out.returncode == 0, out.stdout[-3000:]
    assert "process 0 of 2, 1 local / 2 global devices" in outs[0]
    assert "step 2/" in outs[0] and "step 2/" not in outs[1]  # only process 0 logs

    load = lambda w: jax.tree.leaves(checkpointing.load_pretrained(
        w, abstract_state=build.abstract_state).params)
    for x, y in zip(load(two_devices), load(multi)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert _losses(two_devices) == _losses(multi)


def test_console_script_is_installed_and_runs(tmp_path):
    """``pip install -e .`` (the README's commands) puts ``us3l`` next to the interpreter."""
    import subprocess
    import sys

    from tests.helpers import REPO
    script = os.path.join(os.path.dirname(sys.executable), "us3l")
    assert os.path.exists(script), "us3l_jax is not installed: run pip install -e ."
    out = subprocess.run([script, "--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
                          "--config.method.tau=0"], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2
    assert out.stderr.strip() == "error: config.method.tau must be > 0, got 0.0"


def _preempt(workdir, schedule):
    """Runs the two processes, signals them by ``schedule``; returns the agreed stop step."""
    from us3l_jax import pretrain
    procs = _two_processes(workdir)
    outs, sent = _signal_at(procs, workdir, schedule)
    assert len(set(sent)) == len(sent)  # signals at different steps
    for p, o in zip(procs, outs):
        assert p.returncode == pretrain.PREEMPTED_EXIT_CODE, o[-3000:]
        assert "Traceback" not in o
    stopped = int(outs[0].split("preempted at step ")[1].split(";")[0])
    assert min(sent) < stopped < PREEMPT_STEPS and max(sent) <= stopped
    steps = checkpointing.Checkpointer(workdir, checkpointing.read_config(workdir)).all_steps()
    assert steps[-1] == stopped
    return stopped


@pytest.mark.slow
def test_preemption_of_two_processes_saves_one_agreed_step(uninterrupted, tmp_path):
    """SIGTERM to one process only (as when one host of a pod is preempted first): both
    processes stop at the same step (the coordination service's agreement; a per-process
    decision would leave the other waiting in a collective forever), save it and exit 143;
    the rerun ends with bitwise the uninterrupted run's parameters."""
    workdir = str(tmp_path / "run")
    stopped = _preempt(workdir, [(3, 1)])
    procs = _two_processes(workdir)
    outs = [p.communicate(timeout=TWO_PROCESS_TIMEOUT_S)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert f"resuming {workdir} from step {stopped}" in outs[0]
    final = lambda w: jax.tree.leaves(checkpointing.load_pretrained(
        w, abstract_state=build.abstract_state).params)
    for x, y in zip(final(uninterrupted[0]), final(workdir)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def _assert_nothing_half_written(workdir):
    """No temporary file anywhere; a config.json present is complete; each checkpoint is
    sealed with its checksums."""
    for d, dirs, files in os.walk(workdir):
        assert not [n for n in files + dirs if n.endswith(".tmp") or "-tmp" in n], (d, files)
    if os.path.exists(os.path.join(workdir, "config.json")):
        json.load(open(os.path.join(workdir, "config.json")))
    for step in checkpointing.Checkpointer(workdir, checkpointing.read_config(
            workdir)).all_steps() if os.path.isdir(os.path.join(workdir, "checkpoints")) else []:
        assert checkpointing.verify_checksums(os.path.join(workdir, "checkpoints",
                                                           str(step))) is None


# Where to interrupt: the first line of output that ends with (or holds) the marker. Import
# times (python -X importtime) show how far the imports are.
MOMENTS = {"imports": ("end", "absl.app"), "jax import": ("end", " jax"),
           "setup": ("in", "new run in"), "training": ("in", "step 2/")}


@pytest.mark.slow
@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path, moment):
    """SIGINT to a real ``python -m us3l_jax.main`` during its imports, setup or training:
    exit 130, one line, no traceback, nothing half-written."""
    import signal
    workdir = str(tmp_path / "run")
    proc = run_main("configs/demo.py:smoke", workdir, "--config.train.max_steps=400",
                    "--config.train.log_every_steps=1", wait=False,
                    env={"PYTHONPROFILEIMPORTTIME": "1"})
    how, marker = MOMENTS[moment]
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if (line.rstrip().endswith(marker) if how == "end" else marker in line):
            break
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    errors_ = [line for line in out.splitlines() if "error:" in line]
    if moment == "training":
        assert not errors_ and "interrupted (Ctrl-C) at step" in out, out[-3000:]
    else:
        assert len(errors_) == 1 and "interrupted (Ctrl-C)" in errors_[0], out[-3000:]
    _assert_nothing_half_written(workdir)


GC_HOOK = (
    "import os, signal, time\n"
    "from us3l_jax import errors\n"
    "errors.catch_interrupts(); errors.interrupts_raise()\n"
    "def _xla_gc_callback():  # stands for JAX's hook, where Python swallows exceptions\n"
    "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.01)\n"
    "_xla_gc_callback()\n"
    "print('survived the hook', flush=True)\n"
    "try:\n"
    "    time.sleep(5)\n"
    "except KeyboardInterrupt:\n"
    "    print('raised after it', flush=True)\n")


def test_ctrl_c_inside_jax_gc_hook_is_raised_right_after_it():
    out = subprocess.run([sys.executable, "-c", GC_HOOK], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.stdout.split("\n")[:2] == ["survived the hook", "raised after it"], out
    assert out.stderr == ""


@pytest.mark.slow
def test_workdir_deleted_mid_run_exits_4_with_one_line(tmp_path):
    import shutil
    workdir = str(tmp_path / "run")
    proc = run_main("configs/demo.py:smoke", workdir, "--config.train.max_steps=400",
                    "--config.train.log_every_steps=1", "--config.eval.final_sweep=False",
                    wait=False)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 2/" in line:
            break
    shutil.rmtree(workdir)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 4, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(
        f"error: the workdir {workdir} was deleted, renamed, replaced or unmounted during the "
        "run (it no longer exists); stopped at step "), out[-3000:]
    assert "Traceback" not in out and "finished" not in out
    assert not os.path.exists(workdir)


def _without_permission_override() -> tuple:
    """A command prefix under which file permissions bite (root ignores them)."""
    import shutil
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be made to bite")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ("setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--")


@pytest.mark.slow
def test_a_save_into_an_unwritable_checkpoints_folder_exits_4_at_once(tmp_path):
    """The failed save is reported in one line with the fix, and the process exits (orbax's
    signalling threads of the failed save would otherwise keep it alive for ever)."""
    workdir = str(tmp_path / "run")
    flags = ("--config.train.checkpoint_every_steps=2", "--config.eval.final_sweep=False",
             "--config.train.compile_ahead=False")
    assert run_main("configs/demo.py:smoke", workdir, "--config.train.max_steps=4",
                    *flags).returncode == 0
    ckpts = os.path.join(workdir, "checkpoints")
    os.chmod(ckpts, 0o555)
    try:
        proc = run_main("configs/demo.py:smoke", workdir, "--config.train.max_steps=8", *flags,
                        timeout=300, prefix=_without_permission_override())
    finally:
        os.chmod(ckpts, 0o755)
    assert proc.returncode == 4, proc.stdout[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"error: saving checkpoint 6 to {ckpts}/6 failed (errno 13 EACCES"), last
    assert last.endswith("make the workdir's checkpoints/ writable and rerun to resume"), last
    assert "Traceback" not in proc.stdout
    assert sorted(os.listdir(ckpts)) == ["2", "4"]


@pytest.mark.slow
def test_rerunning_a_finished_run_rewrites_nothing(tmp_path):
    """The second run of the same command has nothing to do: no file is written again (the
    final sweep of that checkpoint is in sweep.json already, no new TensorBoard events)."""
    workdir = str(tmp_path / "run")
    flags = ("--config.train.max_steps=4", "--config.eval.sweep_widths=(1.0,)")
    first = run_main("configs/demo.py:smoke", workdir, *flags)
    assert first.returncode == 0, first.stdout[-3000:]
    files = lambda: {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                     for d, _, names in os.walk(workdir) for f in names
                     if f != ".us3l.lock"}  # (the lock names its holder)
    before = files()
    assert os.path.join(workdir, "sweep.json") in before
    second = run_main("configs/demo.py:smoke", workdir, *flags)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "nothing to do" in second.stdout
    assert "the final sweep of step 4 is in sweep.json already" in second.stdout
    assert files() == before
