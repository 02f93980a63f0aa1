"""Fault matrix: injects faults and bad inputs into the command lines and records what happens.

    python experiments/fault_matrix.py [--out=/tmp/fault_matrix.json] [--only=kill,main: ]
                                       [--quick] [--jobs=2] [--list]

Every case runs ``python -m us3l_jax.main`` (or ``evaluate``, ``export``, ``profile``) as a user
would, on CPU with ``configs/demo.py:smoke`` cut to 12 steps (a checkpoint every 2), on a copy
of one small run trained to step 6. A case that resumes runs on to step 12 and its state is
compared leaf by leaf, bit for bit, with an uninterrupted 0 -> 12 run ("bitwise" column).

Classes: kill -9 / SIGTERM / SIGINT at several moments (imports, setup, training, during a
save); corruption of the latest and of all checkpoints, a missing checksum file, a missing or
garbage ``config.json``; config, model and width changes, a failed override, NaN; one run per
workdir and a removed lock; read-only, vanishing (deleted, renamed) and unmounted workdirs,
full disks; permissions as a process without root's file privileges; bad inputs of ``main``,
``evaluate``, ``export`` and ``profile``, a corrupt ``bn_stats`` file and a garbage
``sweep.json``.

Permission cases drop privileges with ``setpriv``: as the user nobody when it can import the
packages, otherwise (packages under /root, mode 0700) as root without the
capabilities that bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER),
so the owner's mode bits bite; the row says which. Read-only and unmounted workdirs and full
disks need ``mount`` (root); without it those rows fail as "cannot mount".

Each row: expectation met (ok/FAIL), exit code(s), bitwise equality with the uninterrupted run
(yes / no / - where the case does not resume), what was lost (a checkpoint that verified before
is gone or corrupt afterwards, or config.json changed by a refused run), and whether the run
got stuck (timed out, or the original command could not carry on without manual repair). A
bad input must be one line (``error: ...``, no traceback), exit 2, and write nothing. The exit
status is 1 if any row fails (a lost or stuck run, an unclean bad input, or any other
expectation), else 0. Expected: every row ok; about 15 minutes on 2 busy CPU cores.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from us3l_jax import checkpointing  # noqa: E402  (orbax and JAX on CPU; no config import)

CONFIG = "configs/demo.py:smoke"
STEPS = 12  # every resuming case runs on to this step and is compared with the reference
BASE_STEPS = 6
KEEP = 3  # train.keep_checkpoints: orbax removes older ones once KEEP newer are saved
COMMON = ["--config.train.checkpoint_every_steps=2", "--config.train.log_every_steps=2",
          "--config.train.compile_ahead=False", "--config.eval.final_sweep=False",
          f"--config.train.compilation_cache_dir={os.path.join(REPO, '.jax_cache')}"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
TIMEOUT = 300  # a run past this is stuck (a normal one takes under 90 s on 2 busy cores)
NO_DAC = "-dac_override,-dac_read_search,-fowner"
PROBE = "import absl, flax, jax, orbax.checkpoint, us3l_jax.main"  # what every command needs


# ------------------------------------------------------------------------------ processes

@dataclasses.dataclass
class Result:
    rc: int | None  # None: timed out (stuck)
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


def main_cmd(workdir: str, *flags: str, steps: int | None = STEPS,
             config: str = CONFIG) -> list[str]:
    return [sys.executable, "-m", "us3l_jax.main", f"--config={config}",
            f"--workdir={workdir}", *COMMON,
            *([f"--config.train.max_steps={steps}"] if steps else []), *flags]


def tool_cmd(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", module, *flags]


def run(cmd: Sequence[str], timeout: int = TIMEOUT, unprivileged: bool = False) -> Result:
    cmd = list(cmd)
    if unprivileged:
        cmd = PRIVILEGE.prefix + cmd
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr, time.time() - t0)
    except subprocess.TimeoutExpired as e:
        return Result(None, _text(e.stdout), _text(e.stderr), time.time() - t0)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


class Started:
    """A run in the background; its output goes to files (a full pipe would block it)."""

    def __init__(self, cmd: Sequence[str], root: str):
        fd, self.out_path = tempfile.mkstemp(dir=root, prefix="out.")
        os.close(fd)
        self.err_path = self.out_path.replace("out.", "err.")
        self.t0 = time.time()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(list(cmd), cwd=REPO, env=ENV, stdout=out, stderr=err)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def finish(self, timeout: int = TIMEOUT) -> Result:
        try:
            self.proc.wait(timeout=timeout)
            rc = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        out, err = (open(p).read() for p in (self.out_path, self.err_path))
        for p in (self.out_path, self.err_path):
            os.remove(p)
        return Result(rc, out, err, time.time() - self.t0)


def logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    steps = []
    if os.path.exists(path):
        for line in open(path):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                steps.append(int(json.loads(line)["step"]))
    return steps


def wait_until(proc: Started, condition: Callable[[], bool], timeout: float = 300,
               poll: float = 0.05) -> bool:
    """True once ``condition()`` holds while ``proc`` runs; False if it ended or timed out."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.alive():
        if condition():
            return True
        time.sleep(poll)
    return False


def saving(workdir: str) -> bool:
    """A checkpoint save is under way (orbax's temporary folder exists)."""
    d = os.path.join(workdir, "checkpoints")
    with contextlib.suppress(OSError):
        return any("tmp" in name for name in os.listdir(d))
    return False


# ------------------------------------------------------------------------------ privileges

@dataclasses.dataclass
class Privilege:
    prefix: list[str]
    how: str


def find_privilege_drop() -> Privilege:
    """How a command runs without root's power over file permissions (see the docstring)."""
    if os.geteuid() != 0:
        return Privilege([], f"uid {os.geteuid()} (not root)")
    if shutil.which("setpriv"):
        nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
        p = subprocess.run(nobody + [sys.executable, "-c", PROBE], cwd=REPO,
                           env=ENV, capture_output=True)
        if p.returncode == 0:
            return Privilege(nobody, "setpriv as nobody")
        caps = ["setpriv", f"--bounding-set={NO_DAC}", f"--inh-caps={NO_DAC}", "--"]
        p = subprocess.run(caps + [sys.executable, "-c", PROBE], cwd=REPO, env=ENV,
                           capture_output=True)
        if p.returncode == 0:
            return Privilege(caps, "setpriv as root without CAP_DAC_OVERRIDE/"
                                   "DAC_READ_SEARCH/FOWNER (nobody cannot import the "
                                   f"packages of {sys.executable})")
    return Privilege([], "no way to drop privileges (permissions do not bite)")


