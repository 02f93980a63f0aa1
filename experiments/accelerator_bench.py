"""One accelerator benchmark for a short device window: step time, MFU, memory, compile cost
and input throughput per case, and the projected length of each paper config's run.

    python experiments/accelerator_bench.py --out bench/accel.json [--budget-s 480] [--steps 10]
    python experiments/accelerator_bench.py --out /tmp/accel.json --smoke   # tiny, CPU, < 1 min
        [--cases cifar_r18_bf16,imagenet_r50_bf16]  # a subset (others recorded as skipped)

Cases, in this order (each one is skipped, with the reason in the JSON, when its estimated cost
does not fit the remaining ``--budget-s``; an error in one is recorded and the next one runs):

* ``cifar_r18_bf16`` / ``cifar_r18_fp32``: ``configs/us3l_cifar100.py:resnet18`` (batch 512,
  32 px) in bfloat16 / float32: the base-only step (stage 1 of the schedule), and the US3L step
  with the widths the run's sampler draws at the first iteration of the last stage, in both
  update modes (``accumulate``, ``per_width``);
* ``imagenet_r50_bf16``: ``configs/us3l_imagenet.py:resnet50`` at batch 256 (224 px,
  bfloat16, host-cropped views as the streaming run feeds them): base-only and US3L in the
  config's update mode;
* ``vit_tiny_bf16``: when ``us3l_jax.models`` has ``vit_tiny`` (CIFAR, batch 512, 32 px).

Per step variant: median wall time of ``--steps`` steps, each waited for, after ``--warmup``
steps (and the mean of as many steps dispatched back to back), images/s, achieved FLOP/s and
MFU, each program's compile seconds (cold, then from the persistent compilation cache, which
lives in a fresh folder next to ``--out``: ``jax.clear_caches()`` and a new trainer make every
program load from it), XLA's memory estimate of the largest program, and the device's peak
memory (``memory_stats``; process-wide, so it includes earlier cases; null on CPU). Per case:
the input pipeline's images/s (the on-device view program at the case's batch; for streaming
configs also the host decode + crop pipeline on 2 threads, ``bench_input``).

FLOP convention: ``bench_step.iteration_macs`` (the profiler's exact conv MACs per width plus
the heads' dense layers): the teacher's forward at full width plus, for every width of the
step, forward + backward = 3 forwards (backward = 2 x forward); 2 FLOPs per MAC; x 2 views x
batch. BN, activations, losses, the optimizer and the augmentation are not counted, so MFU is
a slight underestimate. MFU = achieved FLOP/s / (peak of the compute dtype x devices).

Projection, per paper config whose model was measured: epochs x steps per epoch (training
split / batch) iterations, each stage at its mean MACs (per image and view, from 8 iterations
the run's sampler draws) through a fit of step time against MACs: ``t(m) = t_base + b x
max(m - m_base, 0)``, anchored at the measured base-only step (stage 1 is exactly that step)
with ``b`` >= 0 the slope to the measured US3L step (least squares, clipped at 0). So no stage
is ever negative or below the base step, and a US3L step measured faster than the base step
(noise) gives every stage the base step time (``fit.clipped``: a lower bound). The anchor,
rather than ``a + b x m`` with both >= 0, keeps consistent measurements exact: on a GPU small
widths cost more than their MACs (launch bound), so the line's intercept is negative and
clipping it would pull the fit off both measured points. The
US3L step is the config's update mode's; when only the other mode was measured, its time per
MAC stands in (per-iteration FLOPs are the same in both modes; ``from_mode`` and a note say
so). When no US3L step was measured (cut by the budget), the projection is ``skipped`` with
the reason and a ``lower_bound``: every step at the base step's time. An unmeasured case is
``skipped`` with its reason too. Step times measured at another batch are scaled linearly.
Plus compile time: the programs this benchmark compiled, with the run's other sub-network
programs at the measured mean.

The JSON is rewritten (atomically) after every case, so a run killed by a timeout keeps the
cases it finished; ``complete`` says whether the benchmark reached its end.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the smoke run is a CPU check

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))
import bench_compile  # noqa: E402
import bench_input  # noqa: E402
import bench_step  # noqa: E402
from us3l_jax import build, fileio, mesh as mesh_lib, models, pretrain, sampling  # noqa: E402
from us3l_jax.data import streaming  # noqa: E402

# ------------------------------------------------------------------------------ peaks

# Dense peak FLOP/s per device (no structured sparsity). "float32" is what float32 matmuls and
# convolutions run at under JAX's default precision: TF32 tensor cores on NVIDIA Ampere and
# later, single bf16 passes on TPU (so the TPU float32 entry is the bf16 peak).
# (device_kind prefix, name, bf16, float32, source)
PEAKS: tuple[tuple[str, str, float, float, str], ...] = (
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): H200 NVL 1,671 / 835 TFLOPS
    # BF16 / TF32 with sparsity -> half dense. Listed before "NVIDIA H200" (prefix match).
    ("NVIDIA H200 NVL", "H200 NVL", 835.5e12, 417.5e12, "NVIDIA H200 datasheet"),
    # H200 SXM: 1,979 / 989 TFLOPS BF16 / TF32 with sparsity (same datasheet).
    ("NVIDIA H200", "H200 SXM", 989.5e12, 494.5e12, "NVIDIA H200 datasheet"),
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): PCIe 1,513 / 756, NVL
    # 1,671 / 835, SXM 1,979 / 989 TFLOPS BF16 / TF32 with sparsity -> half dense.
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5e12, 378e12, "NVIDIA H100 datasheet"),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5e12, 417.5e12, "NVIDIA H100 datasheet"),
    ("NVIDIA H100", "H100 SXM", 989.5e12, 494.5e12, "NVIDIA H100 datasheet"),
    # NVIDIA A100 datasheet: BF16 312, TF32 156 TFLOPS dense (SXM and PCIe alike).
    ("NVIDIA A100", "A100", 312e12, 156e12, "NVIDIA A100 datasheet"),
    # NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): BF16 242, TF32 120 TFLOPS with
    # sparsity -> 121 / 60 dense.
    ("NVIDIA L4", "L4", 121e12, 60e12, "NVIDIA L4 datasheet"),
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p,
    # v6e): peak bf16 per chip 275 (v4), 197 (v5e, device_kind "TPU v5 lite"), 459 (v5p,
    # "TPU v5" or "TPU v5p"), 918 (v6e, "TPU v6 lite") TFLOPS.
    ("TPU v4", "TPU v4", 275e12, 275e12, "cloud.google.com/tpu/docs/v4"),
    ("TPU v5 lite", "TPU v5e", 197e12, 197e12, "cloud.google.com/tpu/docs/v5e"),
    ("TPU v5e", "TPU v5e", 197e12, 197e12, "cloud.google.com/tpu/docs/v5e"),
    ("TPU v5p", "TPU v5p", 459e12, 459e12, "cloud.google.com/tpu/docs/v5p"),
    ("TPU v5", "TPU v5p", 459e12, 459e12, "cloud.google.com/tpu/docs/v5p"),
    ("TPU v6 lite", "TPU v6e", 918e12, 918e12, "cloud.google.com/tpu/docs/v6e"),
    ("TPU v6e", "TPU v6e", 918e12, 918e12, "cloud.google.com/tpu/docs/v6e"),
)
H100_CLASS = ("H100 SXM", "H100 PCIe", "H100 NVL", "H200 SXM", "H200 NVL")
GOAL = dict(config="configs/us3l_cifar100.py:resnet18", minutes=30.0, mfu=0.25)


def device_peak(device_kind: str) -> dict[str, Any]:
    """The peak table's entry for a ``jax.Device.device_kind``: ``{name, bfloat16, float32,
    source}`` (FLOP/s per device), or ``{name: None, note}`` for a kind not in the table."""
    for prefix, name, bf16, fp32, source in PEAKS:
        # "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"; but "NVIDIA L40S" is not an L4.
        if device_kind == prefix or device_kind.startswith((prefix + " ", prefix + "-")):
            return {"name": name, "bfloat16": bf16, "float32": fp32, "source": source}
    return {"name": None, "bfloat16": None, "float32": None,
            "note": f"no peak known for device kind {device_kind!r}: MFU is null"}


# ------------------------------------------------------------------------------ cases


class Case(NamedTuple):  # (a NamedTuple: the tests load this script without sys.modules)
    name: str
    config: str  # configs/<file>.py[:<arg>], or "model:<name>" for the default US3L config
    dtype: str
    batch: int
    modes: tuple[str, ...]  # update modes of the US3L step ("config": the config's own)
    estimate_s: float  # expected cost on an accelerator (compile dominated)
    needs_model: str | None = None
    smoke_modes: tuple[str, ...] | None = None  # fewer programs to compile on a CPU


CASES = (
    Case("cifar_r18_bf16", "configs/us3l_cifar100.py:resnet18", "bfloat16", 512,
         ("accumulate", "per_width"), 120.0),
    Case("cifar_r18_fp32", "configs/us3l_cifar100.py:resnet18", "float32", 512,
         ("accumulate", "per_width"), 120.0, smoke_modes=("accumulate",)),
    Case("imagenet_r50_bf16", "configs/us3l_imagenet.py:resnet50", "bfloat16", 256,
         ("config",), 200.0),
    Case("vit_tiny_bf16", "model:vit_tiny", "bfloat16", 512, ("config",), 90.0,
         needs_model="vit_tiny"),
)

# Smoke: the same cases on tiny shapes, 2 widths per US3L step (and the projections on the
# same tiny models).
SMOKE_MODEL = dict(base_width=16, stage_sizes=(1, 1, 1, 1))
SMOKE_HEADS = dict(proj_hidden=32, proj_out=16, head_hidden=32)
SMOKE_BATCH, SMOKE_GROUP = 8, 4
SMOKE_SIZE = {"cifar100": 8, "cifar10": 8, "imagenet2012": 32}
# A ViT's patch must divide the view size: patch 4 on the 8-px smoke views (2 x 2 patches).
SMOKE_VIT = dict(dim=48, depth=2, heads=3, patch_size=4)


def shrink(config) -> None:
    """Tiny shapes for ``--smoke`` (model, heads, view size); batch and epochs untouched."""
    if config.model.name.startswith(("cifar_resnet", "resnet")):
        for k, v in SMOKE_MODEL.items():
            config.model[k] = v
    if config.model.name in models.VIT_NAMES:
        for k, v in SMOKE_VIT.items():
            config.model[k] = v
    for k, v in SMOKE_HEADS.items():
        config.heads[k] = v
    config.method.group_size = SMOKE_GROUP
    config.sampler.num_samples = 2
    config.data.image_size = SMOKE_SIZE.get(config.data.dataset, 8)


def case_config(case: Case, smoke: bool):
    if case.config.startswith("model:"):
        config = bench_step.make_config(case.config.split(":", 1)[1], case.batch, 32)
    else:
        config = bench_compile.load_config(case.config)
    config.model.dtype = case.dtype
    config.optim.batch_size = case.batch
    if smoke:
        shrink(config)
        config.optim.batch_size = SMOKE_BATCH
    return config


def last_stage_widths(config, steps_per_epoch: int) -> tuple[float, ...]:
    """The widths the run's sampler draws at the first iteration of its last stage."""
    sampler = build.sampler(config)
    total = config.optim.epochs * steps_per_epoch
    step = next(k for k in range(0, total, steps_per_epoch)
                if sampling.stage(sampler, k, steps_per_epoch, total) == sampling.NUM_STAGES)
    return sampling.sample_widths(sampler, step, steps_per_epoch, total)


