"""The accelerator check in one command, for a machine with a preinstalled JAX and no network
(a GPU image, a TPU VM, Colab): install, versions, a short test subset on the device, the
accelerator benchmark, the official step in PyTorch at the same batch / widths / dtype, and a
profile of one US3L iteration. Everything goes under one output folder.

    # on a machine with network: the wheels the image lacks, for its Python (3.12), ~11 MiB
    python experiments/device_check.py --download-wheels .whl
    # on the device machine, from the repository root, no network:
    python3 experiments/device_check.py --out OUT --wheels .whl [--budget-s 330]
    # the CPU path of the same script (tiny shapes, a few minutes):
    python experiments/device_check.py --out /tmp/dc --smoke

Steps, in this order, each timed and logged; a step that fails is recorded and the next runs:

1. ``install``: ``pip install --no-deps --no-index`` of the wheel folder and of this project
   into ``<work>/site`` (``<out>.work`` by default; nothing of the image is replaced), then
   every module imports from there;
2. ``versions``: Python, JAX, jaxlib, flax, optax, orbax, chex, numpy, torch; devices;
3. ``ab`` (only with ``--before DIR``, a copy of ``us3l_jax`` before a change): the CIFAR
   ResNet-18 bf16 US3L step from that copy and from this checkout, each in a fresh process
   (``ab.json``: before / after step times and the speed-up);
4. ``tests``: a subset of the test suite on the default backend (``JAX_PLATFORMS`` unset),
   within ``--tests-s`` (an error if it fails or runs out of time);
5. ``bench``: ``accelerator_bench.py`` within what is left of ``--budget-s`` (its JSON and
   table);
6. ``torch``: ``official_step_torch.py`` at the CIFAR case's batch and stage-4 widths, in
   bfloat16 and float32, and the throughput ratio of our step to it;
7. ``profile``: the CIFAR ResNet-18 US3L step (bf16, the config's update mode): per-program
   times (blocking after each program), a ``jax.profiler`` trace of 3 iterations with the
   device's kernels summed by name, and XLA's HLO dumps; packed into ``profile.tar.gz``.

Outputs (at most 8 files, so that a device tool returning ``$OUT`` gets them all):
``device_check.json`` (summary, rewritten after every step), ``device_check.log``,
``accel.json``, ``torch_bf16.json``, ``torch_fp32.json``, ``profile.json``,
``profile.tar.gz``, ``ab.json``.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")

# What a current GPU image (Python 3.12, JAX + flax + optax + orbax + chex + scikit-learn +
# matplotlib + safetensors preinstalled) lacks for ``import us3l_jax.*``, pinned to the
# versions the lock file tests. ``promise`` ships only as a source archive: it is built into a
# (pure-Python) wheel here.
WHEELS = ("ml-collections==1.1.0", "dm-pix==0.4.5", "tensorboardX==2.6.5",
          "tensorflow-datasets==4.9.10", "grain==0.2.18", "array-record==0.8.6",
          "dm-tree==0.1.10", "immutabledict==4.3.1", "simple-parsing==0.1.9",
          "tensorflow-metadata==1.21.0", "termcolor==3.3.0", "toml==0.10.2",
          "googleapis-common-protos==1.76.0", "docstring-parser==0.18.0", "portpicker==1.6.0")
SDIST_WHEELS = ("promise==2.3",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")

# Fast test files that run the slimmable layers (BatchNorm's gradient included), the ResNets,
# the losses and the width sampler on the device: 109 tests, about 100 s on an H200 with
# JAX 0.11.2 (most of it compiling). tests/engine/test_engine.py adds the engine's slower
# ones (about 2 more minutes there, measured for its predecessor): pass it with --test-files when the window allows.
DEVICE_TESTS = ("tests/test_slim.py", "tests/test_objectives.py", "tests/test_sampling.py",
                "tests/models/test_resnet.py")

MODULES = ("us3l_jax.main", "us3l_jax.pretrain", "us3l_jax.evaluate", "us3l_jax.export",
           "us3l_jax.profile", "us3l_jax.data.streaming", "us3l_jax.data.prepare")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "ml-collections", "tensorflow-datasets", "grain", "dm-pix", "torch")


# ------------------------------------------------------------------------------ helpers


class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.f.write(line + "\n")


def run_cmd(log: Log, cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
            cwd: str = REPO) -> dict[str, Any]:
    """Runs ``cmd`` (its own process group, killed whole after ``timeout`` s) with its output
    appended to the log; {rc, seconds, timed_out, tail (last 40 lines)}."""
    log(f"$ {' '.join(cmd)}")
    t = time.monotonic()
    out_path = log.f.name + ".cmd"
    with open(out_path, "w") as out:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        try:
            rc, timed_out = p.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            rc, timed_out = None, True
    with open(out_path) as f:
        lines = f.read().splitlines()
    os.remove(out_path)
    log(*("  " + x for x in lines))
    if timed_out:
        log(f"  (stopped after {timeout:.0f} s)")
    return dict(rc=rc, seconds=time.monotonic() - t, timed_out=timed_out, tail=lines[-40:])


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write. Not ``us3l_jax.fileio``: this process must not import the package,
    whose copy (installed, checkout or ``--src``) each step chooses for itself."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ wheels


def download_wheels(folder: str, python_version: str = "3.12") -> int:
    """Downloads (and, for source-only packages, builds) the wheels of ``WHEELS`` for the
    image's Python into ``folder``; returns pip's exit status."""
    os.makedirs(folder, exist_ok=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    rc = subprocess.call([sys.executable, "-m", "pip", "download", "--no-deps",
                          "--only-binary=:all:", "--python-version", python_version,
                          "--implementation", "cp", *plat, "-d", folder, *WHEELS])
    if rc == 0:
        rc = subprocess.call([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", folder,
                              *SDIST_WHEELS])
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.whl")))
    print(f"{folder}: {len(glob.glob(os.path.join(folder, '*.whl')))} wheels, "
          f"{size / 2 ** 20:.1f} MiB")
    return rc


# ------------------------------------------------------------------------------ steps


def step_install(args, log: Log, env: dict[str, str]) -> dict[str, Any]:
    site = args.site
    os.makedirs(site, exist_ok=True)
    out: dict[str, Any] = dict(site=site)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", site]
    if args.wheels:
        wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
        if not wheels:
            raise FileNotFoundError(f"--wheels {args.wheels}: no .whl files there")
        out["wheels"] = [os.path.basename(w) for w in wheels]
        r = run_cmd(log, pip + wheels, 300, env)
        if r["rc"] != 0:
            raise RuntimeError(f"installing the wheels failed: {r['tail'][-3:]}")
    r = run_cmd(log, pip + ["--no-build-isolation", REPO], 300, env)
    out["project"] = "pip"
    if r["rc"] != 0:
        # No network means no build isolation, so the build needs the image's setuptools
        # (and wheel): where they cannot build, the package is pure Python, copy it.
        log("  pip could not build us3l_jax here; copying the package instead")
        shutil.rmtree(os.path.join(site, "us3l_jax"), ignore_errors=True)
        shutil.copytree(os.path.join(REPO, "us3l_jax"), os.path.join(site, "us3l_jax"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        out["project"] = "copied (pip build failed)"
    code = ("import importlib, sys\n"
            f"for m in {MODULES!r}:\n"
            "    importlib.import_module(m)\n"
            "import us3l_jax; print('us3l_jax from', us3l_jax.__file__)")
    # Imports from the installed copy (not the checkout), to check the install itself.
    r = run_cmd(log, [sys.executable, "-c", code], 300,
                dict(env, PYTHONPATH=site, JAX_PLATFORMS="cpu"), cwd="/")
    out["imports"] = r["rc"] == 0
    if r["rc"] != 0:
        raise RuntimeError(f"imports failed: {r['tail'][-5:]}")
    return out


VERSIONS_CODE = r"""
import json, os, platform, sys
from importlib import metadata
out = {"python": platform.python_version(), "packages": {}}
for p in %r:
    try:
        out["packages"][p] = metadata.version(p)
    except metadata.PackageNotFoundError:
        out["packages"][p] = None
