"""Checkpoints of a run's workdir (orbax-checkpoint).

Layout of ``<workdir>``::

    config.json            the run's config (written atomically; rewritten only once a
                           checkpoint has been saved under a changed config)
    checkpoints/<step>/    orbax: ``state`` (the full TrainState) and ``meta`` (JSON: step,
                           model identity and width range, used to refuse a mismatched restore,
                           and the whole config, from which a lost config.json is rebuilt)

orbax writes each checkpoint into a temporary directory and renames it when complete, so a
checkpoint is either complete or absent, also after ``kill -9``.

Integrity: before that rename, process 0 writes ``us3l_checksums.json`` into the checkpoint
(size and CRC-32 of every file of its items ``state`` and ``meta``; orbax's own formats
checksum only the shard index, so a flipped bit in array data would load silently).
Restoring verifies it first. A checkpoint without it (e.g. written by a synchronous save
killed before sealing) is unverified and counts as corrupt unless the caller trusts
unverified checkpoints. A checkpoint that fails the check or cannot be read is corrupt:
training falls back to the newest good one and moves each newer corrupt one to
``checkpoints/corrupt-<step>/`` (saying so), so the run can save that step again. Nothing is
deleted. If checkpoints exist but none is readable, training refuses to start a new run over
them (``NoReadableCheckpointError``) unless told to start over.

Only orbax's public API is used; this module builds nothing: ``load_pretrained`` takes the
function that gives a config's abstract train state from its caller.
"""
from __future__ import annotations

import dataclasses
import errno as errno_lib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from us3l_jax import config as config_lib, paths
from us3l_jax.fileio import atomic_write_text

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CHECKSUM_FILE = "us3l_checksums.json"
CORRUPT_PREFIX = "corrupt-"
# The items of a checkpoint: the checksums cover their files. (orbax's own files beside them,
# such as its step metadata, are rewritten after the checksums are taken and hold no data.)
ITEMS = ("state", "meta")
# How orbax makes a save atomic: its default for the file system (the checkpoint folder and
# the post-finalization callback must agree on it).
ATOMICITY = ocp.options.AtomicityOptions()
# Fields that decide the shapes of the saved state: a checkpoint restores only into a config
# with the same values. Fields added later are compared only when the checkpoint records them.
IDENTITY_FIELDS = ("model.name", "model.base_width", "model.stage_sizes", "sampler.width_range",
                   "heads.proj_hidden", "heads.proj_out", "heads.proj_style",
                   "heads.head_hidden", "method.base_loss", "method.aux_head",
                   "method.momentum_base", "method.momentum_sub", "model.dim", "model.depth",
                   "model.heads", "model.patch_size", "model.switchable_widths",
                   "train.objective", "method.teacher", "method.queue_size",
                   "method.feature_distill")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run."""


class NoReadableCheckpointError(CheckpointError):
    """Checkpoints exist, but none of them can be restored."""


class StateMismatchError(CheckpointError):
    """A checkpoint passes its checksums but its state does not fit the train state asked for
    (``detail`` says where); callers that know of a config change reword it."""

    def __init__(self, message: str, step: int, detail: str):
        super().__init__(message)
        self.step, self.detail = step, detail


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (e.g. the disk is full); older checkpoints are intact.

    ``errno_value`` is the error number of the ``OSError`` behind ``cause`` (``find_os_error``),
    else None: tensorstore reports its write errors (a full disk included) as a ``ValueError``
    with the OS's words in its message and no error number, and the message then carries
    that text."""

    def __init__(self, step: int, path: str, cause: BaseException):
        self.step, self.path = step, path
        os_error = find_os_error(cause)
        self.errno_value = os_error.errno if os_error else None
        detail = (f"errno {os_error.errno} {errno_lib.errorcode.get(os_error.errno, '')}: "
                  f"{os_error.strerror or os.strerror(os_error.errno)}" if os_error else
                  f"{type(cause).__name__}: {paths.first_line(cause, 1000)}")
        super().__init__(self.errno_value, f"saving checkpoint {step} to {path} failed "
                         f"({detail})")

    def __str__(self) -> str:
        return self.args[1]