def steps_per_epoch(config) -> int:
    return bench_compile.TRAIN_EXAMPLES[config.data.dataset] // config.optim.batch_size


# ------------------------------------------------------------------------------ measuring


def _label(trainer, widths: Sequence[float]) -> Callable[[Any], str]:
    """Program key -> label, ``apply`` variants told apart by whether the iteration trained
    sub-networks (which decides the decayed groups)."""
    label = bench_step._labels(trainer, widths)
    return lambda key: label(key) + (("[sub]" if key[1] else "[base]")
                                     if key[0] == "apply" else "")


def compile_variant(mode: bench_step._Mode, widths: Sequence[float],
                    all_widths: Sequence[float]) -> tuple[list, dict[str, Any]]:
    """Compiles (ahead of time, waited for) the programs an iteration with ``widths`` runs
    that this trainer has not compiled yet; (program keys, {wall_s, new, per-program s})."""
    trainer = mode.trainer
    t = time.perf_counter()
    keys = trainer.iteration_keys(mode.state, mode.images, widths)
    for fut in trainer.programs.pending():
        fut.result()
    wall = time.perf_counter() - t
    label = _label(trainer, all_widths)
    secs = trainer.programs.seconds_by_key
    return keys, {"wall_s": wall, "programs": {label(k): secs[k] for k in keys},
                  "new_programs": [label(k) for k in keys if k not in mode.seen]}