import jax
out["backend"] = jax.default_backend()
out["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
print("VERSIONS " + json.dumps(out))
"""


def step_versions(args, log: Log, env: dict[str, str]) -> dict[str, Any]:
    r = run_cmd(log, [sys.executable, "-c", VERSIONS_CODE % (PACKAGES,)], 120, env)
    line = next((x for x in r["tail"] if x.startswith("VERSIONS ")), None)
    if line is None:
        raise RuntimeError(f"version probe failed: {r['tail'][-5:]}")
    out = json.loads(line[len("VERSIONS "):])
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True)
        out["nvidia_smi"] = smi.stdout.strip()
        log(f"nvidia-smi: {out['nvidia_smi']}")
    return out


def step_tests(args, log: Log, env: dict[str, str], limit: float) -> dict[str, Any]:
    # One process (the device is one), no preallocation (pytest and XLA share it politely);
    # conftest pins float32 matmuls to full precision, so references hold on TF32 hardware.
    test_env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if not args.smoke:
        test_env.pop("JAX_PLATFORMS", None)  # the device's backend, not conftest's CPU
    files = [f for f in args.test_files if os.path.exists(os.path.join(REPO, f))]
    r = run_cmd(log, [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:xdist",
                      "-p", "no:cacheprovider", "-o", "addopts=", "--durations=5", *files],
                limit, test_env)
    summary = next((x for x in reversed(r["tail"]) if " in " in x and (
        "passed" in x or "failed" in x or "error" in x)), None)
    if r["timed_out"] or r["rc"] != 0:
        dots = sum(x.count(".") for x in r["tail"] if set(x.strip()) <= set(".[]% 0123456789"))
        raise RuntimeError(f"tests {'stopped at the time limit' if r['timed_out'] else 'failed'}"
                           f" ({summary or f'{dots} passed before it'})")
    return dict(files=files, rc=r["rc"], timed_out=r["timed_out"], seconds=r["seconds"],
                summary=summary, backend="cpu" if args.smoke else "default")


def step_bench(args, log: Log, env: dict[str, str], budget: float) -> dict[str, Any]:
    out_json = os.path.join(args.out, "accel.json")
    cmd = [sys.executable, os.path.join(EXPERIMENTS, "accelerator_bench.py"), "--out",
           out_json, "--budget-s", f"{budget:.0f}", "--cache-dir",
           os.path.join(args.work, "xla_cache")]
    if args.smoke:
        cmd += ["--smoke", "--cases", "cifar_r18_bf16"]
    if args.bench_cases:
        cmd += ["--cases", args.bench_cases]
    r = run_cmd(log, cmd, budget + 120, env)
    res = json.load(open(out_json)) if os.path.exists(out_json) else {}
    return dict(rc=r["rc"], timed_out=r["timed_out"], seconds=r["seconds"],
                complete=res.get("complete"), goals=res.get("goals"),
                cases={c["name"]: c["status"] for c in res.get("cases", [])})


def cifar_case(args) -> dict[str, Any] | None:
    path = os.path.join(args.out, "accel.json")
    if not os.path.exists(path):
        return None
    res = json.load(open(path))
    return next((c for c in res.get("cases", []) if c["name"].startswith("cifar_r18_")
                 and c["status"] == "ok"), None)


def step_torch(args, log: Log, env: dict[str, str]) -> dict[str, Any]:
    """The official step at the CIFAR case's batch and widths, bf16 and fp32; the ratio of
    its iteration time to ours in the same update mode (per_width: one update per width)."""
    res = json.load(open(os.path.join(args.out, "accel.json")))
    cases = {c["name"]: c for c in res.get("cases", []) if c["status"] == "ok"}
    ref = cases.get("cifar_r18_bf16") or cases.get("cifar_r18_fp32")
    if ref is None:
        raise RuntimeError("no CIFAR ResNet-18 case was measured: nothing to compare with")
    out: dict[str, Any] = {}
    for dtype, case_name in (("bf16", "cifar_r18_bf16"), ("fp32", "cifar_r18_fp32")):
        path = os.path.join(args.out, f"torch_{dtype}.json")
        cmd = [sys.executable, os.path.join(EXPERIMENTS, "official_step_torch.py"), "--out", path,
               "--batch", str(ref["batch"]), "--widths", ",".join(map(str, ref["us3l_widths"])),
               "--steps", str(args.torch_steps), "--device", "cpu" if args.smoke else "cuda"]
        if args.smoke:
            cmd += ["--image-size", str(ref["image_shape"][0]), "--base-width", "16"]
        if dtype == "bf16":
            cmd.append("--bf16")
        r = run_cmd(log, cmd, 300, env)
        rec: dict[str, Any] = dict(rc=r["rc"])
        if r["rc"] == 0:
            t = json.load(open(path))
            rec.update(step_s=t["step_s"], images_per_s=t["images_per_s"], device=t["device"])
            ours = cases.get(case_name)
            v = next((v for v in (ours or {}).get("variants", [])
                      if v["variant"] == "us3l_per_width"), None)
            if v is not None:
                rec.update(ours_step_s=v["step_s"], ours_pipelined_step_s=v["pipelined_step_s"],
                           throughput_ratio=t["step_s"] / v["step_s"],
                           pipelined_throughput_ratio=t["step_s"] / v["pipelined_step_s"])
                log(f"official {dtype}: {1e3 * t['step_s']:.2f} ms, ours (per_width) "
                    f"{1e3 * v['step_s']:.2f} ms: {rec['throughput_ratio']:.2f}x")
        out[dtype] = rec
    return out


# ------------------------------------------------------------------------------ profile


def _trace_tables(trace_dir: str, iterations: int, top: int = 40) -> dict[str, Any]:
    """Device activity of the profiler's trace (the ``*.trace.json.gz`` of the trace viewer):
    per device thread (GPU streams: kernels; "XLA Ops": HLO instructions; "XLA Modules":
    programs) the time per event name, summed over the traced iterations and divided by
    their number."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        return dict(note="no trace written")
    with gzip.open(files[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in meta
             if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in meta
               if e.get("name") == "thread_name"}
    device = {p for p, n in procs.items() if n.startswith("/device:") and "CPU" not in n}
    tables: dict[str, dict[str, list[float]]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device and "dur" in e:
            thread = threads.get((e["pid"], e.get("tid")), "?")
            group = "stream" if thread.lower().startswith("stream") else thread
            row = tables.setdefault(group, {}).setdefault(e.get("name", "?"), [0.0, 0])
            row[0] += e["dur"]
            row[1] += 1
    out: dict[str, Any] = dict(file=os.path.basename(files[0]),
                               device_processes=sorted(procs[p] for p in device), threads={})
    for group, rows in tables.items():
        ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
        out["threads"][group] = dict(
            us_per_iteration=sum(r[0] for r in rows.values()) / iterations,
            events_per_iteration=sum(r[1] for r in rows.values()) / iterations,
            top=[dict(name=n[:200], us_per_iteration=d / iterations,
                      calls_per_iteration=c / iterations) for n, (d, c) in ranked[:top]])
    return out


def profile_main(args) -> None:
    """(Runs in its own process, so that the XLA dump flags apply to it alone.) With
    ``--src``, ``us3l_jax`` is imported from that folder first (a copy of the package in its
    "before" state, for an A/B of a change in one session)."""
    if args.src:
        sys.path.insert(0, args.src)
        import us3l_jax  # noqa: F401 - imported first, so later path changes keep this copy
    import jax
    import numpy as np
    sys.path.insert(0, REPO)
    sys.path.insert(0, EXPERIMENTS)
    import accelerator_bench as ab
    import bench_step
    from us3l_jax import build, mesh as mesh_lib
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.work, "xla_cache"))
    case = next(c for c in ab.CASES if c.name == "cifar_r18_bf16")
    config = ab.case_config(case, args.smoke)
    if args.profile_mode:
        config.method.update_mode = args.profile_mode
    mesh = mesh_lib.make_mesh()
    spec = build.image_spec(config, mesh)
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, spec.shape, np.uint8),
                            spec.sharding)
    widths = ab.last_stage_widths(config, ab.steps_per_epoch(config))
    t = time.perf_counter()
    mode = bench_step._Mode(config, config.method.update_mode, images, mesh)
    mode.step(widths)
    import us3l_jax
    rec: dict[str, Any] = dict(config=case.config, dtype=config.model.dtype,
                               batch=config.optim.batch_size, widths=list(widths),
                               update_mode=config.method.update_mode,
                               package=os.path.dirname(us3l_jax.__file__),
                               first_step_s=time.perf_counter() - t)
    for _ in range(2):
        mode.step(widths)
    steps = [float(mode.step(widths)[0][0]) for _ in range(10)]
    rec["step_s"] = statistics.median(steps)
    rec["step_times"] = steps
    t = time.perf_counter()
    for _ in range(10):  # dispatched back to back, as the training loop runs
        mode.state, _ = mode.trainer.step(mode.state, mode.images, widths)
    jax.block_until_ready(mode.state)
    rec["pipelined_step_s"] = (time.perf_counter() - t) / 10
    if args.no_trace:
        write_json(args.record, rec)
        print(f"{args.label}: step {1e3 * rec['step_s']:.2f} ms, pipelined "
              f"{1e3 * rec['pipelined_step_s']:.2f} ms, first step {rec['first_step_s']:.1f} s")
        return
    parts: dict[str, list[float]] = {}
    for _ in range(3):
        for k, v in mode.breakdown(widths).items():
            parts.setdefault(k, []).append(float(v[0]))
    rec["programs_s"] = {k: statistics.median(v) for k, v in parts.items()}
    rec["programs_sum_s"] = sum(rec["programs_s"].values())
    trace_dir = os.path.join(args.work, "trace")
    n = 3
    jax.block_until_ready(mode.state)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(n):
        mode.step(widths)
    jax.block_until_ready(mode.state)
    jax.profiler.stop_trace()
    try:
        rec["trace"] = _trace_tables(trace_dir, n)
    except Exception as e:  # noqa: BLE001 - the trace is still packed for offline reading
        rec["trace"] = dict(error=f"{type(e).__name__}: {e}")
    write_json(args.record, rec)
    print(f"profile: step {1e3 * rec['step_s']:.2f} ms; programs "
          + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in rec["programs_s"].items()))
    for group, table in rec["trace"].get("threads", {}).items():
        print(f"{group}: {table['us_per_iteration'] / 1e3:.2f} ms/iteration in "
              f"{table['events_per_iteration']:.0f} events")
        for row in table["top"][:20]:
            print(f"  {row['us_per_iteration'] / 1e3:8.3f} ms  x{row['calls_per_iteration']:5.1f}"
                  f"  {row['name'][:110]}")


