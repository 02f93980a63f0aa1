"""Update mode and BN calibration on the digits demo: how much each fidelity choice moves
accuracy per width (docs/fidelity.md, "Update mode" and "BN calibration").

    python experiments/fidelity_digits.py --out /tmp/fidelity [--seeds 0,1] [--epochs 12]

For each seed, the digits demo (``configs/demo.py``) is pretrained twice with the same steps,
once per update mode (``accumulate``: one update per iteration, paper Algorithm 1;
``per_width``: one update per width, the official code). Each run is then evaluated with the
fast linear probe at widths 1.0/0.75/0.5/0.25 under every BN calibration procedure
(``custom``: exact cumulative statistics, the project's default; ``official_cifar`` and
``official_imagenet``). Prints two tables (mean over seeds, and each seed) and writes
``<out>/fidelity_digits.json`` with every record, the pretraining wall and CPU seconds of
each run, and the settings. On a shared CPU compare CPU seconds, not wall seconds; for the
step-time ratio of the two modes without compilation use ``experiments/bench_step.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))

WIDTHS = (1.0, 0.75, 0.5, 0.25)
MODES = ("accumulate", "per_width")
CALIBRATIONS = ("custom", "official_cifar", "official_imagenet")


def pretrain(mode: str, seed: int, epochs: int, workdir: str) -> dict[str, float]:
    import demo  # configs/demo.py

    from us3l_jax import pretrain as pretrain_lib
    c = demo.get_config()
    c.seed = seed
    c.optim.epochs = epochs
    c.method.update_mode = mode
    c.eval.final_sweep = False
    t, cpu = time.perf_counter(), time.process_time()
    pretrain_lib.train(c, workdir)
    return {"train_wall_s": time.perf_counter() - t, "train_cpu_s": time.process_time() - cpu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs and the JSON")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--epochs", type=int, default=12, help="pretraining epochs (demo: 12)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    from us3l_jax.evaluate.sweep import run_sweep

    os.makedirs(args.out, exist_ok=True)
    records, runs = [], []
    for seed in seeds:
        for mode in MODES:
            workdir = os.path.join(args.out, f"{mode}-seed{seed}")
            if os.path.exists(os.path.join(workdir, "config.json")):
                sys.exit(f"{workdir} already holds a run; choose an empty --out")
            timing = pretrain(mode, seed, args.epochs, workdir)
            runs.append({"mode": mode, "seed": seed, **timing})
            for cal in CALIBRATIONS:
                for r in run_sweep(workdir, WIDTHS, "fast", out=os.path.join(workdir, cal),
                                   calibration=cal, echo=None):
                    records.append({"mode": mode, "seed": seed, "calibration": cal,
                                    "width": r["width"], "accuracy": r["accuracy"]})
            with open(os.path.join(args.out, "fidelity_digits.json"), "w") as f:
                json.dump({"seeds": seeds, "epochs": args.epochs, "runs": runs,
                           "records": records}, f, indent=1)
    print(table(records, seeds))
    print("\npretraining (wall / CPU seconds, incl. compilation):")
    for r in runs:
        print(f"  {r['mode']:<10} seed {r['seed']}: {r['train_wall_s']:.0f} s / "
              f"{r['train_cpu_s']:.0f} s")
    return 0


def table(records: list[dict], seeds: list[int]) -> str:
    """Fast-probe accuracy (%) by update mode and calibration, mean over seeds and each."""
    lines = ["| update mode | calibration | " + " | ".join(f"{w:g}" for w in WIDTHS) + " |",
             "|---|---|" + "---|" * len(WIDTHS)]
    for mode in MODES:
        for cal in CALIBRATIONS:
            cells = []
            for w in WIDTHS:
                accs = [r["accuracy"] for r in records if (r["mode"], r["calibration"],
                                                           r["width"]) == (mode, cal, w)]
                if not accs:
                    cells.append("-")
                    continue
                each = "/".join(f"{a:.1f}" for a in accs)
                cells.append(f"{statistics.mean(accs):.1f}" +
                             (f" ({each})" if len(accs) > 1 else ""))
            lines.append(f"| {mode} | {cal} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
