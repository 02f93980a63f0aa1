"""Compile cost of a paper config: every program its run needs, cold and from the persistent
cache, next to the run's projected length (goal: all programs cost <= 5% of the run).

    python experiments/bench_compile.py --config configs/us3l_cifar100.py:resnet18 \
        --out compile.json [--grid-step 0.0625] [--max-sub-programs N] [--steps-per-epoch K]

Two width samplers are compared: the config's own (continuous widths, as the paper: one
sub-network program per distinct channel configuration in the range, since continuous draws
map onto those) and a grid of ``--grid-step`` (deduplicated by configuration). Each runs in a
fresh process with an empty persistent compilation cache:

* ``cold``: ``Engine.compile_ahead`` of every program (2 compile threads, as a run does);
  wall time and the summed per-program time;
* ``cached``: the same after ``jax.clear_caches()`` with a new trainer, so every program is
  traced again and read from the persistent cache.

``--max-sub-programs N`` compiles only N sub-network programs and extrapolates the rest from
their mean (marked ``extrapolated`` in the table and JSON), for models whose full set takes
hours on a CPU. The projection: one base-only step is timed after compilation, and each
iteration of the run costs that times its FLOP ratio to a base step (``bench_step``'s FLOP
model, widths drawn by the run's own sampler at every ``--sample-every``-th step).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from us3l_jax import build, config as config_lib, mesh as mesh_lib, pretrain, sampling, slim  # noqa: E402,E501

# Training-split sizes for the run's length (no data is read).
TRAIN_EXAMPLES = {"cifar10": 50000, "cifar100": 50000, "imagenet2012": 1281167, "digits": 1437}


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(arg: str):
    """``configs/<file>.py[:<arg>]`` -> validated config."""
    path, _, variant = arg.partition(":")
    module = _load(os.path.join(REPO, path) if not os.path.isabs(path) else path, "cfg")
    config = module.get_config(variant or None) if variant else module.get_config()
    config_lib.validate(config)
    return config


def _run(config, steps_per_epoch: int) -> pretrain.Run:
    mesh = mesh_lib.make_mesh()
    spec = build.image_spec(config, mesh)
    data = build.Data(batches=None, steps_per_epoch=steps_per_epoch, image_spec=spec)
    return pretrain.Run(config=config, mesh=mesh, data=data,
                        trainer=build.trainer(config, mesh, steps_per_epoch),
                        sampler=build.sampler(config), steps_per_epoch=steps_per_epoch,
                        total_steps=config.optim.epochs * steps_per_epoch)


def _compile_all(run: pretrain.Run, width_sets) -> dict[str, float]:
    trainer = run.trainer
    abstract = trainer.abstract_state(run.image_spec)
    t = time.perf_counter()
    for fut in trainer.compile_ahead(abstract, run.image_spec, width_sets):
        fut.result()
    return {"wall_s": time.perf_counter() - t, "sum_s": trainer.programs.compile_seconds,
            "programs": trainer.programs.compiled}


def measure_variant(config, steps_per_epoch: int, max_sub_programs: int | None
                    ) -> dict[str, Any]:
    """Cold and cached compilation of one sampler variant (run in its own process)."""
    run = _run(config, steps_per_epoch)
    sets = pretrain.compile_width_sets(run)
    subs = pretrain.possible_sub_widths(run)
    kept = subs if max_sub_programs is None else subs[:max_sub_programs]
    if kept != subs:
        sets = [s for s in sets if len(s) == 1] + [(sets[-1][0], *kept)]
    out: dict[str, Any] = {"sub_programs": len(subs), "sub_programs_compiled": len(kept)}
    for phase in ("cold", "cached"):
        jax.clear_caches()
        r = _run(config, steps_per_epoch)
        out[phase] = _compile_all(r, sets)
    out["programs_compiled"] = out["cold"]["programs"]
    out["programs_total"] = out["programs_compiled"] + len(subs) - len(kept)
    out["extrapolated"] = kept != subs
    for phase in ("cold", "cached"):
        scale = out["programs_total"] / out["programs_compiled"]
        out[phase]["wall_s_total"] = out[phase]["wall_s"] * scale
        out[phase]["sum_s_total"] = out[phase]["sum_s"] * scale
    return out


def time_base_step(run: pretrain.Run, repeats: int = 2) -> float:
    """Median wall time of a base-only step (programs already compiled)."""
    trainer = run.trainer
    rng = np.random.default_rng(0)
    spec = run.image_spec
    images = jax.device_put(rng.integers(0, 256, spec.shape, dtype=np.uint8), spec.sharding)
    state = trainer.init_state(jax.random.key(0), spec)
    hi = (run.sampler.width_range[1],)
    state, _ = trainer.step(state, images, hi)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, _ = trainer.step(state, images, hi)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def mean_flop_ratio(config, steps_per_epoch: int, sample_every: int) -> float:
    """Mean over the run's iterations (every ``sample_every``-th) of the iteration's FLOPs
    relative to a base-only iteration, with the widths the run's sampler draws."""
    bench = _load(os.path.join(REPO, "experiments", "bench_step.py"), "bench_step")
    size = build.views(config)[0].size
    sampler = build.sampler(config)
    total = config.optim.epochs * steps_per_epoch
    # Continuous draws map onto the distinct configurations: snap each width to the smallest
    # width of its configuration, so the profiler runs once per configuration.
    lo, hi = sampler.width_range
    reps = np.array(slim.distinct_widths(build.backbone(config).channel_config, lo, hi))
    snap = lambda w: float(reps[np.searchsorted(reps, w + 1e-9) - 1])
    cache: dict[tuple[float, ...], int] = {}

    def macs(widths):
        key = tuple(snap(w) for w in widths)
        if key not in cache:
            cache[key] = bench.iteration_macs(config, key, size)["total"]
        return cache[key]

    base = macs((hi,))
    ratios = [macs(sampling.sample_widths(sampler, k, steps_per_epoch, total)) / base
              for k in range(0, total, sample_every)]
    return float(np.mean(ratios))