def find_os_error(e: BaseException | None) -> OSError | None:
    """The first ``OSError`` with an error number (``PermissionError``, ``FileNotFoundError``,
    ...) among ``e`` and the exceptions it was raised from or while handling (``__cause__``,
    else ``__context__``); None if there is none. Messages are never parsed: an error number
    is taken only from an exception that carries one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        e = e.__cause__ or e.__context__
    return None


def crc32_of_file(path: str) -> int:
    crc = 0
    with paths.open_read(path) as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _item_files(root: str):
    for item in ITEMS:
        top = paths.join(root, item)
        yield from (paths.join(top, rel) for rel in paths.walk_files(top))


def file_checksums(root: str) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every file of the checkpoint's items under
    ``root``."""
    return {os.path.relpath(path, root): [paths.size(path), crc32_of_file(path)]
            for path in sorted(_item_files(root))}


def write_checksums(root: str) -> None:
    atomic_write_text(os.path.join(root, CHECKSUM_FILE),
                      json.dumps({"crc32": file_checksums(root)}))


TRUST_FLAG = "--trust_unverified_checkpoints"


def verify_checksums(root: str, trust_unverified: bool = False) -> str | None:
    """None if every file listed in ``root``'s checksum file is there with its size and CRC;
    else what is wrong. A checkpoint without a checksum file cannot be verified: that is
    what is wrong with it, unless ``trust_unverified`` (then it passes with a warning and
    only orbax's own checks apply)."""
    path = os.path.join(root, CHECKSUM_FILE)
    if not paths.exists(path):
        if not trust_unverified:
            return f"its {CHECKSUM_FILE} is missing (unverified; {TRUST_FLAG} uses it anyway)"
        log.warning("checkpoint %s has no %s: used unverified (%s)", root, CHECKSUM_FILE,
                    TRUST_FLAG)
        return None
    try:
        want = json.loads(paths.read_text(path))["crc32"]
        if not isinstance(want, dict) or not want:
            raise ValueError("no entries")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {CHECKSUM_FILE} is unreadable ({type(e).__name__}: {paths.first_line(e)})"
    for rel, entry in want.items():
        full = os.path.join(root, rel)
        try:
            size, crc = entry
            if not paths.isfile(full):
                return f"{rel} is missing" if not paths.exists(full) else \
                    f"{rel} is not a regular file"
            if paths.size(full) != size:
                return f"{rel} has {paths.size(full)} bytes, {size} were written"
            if crc32_of_file(full) != crc:
                return f"{rel} fails its CRC-32 check (its data changed after the save)"
        except (OSError, ValueError, TypeError) as e:
            return f"{rel} cannot be checked ({type(e).__name__}: {paths.first_line(e)})"
    return None


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


CONFIG_HISTORY_FILE = "config_history.jsonl"
# What may change when a run resumes: how often and where it logs, how often it saves, where
# it stops, how it compiles and feeds. Everything else changes what is trained and needs
# --allow_config_change.
RESUMABLE_CHANGES = ("train.log_every_steps", "train.checkpoint_every_steps",
                     "train.keep_checkpoints", "train.max_steps", "train.compile_ahead",
                     "train.compilation_cache_dir", "train.transfer_guard", "data.num_threads",
                     "train.wandb_project", "train.wandb_entity", "train.wandb_name")


def config_changes(old: ml_collections.ConfigDict,
                   new: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (old, new)}`` for every field that differs."""
    a, b = config_lib.flatten(old), config_lib.flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@dataclasses.dataclass
class ConfigChange:
    """A resume's config change that was allowed but is not yet recorded: ``record`` writes
    it (``config.json`` and a line of ``config_history.jsonl``) once a checkpoint exists under
    it, so a resume that fails or stops before saving leaves the run's record as it was."""
    changes: dict[str, tuple[Any, Any]]
    accepted: bool  # it needed --allow_config_change
    replaced: str | None = None  # why config.json is replaced as a whole ("missing", ...)

    def describe(self) -> str:
        return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.changes.items()) or \
            f"config.json was {self.replaced}; replaced"

    def record(self, workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
        if jax.process_index() != 0:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": int(step),
                  "accepted": self.accepted,
                  "changes": ({k: list(v) for k, v in self.changes.items()}
                              if self.replaced is None else f"config.json was {self.replaced}; "
                              f"replaced")}
        paths.append_text(os.path.join(workdir, CONFIG_HISTORY_FILE),
                          json.dumps(record) + "\n")
        path = os.path.join(workdir, CONFIG_FILE)
        if self.replaced == "unreadable" and paths.exists(path):
            # kept for inspection, never deleted
            paths.rename(path, path + ".unreadable", replace=True)
        write_config(workdir, config)
        # Allow-listed changes (max_steps, logging) are routine: logged, not warned about.
        log.log(logging.WARNING if self.accepted else logging.INFO,
                "config change recorded at step %d (%s): %s", step, CONFIG_HISTORY_FILE,
                self.describe())