PRIVILEGE = Privilege([], "not probed")


def give_to_unprivileged(path: str) -> None:
    """Makes a copied workdir the unprivileged user's own (a no-op when that is root)."""
    if PRIVILEGE.prefix[:2] == ["setpriv", "--reuid=nobody"]:
        subprocess.run(["chown", "-R", "nobody:nogroup", path], check=True)


# ------------------------------------------------------------------------------ inspection

def snapshot(workdir: str) -> tuple[dict[int, str], str | None]:
    """Verified checkpoints (step -> folder) and config.json's text."""
    d = os.path.join(workdir, "checkpoints")
    good = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(d):
            path = os.path.join(d, name)
            with contextlib.suppress(Exception):
                if name.isdigit() and os.path.exists(
                        os.path.join(path, checkpointing.CHECKSUM_FILE)) and \
                        checkpointing.verify_checksums(path) is None:
                    good[int(name)] = path
    cfg = os.path.join(workdir, "config.json")
    text = None
    with contextlib.suppress(OSError):
        text = open(cfg).read()
    return good, text


def lost(before, after, config_may_change: bool = False,
         replaced_ok: Sequence[int] = ()) -> list[str]:
    """What a case lost: intact checkpoints that are gone or corrupt afterwards (a step saved
    again after its corrupt copy was moved aside counts as kept, and so does one rotated out
    by ``keep_checkpoints`` after KEEP newer verified ones were saved), and config.json
    changed by a run that should have left it alone."""
    (b_ckpt, b_cfg), (a_ckpt, a_cfg) = before, after
    rotated = min(sorted(a_ckpt)[-KEEP:]) if len(a_ckpt) >= KEEP else -1
    gone = [s for s in b_ckpt if s not in a_ckpt and s not in replaced_ok and s >= rotated]
    out = [f"checkpoint {s}" for s in sorted(gone)]
    if b_cfg is not None and a_cfg != b_cfg and not config_may_change:
        out.append("config.json")
    return out


def tree(path: str) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime (empty if there is none)."""
    found = {}
    if os.path.isfile(path):
        st = os.stat(path)
        return {"": (st.st_size, st.st_mtime_ns)}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with contextlib.suppress(OSError):
                st = os.stat(p)
                found[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return found


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:") or ": error:" in ln]


def one_line(r: Result) -> bool:
    """One ``error:`` line on stderr and no traceback anywhere."""
    return "Traceback" not in r.text and len(error_lines(r.err)) == 1


def first_error(r: Result) -> str:
    lines = error_lines(r.err)
    if lines:
        return lines[0]
    tail = (r.err.strip() or r.out.strip()).splitlines()
    return ("timed out; " if r.rc is None else "") + (tail[-1] if tail else "(no output)")


def state_equal(workdir: str, reference: str, step: int = STEPS) -> tuple[bool, str]:
    """Checkpoint ``step`` of ``workdir`` against the reference's, leaf by leaf, bit for bit."""
    import warnings

    import numpy as np
    import orbax.checkpoint as ocp
    from jax import tree_util
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    trees = []
    for w in (workdir, reference):
        path = os.path.join(w, "checkpoints", str(step), "state")
        if not os.path.isdir(path):
            return False, f"no checkpoint {step} in {w}"
        try:
            with ocp.PyTreeCheckpointer() as c:
                trees.append({tree_util.keystr(k): np.asarray(v) for k, v in
                              tree_util.tree_leaves_with_path(c.restore(path))})
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is a difference
            return False, f"cannot restore {path}: {str(e).splitlines()[0][:120]}"
    a, b = trees
    if a.keys() != b.keys():
        return False, f"leaves differ: {sorted(a.keys() ^ b.keys())[:3]}"
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or \
                a[k].tobytes() != b[k].tobytes():
            return False, f"leaf {k} differs"
    return True, f"{len(a)} leaves bitwise equal"


# ------------------------------------------------------------------------------ the table

@dataclasses.dataclass
class Row:
    group: str
    case: str
    expected: str
    exit: list
    ok: bool
    bitwise: bool | None = None  # None: the case does not resume
    lost: list = dataclasses.field(default_factory=list)
    stuck: bool = False
    bad_input: bool = False
    detail: str = ""
    seconds: float = 0.0


def verdict(rows: Sequence[Row]) -> dict:
    """Counts and the exit status: 1 if any row failed (every lost or stuck run and every
    bad input not answered cleanly is a failed row)."""
    failed = [r for r in rows if not r.ok or r.lost or r.stuck or r.bitwise is False]
    return {"cases": len(rows), "failed": len(failed),
            "lost": sum(bool(r.lost) for r in rows), "stuck": sum(r.stuck for r in rows),
            "bad_inputs": sum(r.bad_input for r in rows),
            "bad_inputs_unclean": sum(r.bad_input and not r.ok for r in rows),
            "bitwise_checked": sum(r.bitwise is not None for r in rows),
            "bitwise_equal": sum(r.bitwise is True for r in rows),
            "exit_status": 1 if failed else 0}