def _child(args) -> None:
    config = load_config(args.config)
    if args.variant == "step":
        # Step time is linear in the batch: a smaller one fits a CPU's memory.
        batch = config.optim.batch_size
        config.optim.batch_size = args.step_batch or batch
        run = _run(config, args.steps_per_epoch)
        out = {"step_batch": config.optim.batch_size, "base_step_s":
               time_base_step(run, args.step_repeats) * batch / config.optim.batch_size}
    else:
        if args.variant == "grid":
            config.sampler.grid_step = args.grid_step
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        out = measure_variant(config, args.steps_per_epoch, args.max_sub_programs)
    print("RESULT " + json.dumps(out))


def _spawn(args, variant: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="us3l_compile_cache_") as cache:
        cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config,
               "--out", args.out, "--grid-step", str(args.grid_step),
               "--steps-per-epoch", str(args.steps_per_epoch), "--variant", variant,
               "--step-repeats", str(args.step_repeats),
               "--step-batch", str(args.step_batch or 0),
               "--cache-dir", cache]
        if args.max_sub_programs is not None:
            cmd += ["--max-sub-programs", str(args.max_sub_programs)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{variant} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def format_table(record: dict[str, Any]) -> str:
    lines = [f"{record['config']}: {record['total_steps']} steps "
             f"({record['epochs']} epochs x {record['steps_per_epoch']}), batch "
             f"{record['batch']}, {record['device']}",
             f"projected run: {record['run_hours']:.2f} h = {record['total_steps']} steps x "
             f"{record['base_step_s']:.3f} s (base step, measured at batch "
             f"{record['step_batch']}) x {record['mean_flop_ratio']:.3f} (mean FLOP ratio of "
             f"the sampled widths)",
             "",
             f"{'sampler':>12} {'programs':>9} {'cold s':>9} {'cached s':>9} "
             f"{'cold %run':>9} {'cached %run':>11}  note"]
    for name in ("continuous", "grid"):
        v = record[name]
        note = (f"extrapolated from {v['programs_compiled']} programs"
                if v["extrapolated"] else "")
        lines.append(f"{name:>12} {v['programs_total']:>9} {v['cold']['wall_s_total']:>9.1f} "
                     f"{v['cached']['wall_s_total']:>9.1f} {v['cold_pct_of_run']:>9.2f} "
                     f"{v['cached_pct_of_run']:>11.2f}  {note}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="configs/<file>.py[:<arg>]")
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--grid-step", type=float, default=1 / 16)
    p.add_argument("--max-sub-programs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="default: the dataset's training split / batch, last batch dropped")
    p.add_argument("--step-repeats", type=int, default=2,
                   help="timed base steps (median) after one warm-up step")
    p.add_argument("--sample-every", type=int, default=97,
                   help="iterations between sampled width sets for the FLOP ratio")
    p.add_argument("--step-batch", type=int, default=None,
                   help="time the base step at this batch and scale linearly to the config's "
                        "(for models whose full batch does not fit this machine)")
    p.add_argument("--variant", choices=("continuous", "grid", "step"), help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.grid_step <= 1:
        p.error(f"--grid-step must be in (0, 1], got {args.grid_step}")
    if args.step_repeats < 1:
        p.error(f"--step-repeats must be >= 1, got {args.step_repeats}")
    if args.max_sub_programs is not None and args.max_sub_programs < 1:
        p.error(f"--max-sub-programs must be >= 1, got {args.max_sub_programs}")
    try:
        config = load_config(args.config)
    except (ValueError, FileNotFoundError) as e:
        p.error(f"--config {args.config}: {e}")
    if args.steps_per_epoch is None:
        args.steps_per_epoch = TRAIN_EXAMPLES[config.data.dataset] // config.optim.batch_size
    if args.variant:
        _child(args)
        return {}
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "config": args.config, "epochs": config.optim.epochs,
        "steps_per_epoch": args.steps_per_epoch, "batch": config.optim.batch_size,
        "total_steps": config.optim.epochs * args.steps_per_epoch,
        "device": f"{jax.default_backend()} {jax.devices()[0].device_kind} "
                  f"x{jax.device_count()}, {os.cpu_count()} CPU cores",
        "grid_step": args.grid_step}
    for variant in ("continuous", "grid"):
        record[variant] = _spawn(args, variant)
        print(f"{variant}: {json.dumps(record[variant])}", flush=True)
    record.update(_spawn(args, "step"))
    record["mean_flop_ratio"] = mean_flop_ratio(config, args.steps_per_epoch,
                                                args.sample_every)
    run_s = record["total_steps"] * record["base_step_s"] * record["mean_flop_ratio"]
    record["run_hours"] = run_s / 3600
    for variant in ("continuous", "grid"):
        v = record[variant]
        v["cold_pct_of_run"] = 100 * v["cold"]["wall_s_total"] / run_s
        v["cached_pct_of_run"] = 100 * v["cached"]["wall_s_total"] / run_s
    record["benchmark_s"] = time.perf_counter() - t0
    print(format_table(record))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
