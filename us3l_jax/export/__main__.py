"""``python -m us3l_jax.export --workdir=RUN (--width=W | --max-macs=N | --max-params=N |
--max-latency-ms=MS) --out=DIR [--format=onnx,stablehlo,torch,flax] [--batch=1]
[--image-size=N] [--step=N] [--calibration=NAME] [--calibration_batches=N]
[--trust_unverified_checkpoints]``: export one
width of a run (see ``command.export_run``); ``python -m us3l_jax.export --workdir=RUN
--table [--out=DIR]``: params, MACs, latency and accuracy of every distinct width
(``command.width_table``).

Without ``--format``, every format whose dependencies are installed is written, and a note
on stderr names any left out (ONNX needs the ``[export]`` extra). A format named in
``--format`` whose dependencies are missing is an error, found before any work.
``--calibration`` (and ``--calibration_batches``, as ``python -m us3l_jax.evaluate`` takes
them) picks whose BN statistics are folded in (each procedure has its own, see
``us3l_jax.calibration``); the output line and the model card name it.

Bad arguments (no run, a width outside the trained range, a budget no width fits, an unknown
format or one not installed, an unknown ``--calibration``, ``--calibration_batches`` < 1,
``--out`` an existing file, a non-empty directory or in a folder that cannot be written)
print one line ``python -m us3l_jax.export: error: ...`` and exit 2, writing nothing.
Checkpoints that lack their checksum file are skipped (a warning names each) unless
``--trust_unverified_checkpoints``, as in pretraining.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from absl import flags as absl_flags

from us3l_jax import cli
from us3l_jax.checkpointing import CheckpointError
from us3l_jax.export import artifacts

PROG = "python -m us3l_jax.export"
FLAGS = absl_flags.FlagValues()
absl_flags.DEFINE_string("workdir", None, "the pretraining run directory (required)",
                         flag_values=FLAGS)
absl_flags.DEFINE_float("width", None, "the width to export", flag_values=FLAGS)
absl_flags.DEFINE_string("max_macs", None, "MACs budget, e.g. 300M", flag_values=FLAGS)
absl_flags.DEFINE_string("max_params", None, "parameter budget, e.g. 2M", flag_values=FLAGS)
absl_flags.DEFINE_string("max_latency_ms", None,
                         "latency budget in ms, measured on this device at --batch",
                         flag_values=FLAGS)
absl_flags.DEFINE_bool("table", False, "print and plot every width", flag_values=FLAGS)
absl_flags.DEFINE_string("format", None,
                         f"comma-separated, of: {', '.join(artifacts.FORMATS)} (default: "
                         "all whose dependencies are installed)", flag_values=FLAGS)
absl_flags.DEFINE_string("out", None, "export directory (new or empty); with --table where "
                         "the table goes (default --workdir)", flag_values=FLAGS)
absl_flags.DEFINE_integer("batch", 1, "exported and timed batch size", flag_values=FLAGS)
absl_flags.DEFINE_integer("image_size", None, "input side (default the run's evaluation crop)",
                          flag_values=FLAGS)
absl_flags.DEFINE_integer("step", None, "checkpoint step (default latest)", flag_values=FLAGS)
absl_flags.DEFINE_integer("repeats", 20, "latency repeats (median)", flag_values=FLAGS)
absl_flags.DEFINE_string("calibration", None, "whose BN statistics are folded in: custom, "
                         "official_cifar, official_imagenet (default the run's "
                         "eval.calibration); named in the card", flag_values=FLAGS)
absl_flags.DEFINE_integer("calibration_batches", None, "BN calibration batches (default the "
                          "procedure's), as python -m us3l_jax.evaluate takes it",
                          flag_values=FLAGS)
absl_flags.DEFINE_bool("trust_unverified_checkpoints", False, "use checkpoints that lack "
                       "their checksum file (otherwise they are skipped)", flag_values=FLAGS)
_NAMES = ("workdir", "width", "max_macs", "max_params", "max_latency_ms", "table", "format",
          "out", "batch", "image_size", "step", "repeats", "calibration",
          "calibration_batches", "trust_unverified_checkpoints")
_CHOICES = ("width", "max_macs", "max_params", "max_latency_ms", "table")


def usage() -> str:
    return ("Export one width of a US3L run (ONNX, StableHLO, torch safetensors, Flax) or "
            "tabulate every width's cost.\n"
            f"  {PROG} --workdir=RUN --max-macs=300M --out=DIR\n"
            f"  {PROG} --workdir=RUN --table\n\n"
            f"Flags:\n{cli.format_flags(FLAGS, _NAMES)}\n")


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, PROG, usage)
    args = FLAGS
    if not args.workdir:
        cli.fail(PROG, "--workdir is required (the pretraining run directory)")
    chosen = [c for c in _CHOICES if (args[c].value if c == "table" else
                                      args[c].value is not None)]
    if len(chosen) != 1:
        cli.fail(PROG, "give exactly one of --width, --max-macs, --max-params, "
                       f"--max-latency-ms, --table (got {len(chosen)}: "
                       f"{', '.join('--' + c.replace('_', '-') for c in chosen) or 'none'})")
    if args.table:  # the table reads no BN statistics and writes no format: say so, not ignore
        given = [f for f in ("format", "calibration", "calibration_batches")
                 if args[f].value is not None]
        if given:
            cli.fail(PROG, f"--{given[0]} applies to an export, not to --table (the table's "
                           "accuracy column comes from the run's sweep.json, its latency from "
                           "uncalibrated weights)")
    if args.calibration_batches is not None and args.calibration_batches < 1:
        cli.fail(PROG, f"--calibration_batches={args.calibration_batches} must be > 0")
    # Our progress at INFO; other libraries (jax2onnx logs every conversion step, absl via
    # orbax installs its own handler) only at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    logging.getLogger("us3l_jax").setLevel(logging.INFO)
    note = None
    if not args.table:  # a missing dependency is found before any import or work
        try:
            if args.format is None:
                formats, note = artifacts.default_formats()
            else:
                formats = artifacts.check_formats(args.format)
        except ValueError as e:
            cli.fail(PROG, e)
    from us3l_jax.export import command, widths  # deferred: argument errors stay fast

    try:
        if args.table:
            command.width_table(args.workdir, args.out, args.batch, args.image_size, args.step,
                                args.repeats,
                                trust_unverified=args.trust_unverified_checkpoints)
            return 0
        if args.out is None:
            raise ValueError("--out is required to export (a new or empty directory)")
        if note:
            print(note, file=sys.stderr)
        budget = None
        for flag, key in widths.BUDGETS.items():
            text = getattr(args, flag)
            if text is not None:
                budget = (key, widths.parse_count(text, "--" + flag.replace("_", "-")))
        command.export_run(args.workdir, args.out, args.width, budget, formats, args.batch,
                           args.image_size, args.step, repeats=args.repeats,
                           calibration=args.calibration,
                           calibration_batches=args.calibration_batches,
                           trust_unverified=args.trust_unverified_checkpoints)
    except (CheckpointError, ValueError) as e:  # the same one line (exit 2) as bad flags
        cli.fail(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