def table(rows: Sequence[Row]) -> str:
    lines = ["| group | case | outcome | exit | bitwise equal to the uninterrupted run | lost "
             "| detail |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        good = r.ok and not r.lost and not r.stuck and r.bitwise is not False
        outcome = "ok" if good else "STUCK" if r.stuck else "LOST" if r.lost else "FAIL"
        bitwise = "-" if r.bitwise is None else "yes" if r.bitwise else "NO"
        code = "/".join("timeout" if c is None else str(c) for c in r.exit)
        detail = r.detail.replace("|", "/").replace("\n", " ")[:150]
        lines.append(f"| {r.group} | {r.case} | {outcome} | {code} | {bitwise} | "
                     f"{', '.join(r.lost) or '-'} | {detail} |")
    return "\n".join(lines)


class Matrix:
    def __init__(self, root: str, only: Sequence[str], quick: bool, listing: bool = False):
        self.root, self.only, self.quick, self.listing = root, list(only), quick, listing
        self.rows: list[Row] = []
        self.names: list[str] = []
        self.base = os.path.join(root, "base")
        self.reference = os.path.join(root, "reference")

    def child(self) -> "Matrix":
        """A view with its own rows, for one group of cases run in a thread."""
        sub = Matrix(self.root, self.only, self.quick, self.listing)
        sub.names = self.names
        return sub

    def want(self, name: str, slow: bool = False) -> bool:
        self.names.append(name)
        if self.listing or (slow and self.quick):
            return False
        return not self.only or any(s in name for s in self.only)

    def add(self, row: Row, *results: Result) -> None:
        if not (row.ok and not row.lost and not row.stuck and row.bitwise is not False):
            tails = [" / ".join(r.text.strip().splitlines()[-3:]) for r in results]
            row.detail += " | output tail: " + " || ".join(t[-300:] for t in tails if t)
        row.stuck = row.stuck or any(r.rc is None for r in results)
        row.seconds = round(sum(r.seconds for r in results), 1)
        self.rows.append(row)
        good = row.ok and not row.lost and not row.stuck and row.bitwise is not False
        print(f"{'ok  ' if good else 'FAIL'} {row.group} | {row.case} | exit {row.exit} | "
              f"bitwise {row.bitwise} | lost {row.lost or '-'} | {row.detail[:200]} "
              f"({row.seconds:.0f}s)", flush=True)

    def copy(self, name: str, src: str | None = None) -> str:
        dst = os.path.join(self.root, "".join(c if c.isalnum() else "_" for c in name))
        n = 1
        while os.path.exists(dst + ("" if n == 1 else f"-{n}")):
            n += 1
        dst += "" if n == 1 else f"-{n}"
        shutil.copytree(src or self.base, dst, symlinks=True)
        return dst

    def resume_and_compare(self, workdir: str, *flags: str) -> tuple[Result, bool, str]:
        """Reruns the original command on ``workdir`` and compares step 12 with the
        reference."""
        r = run(main_cmd(workdir, *flags))
        if r.rc != 0:
            return r, False, f"rerun exit {r.rc}: {first_error(r)}"
        equal, how = state_equal(workdir, self.reference)
        return r, equal, how


# ------------------------------------------------------------------------------ corruptions

def data_files(step_dir: str) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            found += [os.path.join(root, f) for f in files]
    return sorted(found, key=os.path.getsize, reverse=True)


def truncate(d: str) -> None:
    p = data_files(d)[0]
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def flip64(d: str) -> None:
    p = data_files(d)[0]
    data = bytearray(open(p, "rb").read())
    for i in random.Random(0).sample(range(len(data)), 64):
        data[i] ^= 0xFF
    open(p, "wb").write(bytes(data))


def garbage_meta(d: str) -> None:
    open(os.path.join(d, "meta", "metadata"), "w").write("\x00garbage{")


def unreadable(d: str) -> None:
    for root, _, files in os.walk(d):
        for f in files:
            os.chmod(os.path.join(root, f), 0)


def file_to_folder(d: str) -> None:
    p = os.path.join(d, "state", "_sharding")
    os.remove(p)
    os.makedirs(p)


# Damage to one checkpoint (tests/test_checkpointing.py runs these in-process too). The
# unreadable one is a permission case: root reads files whatever their mode.
CORRUPTIONS = {
    "truncated data file": truncate,
    "deleted _METADATA": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "garbage metadata": garbage_meta,
    "state/ deleted": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "file replaced by a folder": file_to_folder,
    "unreadable files (chmod 000)": unreadable,
    "64 flipped bytes": flip64,
}
SLOW_CORRUPTIONS = ("deleted _METADATA", "garbage metadata", "file replaced by a folder")


def corrupt_cases(m: Matrix) -> None:
    damage = {**{k: v for k, v in CORRUPTIONS.items() if not k.startswith("unreadable")},
              "checksum file missing": lambda d: os.remove(
                  os.path.join(d, checkpointing.CHECKSUM_FILE))}
    for name, fn in damage.items():
        if not m.want(f"latest checkpoint: {name}", slow=name in SLOW_CORRUPTIONS):
            continue
        w = m.copy(name)
        fn(os.path.join(w, "checkpoints", "6"))
        before = snapshot(w)
        r, equal, how = m.resume_and_compare(w)
        moved = os.path.isdir(os.path.join(w, "checkpoints", "corrupt-6"))
        m.add(Row("corrupt checkpoint", f"latest checkpoint: {name}",
                  "exit 0, moved to corrupt-6, resumes from 4", [r.rc],
                  r.rc == 0 and moved, equal,
                  lost(before, snapshot(w), config_may_change=True, replaced_ok=(6,)),
                  detail=("moved to corrupt-6; " if moved else "NOT moved aside; ") + how), r)

    if m.want("all checkpoints: 64 flipped bytes, then --start_over"):
        w = m.copy("all_flipped")
        for s in ("2", "4", "6"):
            flip64(os.path.join(w, "checkpoints", s))
        cfg = open(os.path.join(w, "config.json")).read()
        r = run(main_cmd(w))
        kept = sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "4", "6"] and \
            open(os.path.join(w, "config.json")).read() == cfg
        r2, equal, how = m.resume_and_compare(w, "--start_over")
        moved = sorted(os.listdir(os.path.join(w, "checkpoints")))
        m.add(Row("corrupt checkpoint", "all checkpoints: 64 flipped bytes, then --start_over",
                  "exit 2 one line, nothing moved; --start_over: all to corrupt-*, trains "
                  "from 0", [r.rc, r2.rc],
                  r.rc == 2 and one_line(r) and kept and r2.rc == 0 and
                  {"corrupt-2", "corrupt-4", "corrupt-6"} <= set(moved), equal,
                  [] if kept else ["checkpoints or config.json touched by the refusal"],
                  detail=f"{first_error(r)}; then {how}"), r, r2)

    if m.want("all checkpoints: checksum file missing"):
        w = m.copy("all_unverified")
        for s in ("2", "4", "6"):
            os.remove(os.path.join(w, "checkpoints", s, checkpointing.CHECKSUM_FILE))
        r = run(main_cmd(w))
        trust = getattr(checkpointing, "TRUST_FLAG", "--trust_unverified_checkpoints")
        r2, equal, how = m.resume_and_compare(w, trust)
        m.add(Row("corrupt checkpoint", "all checkpoints: checksum file missing",
                  f"exit 2 one line naming {trust}; with it: resumes from 6", [r.rc, r2.rc],
                  r.rc == 2 and one_line(r) and trust in r.err and r2.rc == 0, equal,
                  detail=f"{first_error(r)}; then {how}"), r, r2)

    for name, damage in (("config.json missing", os.remove),
                         ("config.json garbage", lambda p: open(p, "w").write("{not json"))):
        if not m.want(name):
            continue
        w = m.copy(name)
        damage(os.path.join(w, "config.json"))
        r, equal, how = m.resume_and_compare(w)
        valid = False
        with contextlib.suppress(Exception):
            valid = bool(json.load(open(os.path.join(w, "config.json"))))
        m.add(Row("sidecar files", name, "exit 0, config.json rebuilt from the checkpoint, "
                  "resumes from 6", [r.rc], r.rc == 0 and valid, equal,
                  detail=("config.json valid afterwards; " if valid else
                          "config.json NOT valid afterwards; ") + how), r)
    if m.want("config.json missing, lr changed"):
        w = m.copy("config_missing_lr")
        os.remove(os.path.join(w, "config.json"))
        before = snapshot(w)
        r = run(main_cmd(w, "--config.optim.lr=0.1"))
        after = snapshot(w)
        m.add(Row("sidecar files", "config.json missing, lr changed",
                  "exit 2 one line (the change is still caught)", [r.rc],
                  r.rc == 2 and one_line(r), None, lost(before, after, config_may_change=True),
                  detail=first_error(r)), r)