def check_config_change(workdir: str, config: ml_collections.ConfigDict, allow: bool = False,
                        recorded: Callable[[], tuple[int, ml_collections.ConfigDict] | None]
                        = lambda: None) -> ConfigChange | None:
    """Compares ``config`` with the run's ``config.json`` before resuming; writes nothing but
    a lost ``config.json`` rebuilt from the checkpoints.

    Fields of ``RESUMABLE_CHANGES`` may change; any other change raises ``CheckpointError``
    with the difference unless ``allow``. Returns the accepted change (None if there is none)
    for the caller to ``record`` once a checkpoint is saved under it. The model's identity
    (``IDENTITY_FIELDS``) is checked against the checkpoint itself, which refuses it even with
    ``allow``.

    A missing or unreadable ``config.json`` is rebuilt from ``recorded()`` (step and config
    recorded in the newest checkpoint that has one) and then compared as usual; if no
    checkpoint records it, the resume is refused unless ``allow`` (the returned change then
    replaces the file as a whole)."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        old = _read_config_file(workdir)
    except (CheckpointError, OSError, ValueError) as e:
        problem = "missing" if isinstance(e, CheckpointError) else "unreadable"
        found = recorded()
        if found is not None:
            step, old = found
            if jax.process_index() == 0:
                if problem == "unreadable":
                    paths.rename(path, path + ".unreadable", replace=True)  # kept, never deleted
                write_config(workdir, old)
            log.warning("%s was %s; rebuilt from checkpoint %d", path, problem, step)
        elif not allow:
            why = "" if problem == "missing" else f" ({type(e).__name__}: {paths.first_line(e)})"
            raise CheckpointError(
                f"{path} is {problem}{why}, and no checkpoint records the run's config, so "
                f"this config cannot be compared with the one the run was trained with; rerun "
                f"with the run's config and --allow_config_change to record it as the run's "
                f"(the checkpoint's model identity is still checked)") from None
        else:
            return ConfigChange({}, accepted=True, replaced=problem)
    changes = config_changes(old, config)
    if not changes or any(k in IDENTITY_FIELDS for k in changes):
        return None  # another model: the checkpoint's identity check refuses it
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
    if refused and not allow:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise CheckpointError(
            f"the config differs from the run's {path} ({diff}); resuming with it would "
            f"train something else. Use a new --workdir, the same config, or "
            f"--allow_config_change to accept (logged in {CONFIG_HISTORY_FILE}). Fields that "
            f"may change freely: {', '.join(RESUMABLE_CHANGES)}")
    return ConfigChange(changes, accepted=bool(refused))


def _read_config_file(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not paths.exists(path):
        raise CheckpointError(f"no run in {workdir!r}: {CONFIG_FILE} not found (was it "
                              f"pretrained with `python -m us3l_jax.main --workdir=...`?)")
    return config_lib.from_json(paths.read_text(path))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config: its ``config.json``, or, if that is missing, the config recorded in
    its newest checkpoint (with a warning; nothing is written: the next resume rebuilds the
    file). Raises ``CheckpointError`` if there is neither."""
    try:
        return _read_config_file(workdir)
    except CheckpointError:
        if latest_step(workdir) is None:
            raise
        ckpt = Checkpointer(workdir, None, read_only=True)
        try:
            found = ckpt.recorded_config()
        finally:
            ckpt.close()
        if found is None:
            raise
        log.warning("%s is missing; using the config recorded in checkpoint %d",
                    os.path.join(workdir, CONFIG_FILE), found[0])
        return found[1]


# Orbax announces at WARNING what opening checkpoints read-only implies (no saves, no
# cleanup); evaluation and export only read, so these lines would read as problems.
_READ_ONLY_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