def step_profile(args, log: Log, env: dict[str, str], budget: float) -> dict[str, Any]:
    dump = os.path.join(args.work, "xla_dump")
    shutil.rmtree(dump, ignore_errors=True)
    shutil.rmtree(os.path.join(args.work, "trace"), ignore_errors=True)
    flags = env.get("XLA_FLAGS", "")
    if not args.no_dump:
        flags += (f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                  " --xla_dump_hlo_module_re=.*(base|sub|apply|views|finish).*")
    cmd = [sys.executable, os.path.abspath(__file__), "--_profile", "--out", args.out,
           "--work", args.work] + (["--smoke"] if args.smoke else []) + (
        ["--profile-mode", args.profile_mode] if args.profile_mode else [])
    r = run_cmd(log, cmd, budget, dict(env, XLA_FLAGS=flags.strip()))
    tar = os.path.join(args.out, "profile.tar.gz")
    with tarfile.open(tar, "w:gz") as t:
        for d in ("trace", "xla_dump"):
            if os.path.isdir(os.path.join(args.work, d)):
                t.add(os.path.join(args.work, d), arcname=d)
    if os.path.getsize(tar) > 15 * 2 ** 20:  # a device tool returns files up to 16 MiB
        with tarfile.open(tar, "w:gz") as t:
            t.add(os.path.join(args.work, "trace"), arcname="trace")
    path = os.path.join(args.out, "profile.json")
    prof = json.load(open(path)) if os.path.exists(path) else {}
    return dict(rc=r["rc"], timed_out=r["timed_out"], seconds=r["seconds"],
                step_s=prof.get("step_s"), programs_s=prof.get("programs_s"),
                tar_mib=os.path.getsize(tar) / 2 ** 20)