def time_steps(mode: bench_step._Mode, widths, warmup: int, steps: int) -> dict[str, Any]:
    """Median of ``steps`` waited-for steps after ``warmup``; and the mean of ``steps`` steps
    dispatched back to back (what the training loop sees)."""
    for _ in range(warmup):
        mode.step(widths)
    times, loss = [], None
    for _ in range(steps):
        (wall, _), metrics = mode.step(widths)
        times.append(float(wall))
        loss = float(jax.device_get(metrics["loss/total"]))
    t = time.perf_counter()
    for _ in range(steps):
        mode.state, _ = mode.trainer.step(mode.state, mode.images, widths)
    jax.block_until_ready(mode.state)
    return {"step_s": statistics.median(times), "step_times": times,
            "pipelined_step_s": (time.perf_counter() - t) / steps, "loss": loss}


def program_bytes(trainer, keys) -> int | None:
    """XLA's estimate of the largest program's footprint (arguments + outputs + temporaries
    - aliased buffers), or None where the backend has no memory analysis."""
    out = None
    for k in keys:
        m = trainer.programs.executable(k).memory_analysis()
        if m is None:
            return None
        b = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
        out = b if out is None else max(out, b)
    return int(out)


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class MacCache:
    """``bench_step.forward_macs`` for one model, memoised by (width, head); ``of(config)``
    shares one instance between the configs of the same model (dtype, batch and schedule do
    not change MACs), since every count traces the model."""
    _instances: dict[str, MacCache] = {}

    def __init__(self, config):
        self.config, self._cache = config, {}

    @classmethod
    def of(cls, config) -> MacCache:
        key = json.dumps([config.model.name, config.model.base_width, config.model.stage_sizes,
                          config.heads.to_dict(), build.views(config)[0].size,
                          config.sampler.width_range, build.method(config).uses_teacher],
                         default=str)
        return cls._instances.setdefault(key, cls(config))

    def __call__(self, config, width, image_size, head):
        key = (float(width), image_size, bool(head))
        if key not in self._cache:
            self._cache[key] = bench_step.forward_macs(self.config, width, image_size, head)
        return self._cache[key]

    def iteration(self, widths) -> int:
        size = build.views(self.config)[0].size
        return bench_step.iteration_macs(self.config, widths, size, forward=self)["total"]


