"""``python -m us3l_jax.evaluate --workdir=RUN [--widths=1.0,0.5,0.25] [--protocol=fast|knn|paper]
[--dataset=NAME] [--out=DIR] [--step=N] [--epochs=N] [--calibration=NAME] [--calibration_batches=N]
[--recalibrate] [--paper_row=KEY] [--trust_unverified_checkpoints]``: the width sweep of a pretraining run (see ``sweep.run_sweep``).

Each evaluation writes ``sweep.json/.md/.png`` (and TensorBoard events) into a new folder
``<workdir>/eval/<protocols>-<widths>[-<n>]/``, or into ``--out``, which must not already
hold a sweep: the run's own sweep (written by pretraining) is never replaced.

absl flags like ``python -m us3l_jax.main`` (the earlier hyphenated spellings such as
``--calibration-batches`` still work). Bad arguments (no run or checkpoint, a width outside the
trained range, an unknown protocol, dataset or paper row, an ``--out`` that holds a sweep)
print one line ``python -m us3l_jax.evaluate: error: ...`` and exit 2. A workdir that cannot
be written (read-only) needs ``--out``, which then also receives the calibrated BN statistics.
Checkpoints that lack their checksum file are skipped (a warning names each) unless
``--trust_unverified_checkpoints``, as in pretraining.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from absl import flags

from us3l_jax import cli, fileio
from us3l_jax.checkpointing import CheckpointError
from us3l_jax.data.datasets import NAMES as DATASETS
from us3l_jax.evaluate.evaluator import PROTOCOLS

PROG = "python -m us3l_jax.evaluate"
EXIT_IO = 4  # as python -m us3l_jax.main: an I/O error while writing
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "the pretraining run directory (required)",
                    flag_values=FLAGS)
flags.DEFINE_string("widths", None, "comma-separated widths (default "
                    "config.eval.sweep_widths)", flag_values=FLAGS)
flags.DEFINE_string("protocol", None, f"{', '.join(PROTOCOLS)}, or several comma-separated "
                    "(default config.eval.sweep_protocol)", flag_values=FLAGS)
flags.DEFINE_string("dataset", None, "evaluation dataset (default: the pretraining one; "
                    "oxford_flowers102, oxford_iiit_pet, dtd, cifar10, cifar100 for transfer)",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "report directory; must not already hold a sweep (default: "
                    "a new <workdir>/eval/<protocols>-<widths>[-<n>]/)", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step (default latest)", flag_values=FLAGS)
flags.DEFINE_integer("epochs", None,
                     "epochs of the paper and finetune protocols (default the recipe's)",
                     flag_values=FLAGS)
flags.DEFINE_string("calibration", None, "BN calibration procedure: custom (the config's "
                    "calibration_* fields), official_cifar, official_imagenet (default "
                    "config.eval.calibration)", flag_values=FLAGS)
flags.DEFINE_integer("calibration_batches", None, "BN calibration batches (default "
                     "config.eval.calibration_batches)", flag_values=FLAGS)
flags.DEFINE_bool("recalibrate", False, "recalibrate even if stored statistics match",
                  flag_values=FLAGS)
flags.DEFINE_string("paper_row", None, "paper row to draw beside ours, e.g. "
                    "table2/resnet18/ours (default config.eval.paper_row)", flag_values=FLAGS)
flags.DEFINE_bool("trust_unverified_checkpoints", False, "use checkpoints that lack their "
                  "checksum file (written before checksums existed, or the file was lost); "
                  "otherwise they are skipped", flag_values=FLAGS)
_NAMES = ("workdir", "widths", "protocol", "dataset", "out", "step", "epochs",
          "calibration", "calibration_batches", "recalibrate", "paper_row",
          "trust_unverified_checkpoints")


def usage() -> str:
    return (f"Accuracy of a US3L run at every width: BN calibration, then a linear probe or "
            f"kNN.\n  {PROG} --workdir=<run> --widths=1.0,0.5,0.25 --protocol=fast\n\n"
            f"Flags:\n{cli.format_flags(FLAGS, _NAMES)}\n\n"
            f"Protocols: fast (softmax probe on cached features, seconds), knn (weighted kNN, "
            f"k=200), paper (the paper's linear evaluation, long)\n"
            f"Datasets: {', '.join(DATASETS)}\n"
            f"Exit codes: 0 done; 2 bad arguments / run / checkpoint; 4 I/O error while "
            f"writing.\n")


def check_flags() -> str | None:
    """What is wrong with the flags before any work (None: nothing): a flag given empty
    (``--widths=``) would silently mean its default; counts must be positive; ``--out`` must
    be a directory we can create or write."""
    for name in ("widths", "protocol", "dataset", "out", "paper_row"):
        if FLAGS[name].present and not (FLAGS[name].value or "").strip(" ,"):
            return f"--{name} is empty; give a value or leave the flag out for the default"
    for name in ("epochs", "calibration_batches"):
        if FLAGS[name].value is not None and FLAGS[name].value <= 0:
            return f"--{name}={FLAGS[name].value} must be > 0"
    if FLAGS.step is not None and FLAGS.step < 0:
        return f"--step={FLAGS.step} must be >= 0"
    if FLAGS.out is not None:
        problem = fileio.unusable_dir(FLAGS.out)
        if problem:
            return f"--out={FLAGS.out}: {problem}"
    elif FLAGS.workdir and os.path.isdir(FLAGS.workdir):
        # The report and new BN statistics go into the workdir: a read-only one (a copy
        # mounted read-only, another user's run) needs --out, where both then go.
        problem = fileio.unusable_dir(os.path.join(FLAGS.workdir, "eval", "report"))
        if problem:
            return (f"--workdir={FLAGS.workdir} cannot hold the report ({problem}); give "
                    f"--out=DIR for the report and the calibrated BN statistics")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, PROG, usage)
    if not FLAGS.workdir:
        cli.fail(PROG, "--workdir is required, e.g. --workdir=/tmp/us3l_demo")
    problem = check_flags()
    if problem:
        cli.fail(PROG, problem)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)  # absl (imported by orbax) installed its own handler
    for name in ("absl", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from us3l_jax.evaluate.sweep import run_sweep  # deferred: argument errors stay fast

    try:
        run_sweep(FLAGS.workdir, FLAGS.widths, FLAGS.protocol, FLAGS.dataset, FLAGS.out,
                  FLAGS.step, epochs=FLAGS.epochs, calibration_batches=FLAGS.calibration_batches,
                  recalibrate=FLAGS.recalibrate, paper_row=FLAGS.paper_row,
                  calibration=FLAGS.calibration, new_report=True,
                  trust_unverified=FLAGS.trust_unverified_checkpoints)
    except (CheckpointError, ValueError) as e:
        cli.fail(PROG, e)
    except OSError as e:  # e.g. a full disk or a folder that vanished while writing
        cli.fail(PROG, f"I/O error: {e}", EXIT_IO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
