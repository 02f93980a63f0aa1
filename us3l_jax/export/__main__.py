"""``python -m us3l_jax.export --workdir=RUN (--width=W | --max-macs=N | --max-params=N |
--max-latency-ms=MS) --out=DIR [--format=onnx,stablehlo,torch,flax] [--batch=1]
[--image-size=N] [--step=N]``: export one width of a run (see ``command.export_run``);
``python -m us3l_jax.export --workdir=RUN --table [--out=DIR]``: params, MACs, latency and
accuracy of every distinct width (``command.width_table``).

Bad arguments (no run, a width outside the trained range, a budget no width fits, an unknown
format, ``--out`` an existing file or non-empty directory) print one line
``python -m us3l_jax.export: error: ...`` and exit 2, writing nothing.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from us3l_jax.checkpointing import CheckpointError
from us3l_jax.export import artifacts
from us3l_jax.profile import OneLineParser

PROG = "python -m us3l_jax.export"


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description="Export one width of a US3L run (ONNX, StableHLO, "
                     "torch safetensors, Flax) or tabulate every width's cost.")
    parser.add_argument("--workdir", required=True, help="the pretraining run directory")
    pick = parser.add_mutually_exclusive_group(required=True)
    pick.add_argument("--width", type=float, default=None, help="the width to export")
    pick.add_argument("--max-macs", default=None, help="MACs budget, e.g. 300M")
    pick.add_argument("--max-params", default=None, help="parameter budget, e.g. 2M")
    pick.add_argument("--max-latency-ms", default=None,
                      help="latency budget in ms, measured on this device at --batch")
    pick.add_argument("--table", action="store_true", help="print and plot every width")
    parser.add_argument("--format", default=",".join(artifacts.FORMATS),
                        help=f"comma-separated, of: {', '.join(artifacts.FORMATS)}")
    parser.add_argument("--out", default=None, help="export directory (new or empty); "
                        "with --table where the table goes (default --workdir)")
    parser.add_argument("--batch", type=int, default=1, help="exported and timed batch size")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side (default the run's evaluation crop)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--repeats", type=int, default=20, help="latency repeats (median)")
    args = parser.parse_args(argv)
    # Our progress at INFO; other libraries (jax2onnx logs every conversion step, absl via
    # orbax installs its own handler) only at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    logging.getLogger("us3l_jax").setLevel(logging.INFO)
    from us3l_jax.export import command, widths  # deferred: argument errors stay fast

    try:
        if args.table:
            command.width_table(args.workdir, args.out, args.batch, args.image_size, args.step,
                                args.repeats)
            return 0
        if args.out is None:
            raise ValueError("--out is required to export (a new or empty directory)")
        formats = artifacts.check_formats(args.format)
        budget = None
        for flag, key in widths.BUDGETS.items():
            text = getattr(args, flag)
            if text is not None:
                budget = (key, widths.parse_count(text, "--" + flag.replace("_", "-")))
        command.export_run(args.workdir, args.out, args.width, budget, formats, args.batch,
                           args.image_size, args.step, repeats=args.repeats)
    except (CheckpointError, ValueError) as e:  # the same one line (exit 2) as argparse's
        parser.error(" ".join(str(e).split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
