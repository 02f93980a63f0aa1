"""Fault matrix: injects faults and bad inputs into the command line and records what happens.

    python experiments/fault_matrix.py [--out=/tmp/fault_matrix.json] [--only=substring]

Each case runs ``python -m us3l_jax.main`` / ``python -m us3l_jax.evaluate`` as a user would
(CPU, the demo's smoke config cut to a few steps) on a copy of one small trained run, and
checks the outcome: exit code, one-line error (no traceback), and whether anything was lost (a
checkpoint that verified before the case is gone or fails its checksums after it, or
``config.json`` changed by a refused run). Prints a table and writes JSON. The disk-full cases
mount small tmpfs file systems and need root; they are reported as skipped otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from us3l_jax import checkpointing  # noqa: E402  (light: no JAX backend is started)

CONFIG = "configs/demo.py:smoke"
BASE_FLAGS = ["--config.train.max_steps=6", "--config.train.checkpoint_every_steps=2",
              "--config.train.log_every_steps=2", "--config.train.compile_ahead=False",
              "--config.eval.final_sweep=False",
              f"--config.train.compilation_cache_dir={os.path.join(REPO, '.jax_cache')}"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")


def main_cmd(workdir, *flags, config=CONFIG, base=True):
    return [sys.executable, "-m", "us3l_jax.main", f"--config={config}", f"--workdir={workdir}",
            *(BASE_FLAGS if base else []), *flags]


def run(cmd, timeout=600):
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def start(cmd):
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, workdir, step, timeout=300):
    """Waits until ``proc`` has logged ``step`` (or ended)."""
    log = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        steps = [json.loads(x)["step"] for x in open(log)] if os.path.exists(log) else []
        if steps and steps[-1] >= step:
            return
        time.sleep(0.1)


def snapshot(workdir):
    """Verified checkpoints (step -> folder) and config.json's text."""
    d = os.path.join(workdir, "checkpoints")
    good = {}
    if os.path.isdir(d):
        for name in os.listdir(d):
            path = os.path.join(d, name)
            if name.isdigit() and checkpointing.verify_checksums(path) is None and \
                    os.path.exists(os.path.join(path, checkpointing.CHECKSUM_FILE)):
                good[int(name)] = path
    cfg = os.path.join(workdir, "config.json")
    return good, open(cfg).read() if os.path.exists(cfg) else None


KEEP = 3  # train.keep_checkpoints: orbax removes older ones once KEEP newer are saved


def lost(before, after, config_may_change=False, replaced_ok=()):
    """What a case lost: intact checkpoints that are gone or corrupt afterwards (a step saved
    again after its corrupt copy was moved aside counts as kept, and so does one rotated out
    by ``keep_checkpoints`` after KEEP newer verified ones were saved), config.json changed
    by a run that should have left it alone."""
    (b_ckpt, b_cfg), (a_ckpt, a_cfg) = before, after
    rotated = min(sorted(a_ckpt)[-KEEP:]) if len(a_ckpt) >= KEEP else -1
    gone = [s for s in b_ckpt if s not in a_ckpt and s not in replaced_ok and s >= rotated]
    out = [f"checkpoint {s}" for s in sorted(gone)]
    if b_cfg is not None and a_cfg != b_cfg and not config_may_change:
        out.append("config.json")
    return out


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if "error:" in ln]


def one_line(stdout, stderr):
    return "Traceback" not in stdout + stderr and len(error_lines(stderr)) == 1