def flop_fields(macs: MacCache, widths, batch: int, step_s: float, peak: float | None,
                devices: int) -> dict[str, Any]:
    per_image_view = macs.iteration(widths)
    flops = 2 * per_image_view * 2 * batch  # 2 FLOP per MAC, 2 views
    achieved = flops / step_s
    return {"macs_per_image_view": per_image_view, "flops_per_step": flops,
            "flops_per_s": achieved, "images_per_s": batch / step_s,
            "mfu": achieved / (peak * devices) if peak else None}


def measure_case(case: Case, config, args, peak: dict[str, Any],
                 remaining: Callable[[], float]) -> dict[str, Any]:
    """All figures of one case (see the module docstring)."""
    mesh = mesh_lib.make_mesh()
    n_dev = mesh.devices.size
    spec = build.image_spec(config, mesh)
    rng = np.random.default_rng(0)
    host_images = rng.integers(0, 256, spec.shape, dtype=np.uint8)
    images = jax.device_put(host_images, spec.sharding)
    batch = config.optim.batch_size
    hi = (config.sampler.width_range[1],)
    stage4 = last_stage_widths(config, steps_per_epoch(config))
    modes = [config.method.update_mode if m == "config" else m
             for m in (case.smoke_modes if args.smoke and case.smoke_modes else case.modes)]
    peak_flops = peak.get(config.model.dtype)
    macs = MacCache.of(config)
    rec: dict[str, Any] = dict(
        model=config.model.name, dtype=config.model.dtype, batch=batch,
        image_shape=list(spec.shape[1:]), group_size=config.method.group_size, devices=n_dev,
        base_widths=list(hi), us3l_widths=list(stage4), update_modes=modes,
        peak_flops_per_device=peak_flops, variants=[], skipped_variants=[])
    for i, mode_name in enumerate(modes):
        sets = ([("base", hi)] if i == 0 else []) + [(f"us3l_{mode_name}", stage4)]
        if remaining() <= 0:
            rec["skipped_variants"] += [n for n, _ in sets]
            continue
        phases = {}
        for phase in ("cold", "cached"):
            # cached: a new trainer after clearing JAX's in-memory caches, so every program is
            # traced again and its executable read from the persistent cache.
            jax.clear_caches()
            mode = bench_step._Mode(config, mode_name, images, mesh)
            mode.seen = set()
            for name, widths in sets:
                keys, c = compile_variant(mode, widths, hi + stage4)
                mode.seen |= set(keys)
                phases.setdefault(name, {"keys": keys})[phase] = c
        for name, widths in sets:
            timing = time_steps(mode, widths, args.warmup, args.steps)
            keys = phases[name].pop("keys")
            rec["variants"].append(dict(
                variant=name, update_mode=mode_name, widths=list(widths), **timing,
                **flop_fields(macs, widths, batch, timing["step_s"], peak_flops, n_dev),
                compile=phases[name], programs=len(keys),
                program_peak_bytes=program_bytes(mode.trainer, keys),
                device_peak_bytes=device_peak_bytes()))
        del mode
    view_cfg = build.views(config)[0]
    rec["input"] = {"device_views": bench_input.bench_device(
        f"{case.name}_views", host_images, view_cfg, args.input_repeats)}
    if build.is_streaming(config):
        rec["input"]["host_stream"] = bench_input.bench_stream(
            f"{case.name}_stream", streaming.HostCrops.from_views(*build.view_recipe(config)),
            True, steps=args.input_repeats, batch=min(batch, 64))
        rec["input"]["host_cores"] = os.cpu_count()
    return rec


