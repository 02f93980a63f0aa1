"""US3L step time vs FLOPs: does a step with sub-networks cost what its FLOPs say?

    python experiments/bench_step.py --model cifar_resnet18 --batch 128 --out step.json \
        [--image-size 32] [--steps 3] [--widths 1.0,0.5,0.25 --widths 1.0,0.75,0.25] \
        [--modes accumulate,per_width] [--base-width 16 --stage-sizes 1,1,1,1] [--breakdown] \
        [--devices 8 --collectives]
    python experiments/bench_step.py --model vit_tiny --batch 32 --image-size 32 \
        --patch-size 4 --slicing official|embed [--vit-dim 192 --vit-depth 12 --vit-heads 6] \
        --out vit.json

For each update mode (a fresh ``engine.Engine`` per mode, built from ``config.get_default()``
as ``build.trainer`` does) it times, on whatever devices JAX sees (or the first
``--devices``; on CPU this script forces that many host devices):

* ``base``: the base-only step (stage 1 of the schedule: widths ``(1.0,)``);
* ``us3l``: a step with fixed sub-widths, once per ``--widths`` set.

Per case: the programs compiled for it (ahead of time with ``trainer.compile_ahead``, waited
for; a case only compiles what earlier cases of the same mode have not: ``programs_total``
counts all of the mode's programs), compile wall time (``compile_s``; 2 compile threads) and
the summed per-program compile time, the median step time over ``--steps`` timed steps after
one warm-up step (each ``jax.block_until_ready`` on the state), the time ratio to the same
mode's base-only step and the analytic FLOP ratio (``ratio_error = time_ratio / flop_ratio -
1``; the goal of issue 4 is |ratio_error| <= 0.15). The timed steps run round-robin over all
(mode, case) pairs, so that the load of a shared machine hits every case alike.

FLOP model (MACs per image and view, multiply-adds of convolutions and dense layers): an
iteration with widths W costs teacher forward at 1.0 + sum over w in W of 3 x online forward
at w (forward + backward ~ 3 forwards). A forward = backbone conv MACs from
``us3l_jax.profile`` (``convention='backbone'``) + the heads' dense MACs (the projector,
whose first layer reads the slimmed feature, and for sub-widths the auxiliary distillation
head). For ViTs the backbone MACs are the profiler's ViT counts for the ``--slicing`` mode
(patch embedding, every block Linear as sliced, attention q kᵀ and attn·v at the heads
computed; LayerNorm, softmax and GELU count 0). Not counted: BN, ReLU, pooling, the losses, the optimizer update, the EMA and the
augmentation. ``--breakdown`` adds ``--steps`` steps per case that block after every
program, and reports each program's time (the minimum over those steps) and its achieved
GMAC/s (analytic MACs / time).

Every time is taken twice: wall clock, and the CPU time of this process (all threads, via
``time.process_time``). On a CPU shared with other jobs the wall clock of a step varies by 2x
with their load, while its CPU time stays close to the work done; ``cpu_ratio`` (and
``cpu_ratio_error``) is the ratio of median CPU times. On an accelerator only the wall clock
means anything.

No persistent compilation cache is configured, so compile times are cold (unless the caller
has configured one, which the JSON then records as ``compilation_cache``).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _force_cpu_devices(argv: Sequence[str]) -> None:
    """``--devices N`` on CPU needs XLA_FLAGS before JAX starts: set it from the command line."""
    for i, a in enumerate(argv):
        n = a.split("=", 1)[1] if a.startswith("--devices=") else (
            argv[i + 1] if a == "--devices" and i + 1 < len(argv) else None)
        if n and n.isdigit() and "xla_force_host_platform_device_count" not in \
                os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={n}").strip()


if __name__ == "__main__":
    _force_cpu_devices(sys.argv[1:])

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from us3l_jax import build, config as config_lib, mesh as mesh_lib, models, profile  # noqa: E402
from us3l_jax.engine import UPDATE_MODES, Engine  # noqa: E402

DEFAULT_WIDTHS = ((1.0, 0.5, 0.25), (1.0, 0.75, 0.25))
GOAL = 0.15  # issue 4: time ratio within 15% of the FLOP ratio
VIT_FIELDS = ("dim", "depth", "heads", "patch_size", "slicing")  # config.model, ViTs only


# ------------------------------------------------------------------------------ FLOP model


def make_config(model: str, batch: int, image_size: int, update_mode: str = "accumulate",
                group_size: int | None = None, base_width: int | None = None,
                stage_sizes: Sequence[int] | None = None, **vit: Any):
    """The default US3L config (paper Table 7 case 13) for this benchmark's model and batch.
    The BN/negatives group is 128 examples (the default) or the whole batch if smaller.
    ``vit``: ViT fields of ``config.model`` (``dim``, ``depth``, ``heads``, ``patch_size``,
    ``slicing``); None keeps the model's own."""
    c = config_lib.get_default()
    c.model.name = model
    for key, value in vit.items():
        if key not in VIT_FIELDS:
            raise ValueError(f"unknown ViT field {key!r}; valid: {VIT_FIELDS}")
        if value is not None:
            c.model[key] = value
    if base_width is not None:
        c.model.base_width = int(base_width)
    if stage_sizes is not None:
        c.model.stage_sizes = tuple(int(s) for s in stage_sizes)
    c.data.image_size = int(image_size)
    c.optim.batch_size = int(batch)
    c.method.group_size = int(group_size) if group_size is not None else min(128, int(batch))
    c.method.update_mode = update_mode
    config_lib.validate(c)
    return c