def _quiet_read_only(record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith(_READ_ONLY_NOTICES)


class Checkpointer:
    """Saves and restores the TrainState of a run in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, keep: int = 3,
                 async_save: bool = True, trust_unverified: bool = False,
                 read_only: bool = False):
        """``trust_unverified``: restore checkpoints that have no checksum file (else they
        count as corrupt). ``read_only``: never create ``checkpoints/`` (evaluation, export)."""
        self.workdir = paths.absolute(workdir)  # orbax needs absolute paths
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self.config = config
        self._keep, self._async = keep, async_save
        self._trust_unverified, self._read_only = trust_unverified, read_only
        self._saving: int | None = None  # the step of the save in flight
        self._failed = False  # a save error has been raised already
        if read_only:
            logging.getLogger("absl").addFilter(_quiet_read_only)  # (added once)
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        async_options = ocp.AsyncOptions(post_finalization_callback=self._seal) \
            if self._async else None
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, enable_async_checkpointing=self._async,
                async_options=async_options, cleanup_tmp_directories=not self._read_only,
                create=not self._read_only, read_only=self._read_only,
                atomicity_options=ATOMICITY),
            item_names=ITEMS)

    def _seal(self) -> None:
        """orbax's post-finalization callback (background thread, after every file of the
        save is written, before the temporary folder is renamed to its step): writes the
        checksums into it, so a checkpoint never exists without them. Process 0 only (on
        several hosts the folder is shared)."""
        if jax.process_index() == 0 and self._saving is not None:
            write_checksums(self.temporary_dir(self._saving))

    def temporary_dir(self, step: int) -> str:
        """The folder that checkpoint ``step`` is written into until it is complete, as orbax
        names it (its temporary path for this folder and ``ATOMICITY``: on a local file
        system ``<step>.orbax-checkpoint-tmp``, renamed to ``<step>`` at the end)."""
        final = epath.Path(self.step_dir(step))
        kind = ocp.path.atomicity_defaults.get_default_temporary_path_class(
            final, atomicity_options=ATOMICITY)
        return os.fspath(kind.from_final(final).get())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts saving (asynchronously); ``wait`` blocks until it is on disk. Raises
        ``CheckpointSaveError`` if this or the previous save failed, or this one cannot fit."""
        self.wait()  # orbax's save waits for the previous one too; this names its step
        self._check_room(step)
        meta = {"step": int(step), "identity": identity(self.config),
                "config": json.loads(config_lib.to_json(self.config))}
        self._saving = int(step)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise several types
            self._failed = True
            raise CheckpointSaveError(step, self.step_dir(step), e) from e
        if not self._async and jax.process_index() == 0:
            # A synchronous save has no post-finalization callback: seal the finished folder
            # (a kill just before this leaves a checkpoint restored unverified, not lost).
            write_checksums(self.step_dir(step))

    def _check_room(self, step: int) -> None:
        """Refuses (``CheckpointSaveError``, ENOSPC) a save that cannot fit: on one process,
        when the file system has less free space than the newest checkpoint takes (every save
        has the same size, and orbax removes old ones only once the new one is complete).
        Failing here leaves nothing half-written, and keeps the failure out of tensorstore,
        whose other writes in flight then report into orbax's closed event loop."""
        steps = self.all_steps()
        if jax.process_count() > 1 or not steps or not paths.is_local(self.directory):
            return
        need = sum(paths.size(p) for p in _item_files(self.step_dir(steps[-1])))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            self._failed = True
            raise CheckpointSaveError(step, self.step_dir(step), OSError(
                errno_lib.ENOSPC, f"{os.strerror(errno_lib.ENOSPC)}: {free / 1e6:.1f} MB free, "
                f"checkpoint {steps[-1]} takes {need / 1e6:.1f} MB"))

    def check_saved(self) -> None:
        """Raises ``CheckpointSaveError`` if the last background save failed (cheap: it
        looks at the save thread's stored exception; called at every step)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._failed = True
            step = self._saving if self._saving is not None else -1
            raise CheckpointSaveError(step, self.step_dir(step), e) from e

    def reached_preemption(self, step: int) -> bool:
        """Whether every process has agreed to stop and save at ``step``: on several hosts,
        orbax's preemption sync (the JAX coordination service turns a SIGTERM on any host
        into one agreed step, the next after the furthest host's); False on one process."""
        return bool(self.manager.reached_preemption(step))

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed = True
            step = self._saving if self._saving is not None else -1
            raise CheckpointSaveError(step, self.step_dir(step), e) from e
        self.check_saved()

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            if not self._failed:  # not yet reported by check_saved / wait
                raise CheckpointSaveError(self._saving if self._saving is not None else -1,
                                          self.directory, e) from e

    def _problem(self, step: int) -> str | None:
        """Why checkpoint ``step`` cannot be used as it is on disk (None: it looks intact)."""
        path = self.step_dir(step)
        if not paths.isdir(path):
            return "its folder is missing"
        return verify_checksums(path, self._trust_unverified)

    def recorded_config(self) -> tuple[int, ml_collections.ConfigDict] | None:
        """``(step, config)`` recorded in the newest intact checkpoint that records its config
        (checkpoints of older versions do not), else None."""
        for step in reversed(self.all_steps()):
            if self._problem(step) is not None:
                continue
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
                return step, config_lib.from_json(json.dumps(meta["config"]))
            except Exception:  # noqa: BLE001 - no usable record in this one: try older
                continue
        return None

    def _structure_difference(self, step: int, abstract_state: Any) -> str:
        """Where the saved state's tree differs from ``abstract_state``'s, by top-level field
        (e.g. "its opt_state differs in structure (3 entries only in the checkpoint, 2 only
        in this config)"); "" if it cannot tell."""
        def paths(tree) -> set[tuple[str, ...]]:  # dict keys, attributes, indices alike
            return {tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                          for k in path)
                    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
        try:
            theirs = paths(self.manager.item_metadata(step)["state"])
            mine = paths(abstract_state)
        except Exception:  # noqa: BLE001 - only for the message
            return ""
        top = lambda p: p[0] if p else "state"
        fields = sorted({top(p) for p in mine ^ theirs})
        parts = []
        for f in fields:
            a = sum(top(p) == f for p in theirs - mine)
            b = sum(top(p) == f for p in mine - theirs)
            parts.append(f"its {f} differs in structure ({a} entries only in the checkpoint, "
                         f"{b} only in this config)")
        return "; ".join(parts)

    def restore_latest(self, abstract_state: Any, steps: list[int] | None = None,
                       partial: bool = False,
                       move_corrupt: bool = False) -> tuple[int, Any] | None:
        """The newest readable checkpoint (of ``steps``, default all) as ``(step, state)``, or
        None if there is none. ``partial``: ``abstract_state`` is a subtree of the saved state
        (e.g. ``{"params": ...}``) and only that is read.

        Corrupt checkpoints (failed checksums, unreadable files) are skipped with a warning.
        ``move_corrupt`` (training): the newer corrupt ones are moved to
        ``checkpoints/corrupt-<step>/`` once a good one is found, so their steps can be saved
        again; if none is readable, ``NoReadableCheckpointError`` names them (nothing moved).
        Raises ``CheckpointError`` if a checkpoint was written by a different model or width
        range, or passes its checksums but does not fit this version's train state (another
        version's checkpoint is not corrupt: it is neither skipped nor moved).
        """
        corrupt: list[int] = []
        for step in reversed(steps or self.all_steps()):
            problem = self._problem(step)
            if problem is None:
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        meta=ocp.args.JsonRestore()))
                    meta = restored["meta"]
                    if not isinstance(meta, dict):
                        raise ValueError(f"meta is {type(meta).__name__}, not a dict")
                except Exception as e:  # noqa: BLE001 - any unreadable file means "corrupt"
                    problem = f"{type(e).__name__}: {paths.first_line(e)}"
            if problem is None:
                self.check_identity(meta, step)
                try:
                    restore = (ocp.args.PyTreeRestore(
                        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
                            abstract_state), partial_restore=True)
                        if partial else ocp.args.StandardRestore(abstract_state))
                    restored = self.manager.restore(step, args=ocp.args.Composite(state=restore))
                except Exception as e:  # noqa: BLE001
                    problem = f"{type(e).__name__}: {paths.first_line(e)}"
                    if paths.exists(os.path.join(self.step_dir(step), CHECKSUM_FILE)):
                        # Its files are as they were written: not corrupt but another state
                        # (another version's TrainState, or a config change that alters
                        # the optimizer state). Not moved.
                        detail = self._structure_difference(step, abstract_state) or problem
                        raise StateMismatchError(
                            f"checkpoint {step} in {self.directory} passes its checksums but "
                            f"does not restore into this version's train state ({detail}); "
                            f"it was written by another version of us3l_jax: use that "
                            f"version, or a new --workdir", step, detail) from None
            if problem is not None:
                log.warning("checkpoint %d in %s is corrupt (%s); trying an older one",
                            step, self.workdir, problem)
                corrupt.append(step)
                continue
            if move_corrupt and corrupt:
                self.move_aside(corrupt)
            return step, restored["state"]
        if corrupt and move_corrupt:
            raise NoReadableCheckpointError(
                f"no readable checkpoint in {self.directory} (corrupt: "
                f"{', '.join(self.step_dir(s) for s in sorted(corrupt))}); refusing to start a "
                f"new run over them: move them away, or pass --start_over to move them to "
                f"{CHECKPOINT_DIR}/{CORRUPT_PREFIX}<step>/ and train from step 0 (or "
                f"{TRUST_FLAG} if they only lack their {CHECKSUM_FILE})")
        return None

    def move_aside(self, steps: list[int]) -> None:
        """Renames each checkpoint of ``steps`` to ``corrupt-<step>[-<n>]`` (never deletes),
        one line each, and reopens the manager so it forgets them. Process 0 moves; every
        process then reopens (after a barrier on several hosts)."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in sorted(steps):
                dst = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}")
                n = 1
                while paths.exists(dst):
                    n += 1
                    dst = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}-{n}")
                paths.rename(self.step_dir(step), dst)
                log.warning("moved corrupt checkpoint %d to %s (kept for inspection; the run "
                            "can save step %d again)", step, dst, step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("us3l_move_corrupt_checkpoints")
        self.manager.close()
        self.manager = self._open()

    def check_identity(self, meta: dict[str, Any], step: int) -> None:
        """Raises ``CheckpointError`` if the identity recorded in a checkpoint's ``meta``
        differs from this config's in a field it records (``IDENTITY_FIELDS``)."""
        want = identity(self.config)
        got = meta.get("identity", {})
        diff = {k: (got[k], v) for k, v in want.items() if k in got and got[k] != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in
                              diff.items())
            raise CheckpointError(
                f"checkpoint {step} in {self.workdir} was written by a different config "
                f"({lines}); use a new --workdir or the config it was trained with")