# ------------------------------------------------------------------------------ interruptions

def interrupt_cases(m: Matrix) -> None:
    # (name, signal, from scratch, when, expected exit codes of the interrupted run)
    cases = [
        ("kill -9 during setup", signal.SIGKILL, True, "setup", (-9,)),
        ("kill -9 while training", signal.SIGKILL, False, "step 8", (-9,)),
        ("kill -9 during a checkpoint save", signal.SIGKILL, False, "save", (-9,)),
        ("SIGTERM during setup", signal.SIGTERM, True, "setup", (143,)),
        ("SIGTERM while training", signal.SIGTERM, False, "step 8", (143,)),
        ("Ctrl-C (SIGINT) during imports", signal.SIGINT, True, "imports", (130,)),
        ("Ctrl-C (SIGINT) while training", signal.SIGINT, False, "step 8", (130,)),
    ]
    for name, sig, scratch, when, codes in cases:
        if not m.want(name, slow=when == "setup" and sig == signal.SIGTERM):
            continue
        w = os.path.join(m.root, name.replace(" ", "_")) if scratch else m.copy(name)
        before = snapshot(w) if not scratch else ({}, None)
        flags = ["--config.train.checkpoint_every_steps=1"] if when == "save" else []
        p = Started(main_cmd(w, *flags), m.root)
        if when == "imports":
            time.sleep(1.0)
            caught = p.alive()
        elif when == "setup":
            # after the workdir exists, before the first step is logged
            caught = wait_until(p, lambda: os.path.exists(os.path.join(w, "config.json")))
            caught = caught and not logged_steps(w)
        elif when == "save":
            caught = wait_until(p, lambda: max(logged_steps(w) or [0]) >= 7 and saving(w),
                                poll=0.005)
        else:
            caught = wait_until(p, lambda: max(logged_steps(w) or [0]) >= 8)
        p.signal(sig)
        r = p.finish()
        # Before training: one error line. During training the run saves and says so in
        # its progress log (stdout); either way no traceback.
        clean = sig == signal.SIGKILL or ("Traceback" not in r.text and (
            one_line(r) if when in ("imports", "setup") and sig == signal.SIGINT else True))
        half = [f for f in tree(w) if f.endswith(".tmp")]
        after = snapshot(w)  # what the interruption itself left
        r2, equal, how = m.resume_and_compare(w)
        m.add(Row("signals", name, f"exit {'/'.join(map(str, codes))}, no traceback; the "
                  "rerun resumes", [r.rc, r2.rc],
                  caught and r.rc in codes and clean and not half and r2.rc == 0, equal,
                  lost(before, after, config_may_change=True), stuck=r2.rc != 0,
                  detail=("" if caught else f"NOT caught at '{when}' (the run ended first); ")
                  + (f"half-written {half}; " if half else "")
                  + (first_error(r) + "; " if error_lines(r.err) else "") + how), r, r2)


# ------------------------------------------------------------------------------ config

def config_cases(m: Matrix) -> None:
    refusals = [("lr changed", ["--config.optim.lr=0.1"]),
                ("model changed (base_width 32)", ["--config.model.base_width=32"]),
                ("width range changed", ["--config.sampler.width_range=(0.5,1.0)",
                                         "--config.eval.sweep_widths=(1.0,0.5)",
                                         "--config.eval.online_widths=(1.0,0.5)"]),
                ("another variant (configs/demo.py)", None)]
    for name, flags in refusals:
        if not m.want(name):
            continue
        w = m.copy(name)
        before = snapshot(w)
        r = run(main_cmd(w, *(flags or []), config=CONFIG if flags else "configs/demo.py"))
        m.add(Row("config change", name, "exit 2 one line with the difference", [r.rc],
                  r.rc == 2 and one_line(r) and "differ" in r.err, None,
                  lost(before, snapshot(w)), detail=first_error(r)), r)

    if m.want("failed override (--allow_config_change to AdamW)"):
        w = m.copy("failed_override")
        before = snapshot(w)
        r = run(main_cmd(w, "--allow_config_change", "--config.optim.optimizer=adamw",
                         "--config.optim.reg_lambda=0", "--config.optim.weight_decay=0.05"))
        after = snapshot(w)
        r2, equal, how = m.resume_and_compare(w)
        m.add(Row("config change", "failed override (--allow_config_change to AdamW)",
                  "exit 2 one line naming the change; config.json untouched; the original "
                  "command resumes", [r.rc, r2.rc],
                  r.rc == 2 and one_line(r) and "another version" not in r.err and r2.rc == 0,
                  equal, lost(before, after), stuck=r2.rc != 0,
                  detail=f"{first_error(r)}; then {how}"), r, r2)

    if m.want("NaN (lr 1e30 with --allow_config_change)"):
        w = m.copy("nan")
        before = snapshot(w)
        r = run(main_cmd(w, "--allow_config_change", "--config.optim.lr=1e30"))
        after = snapshot(w)
        r2, equal, how = m.resume_and_compare(w)
        m.add(Row("config change", "NaN (lr 1e30 with --allow_config_change)",
                  "exit 3 one line; config.json keeps the original lr; the original command "
                  "resumes", [r.rc, r2.rc], r.rc == 3 and one_line(r) and r2.rc == 0, equal,
                  lost(before, after), stuck=r2.rc != 0,
                  detail=f"{first_error(r)}; then {how}"), r, r2)

    if m.want("allowed change (lr with --allow_config_change)", slow=True):
        w = m.copy("allowed")
        r = run(main_cmd(w, "--config.optim.lr=0.1", "--allow_config_change", steps=8))
        hist = os.path.join(w, checkpointing.CONFIG_HISTORY_FILE)
        rec = json.loads(open(hist).readlines()[-1]) if os.path.exists(hist) else {}
        m.add(Row("config change", "allowed change (lr with --allow_config_change)",
                  "exit 0, change in config_history.jsonl", [r.rc],
                  r.rc == 0 and "optim.lr" in rec.get("changes", {}),
                  detail=json.dumps(rec)[:150]), r)