def step_ab(args, log: Log, env: dict[str, str]) -> dict[str, Any]:
    """The CIFAR ResNet-18 bf16 US3L step (config's update mode) from ``--before`` (a copy of
    ``us3l_jax`` before a change) and from this checkout, each in a fresh process: the
    before/after figures of one change, measured in one session on one device."""
    out: dict[str, Any] = {}
    for label, src in (("before", os.path.abspath(args.before)), ("after", None)):
        record = os.path.join(args.work, f"ab_{label}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--_profile", "--no-trace", "--out",
               args.out, "--work", args.work, "--record", record, "--label", label] + (
            ["--src", src] if src else []) + (["--smoke"] if args.smoke else [])
        r = run_cmd(log, cmd, args.ab_s, env)
        out[label] = json.load(open(record)) if os.path.exists(record) else dict(rc=r["rc"])
    b, a = out["before"].get("step_s"), out["after"].get("step_s")
    if a and b:
        out["speedup"] = b / a
        pb, pa = out["before"]["pipelined_step_s"], out["after"]["pipelined_step_s"]
        out["pipelined_speedup"] = pb / pa
        log(f"A/B: before {1e3 * b:.2f} ms, after {1e3 * a:.2f} ms ({b / a:.3f}x); pipelined "
            f"{1e3 * pb:.2f} -> {1e3 * pa:.2f} ms ({pb / pa:.3f}x)")
    write_json(os.path.join(args.out, "ab.json"), out)
    return {k: v for k, v in out.items() if k in ("speedup", "pipelined_speedup")}


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (created; files in it are replaced)")
    p.add_argument("--wheels", default=None, help="folder of wheels to install (--no-deps)")
    p.add_argument("--download-wheels", metavar="DIR", default=None,
                   help="download the wheels a Python 3.12 image lacks into DIR, then exit")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="seconds for the whole check; the benchmark gets what is left")
    p.add_argument("--tests-s", type=float, default=110.0, help="time limit of the test step")
    p.add_argument("--test-files", default=",".join(DEVICE_TESTS))
    p.add_argument("--bench-cases", default=None, help="accelerator_bench --cases")
    p.add_argument("--torch-steps", type=int, default=10)
    p.add_argument("--profile-s", type=float, default=80.0, help="time kept for the profile")
    p.add_argument("--profile-mode", default=None, help="update mode to profile")
    p.add_argument("--no-dump", action="store_true", help="no XLA HLO dumps in the profile")
    p.add_argument("--skip", default="", help="comma-separated steps to skip")
    p.add_argument("--before", default=None,
                   help="folder holding a copy of us3l_jax before a change: adds the 'ab' "
                        "step (that step before/after, one fresh process each)")
    p.add_argument("--ab-s", type=float, default=200.0, help="time limit of each A/B half")
    p.add_argument("--smoke", action="store_true", help="the CPU path: tiny shapes, CPU only")
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    p.add_argument("--label", default="profile", help=argparse.SUPPRESS)
    p.add_argument("--no-trace", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    if not args.out:
        p.error("--out is required")
    if args.budget_s <= 0 or args.tests_s <= 0:
        p.error(f"--budget-s and --tests-s must be > 0, got {args.budget_s} / {args.tests_s}")
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    args.work = args.work or os.path.join(os.path.dirname(args.out),
                                          os.path.basename(args.out) + ".work")
    os.makedirs(args.work, exist_ok=True)
    if args._profile:
        args.record = args.record or os.path.join(args.out, "profile.json")
        profile_main(args)
        return 0
    args.site = os.path.join(args.work, "site")
    args.test_files = [f for f in args.test_files.split(",") if f]
    skip = {s for s in args.skip.split(",") if s}
    t0 = time.monotonic()
    log = Log(os.path.join(args.out, "device_check.log"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    summary: dict[str, Any] = dict(
        check="device_check", date=datetime.datetime.now().isoformat(timespec="seconds"),
        smoke=args.smoke, budget_s=args.budget_s, steps={})
    summary_path = os.path.join(args.out, "device_check.json")
    write_json(summary_path, summary)

    def left() -> float:
        return args.budget_s - (time.monotonic() - t0)

    steps = [("install", lambda: step_install(args, log, env)),
             ("versions", lambda: step_versions(args, log, env)),
             ("ab", lambda: step_ab(args, log, env)),
             ("tests", lambda: step_tests(args, log, env, min(args.tests_s, max(10.0, left())))),
             ("bench", lambda: step_bench(args, log, env, max(30.0, left() - args.profile_s
                                                               - 45.0))),
             ("torch", lambda: step_torch(args, log, env)),
             ("profile", lambda: step_profile(args, log, env, max(30.0, left())))]
    for name, fn in steps:
        if name in skip:
            summary["steps"][name] = dict(status="skipped", reason="--skip")
            continue
        if name == "ab" and not args.before:
            continue
        log(f"==== {name} ({time.monotonic() - t0:.0f} s, {left():.0f} s left)")
        t = time.monotonic()
        try:
            rec = dict(status="ok", **fn())
        except Exception as e:  # noqa: BLE001 - record it, go on with the next step
            rec = dict(status="error", error=f"{type(e).__name__}: {e}")
            log(f"  {name} failed: {rec['error']}")
        rec["seconds"] = time.monotonic() - t
        summary["steps"][name] = rec
        if name == "install" and rec["status"] == "ok":
            env["PYTHONPATH"] = os.pathsep.join([args.site, env.get("PYTHONPATH", "")]).strip(
                os.pathsep)
        write_json(summary_path, summary)
    summary["elapsed_s"] = time.monotonic() - t0
    write_json(summary_path, summary)
    log(f"==== done in {summary['elapsed_s']:.0f} s: " + ", ".join(
        f"{k} {v['status']}" for k, v in summary["steps"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