def latest_step(workdir: str) -> int | None:
    """The newest step among ``<workdir>/checkpoints/<step>/`` folders (None if there is
    none), read from the directory alone: no orbax manager, nothing created."""
    try:
        names = paths.listdir(os.path.join(workdir, CHECKPOINT_DIR))
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit()]
    return max(steps) if steps else None


@dataclasses.dataclass
class Pretrained:
    """What evaluation and export need from a run."""
    config: ml_collections.ConfigDict
    step: int
    params: dict[str, Any]  # {backbone, projector[, predictor][, distill_head]}


def load_pretrained(workdir: str, step: int | None = None, *,
                    abstract_state: Callable[[ml_collections.ConfigDict], Any],
                    trust_unverified: bool = False) -> Pretrained:
    """Config and parameters of a pretraining run (the latest readable checkpoint, or ``step``).

    ``abstract_state(config)`` gives the run's train state as shapes (e.g.
    ``build.abstract_state``); only its ``params`` are restored (a partial restore), not the
    optimizer state or the teacher. Raises ``CheckpointError`` with a clear message when the
    workdir has no run or no checkpoint (or not ``step``); creates nothing in ``workdir``.
    ``trust_unverified``: use checkpoints without a checksum file (else they are skipped).
    """
    config = read_config(workdir)
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if latest_step(workdir) is None:  # e.g. killed before its first checkpoint
        raise CheckpointError(f"no checkpoint in {directory!r}")
    ckpt = Checkpointer(workdir, config, async_save=False, trust_unverified=trust_unverified,
                        read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)!r}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {workdir!r}; "
                                  f"available: {steps}")
        params = {"params": abstract_state(config).params}
        found = ckpt.restore_latest(params, steps=[step] if step is not None else None,
                                    partial=True)
        if found is None:
            unverified = [s for s in steps
                          if not paths.exists(os.path.join(ckpt.step_dir(s), CHECKSUM_FILE))]
            hint = (f"; {len(unverified)} of them only lack their {CHECKSUM_FILE}: "
                    f"{TRUST_FLAG} uses them" if unverified and not trust_unverified else "")
            raise CheckpointError(f"no readable checkpoint in {workdir!r} (steps {steps}){hint}")
        return Pretrained(config=config, step=found[0], params=found[1]["params"])
    finally:
        ckpt.close()