# ------------------------------------------------------------------------------ locks

def lock_cases(m: Matrix) -> None:
    if m.want("two runs started together", slow=True):
        w = os.path.join(m.root, "together")
        procs = [Started(main_cmd(w, steps=4), m.root) for _ in range(2)]
        rs = [p.finish() for p in procs]
        codes = sorted(r.rc for r in rs if r.rc is not None)
        msg = [ln for r in rs for ln in error_lines(r.err)]
        m.add(Row("one run per workdir", "two runs started together",
                  "one exit 0, one exit 2 naming the holder", [r.rc for r in rs],
                  codes == [0, 2] and len(msg) == 1 and "in use by another run" in msg[0],
                  detail=msg[0] if msg else ""), *rs)
    if m.want("second run while the first trains"):
        w = m.copy("second_run")
        # The first runs long enough (60 steps) to still train while the second starts up.
        first = Started(main_cmd(w, steps=60), m.root)
        wait_until(first, lambda: max(logged_steps(w) or [0]) >= 8)
        r = run(main_cmd(w, steps=60))
        r1 = first.finish()
        m.add(Row("one run per workdir", "second run while the first trains",
                  "second exit 2 one line; the first finishes", [r1.rc, r.rc],
                  r1.rc == 0 and r.rc == 2 and one_line(r) and "in use by another run" in r.err,
                  detail=first_error(r)), r1, r)
    if m.want("lock file removed mid-run"):
        w = m.copy("lock_removed")
        before = snapshot(w)
        p = Started(main_cmd(w), m.root)
        caught = wait_until(p, lambda: max(logged_steps(w) or [0]) >= 8)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(w, ".us3l.lock"))
        r = p.finish()
        after = snapshot(w)
        r2, equal, how = m.resume_and_compare(w)
        m.add(Row("one run per workdir", "lock file removed mid-run",
                  "exit 4 one line (another run may be using the workdir); the rerun resumes",
                  [r.rc, r2.rc], caught and r.rc == 4 and one_line(r) and r2.rc == 0, equal,
                  lost(before, after, config_may_change=True), stuck=r2.rc != 0,
                  detail=f"{first_error(r)}; then {how}"), r, r2)


# ------------------------------------------------------------------------------ workdirs

def mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def umount(path: str, lazy: bool = False) -> None:
    subprocess.run(["umount", *(["-l"] if lazy else []), path], capture_output=True)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def workdir_cases(m: Matrix) -> None:
    if m.want("read-only workdir (read-only mount)"):
        src = m.copy("ro_source")
        mnt = os.path.join(m.root, "ro_mount")
        os.makedirs(mnt)
        if not (mount("--bind", src, mnt) and mount("-o", "remount,bind,ro", mnt)):
            m.add(Row("workdir", "read-only workdir (read-only mount)", "exit 2/4 one line",
                      [None], False, detail="cannot mount (needs root and mount)"))
        else:
            try:
                before = snapshot(mnt)
                r = run(main_cmd(mnt))
                m.add(Row("workdir", "read-only workdir (read-only mount): main",
                          "exit 2 or 4 one line, nothing lost", [r.rc],
                          r.rc in (2, 4) and one_line(r), None, lost(before, snapshot(mnt)),
                          detail=first_error(r)), r)
                r = run(tool_cmd("us3l_jax.evaluate", f"--workdir={mnt}", "--widths=1.0"))
                m.add(Row("workdir", "read-only workdir: evaluate without --out",
                          "exit 2 one line before any work", [r.rc], r.rc == 2 and one_line(r),
                          bad_input=True, detail=first_error(r)), r)
                out = os.path.join(m.root, "ro_eval_out")
                r = run(tool_cmd("us3l_jax.evaluate", f"--workdir={mnt}", "--widths=1.0",
                                 "--calibration_batches=2", f"--out={out}"))
                stats = [f for f in tree(out) if f.startswith("bn_stats/")]
                m.add(Row("workdir", "read-only workdir: evaluate --out",
                          "exit 0; report and calibrated statistics in --out", [r.rc],
                          r.rc == 0 and bool(stats), detail=f"statistics in --out: {stats}"),
                      r)
            finally:
                umount(mnt)

    if m.want("workdir deleted mid-run"):
        w = m.copy("deleted")
        p = Started(main_cmd(w), m.root)
        caught = wait_until(p, lambda: max(logged_steps(w) or [0]) >= 8)
        shutil.rmtree(w, ignore_errors=True)
        r = p.finish()
        m.add(Row("workdir", "workdir deleted mid-run", "exit 4 one line, never success",
                  [r.rc], caught and r.rc == 4 and one_line(r), None,
                  detail=first_error(r) + (f"; recreated: {sorted(tree(w))[:4]}"
                                           if os.path.exists(w) else "")), r)

    if m.want("workdir renamed mid-run"):
        w = m.copy("renamed")
        moved = w + "_moved"
        p = Started(main_cmd(w), m.root)
        caught = wait_until(p, lambda: max(logged_steps(w) or [0]) >= 8)
        os.rename(w, moved)
        r = p.finish()
        split = sorted(tree(w)) if os.path.exists(w) else []
        r2, equal, how = m.resume_and_compare(moved)
        m.add(Row("workdir", "workdir renamed mid-run",
                  "exit 4 one line; nothing written to the old path; the run resumes in the "
                  "new one", [r.rc, r2.rc],
                  caught and r.rc == 4 and one_line(r) and not split and r2.rc == 0, equal,
                  stuck=r2.rc != 0, detail=f"{first_error(r)}; "
                  + (f"old path holds {split[:4]}; " if split else "") + how), r, r2)

    if m.want("workdir unmounted mid-run (tmpfs)"):
        mnt = os.path.join(m.root, "unmounted")
        os.makedirs(mnt)
        if not mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt):
            m.add(Row("workdir", "workdir unmounted mid-run (tmpfs)", "exit 4 one line",
                      [None], False, detail="cannot mount tmpfs (needs root and mount)"))
        else:
            w = os.path.join(mnt, "run")
            shutil.copytree(m.base, w)
            p = Started(main_cmd(w), m.root)
            caught = wait_until(p, lambda: max(logged_steps(w) or [0]) >= 8)
            umount(mnt, lazy=True)
            r = p.finish()
            m.add(Row("workdir", "workdir unmounted mid-run (tmpfs)",
                      "exit 4 one line, never success", [r.rc],
                      caught and r.rc == 4 and one_line(r), None,
                      detail=first_error(r)), r)

    if m.want("disk full during a save (tmpfs)"):
        mnt = os.path.join(m.root, "full_save")
        os.makedirs(mnt)
        if not mount("-t", "tmpfs", "-o", f"size={du(m.base) + 2 * 1024 * 1024}", "tmpfs",
                     mnt):
            m.add(Row("I/O", "disk full during a save (tmpfs)", "exit 4 one line", [None],
                      False, detail="cannot mount tmpfs (needs root and mount)"))
        else:
            try:
                w = os.path.join(mnt, "run")
                shutil.copytree(m.base, w)
                before = snapshot(w)
                r = run(main_cmd(w))
                after = snapshot(w)
                roomy = os.path.join(m.root, "full_save_rerun")
                shutil.copytree(w, roomy)
            finally:
                umount(mnt)
            r2, equal, how = m.resume_and_compare(roomy)
            m.add(Row("I/O", "disk full during a save (tmpfs), rerun with space",
                      "exit 4 one line with errno 28; the rerun resumes", [r.rc, r2.rc],
                      r.rc == 4 and one_line(r) and "28" in r.err and r2.rc == 0, equal,
                      lost(before, after, config_may_change=True),
                      detail=f"{first_error(r)}; then {how}"), r, r2)

    if m.want("disk full at start (tmpfs)", slow=True):
        mnt = os.path.join(m.root, "full_start")
        os.makedirs(mnt)
        if not mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt):
            m.add(Row("I/O", "disk full at start (tmpfs)", "exit 4 one line", [None], False,
                      detail="cannot mount tmpfs (needs root and mount)"))
        else:
            try:
                with open(os.path.join(mnt, "filler"), "wb") as f, \
                        contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                r = run(main_cmd(os.path.join(mnt, "run")))
                m.add(Row("I/O", "disk full at start (tmpfs)", "exit 4 (or 2) one line",
                          [r.rc], r.rc in (2, 4) and one_line(r), detail=first_error(r)), r)
            finally:
                umount(mnt)


def permission_cases(m: Matrix) -> None:
    how = PRIVILEGE.how

    def want(name: str) -> bool:
        if not m.want(name):
            return False
        if not PRIVILEGE.prefix and os.geteuid() == 0:
            m.add(Row("permissions", name, "run without root's privileges", [None], False,
                      detail=how))
            return False
        return True

    if want("unprivileged: workdir not writable"):
        w = m.copy("not_writable")
        give_to_unprivileged(w)
        os.chmod(w, 0o555)
        before = snapshot(w)
        r = run(main_cmd(w), unprivileged=True)
        os.chmod(w, 0o755)
        m.add(Row("permissions", "unprivileged: workdir not writable",
                  "exit 2 one line before any work, nothing lost", [r.rc],
                  r.rc == 2 and one_line(r), None, lost(before, snapshot(w)), bad_input=True,
                  detail=f"{first_error(r)} [{how}]"), r)
    if want("unprivileged: checkpoints/ not writable"):
        w = m.copy("ckpt_not_writable")
        give_to_unprivileged(w)
        os.chmod(os.path.join(w, "checkpoints"), 0o555)
        before = snapshot(w)
        # A normal run takes about a minute here: one waiting minutes on a save that cannot
        # succeed is stuck.
        r = run(main_cmd(w), unprivileged=True, timeout=180)
        os.chmod(os.path.join(w, "checkpoints"), 0o755)
        m.add(Row("permissions", "unprivileged: checkpoints/ not writable",
                  "exit 2 or 4 one line, nothing lost", [r.rc],
                  r.rc in (2, 4) and one_line(r), None,
                  lost(before, snapshot(w), config_may_change=True),
                  detail=f"{first_error(r)} [{how}]"), r)
    if want("unprivileged: latest checkpoint unreadable (chmod 000)"):
        w = m.copy("unreadable")
        give_to_unprivileged(w)
        unreadable(os.path.join(w, "checkpoints", "6"))
        before = snapshot(w)
        r = run(main_cmd(w), unprivileged=True)
        moved = os.path.isdir(os.path.join(w, "checkpoints", "corrupt-6"))
        equal, cmp = state_equal(w, m.reference) if r.rc == 0 else (False, "")
        m.add(Row("permissions", "unprivileged: latest checkpoint unreadable (chmod 000)",
                  "exit 0, moved to corrupt-6, resumes from 4", [r.rc], r.rc == 0 and moved,
                  equal, lost(before, snapshot(w), config_may_change=True, replaced_ok=(6,)),
                  detail=("moved to corrupt-6; " if moved else "NOT moved; ") + cmp
                  + f" [{how}]"), r)
    if want("unprivileged: evaluate --out in a read-only folder"):
        parent = os.path.join(m.root, "ro_parent")
        os.makedirs(parent)
        os.chmod(parent, 0o555)
        r = run(tool_cmd("us3l_jax.evaluate", f"--workdir={m.base}", "--widths=1.0",
                         f"--out={parent}/report"), unprivileged=True)
        m.add(Row("permissions", "unprivileged: evaluate --out in a read-only folder",
                  "exit 2 one line before any work, nothing written", [r.rc],
                  r.rc == 2 and one_line(r) and not tree(parent), bad_input=True,
                  detail=f"{first_error(r)} [{how}]"), r)
    if want("unprivileged: export --out in a read-only folder"):
        parent = os.path.join(m.root, "ro_parent_export")
        os.makedirs(parent)
        os.chmod(parent, 0o555)
        t0 = time.time()
        r = run(tool_cmd("us3l_jax.export", f"--workdir={m.base}", "--width=1.0",
                         "--format=flax", f"--out={parent}/model"), unprivileged=True)
        m.add(Row("permissions", "unprivileged: export --out in a read-only folder",
                  "exit 2 one line before any work, nothing written", [r.rc],
                  r.rc == 2 and one_line(r) and not tree(parent) and time.time() - t0 < 30,
                  bad_input=True, detail=f"{first_error(r)} ({time.time() - t0:.0f}s) [{how}]"),
              r)


