"""CPU throughput ratio of our US3L step to the official PyTorch iteration, and where it goes.

    python experiments/cpu_ratio.py --out cpu_ratio.json [--batch 32] [--steps 5] \
        [--widths 1.0,0.5,0.25] [--image-size 32] [--base-width 64] [--cores 2] \
        [--breakdown] [--convs] [--conv-steps 5]

In one process, on this machine's CPU cores, it builds

* the official iteration (``official_step_torch.make_iteration``, PyTorch, float32, NCHW,
  oneDNN convolutions): EMA, teacher forward, then per width forward, loss, backward and one
  SGD update;
* our step (``us3l_jax.engine.Engine`` from ``configs/us3l_cifar100.py:resnet18``, the
  ``cifar_resnet18`` at ``--base-width``, float32, ``update_mode='per_width'``: the official
  one update per width; BN/negatives groups of min(128, batch)) at the fixed widths
  ``--widths`` (default: dynamic-sampling stage 4, base 1.0 with sub-widths 0.5 and 0.25),

and times them alternately, ``--steps`` rounds after warm-up (each round swaps which runs
first), so that the load of a shared machine hits both alike. Reported: median wall and CPU
(``time.process_time``: all threads) seconds per iteration, and the throughput ratio
``ratio = official_s / ours_s`` (>= 1.0: ours is at least as fast; ``cpu_ratio`` the same
from CPU seconds). Load hits the two unequally (PyTorch's OpenMP regions wait at barriers for
descheduled threads; XLA's task pool does not), so ``ratio_min``, from the fastest round of
each, is the figure least skewed by other jobs; ``round_loadavg`` has the load of every
round. Our step includes on-device augmentation (the ``views`` program), the
official one gets ready random views, so the ratio is a lower bound for ours
(``ratio_no_views`` leaves ``views`` out, from the breakdown).

``--breakdown``: ``--steps`` more of our steps blocking after every program (bench_step's
breakdown): per-program minimum wall / CPU seconds. ``--convs``: one 3x3 stride-1 convolution
per ResNet stage and width (``2 x batch`` images, the stage's channels at that width), forward
plus both gradients, XLA:CPU (NHWC/HWIO as ``us3l_jax.slim.SlimConv``, and NCHW/OIHW) against
PyTorch (NCHW, and channels_last), as GFLOP/s (3 x the forward's 2·N·H·W·Cin·Cout·9, the
fastest of ``--conv-steps`` interleaved repetitions; ``*_fwd`` columns: the forward alone).

``--cores N`` pins this process to its first N allowed cores before either library starts its
thread pool (both size their pools from the affinity mask), so that XLA and PyTorch get the
same threads. The JSON records ``os.getloadavg()`` before and after: on a shared machine,
read the figures against it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
CONFIG = os.path.join(REPO, "configs", "us3l_cifar100.py")


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench():
    """experiments/bench_step.py, loaded once (it imports JAX; thread pools start later)."""
    if "bench_step" not in sys.modules:
        sys.modules["bench_step"] = _load(os.path.join(HERE, "bench_step.py"), "bench_step")
    return sys.modules["bench_step"]


def _official():
    """experiments/official_step_torch.py, loaded once (it imports torch only when run)."""
    if "official_step_torch" not in sys.modules:
        sys.modules["official_step_torch"] = _load(os.path.join(HERE, "official_step_torch.py"),
                                                   "official_step_torch")
    return sys.modules["official_step_torch"]


def _floats(text: str) -> tuple[float, ...]:
    """The official driver's width list, with the base width 1.0 first (our step needs it)."""
    out = _official()._floats(text)
    if out[0] != 1.0:
        raise argparse.ArgumentTypeError(f"the base width 1.0 comes first, got {text!r}")
    return out


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall s, CPU s of this process) of ``fn()``, which must wait for its own results."""
    start = _bench()._clock()
    fn()
    wall, cpu = _bench()._clock() - start
    return float(wall), float(cpu)


def make_config(batch: int, image_size: int, base_width: int, widths: Sequence[float]):
    """``configs/us3l_cifar100.py:resnet18`` at this batch, image size and base width: float32,
    one update per width, BN/negatives groups of min(128, batch), sampler range covering
    ``widths`` (so that tiny base widths validate at their widths)."""
    from us3l_jax import config as config_lib
    c = _load(CONFIG, "us3l_cifar100_config").get_config("resnet18")
    c.model.base_width = int(base_width)
    c.model.dtype = "float32"
    c.data.image_size = int(image_size)
    c.optim.batch_size = int(batch)
    c.method.group_size = min(128, int(batch))
    c.method.update_mode = "per_width"
    c.sampler.width_range = (min(widths), max(widths))
    # Evaluation widths outside that range would fail validation; the step never evaluates.
    c.eval.online_widths = c.eval.sweep_widths = tuple(widths)
    config_lib.validate(c)
    return c


# ------------------------------------------------------------------------------ step ratio


def step_ratio(args, torch) -> dict[str, Any]:
    """Both iterations timed alternately; the records of the step comparison."""
    import jax
    import numpy as np
    bench = _bench()
    official = _official()
    from us3l_jax import mesh as mesh_lib

    config = make_config(args.batch, args.image_size, args.base_width, args.widths)
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    images = jax.device_put(
        rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8),
        mesh_lib.batch_sharding(mesh))
    ours = bench._Mode(config, "per_width", images, mesh)
    t = time.perf_counter()
    programs = bench._compile(ours.trainer, ours.state, images, args.widths)[0]
    compile_s = time.perf_counter() - t
    theirs = official.make_iteration(torch, args.widths, args.batch, device="cpu",
                                     image_size=args.image_size, base_width=args.base_width)

    def our_step():
        ours.state, ours.metrics = ours.trainer.step(ours.state, images, args.widths)
        jax.block_until_ready(ours.state)

    for _ in range(2):  # warm-up: first-call allocations, oneDNN primitive caches
        our_step()
        theirs()
    times: dict[str, list[tuple[float, float]]] = {"official": [], "ours": []}
    loads = []
    for r in range(args.steps):
        loads.append(os.getloadavg()[0])
        order = [("official", theirs), ("ours", our_step)]
        for name, fn in order[:: 1 if r % 2 == 0 else -1]:
            times[name].append(_timed(fn))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in times.items()}
    out = dict(official_s=med["official"][0], ours_s=med["ours"][0],
               official_cpu_s=med["official"][1], ours_cpu_s=med["ours"][1],
               official_times=[w for w, _ in times["official"]],
               ours_times=[w for w, _ in times["ours"]],
               official_cpu_times=[c for _, c in times["official"]],
               ours_cpu_times=[c for _, c in times["ours"]], round_loadavg=loads,
               official_min_s=min(w for w, _ in times["official"]),
               ours_min_s=min(w for w, _ in times["ours"]),
               ours_programs=programs, ours_compile_s=compile_s,
               loss=float(jax.device_get(ours.metrics["loss/total"])))
    out["ratio"] = out["official_s"] / out["ours_s"]
    out["cpu_ratio"] = out["official_cpu_s"] / out["ours_cpu_s"]
    # Load slows PyTorch's OpenMP barriers far more than XLA's task pool: the fastest round
    # of each is the least loaded estimate of both.
    out["ratio_min"] = out["official_min_s"] / out["ours_min_s"]
    if args.breakdown:
        label_s: dict[str, float] = {}
        label_cpu: dict[str, float] = {}
        for _ in range(args.steps):
            for k, (w, c) in ours.breakdown(args.widths).items():
                label_s[k] = min(label_s.get(k, float("inf")), float(w))
                label_cpu[k] = min(label_cpu.get(k, float("inf")), float(c))
        out["program_s"], out["program_cpu_s"] = label_s, label_cpu
        # Augmentation is ours alone (the official step gets ready views): leave it out.
        rest = sum(v for k, v in label_s.items() if k != "views")
        out["ratio_no_views"] = out["official_s"] / (out["ours_s"] * rest / sum(label_s.values()))
    return out


# ------------------------------------------------------------------------------ conv rates


def conv_shapes(base_width: int, image_size: int, widths: Sequence[float]
                ) -> list[tuple[int, float, int, int]]:
    """(stage, width, channels, spatial side) of the stride-1 3x3 convs of each CIFAR ResNet
    stage, channels rounded as the slimmed layers round them."""
    from us3l_jax import slim
    return [(s + 1, w, slim.channels(base_width * 2 ** s, w), max(1, image_size // 2 ** s))
            for s in range(4) for w in widths]


def conv_rates(shapes, batch: int, steps: int, torch) -> list[dict[str, Any]]:
    """GFLOP/s of forward + input and kernel gradients of one conv per shape, per variant
    (``*_fwd``: the forward alone)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    F = torch.nn.functional
    n = 2 * batch  # both views go through every layer

    def jax_conv(layout):
        dn = ("NHWC", "HWIO", "NHWC") if layout == "nhwc" else ("NCHW", "OIHW", "NCHW")

        @jax.jit
        def f(x, k, g):
            y, vjp = jax.vjp(lambda x, k: jax.lax.conv_general_dilated(
                x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn), x, k)
            return (y,) + vjp(g)
        return f

    fns = {"xla_nhwc": jax_conv("nhwc"), "xla_nchw": jax_conv("nchw")}
    # Forward alone, to tell whether XLA loses in the forward or in the two gradients.
    fwd = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
    rows = []
    for stage, w, c, hw in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, c, hw, hw), dtype=np.float32)
        k = (rng.standard_normal((c, c, 3, 3)) / (3 * np.sqrt(c))).astype(np.float32)
        g = rng.standard_normal((n, c, hw, hw), dtype=np.float32)
        nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))
        jargs = {"xla_nhwc": tuple(jnp.asarray(a) for a in (nhwc(x), k.transpose(2, 3, 1, 0),
                                                             nhwc(g))),
                 "xla_nchw": tuple(jnp.asarray(a) for a in (x, k, g))}
        tx = torch.from_numpy(x).requires_grad_()
        tk = torch.from_numpy(k).requires_grad_()
        tg = torch.from_numpy(g)
        cl = torch.channels_last
        tx_cl = tx.detach().to(memory_format=cl).requires_grad_()
        tg_cl = tg.to(memory_format=cl)

        def torch_run(xx, gg):
            def run():
                y = F.conv2d(xx, tk, padding=1)
                y.backward(gg)
                xx.grad = tk.grad = None
            return run

        variants = {name: (lambda f=fns[name], a=jargs[name]:
                           jax.block_until_ready(f(*a)))
                    for name in fns}
        variants["torch_nchw"] = torch_run(tx, tg)
        variants["torch_channels_last"] = torch_run(tx_cl, tg_cl)
        variants["xla_nhwc_fwd"] = lambda a=jargs["xla_nhwc"]: jax.block_until_ready(
            fwd(*a[:2]))

        def torch_fwd():
            with torch.no_grad():
                F.conv2d(tx, tk, padding=1)
        variants["torch_nchw_fwd"] = torch_fwd
        for fn in variants.values():  # compile / warm oneDNN primitives
            fn()
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(steps):  # interleaved, so load hits every variant alike
            for name, fn in variants.items():
                times[name].append(_timed(fn)[0])
        flops = 3 * 2 * n * hw * hw * c * c * 9
        row = dict(stage=stage, width=w, channels=c, side=hw, images=n, gflop=flops / 1e9)
        for name, ts in times.items():  # the fastest repetition: least disturbed by load
            row[f"{name}_s"] = min(ts)
            row[f"{name}_gflops"] = flops / (3 if name.endswith("_fwd") else 1) / min(ts) / 1e9
        row["xla_over_torch"] = row["xla_nhwc_gflops"] / row["torch_nchw_gflops"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ output


def format_table(out: dict[str, Any]) -> str:
    """The step comparison, the per-program breakdown and the conv table, as text."""
    _columns = _bench()._columns
    lines = _columns(["", "official s", "ours s", "ratio official/ours"],
                     [["wall", f"{out['official_s']:.3f}", f"{out['ours_s']:.3f}",
                       f"{out['ratio']:.3f}"],
                      ["wall min", f"{out['official_min_s']:.3f}", f"{out['ours_min_s']:.3f}",
                       f"{out['ratio_min']:.3f}"],
                      ["CPU", f"{out['official_cpu_s']:.3f}", f"{out['ours_cpu_s']:.3f}",
                       f"{out['cpu_ratio']:.3f}"]])
    if "program_s" in out:
        lines += ["", "our step per program (blocking after each; min over rounds); ratio "
                      f"without views: {out['ratio_no_views']:.3f}"]
        lines += _columns(["program", "wall s", "CPU s"],
                          [[k, f"{v:.3f}", f"{out['program_cpu_s'][k]:.3f}"]
                           for k, v in out["program_s"].items()])
    if out.get("convs"):
        names = [k[:-7] for k in out["convs"][0] if k.endswith("_gflops")]
        lines += ["", "3x3 conv forward + backward, GFLOP/s (fastest repetition)"]
        lines += _columns(["stage", "width", "C", "HxW", *names, "xla/torch"],
                          [[str(r["stage"]), f"{r['width']:g}", str(r["channels"]),
                            f"{r['side']}x{r['side']}",
                            *(f"{r[n + '_gflops']:.1f}" for n in names),
                            f"{r['xla_over_torch']:.2f}"] for r in out["convs"]])
    lines.append(f"load average before / after: {out['loadavg_before']} / "
                 f"{out['loadavg_after']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--widths", type=_floats, default=(1.0, 0.5, 0.25),
                   help="base width 1.0 first, then the sub-widths")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (after 2 warm-up)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--base-width", type=int, default=64, help="stage-1 channels at width 1.0")
    p.add_argument("--cores", type=int, default=None,
                   help="pin to this many cores (default: all this process may use)")
    p.add_argument("--breakdown", action="store_true", help="per-program times of our step")
    p.add_argument("--convs", action="store_true", help="conv GFLOP/s, XLA vs PyTorch")
    p.add_argument("--conv-steps", type=int, default=5)
    args = p.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.conv_steps < 1:
        p.error("--batch must be >= 2, --steps and --conv-steps >= 1")
    try:
        import torch
    except ImportError:
        print("cpu_ratio: PyTorch is not installed; the official step needs it",
              file=sys.stderr)
        sys.exit(1)
    if args.cores:
        # Before either thread pool exists: both size themselves from the affinity mask.
        allowed = sorted(os.sched_getaffinity(0))
        if not 1 <= args.cores <= len(allowed):
            p.error(f"--cores must be in [1, {len(allowed)}]")
        os.sched_setaffinity(0, allowed[: args.cores])
        torch.set_num_threads(args.cores)
    out: dict[str, Any] = dict(driver="cpu_ratio", batch=args.batch, widths=list(args.widths),
                               image_size=args.image_size, base_width=args.base_width,
                               steps=args.steps, cpu_count=os.cpu_count(),
                               cores=len(os.sched_getaffinity(0)),
                               torch_threads=torch.get_num_threads(), torch=torch.__version__,
                               xla_flags=os.environ.get("XLA_FLAGS", ""),
                               loadavg_before=list(os.getloadavg()))
    t0 = time.perf_counter()
    out.update(step_ratio(args, torch))
    if args.convs:
        out["convs"] = conv_rates(conv_shapes(args.base_width, args.image_size, args.widths),
                                  args.batch, args.conv_steps, torch)
    import jax
    out.update(jax=jax.__version__, loadavg_after=list(os.getloadavg()),
               total_s=time.perf_counter() - t0)
    print(f"CPU ({out['cores']} cores of {out['cpu_count']}), cifar_resnet18 base width "
          f"{args.base_width}, {args.image_size}px, batch {args.batch}, widths {args.widths}, "
          f"float32, one update per width; median of {args.steps} interleaved rounds")
    print(format_table(out))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
