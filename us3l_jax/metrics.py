"""A pretraining run's metric logs: JSON lines (``metrics.jsonl``), TensorBoard events (``tb/``)
and, when ``config.train.wandb_project`` names a project, a Weights & Biases run.

Logs are not worth a run: any failure of one of these sinks (a full disk, W&B unreachable)
is reported in one warning line and that sink is switched off; training and checkpoints go
on (a full disk then stops the run at its next checkpoint, with its own exit code).

A resumed run continues its W&B run: the run's id is kept in ``<workdir>/wandb_id.txt``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import tempfile
from typing import Any

import jax
import numpy as np

from us3l_jax import paths
from us3l_jax.fileio import atomic_write_text

log = logging.getLogger("us3l")

WANDB_INSTALL = "pip install 'us3l_jax[wandb]'"
WANDB_ID_FILE = "wandb_id.txt"
JSONL, TB, WANDB = "metrics.jsonl", "tb/", "W&B"  # the sinks, as the warnings name them


def wandb_problem() -> str | None:
    """Why Weights & Biases cannot be used here (None if it can): not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        return f"wandb cannot be imported ({paths.first_line(e)}): {WANDB_INSTALL}"
    return None


@dataclasses.dataclass(frozen=True)
class WandbRun:
    """Where a run logs to W&B (``config.train.wandb_*``) and the config it reports."""
    project: str
    entity: str | None = None
    name: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


def wandb_dir(workdir: str) -> str:
    """The folder under which W&B keeps its local files (``<dir>/wandb/``): the workdir
    itself when it is local; W&B writes with the ordinary file API, so for a bucket workdir
    ``$WANDB_DIR``, or else the temporary folder."""
    if paths.is_local(workdir):
        return workdir
    return os.environ.get("WANDB_DIR") or tempfile.gettempdir()


class MetricWriter:
    """The metric sinks of one run, on process 0 only (other processes write nothing)."""

    def __init__(self, workdir: str, resume_step: int | None = None,
                 wandb_run: WandbRun | None = None):
        """``resume_step``: the checkpoint step the run resumes from (None: a new run).
        TensorBoard then drops events of later steps (written before an interruption and
        about to be written again), as ``truncate_after`` does for JSON; W&B continues the
        run recorded in the workdir and skips the steps it has already."""
        self.enabled = jax.process_index() == 0
        self._sinks: dict[str, Any] = {}
        if not self.enabled:
            return
        self.path = paths.join(workdir, JSONL)
        self._guard(JSONL, lambda: self._sinks.__setitem__(JSONL, paths.AppendFile(self.path)))

        def tb():
            from tensorboardX import SummaryWriter
            paths.tensorboard_on_buckets()
            self._sinks[TB] = SummaryWriter(paths.join(workdir, "tb"), purge_step=(
                None if resume_step is None else resume_step + 1))
        self._guard(TB, tb)
        self._wandb_from = 0  # W&B keeps the steps below this already (a resumed W&B run)
        if wandb_run is not None:
            self._guard(WANDB, lambda: self._start_wandb(workdir, resume_step, wandb_run))

    def _start_wandb(self, workdir: str, resume_step: int | None, spec: WandbRun) -> None:
        import wandb
        id_path = paths.join(workdir, WANDB_ID_FILE)
        run_id = None
        # A new run (no checkpoint) starts a new W&B run: W&B cannot drop the steps an
        # earlier attempt logged, which this run is about to log again.
        if resume_step is not None and paths.exists(id_path):
            run_id = paths.read_text(id_path).strip() or None
        if run_id is None:
            run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters too
            atomic_write_text(id_path, run_id + "\n")
        run = wandb.init(project=spec.project, entity=spec.entity, name=spec.name, id=run_id,
                         resume="allow", config=spec.config, dir=wandb_dir(workdir))
        self._sinks[WANDB] = run
        # Online, a resumed W&B run starts after the last step it holds; it would drop
        # (with a warning each) the steps between the checkpoint and the interruption.
        self._wandb_from = run.starting_step

    def _guard(self, what: str, fn) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - any sink failure: warn once, stop writing
            log.warning("cannot write %s (%s: %s); no more %s for this run", what,
                        type(e).__name__, paths.first_line(e), what)
            self._sinks[what] = None
            return False

    def truncate_after(self, step: int) -> None:
        """Drops the records of steps after ``step`` (written before an interruption and
        about to be written again by the resumed run), so every step appears once."""
        if self._sinks.get(JSONL) is None or not paths.exists(self.path):
            return

        def rewrite():
            kept, dropped = [], 0
            for line in paths.read_text(self.path).splitlines(keepends=True):
                try:
                    ok = json.loads(line)["step"] <= step
                except (ValueError, KeyError, TypeError):
                    ok = False  # a line cut short by a kill
                if ok:
                    kept.append(line)
                dropped += not ok
            if dropped:
                self._sinks[JSONL].close()
                atomic_write_text(self.path, "".join(kept))
                self._sinks[JSONL] = paths.AppendFile(self.path)
        self._guard(JSONL, rewrite)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
                                   for k, v in metrics.items()}}
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, float)}
        jsonl, tb, run = (self._sinks.get(s) for s in (JSONL, TB, WANDB))
        if jsonl is not None:
            def write_jsonl():
                jsonl.write(json.dumps(record) + "\n")
                jsonl.flush()
            self._guard(JSONL, write_jsonl)
        if tb is not None:
            def write_tb():
                for k, v in scalars.items():
                    tb.add_scalar(k, v, step)
                tb.flush()
            self._guard(TB, write_tb)
        if run is not None and step >= self._wandb_from:
            self._guard(WANDB, lambda: run.log(scalars, step=step))

    def close(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Closes every sink; ``exit_code`` is the run's (W&B marks a non-zero one failed).
        ``preempted`` (stopped by SIGTERM after saving, to be resumed) tells W&B so first: it
        then shows the run as preempted, and a W&B sweep agent requeues it, not failed."""
        def finish_wandb(run):
            if preempted:
                run.mark_preempting()
            run.finish(exit_code=exit_code)

        for what, sink in self._sinks.items():
            if sink is not None:
                self._guard(what, (lambda: finish_wandb(sink)) if what == WANDB
                            else sink.close)
        self._sinks = {}