# ------------------------------------------------------------------------------ projection

PROJECTED = (  # (config, case whose step times apply, dtype override)
    ("configs/us3l_cifar100.py:resnet18", "cifar_r18_fp32", None),
    ("configs/us3l_cifar100.py:resnet18", "cifar_r18_bf16", "bfloat16"),
    ("configs/us3l_cifar100.py:resnet18,800", "cifar_r18_bf16", "bfloat16"),
    ("configs/us3l_cifar10.py:resnet18", "cifar_r18_bf16", "bfloat16"),
    ("configs/us3l_imagenet.py:resnet50", "imagenet_r50_bf16", None),
    ("configs/us3l_cifar100.py:resnet50", None, None),
    ("configs/us3l_cifar100.py:mobilenet_v2", None, None),
    ("configs/us3l_imagenet.py:resnet18", None, None),
)
PROJECTION_RESERVE_S = 60.0  # budget kept for the projections (profiler traces) at the end


def stage_mix(config, spe: int, draws: int) -> dict[int, dict[str, Any]]:
    """{stage: {iterations, mean MACs per image and view of its iterations}} of a run."""
    sampler = build.sampler(config)
    total = config.optim.epochs * spe
    stages = np.array([sampling.stage(sampler, k, spe, total) for k in range(0, total, spe)])
    steps_of = np.repeat(stages, [min(spe, total - k) for k in range(0, total, spe)]) \
        if sampler.stage_by == "epoch" else None
    if steps_of is None:
        steps_of = np.array([sampling.stage(sampler, k, spe, total) for k in range(total)])
    macs = MacCache.of(config)
    out = {}
    for s in sorted(set(steps_of.tolist())):
        idx = np.flatnonzero(steps_of == s)
        picked = idx[np.linspace(0, len(idx) - 1, draws).astype(int)]
        out[s] = {"iterations": int(len(idx)), "draws": len(picked), "mean_macs": float(np.mean(
            [macs.iteration(sampling.sample_widths(sampler, int(k), spe, total))
             for k in picked]))}
    return out


