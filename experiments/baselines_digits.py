"""US3L and the paper's baselines on the digits demo, with the same data, backbone, batch and
number of steps: accuracy at widths 1.0 and 0.25.

    python experiments/baselines_digits.py --out /tmp/baselines [--only byol,seed]

Each method is its ``configs/demo.py`` variant (12 epochs, 264 steps): US3L (the demo),
individually trained BYOL and MoCo v2 (one run per width), US+BYOL, SEED and SEED-MSE (a
student per width distilled from the frozen BYOL 1.0x run made first), supervised US-Net and
S-Net. Self-supervised runs are scored by the fast linear probe, supervised ones by their own
classifier's top-1, each after the run's own BN calibration. Prints a table and writes
``<out>/baselines_digits.json`` (rewritten after every run, so an interrupted sweep keeps what
finished). The digits are easy (every method is far above the 10% chance) and the recipes
are the official ones scaled down, untuned: the table shows that each pipeline trains at
equal cost, not how the methods rank on CIFAR or ImageNet.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))

# (method, demo variant, widths the run trains and is evaluated at); {teacher} is the BYOL 1.0x
# run's workdir.
RUNS = (
    ("us3l", None, (1.0, 0.25)),
    ("byol", "byol,1.0", (1.0,)),
    ("byol", "byol,0.25", (0.25,)),
    ("us_byol", "us_byol", (1.0, 0.25)),
    ("mocov2", "mocov2,1.0", (1.0,)),
    ("mocov2", "mocov2,0.25", (0.25,)),
    ("seed", "seed,1.0,{teacher}", (1.0,)),
    ("seed", "seed,0.25,{teacher}", (0.25,)),
    ("seed_mse", "seed_mse,1.0,{teacher}", (1.0,)),
    ("seed_mse", "seed_mse,0.25,{teacher}", (0.25,)),
    ("supervised_us", "supervised_us", (1.0, 0.25)),
    ("s_net", "s_net", (1.0, 0.25)),
)


def run_one(variant: str | None, widths, workdir: str) -> list[dict]:
    import demo  # configs/demo.py

    from us3l_jax import pretrain
    from us3l_jax.evaluate.sweep import run_sweep
    c = demo.get_config(variant)
    c.eval.final_sweep = False
    pretrain.train(c, workdir)
    return run_sweep(workdir, widths, c.eval.sweep_protocol, out=os.path.join(workdir, "sweep"),
                     echo=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs and the JSON")
    p.add_argument("--only", default=None, help="comma-separated methods (default: all)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    os.makedirs(args.out, exist_ok=True)
    teacher = os.path.join(args.out, "byol-1.0")
    results = []
    for method, variant, widths in RUNS:
        if only and method not in only and not (variant == "byol,1.0" and
                                                only & {"seed", "seed_mse"}):
            continue
        name = "us3l" if variant is None else variant.split(",{")[0].replace(",", "-")
        workdir = os.path.join(args.out, name)
        t = time.perf_counter()
        try:
            records = run_one(variant and variant.format(teacher=teacher), widths, workdir)
        except Exception as e:  # noqa: BLE001 - record it and go on with the next method
            results.append({"method": method, "variant": variant, "error": repr(e)})
            print(f"{name}: failed: {e!r}", flush=True)
            continue
        for r in records:
            results.append({"method": method, "variant": variant, "width": r["width"],
                            "protocol": r["protocol"], "accuracy": r["accuracy"],
                            "seconds": round(time.perf_counter() - t, 1)})
        print(f"{name}: " + ", ".join(f"{r['width']:g}: {r['accuracy']:.1f}%" for r in records),
              flush=True)
        with open(os.path.join(args.out, "baselines_digits.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    return 0


def table(results: list[dict]) -> str:
    """Accuracy (%) at 1.0 and 0.25 per method."""
    lines = ["| method | protocol | 1.0 | 0.25 |", "|---|---|---:|---:|"]
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method and "accuracy" in r]
        cell = {r["width"]: f"{r['accuracy']:.1f}" for r in rows}
        proto = rows[0]["protocol"] if rows else "failed"
        lines.append(f"| {method} | {proto} | {cell.get(1.0, '-')} | {cell.get(0.25, '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
