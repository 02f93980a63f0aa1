"""Entry point: ``python -m us3l_jax.main --config=configs/<file>.py[:<arg>] --workdir=<dir>``.

Overrides: ``--config.<key>=<value>`` (e.g. ``--config.optim.epochs=10``); the config is locked
and typed, so a misspelt key or a wrong type stops before anything runs, and ``validate``
checks the values. Rerunning the same command resumes from the latest checkpoint.

Multi-host: ``--distributed`` calls ``jax.distributed.initialize()``, which finds the
coordinator on TPU pods and under SLURM by itself; elsewhere pass ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or set ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).

One run per workdir: a second run on the same ``--workdir`` stops with exit 2 naming the
holder's pid and host. Resuming with a changed config is refused with the difference (except
logging/checkpoint frequency, ``max_steps``, compile options and W&B settings) unless
``--allow_config_change``, which logs the change in ``config_history.jsonl``. Corrupt
checkpoints (and unverified ones, without their checksum file, unless
``--trust_unverified_checkpoints``) are moved to ``checkpoints/corrupt-<step>/`` and the run
resumes from the newest good one; if none is readable the run refuses unless ``--start_over``.

Exit codes: 0 finished; 2 bad config / data / checkpoint / workdir, or the workdir is in use
(one-line message); 3 non-finite loss (the last good checkpoint is kept); 4 I/O error, e.g. a
full disk during a save (one line with the path and errno; older checkpoints are intact), or
the workdir or its lock deleted, renamed, replaced or unmounted during the run; 130
interrupted by Ctrl-C (SIGINT), at any moment from the start (during training after saving);
143 preempted by SIGTERM after saving (rerun to resume). Any other error is a bug or a fault
of the machine: its traceback, exit 1.
"""
from __future__ import annotations

import errno
import os
import sys

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "us3l":
    # Ctrl-C from here on: one line and exit 130, also during the imports below.
    from us3l_jax import errors as _errors
    _errors.catch_interrupts()

import logging  # noqa: E402 - after the Ctrl-C handler, on purpose

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from us3l_jax import cli, errors, fileio, paths  # noqa: E402
from us3l_jax.errors import UsageError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py or configs/demo.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host runs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume although the config differs from the run's "
    "config.json (logged in config_history.jsonl).")
_START_OVER = flags.DEFINE_bool(
    "start_over", False, "If no checkpoint of the workdir is readable, move them to "
    "checkpoints/corrupt-<step>/ and train from step 0 (default: refuse).")
_TRUST_UNVERIFIED = flags.DEFINE_bool(
    "trust_unverified_checkpoints", False, "Restore checkpoints that lack their "
    "us3l_checksums.json (default: they count as corrupt and are moved aside).")

IO_ERROR_EXIT_CODE = 4

log = logging.getLogger("us3l")


