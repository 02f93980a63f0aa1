"""Checkpoints of a run's workdir (orbax-checkpoint).

Layout of ``<workdir>``::

    config.json            the run's config (written once, atomically)
    checkpoints/<step>/    orbax: ``state`` (the full TrainState) and ``meta`` (JSON: step,
                           model identity and width range, used to refuse a mismatched restore)

orbax writes each checkpoint into a temporary directory and renames it when complete, so a
checkpoint is either complete or absent, also after ``kill -9``. A checkpoint that exists but
cannot be read (corrupted files) is skipped with a warning in favour of the previous one.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from us3l_jax import build, config as config_lib
from us3l_jax.fileio import atomic_write_text

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Fields that must match between a checkpoint and the config restoring it.
IDENTITY_FIELDS = ("model.name", "model.base_width", "model.stage_sizes", "sampler.width_range",
                   "heads.proj_hidden", "heads.proj_out", "heads.proj_style",
                   "heads.head_hidden", "method.base_loss", "method.aux_head",
                   "method.momentum_base", "method.momentum_sub")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run."""


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {f: _get(config, f) for f in IDENTITY_FIELDS}


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(workdir, CONFIG_FILE), config_lib.to_json(config))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"no run in {workdir!r}: {CONFIG_FILE} not found (was it "
                              f"pretrained with `python -m us3l_jax.main --workdir=...`?)")
    with open(path) as f:
        return config_lib.from_json(f.read())


class Checkpointer:
    """Saves and restores the TrainState of a run in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, keep: int = 3,
                 async_save: bool = True):
        self.workdir = os.path.abspath(workdir)  # orbax needs absolute paths
        self.config = config
        self.manager = ocp.CheckpointManager(
            os.path.join(self.workdir, CHECKPOINT_DIR),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True),
            item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts saving (asynchronously); ``wait`` blocks until it is on disk."""
        meta = {"step": int(step), "identity": identity(self.config)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def reached_preemption(self, step: int) -> bool:
        """Whether every process has agreed to stop and save at ``step``: on several hosts,
        orbax's preemption sync (the JAX coordination service turns a SIGTERM on any host
        into one agreed step, the next after the furthest host's); False on one process."""
        return bool(self.manager.reached_preemption(step))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def restore_latest(self, abstract_state: Any, steps: list[int] | None = None,
                       partial: bool = False) -> tuple[int, Any] | None:
        """The newest readable checkpoint (of ``steps``, default all) as ``(step, state)``, or
        None if there is none. ``partial``: ``abstract_state`` is a subtree of the saved state
        (e.g. ``{"params": ...}``) and only that is read.

        Raises ``CheckpointError`` if a checkpoint was written by a different model or width
        range; skips (with a warning) checkpoints whose files cannot be read.
        """
        for step in reversed(steps or self.all_steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))
                meta = restored["meta"]
            except Exception as e:  # noqa: BLE001 - any unreadable file means "corrupt"
                log.warning("checkpoint %d in %s is unreadable (%s: %s); trying an older one",
                            step, self.workdir, type(e).__name__, e)
                continue
            self._check_identity(meta, step)
            try:
                restore = (ocp.args.PyTreeRestore(
                    abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
                        abstract_state), partial_restore=True)
                    if partial else ocp.args.StandardRestore(abstract_state))
                restored = self.manager.restore(step, args=ocp.args.Composite(state=restore))
            except Exception as e:  # noqa: BLE001
                log.warning("checkpoint %d in %s is unreadable (%s: %s); trying an older one",
                            step, self.workdir, type(e).__name__, str(e)[:300])
                continue
            return step, restored["state"]
        return None

    def _check_identity(self, meta: dict[str, Any], step: int) -> None:
        want = identity(self.config)
        got = meta.get("identity", {})
        diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in
                              diff.items())
            raise CheckpointError(
                f"checkpoint {step} in {self.workdir} was written by a different config "
                f"({lines}); use a new --workdir or the config it was trained with")


@dataclasses.dataclass
class Pretrained:
    """What evaluation and export need from a run."""
    config: ml_collections.ConfigDict
    step: int
    params: dict[str, Any]  # {backbone, projector[, predictor][, distill_head]}


def load_pretrained(workdir: str, step: int | None = None) -> Pretrained:
    """Config and parameters of a pretraining run (the latest readable checkpoint, or ``step``).

    Restores only the parameters (a partial restore against their abstract shapes), not the
    optimizer state or the teacher. Raises ``CheckpointError`` with a clear message when the
    workdir has no run or no checkpoint (or not ``step``).
    """
    config = read_config(workdir)
    ckpt = Checkpointer(workdir, config, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)!r}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {workdir!r}; "
                                  f"available: {steps}")
        params = {"params": build.abstract_state(config).params}
        found = ckpt.restore_latest(params, steps=[step] if step is not None else None,
                                    partial=True)
        if found is None:
            raise CheckpointError(f"no readable checkpoint in {workdir!r} (steps {steps})")
        return Pretrained(config=config, step=found[0], params=found[1]["params"])
    finally:
        ckpt.close()