def forward_macs(config, width: float, image_size: int, head: bool) -> dict[str, int]:
    """MACs of one image through the online network at ``width``: backbone convs (profiler,
    ``backbone`` convention), projector dense layers, and the auxiliary distillation head when
    ``head`` (sub-networks of case 13)."""
    kw = {k: config.model[k] for k in ("base_width", "stage_sizes") + VIT_FIELDS
          if config.model[k] is not None}
    bb = profile.profile(config.model.name, width, input_size=image_size, num_classes=None,
                         convention="backbone", **kw)
    h = config.heads
    feat = build.backbone(config).feature_dim(width)
    proj = feat * h.proj_hidden + h.proj_hidden * h.proj_hidden + h.proj_hidden * h.proj_out
    aux = 2 * h.proj_out * h.head_hidden if head else 0
    return {"backbone": bb["macs"], "projector": proj, "head": aux,
            "total": bb["macs"] + proj + aux}


def iteration_macs(config, widths: Sequence[float], image_size: int,
                   forward: Callable[..., dict[str, int]] = forward_macs) -> dict[str, int]:
    """MACs per image and view of one iteration with ``widths`` (``widths[0]`` the base):
    the teacher forward at full width plus 3 x the online forward of every width.
    ``forward`` is ``forward_macs`` or a cached stand-in with its signature."""
    kind, method = build.method_and_kind(config)
    m = config.method
    if kind != "us3l" or m.base_loss != "infonce" or m.aux_head != "new":
        raise ValueError("the FLOP model covers the US3L loss design (base_loss='infonce', "
                         f"aux_head='new'), got {m.base_loss!r}/{m.aux_head!r}")
    teacher = forward(config, config.sampler.width_range[1], image_size, head=False)
    out = {"teacher": teacher["total"] if method.uses_teacher else 0,
           "base": 3 * forward(config, widths[0], image_size, head=False)["total"]}
    for w in widths[1:]:
        out[f"sub@{w:g}"] = 3 * forward(config, w, image_size, head=True)["total"]
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------ timing


def _case_name(widths: Sequence[float]) -> str:
    return "base" if len(widths) == 1 else "us3l_" + "_".join(f"{w:g}" for w in widths[1:])


def _compile(trainer, state, images, widths) -> tuple[int, float, float]:
    """Compiles this case's missing programs ahead of time; (programs, wall s, summed s)."""
    progs = trainer.programs
    n0, s0 = progs.compiled, progs.compile_seconds
    t = time.perf_counter()
    for fut in trainer.compile_ahead(state, images, [widths]):
        fut.result()
    return progs.compiled - n0, time.perf_counter() - t, progs.compile_seconds - s0