def fit_sub_cost(base: tuple[float, float],
                 us3l: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Step time against MACs (per image and view) from measured ``(macs, step_s)`` points:
    ``step_s(m) = base_step_s + s_per_mac * (m - base_macs)``, anchored at the base step and
    with ``s_per_mac`` the least-squares slope of the US3L points clipped at 0 (``clipped``:
    the US3L step was measured faster than the base step, which is noise)."""
    f0, t0 = base
    df = np.array([f - f0 for f, _ in us3l], float)
    dt = np.array([t - t0 for _, t in us3l], float)
    raw = float(df @ dt / (df @ df)) if len(df) and df @ df > 0 else 0.0
    return dict(base_macs=f0, base_step_s=t0, raw_s_per_mac=raw, s_per_mac=max(raw, 0.0),
                clipped=raw < 0)


def fitted_step_s(fit: dict[str, Any], macs: float) -> float:
    """The fit's step time at ``macs``; never below the base step (a US3L iteration runs the
    base network and more)."""
    return fit["base_step_s"] + fit["s_per_mac"] * max(macs - fit["base_macs"], 0.0)


def _why_missing(case_rec: dict[str, Any], variant: str) -> str:
    if variant in case_rec.get("skipped_variants", ()):
        return "skipped by the time budget"
    return f"not measured (the case measures modes {', '.join(case_rec['update_modes'])})"


def _compile_s(config, case_rec: dict[str, Any], mode: str, spe: int,
               variants: Sequence[str] | None = None) -> tuple[dict[str, float], int]:
    """Compile seconds of the run, cold and cached, from the programs the case compiled in
    ``mode`` (or the named variants): every such program once, and the run's other
    sub-network programs at the mean measured time of a sub-network program. Sums over
    programs: an upper bound, since the loop compiles ahead on 2 threads while it trains."""
    n_sub = len(pretrain.possible_sub_widths(bench_compile._run(config, spe)))
    out = {}
    for phase in ("cold", "cached"):
        programs = {}
        for v in case_rec["variants"]:
            if (v["variant"] in variants) if variants is not None else v["update_mode"] == mode:
                programs.update(v["compile"][phase]["programs"])
        sub = [s for k, s in programs.items() if k.startswith("sub")]
        out[phase] = (sum(s for k, s in programs.items() if not k.startswith("sub"))
                      + n_sub * (statistics.mean(sub) if sub else 0.0))
    return out, n_sub


def project(config, label: str, case_rec: dict[str, Any], draws: int = 8) -> dict[str, Any]:
    """The projected run of ``config`` from a measured case (see the module docstring):
    ``status`` "ok", or "skipped" with its ``reason`` (and, when only the base step was
    measured, a ``lower_bound``)."""
    spe = steps_per_epoch(config)
    total = config.optim.epochs * spe
    scale = config.optim.batch_size / case_rec["batch"]  # step time ~ batch
    mode = config.method.update_mode
    head = dict(config=label, case=case_rec["name"], dtype=config.model.dtype,
                update_mode=mode, epochs=config.optim.epochs, steps_per_epoch=spe,
                total_steps=total, batch=config.optim.batch_size,
                measured_batch=case_rec["batch"], batch_scale=scale)
    by = {v["variant"]: v for v in case_rec["variants"]}
    if "base" not in by:
        reason = f"the base step of case {case_rec['name']} was {_why_missing(case_rec, 'base')}"
        return dict(head, status="skipped", reason=reason, line=f"{label}: skipped ({reason})")
    base = by["base"]
    t_base = base["step_s"] * scale
    # Per-iteration FLOPs are the same in both update modes, so when the config's own mode was
    # not measured the other mode's time per MAC is the best estimate there is.
    from_mode = mode if f"us3l_{mode}" in by else next(
        (m for m in case_rec["update_modes"] if f"us3l_{m}" in by), None)
    if from_mode is None:
        # Every US3L step does the base step's work and more: the base step alone bounds the
        # run from below, but is no projection.
        missing = [f"us3l_{m}" for m in dict.fromkeys([mode, *case_rec["update_modes"]])]
        reason = "no US3L step was measured (" + "; ".join(
            f"{v}: {_why_missing(case_rec, v)}" for v in missing) + ")"
        compile_s, _ = _compile_s(config, case_rec, mode, spe, variants=("base",))
        bound_h = (total * t_base + compile_s["cold"]) / 3600
        return dict(head, status="skipped", reason=reason, base_step_s=t_base,
                    lower_bound=dict(hours=bound_h, step_s=t_base, compute_s=total * t_base,
                                     compile_s=compile_s, basis="base step only"),
                    line=f"{label} ({config.model.dtype}): skipped ({reason}); at least "
                         f"{bound_h:.2f} hours ({total} steps x the base step {t_base:.4f} s "
                         f"+ {compile_s['cold'] / 60:.1f} min compile of its programs)")
    us3l = by[f"us3l_{from_mode}"]
    t_us3l = us3l["step_s"] * scale
    fit = fit_sub_cost((base["macs_per_image_view"], t_base),
                       [(us3l["macs_per_image_view"], t_us3l)])
    stages = stage_mix(config, spe, draws)
    for s in stages.values():
        s["step_s"] = fitted_step_s(fit, s["mean_macs"])
    compute_s = sum(s["iterations"] * s["step_s"] for s in stages.values())
    run_macs = sum(s["iterations"] * s["mean_macs"] for s in stages.values())
    run_flops = 2 * run_macs * 2 * config.optim.batch_size
    compile_s, n_sub = _compile_s(config, case_rec, from_mode, spe)
    hours = (compute_s + compile_s["cold"]) / 3600
    peak = case_rec["peak_flops_per_device"]
    notes = []
    if from_mode != mode:
        notes.append(f"US3L step time from the {from_mode!r} mode: {mode!r} was "
                     f"{_why_missing(case_rec, f'us3l_{mode}')}")
    if fit["clipped"]:
        notes.append("the US3L step was measured faster than the base step (noise): every "
                     "stage at the base step time, a lower bound")
    per_stage = ", ".join(f"{k}: {s['step_s']:.4f}" for k, s in stages.items())
    return dict(
        head, status="ok", from_mode=from_mode, base_step_s=t_base, us3l_step_s=t_us3l,
        fit=fit, stages={str(k): v for k, v in stages.items()},
        mean_step_s=compute_s / total, compute_s=compute_s, sub_programs=n_sub,
        compile_s=compile_s, hours=hours, hours_cached=(compute_s + compile_s["cached"]) / 3600,
        run_flops=run_flops, run_mfu=(run_flops / compute_s / (peak * case_rec["devices"])
                                      if peak else None), notes=notes,
        line=f"{label} ({config.model.dtype}): a full run takes about {hours:.2f} hours on "
             f"this device ({total} steps x {compute_s / total:.4f} s + "
             f"{compile_s['cold'] / 60:.1f} min compile, {compile_s['cached'] / 60:.1f} min "
             f"from the cache; s per step by stage {per_stage})"
             + "".join(f"; note: {n}" for n in notes))


def projections(cases: Sequence[dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    """One record per ``PROJECTED`` config; an unmeasured case or variant is ``skipped`` with
    its reason, and only an unexpected failure is an ``error``."""
    by_name = {c["name"]: c for c in cases}
    out = []
    for label, case_name, dtype in PROJECTED:
        try:
            config = bench_compile.load_config(label)
        except (ValueError, FileNotFoundError) as e:
            out.append(dict(config=label, case=case_name, status="skipped",
                            reason=f"config does not load: {e}"))
            continue
        case = by_name.get(case_name)
        if case is None or case["status"] != "ok":
            out.append(dict(config=label, case=case_name, status="skipped", reason=(
                f"no measured case for {config.model.name}" if case_name is None else
                f"case {case_name} was not run" if case is None else
                f"case {case_name} was skipped: {case['reason']}" if case["status"] == "skipped"
                else f"case {case_name} failed: {case.get('error')}")))
            continue
        if dtype:
            config.model.dtype = dtype
        if smoke:
            shrink(config)
        try:
            out.append(project(config, label, case, draws=3 if smoke else 8))
        except Exception as e:  # noqa: BLE001 - a projection's error must not end the run
            out.append(dict(config=label, case=case_name, status="error",
                            error=f"{type(e).__name__}: {e}"))
    return out


def goals(projs: Sequence[dict[str, Any]], peak: dict[str, Any]) -> dict[str, Any]:
    """The goal: a 400-epoch CIFAR-100 ResNet-18 US3L run in under 30 minutes on one
    H100-class GPU at >= 25% of bf16 peak."""
    mine = [p for p in projs if p["config"] == GOAL["config"] and p.get("dtype") == "bfloat16"]
    p = next((p for p in mine if p["status"] == "ok"), None)
    out: dict[str, Any] = dict(GOAL, device=peak.get("name"),
                               h100_class=peak.get("name") in H100_CLASS)
    if p is None:
        bound = next((q["lower_bound"] for q in mine if "lower_bound" in q), None)
        if bound is not None:
            return dict(out, lower_bound_minutes=bound["hours"] * 60,
                        note=f"the US3L step was not measured; the base step alone gives at "
                             f"least {bound['hours'] * 60:.1f} min")
        return dict(out, note="the bfloat16 CIFAR ResNet-18 case was not measured")
    out.update(projected_minutes=p["hours"] * 60, run_mfu=p["run_mfu"],
               under_30_min=p["hours"] * 60 < GOAL["minutes"],
               mfu_at_least_25pct=None if p["run_mfu"] is None else p["run_mfu"] >= GOAL["mfu"])
    if p["notes"]:
        out["projection_notes"] = p["notes"]
    if not out["h100_class"]:
        out["note"] = "not an H100-class device: the goal's figures do not apply here"
    return out


# ------------------------------------------------------------------------------ output


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    d = result["device"]
    lines = [f"{d['platform']} {d['kind']} x{d['count']}, peak "
             f"{_fmt(d['peak'].get('bfloat16'), '.3g')} bf16 / "
             f"{_fmt(d['peak'].get('float32'), '.3g')} fp32 FLOP/s per device "
             f"({d['peak'].get('source') or d['peak'].get('note')}); "
             f"{result['flop_convention']}", ""]
    head = ["case", "variant", "step ms", "pipe ms", "img/s", "TFLOP/s", "MFU", "prog MiB",
            "dev MiB", "cold s", "cached s", "views img/s"]
    body = []
    mib = lambda b: _fmt(None if b is None else b / 2 ** 20, ".1f")
    for c in result["cases"]:
        if c["status"] != "ok":
            body.append([c["name"], c["status"], c.get("reason") or c.get("error", "")[:60]]
                        + [""] * (len(head) - 3))
            continue
        views = c["input"]["device_views"]["images_per_s"]
        for v in c["variants"]:
            body.append([c["name"], v["variant"], f"{1e3 * v['step_s']:.2f}",
                         f"{1e3 * v['pipelined_step_s']:.2f}", f"{v['images_per_s']:.0f}",
                         f"{v['flops_per_s'] / 1e12:.4f}", _fmt(v["mfu"], ".1%"),
                         mib(v["program_peak_bytes"]), mib(v["device_peak_bytes"]),
                         f"{v['compile']['cold']['wall_s']:.1f}",
                         f"{v['compile']['cached']['wall_s']:.1f}", f"{views:.0f}"])
        for name in c["skipped_variants"]:
            body.append([c["name"], name, "skipped: budget"] + [""] * (len(head) - 3))
    lines += bench_step._columns(head, body)
    lines.append("")
    for p in result["projections"]:
        lines.append(p.get("line") or
                     f"{p['config']}: {p['status']} ({p.get('reason') or p.get('error')})")
    g = result["goals"]
    lines.append(f"goal ({g['config']} in < {g['minutes']:.0f} min at >= {g['mfu']:.0%} bf16 "
                 f"MFU on one H100-class GPU): projected "
                 f"{_fmt(g.get('projected_minutes'), '.1f')} min, run MFU "
                 f"{_fmt(g.get('run_mfu'), '.1%')}; {g.get('note', 'measured on ' + str(g['device']))}")
    return "\n".join(lines)


def write(path: str, result: dict[str, Any]) -> None:
    fileio.atomic_write_text(path, json.dumps(result, indent=1, default=str))


def run(args) -> dict[str, Any]:
    t0 = time.monotonic()
    reserve = 0.0 if args.smoke else PROJECTION_RESERVE_S
    remaining = lambda: args.budget_s - reserve - (time.monotonic() - t0)
    dev = jax.devices()[0]
    peak = device_peak(dev.device_kind)
    result: dict[str, Any] = dict(
        benchmark="accelerator_bench", date=datetime.datetime.now().isoformat(timespec="seconds"),
        smoke=args.smoke, budget_s=args.budget_s, steps=args.steps, warmup=args.warmup,
        jax_version=jax.__version__, host_cores=os.cpu_count(),
        device=dict(platform=jax.default_backend(), kind=dev.device_kind,
                    count=jax.device_count(), peak=peak),
        flop_convention="FLOPs = 2 per MAC x (teacher forward + 3 x online forward per width: "
                        "backward = 2 x forward) x 2 views x batch; MACs from us3l_jax.profile "
                        "(convs) + heads (dense)",
        compilation_cache_dir=args.cache_dir, cases=[], projections=[], goals={},
        complete=False)
    write(args.out, result)
    scale = 1.0  # measured / estimated cost of the cases so far
    for case in CASES:
        estimate = (args.smoke_estimate_s if args.smoke else case.estimate_s) * scale
        rec: dict[str, Any] = dict(name=case.name, config=case.config, estimate_s=estimate)
        if case.name not in args.cases:
            rec.update(status="skipped", reason="not selected (--cases)")
        elif case.needs_model and case.needs_model not in models.NAMES:
            rec.update(status="skipped", reason=f"us3l_jax.models has no {case.needs_model!r}")
        elif estimate > remaining():
            rec.update(status="skipped", reason=f"estimated {estimate:.0f} s > remaining "
                                                f"budget {max(0.0, remaining()):.0f} s")
        else:
            t = time.monotonic()
            try:
                config = case_config(case, args.smoke)
                rec.update(status="ok", **measure_case(case, config, args, peak, remaining))
            except Exception as e:  # noqa: BLE001 - record it, go on with the next case
                rec.update(status="error", error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc()[-3000:])
            rec["seconds"] = time.monotonic() - t
            scale = max(scale, rec["seconds"] / max(rec["estimate_s"] / scale, 1e-9))
        result["cases"].append(rec)
        print(f"[{time.monotonic() - t0:.0f} s] {case.name}: {rec['status']} "
              f"{rec.get('reason') or rec.get('error') or ''}", flush=True)
        write(args.out, result)
    result["projections"] = projections(result["cases"], args.smoke)
    result["goals"] = goals(result["projections"], peak)
    result["elapsed_s"] = time.monotonic() - t0
    result["complete"] = True
    write(args.out, result)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file (rewritten after every case)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU (a check that the benchmark works, < 1 min)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="cases that do not fit the remaining seconds are skipped")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; smoke 1)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help="comma-separated subset of the cases (default: all, in this order)")
    p.add_argument("--cache-dir", default=None,
                   help="persistent compilation cache (default: <out>.xla_cache, emptied)")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.input_repeats = 1 if args.smoke else 3
    args.smoke_estimate_s = 5.0
    names = [c.name for c in CASES]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in names]
    if bad or not args.cases:
        p.error(f"--cases: unknown case(s) {', '.join(bad) or '(none given)'}; valid: "
                f"{', '.join(names)}")
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} / {args.warmup}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: folder {out_dir} does not exist")
    if args.cache_dir is None:
        args.cache_dir = os.path.abspath(args.out) + ".xla_cache"
        shutil.rmtree(args.cache_dir, ignore_errors=True)  # cold means cold
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    result = run(args)
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