# ------------------------------------------------------------------------------ bad inputs

BAD_MAIN = [
    ("lr=inf", ["--config.optim.lr=inf"], "config.optim.lr=inf"),
    ("distill_weight=-1", ["--config.method.distill_weight=-1"], "method.distill_weight"),
    ("reg_alpha=-1", ["--config.optim.reg_alpha=-1"], "optim.reg_alpha"),
    ("online_every_epochs=-1", ["--config.eval.online_every_epochs=-1"],
     "eval.online_every_epochs"),
    ("width_range=(0.1,1.0)", ["--config.sampler.width_range=(0.1,1.0)"],
     "sampler.width_range"),
    ("width_range=(0.2,1.0)", ["--config.sampler.width_range=(0.2,1.0)"],
     "sampler.width_range"),
    ("image_size=0", ["--config.data.image_size=0"], "config.data.image_size"),
    ("reg_groups=0", ["--config.optim.reg_groups=0"], "config.optim.reg_groups"),
    ("warmup_epochs=-1", ["--config.optim.warmup_epochs=-1"], "config.optim.warmup_epochs"),
    ("stage_sizes=(1,1)", ["--config.model.stage_sizes=(1,1)"], "model.stage_sizes"),
    ("data_dir for digits", ["--config.data.data_dir=/tmp"], "data.data_dir"),
    ("batch size 63, group 32", ["--config.optim.batch_size=63"], "use e.g. 64"),
    ("unknown key bogus", ["--config.optim.bogus=1"], "closest valid key is config.optim."),
    ("key in the wrong section", ["--config.optim.distill_weight=1"],
     "closest valid key is config.method.distill_weight"),
    ("workdir is a file", None, "/etc/hostname"),
    ("workdir under /proc", None, "/proc"),
]
BAD_TOOLS = [  # (name, module, flags, text the one line must hold)
    ("evaluate --widths=", "us3l_jax.evaluate", ["--widths="], "--widths is empty"),
    ("evaluate --calibration_batches=0", "us3l_jax.evaluate", ["--calibration_batches=0"],
     "--calibration_batches=0 must be > 0"),
    ("evaluate width outside the range", "us3l_jax.evaluate", ["--widths=1.0,0.1"],
     "outside the trained range"),
    ("evaluate unknown protocol", "us3l_jax.evaluate", ["--protocol=nope"], "nope"),
    ("evaluate no such run", "us3l_jax.evaluate", ["--workdir=/nonexistent/run"],
     "/nonexistent/run"),
    ("export width outside the range", "us3l_jax.export", ["--width=2.0", "--out={tmp}/x"],
     "2.0"),
    ("export unknown format", "us3l_jax.export", ["--width=1.0", "--format=nope",
                                                  "--out={tmp}/x"], "nope"),
    ("export --out an existing file", "us3l_jax.export", ["--width=1.0",
                                                          "--out={tmp}/file"], "file"),
    ("export budget no width fits", "us3l_jax.export", ["--max-params=10",
                                                        "--out={tmp}/x"], "10"),
    ("profile unknown model", "us3l_jax.profile", ["--model=nope"], "nope"),
    ("profile width 2.0", "us3l_jax.profile", ["--model=resnet18", "--widths=2.0"], "2.0"),
    ("profile input_size=0", "us3l_jax.profile", ["--model=resnet18", "--input_size=0"],
     "input_size"),
    ("profile empty widths", "us3l_jax.profile", ["--model=resnet18", "--widths="], "widths"),
]


def bad_input_cases(m: Matrix) -> None:
    for name, flags, want in BAD_MAIN:
        if not m.want(f"main: {name}"):
            continue
        w = {"workdir is a file": "/etc/hostname",
             "workdir under /proc": "/proc/us3l_run"}.get(name) or os.path.join(
            m.root, "bad_" + "".join(c if c.isalnum() else "_" for c in name))
        before = tree(w)
        r = run(main_cmd(w, *(flags or [])), timeout=120)
        written = tree(w) != before or (not before and os.path.exists(w))
        m.add(Row("bad input", f"main: {name}", "exit 2 one line naming it, nothing written",
                  [r.rc], r.rc == 2 and one_line(r) and want in r.err and not written,
                  bad_input=True, detail=first_error(r) + ("; WROTE into the workdir"
                                                           if written else "")), r)
    for name, module, flags, want in BAD_TOOLS:
        if not m.want(name):
            continue
        tmp = os.path.join(m.root, "bad_" + "".join(c if c.isalnum() else "_" for c in name))
        os.makedirs(tmp)
        open(os.path.join(tmp, "file"), "w").write("keep")
        flags = [f.format(tmp=tmp) for f in flags]
        if module != "us3l_jax.profile" and not any(f.startswith("--workdir") for f in flags):
            flags = [f"--workdir={m.base}"] + flags
        before_tmp, before_base = tree(tmp), tree(m.base)
        r = run(tool_cmd(module, *flags), timeout=120)
        written = tree(tmp) != before_tmp or tree(m.base) != before_base
        m.add(Row("bad input", name, "exit 2 one line naming it, nothing written", [r.rc],
                  r.rc == 2 and one_line(r) and want in r.err and not written,
                  bad_input=True, detail=first_error(r) + ("; WROTE something"
                                                           if written else "")), r)