def _labels(trainer, widths) -> Callable[[Any], str]:
    """Program key -> readable label (``views``, ``base@1``, ``sub@0.5``, ``apply``, ...)."""
    width_of = {trainer.config_key(w): w for w in widths}

    def label(key):
        kind = key[0].replace("_update", "")
        return f"{kind}@{width_of[key[1]]:g}" if kind in ("base", "sub") else kind
    return label


# ------------------------------------------------------------------------------ collectives

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_SHAPE = re.compile(r"\b(pred|[fsu]\d+|bf16)\[([\d,]*)\]")


SCALAR_BYTES = 1024  # all-reduces up to this size carry metrics (losses), not gradients


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collective ops in a compiled (optimized) HLO module and the bytes of their results:
    ``{op: {"ops": n, "bytes": b, "small_ops": n}}`` (small: at most ``SCALAR_BYTES``, i.e.
    scalar metrics). Async pairs count once (at their ``-start``)."""
    out = {op: {"ops": 0, "bytes": 0, "small_ops": 0} for op in _COLLECTIVES}
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        for op in _COLLECTIVES:
            m = re.match(rf"\s*(.*?)\s{op}(-start)?\(", rhs)
            if m:
                shape = m.group(1)
                if m.group(2):  # the start op's result also holds its operands: halve
                    shape = shape[:len(shape) // 2] if shape.startswith("(") else shape
                size = sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",")
                                                              if d)
                           for t, dims in _SHAPE.findall(shape))
                out[op]["ops"] += 1
                out[op]["bytes"] += size
                out[op]["small_ops"] += size <= SCALAR_BYTES
                break
    return out


def iteration_collectives(trainer, state, images, widths) -> dict[str, Any]:
    """Collectives of every program one iteration with ``widths`` runs (from their compiled
    HLO), summed over the iteration, and per program."""
    label = _labels(trainer, widths)
    total = {op: {"ops": 0, "bytes": 0, "small_ops": 0} for op in _COLLECTIVES}
    per_program = {}
    for key in trainer.iteration_keys(state, images, widths):
        c = hlo_collectives(trainer.programs.executable(key).as_text())
        per_program[label(key)] = {op: v for op, v in c.items() if v["ops"]}
        for op, v in c.items():
            for k in v:
                total[op][k] += v[k]
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    ar = total["all-reduce"]
    return {"allreduce_ops_per_iteration": ar["ops"],
            "gradient_allreduce_ops_per_iteration": ar["ops"] - ar["small_ops"],
            "allreduce_bytes_per_iteration": total["all-reduce"]["bytes"],
            "param_bytes": int(param_bytes),
            "allreduce_bytes_over_param_bytes": total["all-reduce"]["bytes"] / param_bytes,
            "collectives_per_iteration": total, "collectives_per_program": per_program,
            "reduce_once": bool(trainer.sharded)}


def _clock() -> np.ndarray:
    """(wall seconds, CPU seconds of this process: all its threads, user + system)."""
    return np.array([time.perf_counter(), time.process_time()])


def _breakdown(trainer, state, images, widths):
    """Runs one step blocking after every program; (state, {program: (wall s, CPU s)})."""
    times: dict[str, np.ndarray] = collections.defaultdict(lambda: np.zeros(2))
    label = _labels(trainer, widths)

    def timed(key, make, *args):
        t = _clock()
        out = jax.block_until_ready(trainer.programs.call(key, make, *args))
        times[label(key)] += _clock() - t
        return out

    state, _ = trainer.iteration(timed, state, images, widths)
    jax.block_until_ready(state)
    return state, dict(times)


class _Mode:
    """One fresh trainer in an update mode, its state and its iteration counter."""

    def __init__(self, config, mode: str, images, mesh, reduce_once: bool | None = None):
        config = config.copy_and_resolve_references()
        config.method.update_mode = mode
        self.mode = mode
        tx, lr = build.optimizer(config, steps_per_epoch=100)
        self.trainer = Engine(build.training_method(config, steps_per_epoch=100), tx, mesh,
                              batch_size=config.optim.batch_size,
                              group_size=config.method.group_size, update_mode=mode,
                              lr_schedule=lr, reduce_once=reduce_once)
        self.state = self.trainer.init_state(jax.random.key(0), images)
        self.images = images

    def step(self, widths) -> tuple[np.ndarray, dict[str, Any]]:
        """One iteration, waited for; ((wall s, CPU s), metrics)."""
        t = _clock()
        self.state, metrics = self.trainer.step(self.state, self.images, widths)
        jax.block_until_ready(self.state)
        return _clock() - t, metrics

    def breakdown(self, widths) -> dict[str, np.ndarray]:
        self.state, times = _breakdown(self.trainer, self.state, self.images, widths)
        return times


def bench(config, modes: Sequence[str], cases: Sequence[Sequence[float]], images, mesh,
          steps: int, breakdown: bool, collectives: bool = False) -> list[dict[str, Any]]:
    """Compiles every (mode, case), one warm-up step each, then ``steps`` rounds that time
    one step of every (mode, case) in turn: on a shared machine, load changes then hit all
    cases alike instead of whichever case ran while another job was busy."""
    runs = [_Mode(config, mode, images, mesh) for mode in modes]
    records = []
    for run in runs:
        for widths in cases:
            programs, compile_s, compile_sum_s = _compile(run.trainer, run.state, images,
                                                          widths)
            records.append(dict(case=_case_name(widths), update_mode=run.mode,
                                sub_widths=list(widths[1:]), widths=list(widths),
                                compile_s=compile_s, compile_sum_s=compile_sum_s,
                                programs=programs, programs_total=run.trainer.num_programs,
                                step_times=[], step_cpu_times=[], _run=run))
            if collectives:
                records[-1].update(iteration_collectives(run.trainer, run.state, images, widths))
    if collectives:  # the same iterations, reducing the gradients in every program
        for mode in modes:
            before = _Mode(config, mode, images, mesh, reduce_once=False)
            for rec in records:
                if rec["update_mode"] == mode:
                    c = iteration_collectives(before.trainer, before.state, images,
                                              rec["widths"])
                    rec["reduce_every_program"] = {k: c[k] for k in (
                        "allreduce_ops_per_iteration", "allreduce_bytes_per_iteration",
                        "gradient_allreduce_ops_per_iteration",
                        "allreduce_bytes_over_param_bytes")}
    for rec in records:
        rec["warmup_s"] = float(rec["_run"].step(rec["widths"])[0][0])
    for _ in range(steps):
        for rec in records:
            (wall, cpu), metrics = rec["_run"].step(rec["widths"])
            rec["step_times"].append(float(wall))
            rec["step_cpu_times"].append(float(cpu))
            rec["loss"] = float(jax.device_get(metrics["loss/total"]))
    for _ in range(steps if breakdown else 0):
        for rec in records:
            for k, (wall, cpu) in rec["_run"].breakdown(rec["widths"]).items():
                best = rec.setdefault("program_s", {})
                best_cpu = rec.setdefault("program_cpu_s", {})
                best[k] = min(best.get(k, np.inf), float(wall))
                best_cpu[k] = min(best_cpu.get(k, np.inf), float(cpu))
    for rec in records:
        del rec["_run"]
        rec["step_s"] = statistics.median(rec["step_times"])
        rec["step_min_s"] = min(rec["step_times"])
        rec["step_cpu_s"] = statistics.median(rec["step_cpu_times"])
    return records


def _program_macs(config, widths, image_size, batch) -> dict[str, int]:
    """Analytic MACs of each program of a step (2 views x batch), keyed like ``_breakdown``."""
    it = iteration_macs(config, widths, image_size)
    n = 2 * batch
    out = {f"base@{widths[0]:g}": n * (it["teacher"] + it["base"])}
    for w in widths[1:]:
        out[f"sub@{w:g}"] = n * it[f"sub@{w:g}"]
    return out


def run(config, cases: Sequence[Sequence[float]], modes: Sequence[str], steps: int,
        breakdown: bool = False, devices: int | None = None,
        collectives: bool = False) -> list[dict[str, Any]]:
    """All records: ``base`` plus every case, per update mode, with ratios filled in."""
    if devices is not None and devices > jax.device_count():
        raise ValueError(f"--devices {devices}: JAX sees only {jax.device_count()} device(s) "
                         "(on CPU, run this file as a script so it can force them)")
    mesh = mesh_lib.make_mesh(jax.devices()[:devices] if devices else None)
    batch, size = config.optim.batch_size, config.data.image_size
    mesh_lib.check_batch_size(batch, mesh)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                            mesh_lib.batch_sharding(mesh))
    base_w = (config.sampler.width_range[1],)
    cases = [base_w] + [tuple(float(w) for w in c) for c in cases]
    base_macs = iteration_macs(config, base_w, size)["total"]
    dev = jax.devices()[0]
    common = dict(model=config.model.name, base_width=config.model.base_width,
                  stage_sizes=config.model.stage_sizes, batch=batch, image_size=size,
                  **({k: getattr(build.backbone(config), k) for k in VIT_FIELDS}
                     if config.model.name in models.VIT_NAMES else {}),
                  group_size=config.method.group_size,
                  device=f"{jax.default_backend()} {dev.device_kind} x{mesh.devices.size}",
                  compilation_cache=jax.config.jax_compilation_cache_dir)
    records = bench(config, modes, cases, images, mesh, steps, breakdown, collectives)
    for mode in modes:
        recs = [r for r in records if r["update_mode"] == mode]
        base = recs[0]
        for r in recs:
            macs = iteration_macs(config, r["widths"], size)
            r.update(common)
            r["macs_per_image_view"] = macs
            r["flop_ratio"] = macs["total"] / base_macs
            r["time_ratio"] = r["step_s"] / base["step_s"]
            r["ratio_error"] = r["time_ratio"] / r["flop_ratio"] - 1.0
            r["cpu_ratio"] = r["step_cpu_s"] / base["step_cpu_s"]
            r["cpu_ratio_error"] = r["cpu_ratio"] / r["flop_ratio"] - 1.0
            if "program_s" in r:
                pm = _program_macs(config, r["widths"], size, batch)
                r["program_gmacs_per_s"] = {k: pm[k] / r["program_s"][k] / 1e9 for k in pm}
                r["program_gmacs_per_cpu_s"] = {k: pm[k] / r["program_cpu_s"][k] / 1e9
                                                for k in pm}
    return records


# ------------------------------------------------------------------------------ output


def _columns(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The step table, and the per-program table when the records have a breakdown."""
    pct = lambda x: f"{100 * x:+.1f}%"
    head = ["mode", "case", "step s", "CPU s", "time ratio", "CPU ratio", "FLOP ratio",
            "time err", "CPU err", "compile s", "programs"]
    body = [[r["update_mode"], r["case"], f"{r['step_s']:.3f}", f"{r['step_cpu_s']:.3f}",
             f"{r['time_ratio']:.3f}", f"{r['cpu_ratio']:.3f}", f"{r['flop_ratio']:.3f}",
             pct(r["ratio_error"]), pct(r["cpu_ratio_error"]), f"{r['compile_s']:.1f}",
             f"{r['programs']} ({r['programs_total']})"] for r in records]
    lines = _columns(head, body)
    coll = [r for r in records if "allreduce_ops_per_iteration" in r]
    if coll:
        mib = lambda b: f"{b / 2**20:.3f}"
        lines += ["", f"all-reduces per iteration, from the compiled HLO of every program "
                      f"(parameters: {mib(coll[0]['param_bytes'])} MiB); ops (grad): all "
                      f"all-reduces (those over {SCALAR_BYTES} bytes, i.e. not scalar "
                      f"metrics); before = reducing in every program"]
        head = ["mode", "case", "reduce once", "ops (grad)", "MiB", "x params", "ops before",
                "MiB before", "x params before"]
        ops = lambda c: (f"{c['allreduce_ops_per_iteration']} "
                         f"({c['gradient_allreduce_ops_per_iteration']})")
        body = [[r["update_mode"], r["case"], str(r["reduce_once"]), ops(r),
                 mib(r["allreduce_bytes_per_iteration"]),
                 f"{r['allreduce_bytes_over_param_bytes']:.3f}",
                 ops(r["reduce_every_program"]),
                 mib(r["reduce_every_program"]["allreduce_bytes_per_iteration"]),
                 f"{r['reduce_every_program']['allreduce_bytes_over_param_bytes']:.3f}"]
                for r in coll]
        lines += _columns(head, body)
    progs = [r for r in records if "program_s" in r]
    if progs:
        lines += ["", "per program, blocking after each (min over the rounds): wall s / CPU s "
                      "[analytic GMAC per CPU-second]"]
        head = ["mode", "case", "program", "wall s", "CPU s", "GMAC/CPU-s"]
        body = [[r["update_mode"], r["case"], k, f"{v:.3f}", f"{r['program_cpu_s'][k]:.3f}",
                 f"{r['program_gmacs_per_cpu_s'][k]:.1f}"
                 if k in r["program_gmacs_per_cpu_s"] else ""]
                for r in progs for k, v in r["program_s"].items()]
        lines += _columns(head, body)
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        out = ()
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return out


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in UPDATE_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"update modes must be from {UPDATE_MODES}, got "
                                         f"{text!r}")
    return modes


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a us3l_jax.models name")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--out", required=True, help="JSON file for the records")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after 1 warm-up)")
    p.add_argument("--widths", type=_floats, action="append",
                   help="widths of a US3L case, base first (repeatable; default "
                        + " and ".join(",".join(f"{w:g}" for w in c) for c in DEFAULT_WIDTHS)
                        + ")")
    p.add_argument("--modes", type=_modes, default=UPDATE_MODES,
                   help="comma-separated update modes (default: both)")
    p.add_argument("--group-size", type=int, default=None,
                   help="BN/negatives group (default min(128, batch))")
    p.add_argument("--base-width", type=int, default=None, help="ResNet stage-1 planes")
    p.add_argument("--stage-sizes", type=_floats, default=None, help="ResNet blocks per stage")
    p.add_argument("--slicing", choices=("official", "embed"), default=None,
                   help="ViT slicing mode (default: the model's, official)")
    p.add_argument("--vit-dim", type=int, default=None, help="ViT embedding dimension")
    p.add_argument("--vit-depth", type=int, default=None, help="ViT blocks")
    p.add_argument("--vit-heads", type=int, default=None, help="ViT attention heads")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch side in pixels")
    p.add_argument("--breakdown", action="store_true",
                   help="--steps more steps per case, timing every program separately")
    p.add_argument("--devices", type=int, default=None,
                   help="use this many devices (on CPU: forced host devices)")
    p.add_argument("--collectives", action="store_true",
                   help="count the all-reduces (ops, bytes) per iteration from the compiled "
                        "HLO, with and without keeping partial gradients on their devices")
    args = p.parse_args(argv)
    if args.devices is not None and args.devices < 1:
        p.error(f"--devices must be >= 1, got {args.devices}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    try:
        config = make_config(args.model, args.batch, args.image_size,
                             group_size=args.group_size, base_width=args.base_width,
                             stage_sizes=args.stage_sizes, dim=args.vit_dim,
                             depth=args.vit_depth, heads=args.vit_heads,
                             patch_size=args.patch_size, slicing=args.slicing)
    except ValueError as e:
        p.error(str(e))
    cases = args.widths or DEFAULT_WIDTHS
    for c in cases:
        if c[0] != config.sampler.width_range[1] or len(c) < 2:
            p.error(f"--widths {','.join(map(str, c))}: a US3L case starts with the base width "
                    f"{config.sampler.width_range[1]} and has at least one sub-width")
    t0 = time.perf_counter()
    try:
        records = run(config, cases, args.modes, args.steps, args.breakdown, args.devices,
                      args.collectives)
    except ValueError as e:
        p.error(str(e))
    total = time.perf_counter() - t0
    r0 = records[0]
    arch = (", ".join(f"{k} {r0[k]}" for k in VIT_FIELDS) if "slicing" in r0 else
            f"base width {r0['base_width']}, stages {r0['stage_sizes']}")
    print(f"{r0['model']} ({arch}), batch "
          f"{r0['batch']}, {r0['image_size']}px, group {r0['group_size']}, {r0['device']}, "
          f"{os.cpu_count()} CPU cores; median of {args.steps} timed step(s); "
          f"ratios vs the same mode's base-only step; goal |error| <= {GOAL:.0%}")
    print(format_table(records))
    print(f"benchmark took {total:.0f} s")
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()
