"""``python -m us3l_jax.evaluate --workdir=RUN [--widths=1.0,0.5,0.25] [--protocol=fast|knn|paper]
[--dataset=NAME] [--out=DIR] [--step=N] [--epochs=N] [--calibration-batches=N] [--recalibrate]
[--paper-row=KEY]``: the width sweep of a pretraining run (see ``sweep.run_sweep``).

Bad arguments (no run or checkpoint, a width outside the trained range, an unknown protocol,
dataset or paper row) print one line ``python -m us3l_jax.evaluate: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from us3l_jax.checkpointing import CheckpointError

PROG = "python -m us3l_jax.evaluate"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description="Accuracy of a US3L run at every width: BN "
                     "calibration, then a linear probe (fast/paper) or kNN.")
    parser.add_argument("--workdir", required=True, help="the pretraining run directory")
    parser.add_argument("--widths", default=None,
                        help="comma-separated widths (default config.eval.sweep_widths)")
    parser.add_argument("--protocol", default=None,
                        help="fast, knn, paper, or several comma-separated "
                             "(default config.eval.sweep_protocol)")
    parser.add_argument("--dataset", default=None, help="evaluation dataset (default: the "
                        "pretraining one; cifar10, cifar100, oxford_flowers102, "
                        "oxford_iiit_pet, dtd for transfer)")
    parser.add_argument("--out", default=None, help="report directory (default: --workdir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--epochs", type=int, default=None, help="paper protocol epochs")
    parser.add_argument("--calibration-batches", type=int, default=None)
    parser.add_argument("--recalibrate", action="store_true",
                        help="recalibrate even if stored statistics match")
    parser.add_argument("--paper-row", default=None, help="paper row to draw beside ours, "
                        "e.g. table2/resnet18/ours (default config.eval.paper_row)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)  # absl (imported by orbax) installed its own handler
    for name in ("absl", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from us3l_jax.evaluate.sweep import run_sweep  # deferred: argument errors stay fast

    try:
        run_sweep(args.workdir, args.widths, args.protocol, args.dataset, args.out, args.step,
                  epochs=args.epochs, calibration_batches=args.calibration_batches,
                  recalibrate=args.recalibrate, paper_row=args.paper_row)
    except (CheckpointError, ValueError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