def stats_file(workdir: str, calibration_batches: int | None) -> str:
    """The width-1.0 statistics file that evaluate and export read for the run's calibration
    procedure (with ``--calibration_batches``)."""
    from us3l_jax import calibration as calib
    from us3l_jax.evaluate.evaluator import calibration_settings
    config = checkpointing.read_config(workdir)
    key = calib.procedure_key(config.eval.calibration,
                              calibration_settings(config, calibration_batches))
    return calib.stats_path(workdir, BASE_STEPS, 1.0, key)


def sidecar_input_cases(m: Matrix) -> None:
    """Damaged files that evaluation and export read: they must be named and worked around."""
    for tool in ("evaluate", "export"):
        name = f"{tool}: corrupt bn_stats file"
        if not m.want(name, slow=tool == "evaluate"):
            continue
        w = m.copy(name)
        stats = stats_file(w, 2 if tool == "evaluate" else None)
        os.makedirs(os.path.dirname(stats))
        open(stats, "wb").write(b"\x81\xa3abc\x00garbage")
        out = os.path.join(m.root, f"{tool}_corrupt_stats_out")
        flags = (["--widths=1.0", "--calibration_batches=2"] if tool == "evaluate" else
                 ["--width=1.0", "--format=flax"])
        r = run(tool_cmd(f"us3l_jax.{tool}", f"--workdir={w}", *flags, f"--out={out}"))
        named = "width_1.0.msgpack" in r.text
        m.add(Row("damaged inputs", name, "exit 0, the file named, statistics recomputed",
                  [r.rc], r.rc == 0 and named and "Traceback" not in r.text,
                  detail=("file named; " if named else "file NOT named; ") + first_error(r)
                  if r.rc else ("file named" if named else "file NOT named")), r)
    if m.want("export: garbage sweep.json"):
        w = m.copy("garbage_sweep")
        open(os.path.join(w, "sweep.json"), "w").write("{garbage")
        out = os.path.join(m.root, "export_garbage_sweep_out")
        r = run(tool_cmd("us3l_jax.export", f"--workdir={w}", "--width=1.0", "--format=flax",
                         f"--out={out}"))
        named = "sweep.json" in r.text
        m.add(Row("damaged inputs", "export: garbage sweep.json",
                  "exit 0 without probe accuracies, sweep.json named", [r.rc],
                  r.rc == 0 and named and "Traceback" not in r.text,
                  detail=("sweep.json named; " if named else "sweep.json NOT named; ")
                  + (first_error(r) if r.rc else "")), r)


# ------------------------------------------------------------------------------ main

GROUPS = (bad_input_cases, interrupt_cases, corrupt_cases, config_cases, lock_cases,
          workdir_cases, permission_cases, sidecar_input_cases)


def build_runs(m: Matrix) -> None:
    """The base run (0 -> 6) the cases copy, and the uninterrupted reference (0 -> 12),
    side by side."""
    t0 = time.time()
    runs = [(path, Started(main_cmd(path, steps=steps), m.root))
            for path, steps in ((m.base, BASE_STEPS), (m.reference, STEPS))]
    for path, p in runs:
        r = p.finish()
        if r.rc != 0:
            raise SystemExit(f"the {os.path.basename(path)} run failed (exit {r.rc}):\n"
                             f"{r.text[-3000:]}")
        print(f"{os.path.basename(path)} run: {time.time() - t0:.0f}s, checkpoints "
              f"{sorted(snapshot(path)[0])}", flush=True)


def run_groups(m: Matrix, jobs: int) -> None:
    """Runs the groups of cases, ``jobs`` at a time (most of a case is process start-up and
    waiting on the file system, so two overlap well on two cores); the rows keep the order
    of GROUPS. A group that crashes is a failed row, not a lost matrix."""
    subs = [m.child() for _ in GROUPS]

    def one(group, sub):
        try:
            group(sub)
        except Exception as e:  # noqa: BLE001 - reported as a row
            sub.add(Row(group.__name__, "(the group stopped)", "all its cases run", [None],
                        False, detail=f"{type(e).__name__}: {e}"))

    order = sorted(range(len(GROUPS)), key=lambda i: GROUPS[i] is bad_input_cases)
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for future in [pool.submit(one, GROUPS[i], subs[i]) for i in order]:
            future.result()
    m.rows = [row for sub in subs for row in sub.rows]


def main(argv: Sequence[str] | None = None) -> int:
    global PRIVILEGE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/fault_matrix.json", help="JSON results")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the "
                    "cases whose name holds one of them")
    ap.add_argument("--quick", action="store_true", help="leave out the slower duplicates "
                    "(about half the time)")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--jobs", type=int, default=2, help="groups of cases run at once")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.list:
        m = Matrix("", only, args.quick, listing=True)
        for group in GROUPS:
            group(m)
        print("\n".join(m.names))
        return 0
    t_start = time.time()
    root = tempfile.mkdtemp(prefix="us3l_faults_")
    os.chmod(root, 0o755)  # an unprivileged user must reach the copies
    PRIVILEGE = find_privilege_drop()
    print(f"privileges dropped by: {PRIVILEGE.how}", flush=True)
    m = Matrix(root, only, args.quick)
    try:
        build_runs(m)
        import jax
        jax.devices()  # the comparisons restore in threads: start the backend once, here
        run_groups(m, args.jobs)
    finally:
        for line in open("/proc/mounts"):
            point = line.split()[1]
            if point.startswith(root):
                umount(point, lazy=True)
        subprocess.run(["chmod", "-R", "u+rwX", root], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    wall = time.time() - t_start
    summary = {**verdict(m.rows), "wall_s": round(wall), "privileges": PRIVILEGE.how,
               "only": only, "quick": args.quick, "jobs": args.jobs}
    print("\n" + table(m.rows))
    print(f"\n{summary['cases']} cases in {wall / 60:.1f} min: {summary['failed']} failed; "
          f"runs lost {summary['lost']}, stuck {summary['stuck']}; bad inputs "
          f"{summary['bad_inputs']}, not clean {summary['bad_inputs_unclean']}; bitwise equal "
          f"{summary['bitwise_equal']} of {summary['bitwise_checked']} resumed runs")
    with open(args.out, "w") as f:
        json.dump({**summary, "rows": [dataclasses.asdict(r) for r in m.rows]}, f, indent=2)
    return summary["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