def metrics_unique(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    steps = [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []
    return len(steps) == len(set(steps))


class Matrix:
    def __init__(self, root, only):
        self.root, self.only, self.rows = root, only, []

    def want(self, name):
        return not self.only or self.only in name

    def add(self, group, name, expected, rc, ok, detail, lost_items=(), stderr=""):
        if not ok and stderr:
            detail += " | stderr tail: " + " / ".join(stderr.strip().splitlines()[-4:])
        row = {"group": group, "case": name, "expected": expected, "exit": rc,
               "ok": bool(ok), "lost": list(lost_items), "detail": detail[:1000]}
        self.rows.append(row)
        print(f"{'PASS' if ok else 'FAIL'} {group} | {name} | exit {rc} | "
              f"lost {row['lost'] or 'nothing'} | {row['detail'][:160]}", flush=True)

    def copy(self, base, name):
        dst = os.path.join(self.root, name.replace(" ", "_").replace("/", "_"))
        shutil.copytree(base, dst)
        return dst


# ------------------------------------------------------------------------------ corruptions

def data_files(step_dir):
    found = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            found += [os.path.join(root, f) for f in files]
    return sorted(found, key=os.path.getsize, reverse=True)


def truncate(d):
    p = data_files(d)[0]
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def flip64(d):
    import random
    p = data_files(d)[0]
    data = bytearray(open(p, "rb").read())
    for i in random.Random(0).sample(range(len(data)), 64):
        data[i] ^= 0xFF
    open(p, "wb").write(bytes(data))


def garbage_meta(d):
    open(os.path.join(d, "meta", "metadata"), "w").write("\x00garbage{")


def file_to_folder(d):
    p = os.path.join(d, "state", "_sharding")
    os.remove(p)
    os.makedirs(p)


def unreadable(d):
    for root, _, files in os.walk(d):
        for f in files:
            os.chmod(os.path.join(root, f), 0)


CORRUPTIONS = {
    "truncated data file": truncate,
    "deleted _METADATA": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "garbage metadata": garbage_meta,
    "state/ deleted": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "file replaced by a folder": file_to_folder,
    "unreadable files (chmod 000)": unreadable,
    "64 flipped bytes": flip64,
}


def corrupt_cases(m, base):
    for name, fn in CORRUPTIONS.items():
        if not m.want(name):
            continue
        w = m.copy(base, name)
        fn(os.path.join(w, "checkpoints", "6"))
        before = snapshot(w)
        rc, out, err = run(main_cmd(w))
        after = snapshot(w)
        moved = os.path.isdir(os.path.join(w, "checkpoints", "corrupt-6"))
        resaved = 6 in after[0]
        as_root = name.startswith("unreadable") and os.geteuid() == 0
        ok = rc == 0 and resaved and metrics_unique(w) and (moved or as_root)
        detail = ("moved to corrupt-6, resumed from 4, saved 6 again" if moved else
                  "files still readable (root ignores permissions): resumed from 6" if as_root
                  else "not moved") + ("; metrics.jsonl steps unique" if metrics_unique(w)
                                       else "; DUPLICATE metrics steps") + \
            (f"; stderr: {err.strip()[-200:]}" if rc else "")
        m.add("corrupt checkpoint", name, "exit 0, corrupt moved aside, step saved again", rc,
              ok, detail, lost(before, after, replaced_ok=(6,)))

    if m.want("all metadata garbage"):
        w = m.copy(base, "all_meta_garbage")
        for s in ("2", "4", "6"):
            garbage_meta(os.path.join(w, "checkpoints", s))
        cfg = open(os.path.join(w, "config.json")).read()
        rc, out, err = run(main_cmd(w))
        kept = sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "4", "6"] and \
            open(os.path.join(w, "config.json")).read() == cfg
        m.add("corrupt checkpoint", "all metadata garbage", "exit 2 one line, nothing moved or "
              "overwritten", rc, rc == 2 and one_line(out, err) and kept,
              (error_lines(err) or [err[-200:]])[0], [] if kept else ["checkpoints/config"])
        rc, out, err = run(main_cmd(w, "--start_over"))
        moved = sorted(os.listdir(os.path.join(w, "checkpoints")))
        m.add("corrupt checkpoint", "all metadata garbage, then --start_over",
              "exit 0, all moved to corrupt-*, trains from 0", rc,
              rc == 0 and {"corrupt-2", "corrupt-4", "corrupt-6"} <= set(moved),
              f"checkpoints/ now {moved}")
    if m.want("orbax step metadata"):
        # orbax's own _CHECKPOINT_METADATA (commit time; not needed to restore): garbage in
        # every checkpoint. The data verifies, so the run must go on from step 6.
        w = m.copy(base, "all_step_metadata_garbage")
        for s in ("2", "4", "6"):
            open(os.path.join(w, "checkpoints", s, "_CHECKPOINT_METADATA"), "w").write("{x")
        before = snapshot(w)
        rc, out, err = run(main_cmd(w, "--config.train.max_steps=8"))
        m.add("corrupt checkpoint", "orbax step metadata garbage in every checkpoint",
              "exit 0, resumes from 6 (array data verified)", rc,
              rc == 0 and "resuming" in out and "from step 6" in out and
              "Traceback" not in err, "resumed from step 6" if "from step 6" in out else "",
              lost(before, snapshot(w), config_may_change=True), err + out)


# ------------------------------------------------------------------------------- lock

def lock_cases(m, base):
    if m.want("two runs together"):
        w = os.path.join(m.root, "together")
        procs = [start(main_cmd(w)) for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        rcs = sorted(p.returncode for p in procs)
        msg = [ln for o, e in outs for ln in error_lines(e)]
        after = snapshot(w)
        ok = rcs == [0, 2] and len(msg) == 1 and "in use by another run (pid" in msg[0] and \
            sorted(after[0]) == [2, 4, 6]
        m.add("one run per workdir", "two runs started together", "one exit 0, one exit 2 "
              "naming pid and host", rcs, ok, msg[0] if msg else str(outs)[-200:],
              [] if sorted(after[0]) == [2, 4, 6] else ["checkpoints"])
    if m.want("two runs apart"):
        w = m.copy(base, "apart")
        before = snapshot(w)
        first = start(main_cmd(w, "--config.train.max_steps=20"))
        wait_for_step(first, w, 7)
        rc, out, err = run(main_cmd(w, "--config.train.max_steps=20"))
        o1, e1 = first.communicate(timeout=600)
        after = snapshot(w)
        m.add("one run per workdir", "second run started while the first trains",
              "second exit 2 naming pid and host; first finishes", [first.returncode, rc],
              first.returncode == 0 and rc == 2 and one_line(out, err) and
              "in use by another run (pid" in err, (error_lines(err) or [err[-200:]])[0],
              lost(before, after, config_may_change=True,
                   replaced_ok=(2, 4, 6)) if first.returncode else [])


# ----------------------------------------------------------------------------- config change

CHANGES = [("lr", "--config.optim.lr=0.1"), ("batch size", "--config.optim.batch_size=32"),
           ("seed", "--config.seed=1"), ("epochs", "--config.optim.epochs=5"),
           ("distillation weight", "--config.method.distill_weight=2.0"),
           ("temperature", "--config.method.tau=0.2"),
           ("grid step", "--config.sampler.grid_step=0.125"),
           ("dtype", "--config.model.dtype=bfloat16")]


def config_cases(m, base):
    for name, flag in CHANGES:
        if not m.want(name):
            continue
        w = m.copy(base, "change_" + name)
        before = snapshot(w)
        rc, out, err = run(main_cmd(w, flag))
        m.add("config change on resume", name, "exit 2 with the diff", rc,
              rc == 2 and one_line(out, err) and "differs from the run's" in err,
              (error_lines(err) or [err[-200:]])[0], lost(before, snapshot(w)), err + out)
    if m.want("another variant"):
        w = m.copy(base, "change_variant")
        before = snapshot(w)
        rc, out, err = run(main_cmd(w, config="configs/demo.py"))
        m.add("config change on resume", "another variant (configs/demo.py)", "exit 2 with "
              "the diff", rc, rc == 2 and one_line(out, err) and "differs" in err,
              (error_lines(err) or [err[-200:]])[0], lost(before, snapshot(w)))
    if m.want("allow-listed"):
        w = m.copy(base, "change_allowed")
        rc, out, err = run(main_cmd(w, "--config.train.log_every_steps=1",
                                    "--config.train.max_steps=8"))
        m.add("config change on resume", "allow-listed (log_every_steps, max_steps)",
              "exit 0, resumes", rc, rc == 0 and "resuming" in out, out.strip()[-120:])
    if m.want("--allow_config_change"):
        w = m.copy(base, "change_accepted")
        rc, out, err = run(main_cmd(w, "--config.optim.lr=0.1", "--config.train.max_steps=8",
                                    "--allow_config_change"))
        hist = os.path.join(w, checkpointing.CONFIG_HISTORY_FILE)
        rec = json.loads(open(hist).readlines()[-1]) if os.path.exists(hist) else {}
        m.add("config change on resume", "lr with --allow_config_change", "exit 0, change in "
              "config_history.jsonl", rc, rc == 0 and "optim.lr" in rec.get("changes", {}),
              json.dumps(rec)[:200])


# ----------------------------------------------------------------------------- I/O faults

def mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                       capture_output=True, text=True)
    return p.returncode == 0


def du(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def io_cases(m, base):
    if m.want("disk full during a save"):
        mnt = os.path.join(m.root, "full_save")
        # Room for the copy plus one more checkpoint's worth less a little: the save of the
        # next step runs out of space.
        size = du(base) + 2 * 1024 * 1024
        if not mount_tmpfs(mnt, size):
            m.add("I/O", "disk full during a save", "exit 4 one line", None, False,
                  "skipped: cannot mount tmpfs (needs root)")
        else:
            try:
                w = os.path.join(mnt, "run")
                shutil.copytree(base, w)
                before = snapshot(w)
                rc, out, err = run(main_cmd(w, "--config.train.max_steps=12"))
                after = snapshot(w)
                m.add("I/O", "disk full during a save", "exit 4 one line with path and errno; "
                      "last good checkpoint intact", rc,
                      rc == 4 and one_line(out, err) and "errno 28" in err,
                      (error_lines(err) or [err[-300:]])[0],
                      lost(before, after, config_may_change=True), err)
                # Space freed (the run moved to a roomy disk): the rerun resumes and finishes.
                roomy = os.path.join(m.root, "full_save_rerun")
                shutil.copytree(w, roomy)
                rc, out, err = run(main_cmd(roomy, "--config.train.max_steps=12"))
                m.add("I/O", "disk full during a save, rerun with space", "exit 0, resumes from "
                      "the last good checkpoint", rc, rc == 0 and "from step 6" in out and
                      12 in snapshot(roomy)[0], "resumed from step 6, saved 12"
                      if rc == 0 else "", lost(after, snapshot(roomy), config_may_change=True),
                      err)
            finally:
                subprocess.run(["umount", mnt])
    if m.want("disk full at start"):
        mnt = os.path.join(m.root, "full_start")
        if not mount_tmpfs(mnt, "1m"):
            m.add("I/O", "disk full at start", "exit 4 one line", None, False,
                  "skipped: cannot mount tmpfs (needs root)")
        else:
            try:
                with open(os.path.join(mnt, "filler"), "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()
                    except OSError:
                        pass
                rc, out, err = run(main_cmd(os.path.join(mnt, "run")))
                m.add("I/O", "disk full at start", "exit 4 (or 2) one line", rc,
                      rc in (2, 4) and one_line(out, err),
                      (error_lines(err) or [err[-300:]])[0])
            finally:
                subprocess.run(["umount", mnt])
    for name, path in [("workdir is a file", "/etc/hostname"), ("workdir under /proc",
                                                                "/proc/us3l_run")]:
        if m.want(name):
            rc, out, err = run(main_cmd(path))
            m.add("paths", name, "exit 2 one line, before any work", rc,
                  rc == 2 and one_line(out, err), (error_lines(err) or [err[-200:]])[0])
    if m.want("evaluate --out"):
        target = os.path.join(m.root, "existing_file")
        open(target, "w").write("keep me")
        t0 = time.time()
        rc, out, err = run([sys.executable, "-m", "us3l_jax.evaluate", f"--workdir={base}",
                            f"--out={target}"])
        m.add("paths", "evaluate --out an existing file", "exit 2 one line before evaluating",
              rc, rc == 2 and one_line(out, err) and open(target).read() == "keep me" and
              time.time() - t0 < 60, (error_lines(err) or [err[-200:]])[0] +
              f" ({time.time() - t0:.0f}s)")


def sigint_case(m, base):
    if not m.want("Ctrl-C"):
        return
    w = m.copy(base, "ctrl_c")
    before = snapshot(w)
    p = start(main_cmd(w, "--config.train.max_steps=60"))
    wait_for_step(p, w, 8)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    saved = snapshot(w)[0]
    rc2, out2, _ = run(main_cmd(w, "--config.train.max_steps=60"))
    m.add("signals", "Ctrl-C (SIGINT) during training, then rerun",
          "exit 130 after saving, no traceback; rerun resumes", [p.returncode, rc2],
          p.returncode == 130 and "Traceback" not in out + err and rc2 == 0 and
          "resuming" in out2 and max(saved) > 6 and metrics_unique(w),
          (out.strip().splitlines() or [""])[-1][-160:], lost(before, snapshot(w),
                                                                config_may_change=True))


# --------------------------------------------------------------------------- bad inputs

BAD_MAIN = [("lr=inf", "--config.optim.lr=inf", "optim.lr=inf"),
            ("distill_weight=nan", "--config.method.distill_weight=nan", "distill_weight=nan"),
            ("checkpoint_every_steps=-5", "--config.train.checkpoint_every_steps=-5",
             "checkpoint_every_steps"),
            ("stage_sizes=(1,1)", "--config.model.stage_sizes=(1,1)", "model.stage_sizes"),
            ("data_dir for digits", "--config.data.data_dir=/tmp", "data.data_dir"),
            ("eval.sweep_widths=()", "--config.eval.sweep_widths=()", "eval.sweep_widths"),
            ("batch size 63, group 32", "--config.optim.batch_size=63", "use e.g. 64"),
            ("typo lrr", "--config.optim.lrr=0.1", "'lrr' Did you mean \"lr\"")]
BAD_EVAL = [("evaluate --widths=", "--widths=", "--widths is empty"),
            ("evaluate --protocol=", "--protocol=", "--protocol is empty"),
            ("evaluate --calibration-batches=0", "--calibration-batches=0",
             "--calibration_batches=0 must be > 0")]


def bad_input_cases(m, base):
    for name, flag, want in BAD_MAIN:
        if not m.want(name):
            continue
        w = os.path.join(m.root, "bad_" + name.replace(" ", "_").replace("/", "_"))
        rc, out, err = run(main_cmd(w, flag))
        m.add("bad input", name, "exit 2 one line naming the field, workdir not created",
              rc, rc == 2 and one_line(out, err) and want in err and not os.path.exists(w),
              (error_lines(err) or [err[-200:]])[0])
    for name, flag, want in BAD_EVAL:
        if not m.want(name):
            continue
        rc, out, err = run([sys.executable, "-m", "us3l_jax.evaluate", f"--workdir={base}",
                            flag])
        m.add("bad input", name, "exit 2 one line", rc,
              rc == 2 and one_line(out, err) and want in err,
              (error_lines(err) or [err[-200:]])[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/fault_matrix.json")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="us3l_faults_")
    m = Matrix(root, args.only)
    base = os.path.join(root, "base")
    t0 = time.time()
    rc, out, err = run(main_cmd(base))
    assert rc == 0, err[-3000:]
    print(f"base run: {time.time() - t0:.0f}s, checkpoints {sorted(snapshot(base)[0])}",
          flush=True)
    for cases in (corrupt_cases, lock_cases, config_cases, io_cases, sigint_case,
                  bad_input_cases):
        cases(m, base)
    print("\n| group | case | expected | exit | outcome | lost |\n|---|---|---|---|---|---|")
    for r in m.rows:
        print(f"| {r['group']} | {r['case']} | {r['expected']} | {r['exit']} | "
              f"{'ok' if r['ok'] else 'FAIL'}: {r['detail'][:140]} | "
              f"{', '.join(r['lost']) or 'nothing'} |")
    n_lost = sum(bool(r["lost"]) for r in m.rows)
    n_fail = sum(not r["ok"] for r in m.rows)
    print(f"\n{len(m.rows)} cases, {len(m.rows) - n_fail} as expected, {n_fail} not; runs "
          f"that lost anything: {n_lost}")
    with open(args.out, "w") as f:
        json.dump({"cases": m.rows, "failed": n_fail, "lost": n_lost}, f, indent=2)
    shutil.rmtree(root, ignore_errors=True)
    return 1 if n_fail or n_lost else 0


if __name__ == "__main__":
    sys.exit(main())