def setup_logging() -> None:
    """Our progress lines on stdout; library chatter (orbax, absl) only when it matters.

    A failed checkpoint save (e.g. a full disk) is reported in one line with exit code 4;
    orbax also logs that failure, with tracebacks, from each of its threads: those records
    are dropped here, in the command line only (``US3L_DEBUG=1`` keeps them)."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    if not os.environ.get("US3L_DEBUG"):
        logging.getLogger("absl").addFilter(
            lambda r: r.levelno < logging.ERROR or "orbax" not in r.pathname)


def init_distributed() -> None:
    import jax
    env = os.environ
    address = _COORDINATOR.value or env.get("JAX_COORDINATOR_ADDRESS")
    if not (_DISTRIBUTED.value or address):
        return
    kwargs = {}
    if address:
        kwargs["coordinator_address"] = address
        n = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else env.get(
            "JAX_NUM_PROCESSES")
        pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else env.get("JAX_PROCESS_ID")
        if n is None or pid is None:
            raise UsageError("--coordinator_address needs --num_processes and --process_id "
                             "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
        kwargs.update(num_processes=int(n), process_id=int(pid))
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    if jax.process_index() != 0:
        log.setLevel(logging.WARNING)  # one progress display per job: process 0's


def _fail(message: str, code: int) -> None:
    if os.environ.get("US3L_DEBUG") and sys.exc_info()[0] is not None:
        raise
    cli.fail(None, message, code)


def main(argv) -> None:
    del argv  # parse_flags has refused positional arguments
    setup_logging()
    try:
        config = _CONFIG.value
        if config is not None:
            config.to_dict()  # config_flags defers file-loading errors to first use
    except Exception as e:  # noqa: BLE001
        _fail(f"cannot load --config: {cli.one_line(e)}", 2)
    if config is None:
        _fail("--config is required, e.g. --config=configs/demo.py", 2)
    if not _WORKDIR.value:
        _fail("--workdir is required, e.g. --workdir=/tmp/us3l_demo", 2)
    problem = fileio.unusable_dir(_WORKDIR.value)
    if problem:
        _fail(f"--workdir={_WORKDIR.value}: {problem}", 2)
    errors.interrupts_raise()  # from here on a Ctrl-C may find files being written
    try:
        _run(config, paths.absolute(_WORKDIR.value))
    except KeyboardInterrupt:
        # Ctrl-C before training started or a second Ctrl-C: no traceback, nothing more saved.
        _fail("interrupted (Ctrl-C); the checkpoints saved so far are intact", 130)


def _run(config, workdir: str) -> None:
    import jax

    from us3l_jax import checkpointing, config as config_lib, pretrain, workdir_lock
    from us3l_jax.data.datasets import DatasetNotFoundError

    try:
        errors.raise_if_interrupted()
        init_distributed()  # before anything touches a JAX backend (validation does)
        config_lib.validate(config)
        cache = config.train.compilation_cache_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "us3l_jax", "xla")
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        online = None
        if config.eval.online_every_epochs:
            from us3l_jax.evaluate.online import OnlineEvaluator
            online = OnlineEvaluator(config)
        errors.raise_if_interrupted()
        with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
            before = checkpointing.latest_step(workdir)
            pretrain.train(config, workdir, online_eval=online,
                           allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                           start_over=_START_OVER.value,
                           trust_unverified=_TRUST_UNVERIFIED.value)
            if config.eval.final_sweep and not _swept(workdir, before, config):
                from us3l_jax import evaluate
                evaluate.run_sweep(workdir, widths=config.eval.sweep_widths,
                                   protocol=config.eval.sweep_protocol,
                                   trust_unverified=_TRUST_UNVERIFIED.value)
    except (UsageError, config_lib.ConfigError, DatasetNotFoundError,
            checkpointing.CheckpointError, workdir_lock.WorkdirLockedError) as e:
        _fail(str(e), 2)  # errors the user can fix; any other keeps its traceback
    except pretrain.NonFiniteLossError as e:
        _fail(str(e), 3)
    except workdir_lock.WorkdirLostError as e:
        _fail(str(e), IO_ERROR_EXIT_CODE)
    except checkpointing.CheckpointSaveError as e:
        fix = {errno.ENOSPC: "free space", errno.EDQUOT: "free space",
               errno.EACCES: "make the workdir's checkpoints/ writable",
               errno.EPERM: "make the workdir's checkpoints/ writable",
               errno.EROFS: "remount the workdir writable"}.get(e.errno_value, "fix the cause")
        print(f"error: {cli.one_line(e)}; the older checkpoints are intact: {fix} and rerun "
              "to resume", file=sys.stderr)
        # orbax's signalling threads of the failed save wait forever for the signals it would
        # have sent, and they are not daemons: a normal exit would hang in threading._shutdown.
        # The loop has closed everything it owns by now, so leave at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(IO_ERROR_EXIT_CODE)
    except OSError as e:  # e.g. a full disk when writing config.json or the lock
        where = "" if e.filename else f" in {workdir}"
        _fail(f"I/O error{where}: {e}", IO_ERROR_EXIT_CODE)
    except pretrain.Preempted as e:
        log.info("%s; rerun the same command to resume", e)
        sys.exit(e.exit_code)


def _swept(workdir: str, before: int | None, config) -> bool:
    """Whether the final sweep is done already: training did nothing (the latest checkpoint
    is the one it found) and ``sweep.json`` evaluates that checkpoint at the widths and
    protocols the config asks for. Rerunning a finished run then rewrites nothing."""
    import json

    from us3l_jax import checkpointing
    if before is None or before != checkpointing.latest_step(workdir):
        return False
    items = lambda v: [x for x in (v.split(",") if isinstance(v, str) else v)]
    want = {(round(float(w), 6), p.strip()) for w in items(config.eval.sweep_widths)
            for p in items(config.eval.sweep_protocol)}
    try:
        records = json.loads(paths.read_text(os.path.join(workdir, "sweep.json")))
        steps = {r["step"] for r in records}
        done = {(round(float(r["width"]), 6), r["protocol"]) for r in records}
    except (OSError, ValueError, KeyError, TypeError):
        return False  # none, or unreadable: the sweep writes it anew
    if steps != {before} or done != want:
        return False
    log.info("the final sweep of step %d is in sweep.json already", before)
    return True


_FLAG_NAMES = ("config", "workdir", "allow_config_change", "start_over",
               "trust_unverified_checkpoints", "distributed", "coordinator_address",
               "num_processes", "process_id")


def usage() -> str:
    """``--help``: the commands, the configs found, the flags, the sweep protocols."""
    from us3l_jax.evaluate.evaluator import PROTOCOLS
    return "\n\n".join([
        "Pretrain (or resume) a US3L run:\n  python -m us3l_jax.main --config=configs/<file>.py"
        "[:<arg>] --workdir=<dir> [--config.<key>=<value> ...]\n  (also the `us3l` console "
        "script)", cli.configs_help(),
        "Flags:\n" + cli.format_flags(flags.FLAGS, _FLAG_NAMES)
        + "\n  --config.<key>=<value>: override any config field, e.g. --config.optim.epochs=20",
        f"Final sweep protocols (--config.eval.sweep_protocol): {', '.join(PROTOCOLS)}; "
        "evaluate other widths later with python -m us3l_jax.evaluate --help.",
        "Exit codes: 0 finished; 2 bad config / data / checkpoint / workdir in use; 3 "
        "non-finite loss; 4 I/O error (e.g. disk full during a save) or the workdir or its "
        "lock deleted, moved or unmounted during the run; 130 Ctrl-C and 143 preempted "
        "(during training after saving; rerun to resume)."]) + "\n"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but every failure (unknown config key, wrong type, missing or
    broken config file) is one line on stderr and exit status 2, not a traceback; --help
    exits 0."""
    prog = "us3l" if os.path.basename(argv[0]) == "us3l" else "python -m us3l_jax.main"
    return cli.parse(flags.FLAGS, argv[1:], prog, usage, error_prog=None)


def run() -> None:
    """Console script ``us3l``."""
    errors.catch_interrupts()  # (again: the flags and the config load before main)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
