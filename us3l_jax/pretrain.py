"""The pretraining loop: config -> data -> US3L steps -> checkpoints and logs.

Resuming is exact: the batch, the widths and the augmentation key of iteration k are pure
functions of (seed, k), and the checkpoint holds the whole TrainState, so a run restarted from
its latest checkpoint (also after ``kill -9``) ends with the same parameters as an
uninterrupted one (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from us3l_jax import (build, checkpointing, config as config_lib, errors, mesh as mesh_lib,
                      metrics as metrics_lib, paths, sampling, workdir_lock)
from us3l_jax.engine import Engine, TrainState, planning

log = logging.getLogger("us3l")

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped, resume me", not "finished"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT (Ctrl-C): saved like SIGTERM


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf; the last good checkpoint is left intact."""


class Preempted(Exception):
    """SIGTERM (or SIGINT, Ctrl-C) arrived; the state was saved at ``step``."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "preempted"
        super().__init__(f"{what} at step {step}; checkpoint saved")
        self.step = step
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The command line's exit status: 128 + the signal, as a shell reports it."""
        return 128 + self.signum


@dataclasses.dataclass
class Run:
    """Everything built from a config for one pretraining run."""
    config: ml_collections.ConfigDict
    mesh: Any
    data: build.Data
    trainer: Engine
    sampler: sampling.SamplerConfig
    steps_per_epoch: int
    total_steps: int
    frozen_teacher: Any = None  # SEED's teacher (us3l_jax.teacher.FrozenTeacher)

    @property
    def image_spec(self) -> jax.ShapeDtypeStruct:
        return self.data.image_spec


def setup(config, mesh=None) -> Run:
    """Validates the config and builds data, model and trainer for ``train``."""
    config_lib.validate(config)
    mesh = mesh or mesh_lib.make_mesh()
    mesh_lib.check_batch_size(config.optim.batch_size, mesh, config.method.group_size)
    data = build.data(config, mesh)
    if data.steps_per_epoch < 1:
        raise config_lib.ConfigError(
            f"config.optim.batch_size={config.optim.batch_size} is larger than the "
            f"{config.data.dataset} training split")
    check_probe_labels(config)
    frozen = None
    if build.method_kind(config) == "seed":  # SEED: another run's network
        from us3l_jax import teacher as teacher_lib
        frozen = teacher_lib.load(config, mesh)
    return Run(config=config, mesh=mesh, data=data,
               trainer=build.trainer(config, mesh, data.steps_per_epoch, frozen),
               sampler=build.sampler(config), steps_per_epoch=data.steps_per_epoch,
               total_steps=config.optim.epochs * data.steps_per_epoch, frozen_teacher=frozen)


def check_probe_labels(config) -> None:
    """The online linear probe learns the training batches' labels: an unlabelled image
    folder (one class of every image) has none."""
    if not config.eval.online_linear:
        return
    from us3l_jax.data import datasets
    n = datasets.num_classes(config.data.dataset, config.data.data_dir)
    if n < 2:
        raise config_lib.ConfigError(
            f"config.eval.online_linear needs labelled training images, but "
            f"{config.data.dataset} at {config.data.data_dir} has {n} class; put them in "
            f"train/<class>/ folders or set config.eval.online_linear=False")


def possible_sub_widths(run: Run) -> list[float]:
    """The sub-network widths a run can compile (``engine.planning.possible_sub_widths``)."""
    return planning.possible_sub_widths(run.sampler, run.trainer.config_key,
                                        run.steps_per_epoch, run.total_steps)


def compile_width_sets(run: Run) -> list[tuple[float, ...]]:
    """Width sets whose dry runs reach every program (``engine.planning``)."""
    return planning.compile_width_sets(run.sampler, run.trainer.config_key,
                                       run.steps_per_epoch, run.total_steps)


class ScheduleCost:
    """Relative compute of iterations under the sampling schedule, for an ETA that does not
    extrapolate stage 1's base-only speed into the stages with sub-networks.

    An iteration costs the teacher forward plus three forwards (forward + backward) per width;
    backbone MACs come from the profiler at the range's ends, interpolated quadratically in
    the width in between (channels scale both sides of a convolution). Widths are drawn by the
    run's sampler at every ``stride``-th iteration (cheap on the host) and held in between.
    """

    def __init__(self, run: Run, end: int, max_samples: int = 20000):
        from us3l_jax import profile  # deferred: only the ETA needs it
        c = run.config
        lo, hi = run.sampler.width_range
        kw = {k: c.model[k] for k in ("base_width", "stage_sizes") if c.model[k] is not None}
        size = build.views(c)[0].size
        m_lo, m_hi = (profile.profile(c.model.name, w, input_size=size, num_classes=None,
                                      convention="backbone", **kw)["macs"] for w in (lo, hi))
        macs = lambda w: m_lo + (m_hi - m_lo) * (w * w - lo * lo) / max(hi * hi - lo * lo,
                                                                        1e-12)
        teacher = m_hi if not build.is_supervised(c) and build.method(c).uses_teacher else 0.0
        self.stride = max(1, -(-end // max_samples))
        costs = [(teacher + 3 * sum(macs(w) for w in sampling.sample_widths(
            run.sampler, k, run.steps_per_epoch, run.total_steps))) / (teacher + 3 * m_hi)
            for k in range(0, end, self.stride)]
        self._cum = np.concatenate([[0.0], np.cumsum(np.repeat(costs, self.stride))])

    def between(self, a: int, b: int) -> float:
        """Relative cost of iterations a .. b-1 (a base-only iteration costs 1)."""
        n = len(self._cum) - 1
        return float(self._cum[min(b, n)] - self._cum[min(a, n)])


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fetch(tree):
    """Host copies of replicated device values; works when they span several processes,
    where ``jax.device_get`` would refuse non-addressable arrays."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(jax.device_get(a.addressable_data(0)))
        return np.asarray(jax.device_get(a))
    return jax.tree.map(one, tree)


@jax.jit
def _finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _all_finite(tree) -> bool:
    return bool(fetch(_finite(tree)))


def train(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
          online_eval=None, allow_config_change: bool = False,
          start_over: bool = False, trust_unverified: bool = False) -> TrainState:
    """Pretrains (or resumes) the run in ``workdir`` and returns the final TrainState.

    ``online_eval``: optional ``callable(params, step, probe=None) -> dict`` run every
    ``config.eval.online_every_epochs`` epochs (``probe``: the online linear probe's state,
    passed when ``config.eval.online_linear``); its metrics are logged.
    Raises ``Preempted`` after saving on SIGTERM or SIGINT, ``NonFiniteLossError`` on
    NaN/Inf, ``checkpointing.CheckpointSaveError`` when a save fails (checked at every step;
    older checkpoints stay intact), ``workdir_lock.WorkdirLockedError`` when another process
    runs in ``workdir``, ``workdir_lock.WorkdirLostError`` when the workdir or its lock is
    deleted, renamed, replaced or unmounted during the run (checked at every log step and
    before every save; nothing more is written), ``KeyboardInterrupt`` for a Ctrl-C that came
    before training started.

    Resuming with a config that differs from the run's ``config.json`` outside
    ``checkpointing.RESUMABLE_CHANGES`` is refused with the difference unless
    ``allow_config_change``; an accepted change is recorded (``config.json``,
    ``config_history.jsonl``) once the first checkpoint under it is saved, so a resume that
    fails or stops before that leaves the record as it was. ``start_over``: if no checkpoint
    is readable, move them all aside and start from step 0 (otherwise refused).
    ``trust_unverified``: restore checkpoints that lack their checksum file (otherwise they
    count as corrupt).

    Preemption: one process stops at the first step after its SIGTERM. With several
    processes, every process asks the JAX coordination service at every step whether the
    agreed preemption step has come (a SIGTERM on any host starts the agreement), so all of
    them save the same step and exit together; a per-process flag would send them into the
    collective save at different steps, where they would wait for each other forever.
    """
    t_setup = time.perf_counter()
    errors.raise_if_interrupted()
    run = setup(config, mesh)
    trainer = run.trainer
    workdir = paths.absolute(workdir)
    end = run.total_steps if config.train.max_steps is None else min(run.total_steps,
                                                                      config.train.max_steps)
    every = config.train.checkpoint_every_steps or run.steps_per_epoch
    stack = contextlib.ExitStack()
    # Before anything is written: one run per workdir.
    stack.enter_context(workdir_lock.hold(workdir, enabled=jax.process_index() == 0))
    try:
        ckpt = checkpointing.Checkpointer(workdir, config, keep=config.train.keep_checkpoints,
                                          trust_unverified=trust_unverified)
    except BaseException:
        stack.close()
        raise

    def close_checkpointer(exc_type, exc, tb) -> bool:
        try:
            ckpt.close()
        except checkpointing.CheckpointSaveError as e:
            if exc is None:
                raise
            # The run is already stopping for its own reason (e.g. the workdir vanished under
            # a save in flight): report that one.
            log.debug("while stopping: %s", e)
        return False
    stack.push(close_checkpointer)
    guard = lambda when: workdir_lock.check(workdir, when)
    preempted = {"flag": False, "signum": signal.SIGTERM}
    agreed = jax.process_count() > 1

    def on_signal(signum, _):
        preempted.update(flag=True, signum=signum)
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
    # Several processes: the coordination service's own SIGTERM handler must stay in place.
    if _main_thread() and not agreed:
        for sig in (signal.SIGTERM, signal.SIGINT):
            stack.callback(signal.signal, sig, signal.signal(sig, on_signal))

    def stop_if_interrupted() -> None:
        """A Ctrl-C before the first step stops at once: no step to save, nothing more to
        write (``KeyboardInterrupt``, as one before this function was called)."""
        if preempted["flag"] and preempted["signum"] == signal.SIGINT:
            raise KeyboardInterrupt
    try:
        errors.raise_if_interrupted()  # a Ctrl-C during setup that JAX's gc hook swallowed
        change = None
        if ckpt.all_steps():
            change = checkpointing.check_config_change(workdir, config, allow_config_change,
                                                       recorded=ckpt.recorded_config)
        frozen = run.frozen_teacher
        if frozen is not None:  # SEED: record the teacher, or check it is the recorded one
            from us3l_jax import teacher as teacher_lib
            teacher_lib.record(workdir, frozen)
        try:
            found = ckpt.restore_latest(trainer.abstract_state(run.image_spec),
                                        move_corrupt=True)
        except checkpointing.NoReadableCheckpointError:
            if not start_over:
                raise
            log.warning("--start_over: no checkpoint is readable; starting from step 0")
            ckpt.move_aside(ckpt.all_steps())
            found = None
        except checkpointing.StateMismatchError as e:
            if change is None or not change.changes:
                raise
            raise checkpointing.CheckpointError(
                f"checkpoint {e.step} in {ckpt.directory} does not fit the train state of this "
                f"config: {e.detail}; the changes you allowed ({change.describe()}) change what "
                f"the checkpoint holds, so the run cannot resume with them: rerun without them "
                f"({checkpointing.CONFIG_FILE} is unchanged) or use a new --workdir") from None
        stop_if_interrupted()
        if found is None:
            checkpointing.write_config(workdir, config)
            change = None
        elif change is not None and change.replaced:
            # A lost config.json is replaced once the restore has succeeded: a workdir is
            # never left without one.
            change.record(workdir, config, found[0])
            change = None
        if found is not None and found[0] >= end:
            # Nothing to do: nothing (more) is written, no log files, no config record.
            log.info("nothing to do: the run is at step %d of %d", found[0], end)
            return found[1]
        writer = metrics_lib.MetricWriter(workdir, None if found is None else found[0],
                                          wandb_run(config))
        stack.push(lambda exc_type, exc, tb: writer.close(
            _exit_code(exc), preempted=isinstance(exc, Preempted)
            and exc.signum == signal.SIGTERM))
        writer.truncate_after(0 if found is None else found[0])
        if found is None:
            state = trainer.init_state(jax.random.key(config.seed), run.image_spec)
            start = 0
            log.info("new run in %s: %s on %s, %d steps (%d epochs x %d), %d device(s)",
                     workdir, config.model.name, config.data.dataset, run.total_steps,
                     config.optim.epochs, run.steps_per_epoch, run.mesh.devices.size)
        else:
            start, state = found
            log.info("resuming %s from step %d", workdir, start)
        compiling: list = []  # futures of the programs compiled ahead
        if config.train.compile_ahead:
            compiling = trainer.compile_ahead(state, run.image_spec, compile_width_sets(run))
            log.info("compiling %d programs ahead in the background", len(compiling))
            # Stopping early (Ctrl-C, an error) need not wait for compilations not started.
            stack.callback(lambda: [f.cancel() for f in compiling])
        stop_if_interrupted()
        log.info("setup took %.1fs", time.perf_counter() - t_setup)

        cost = ScheduleCost(run, end)
        labels = (lambda b: (b.labels,)) if trainer.needs_labels else (lambda b: ())
        shown_programs = None
        online_every = config.eval.online_every_epochs * run.steps_per_epoch
        t0, last_log_t, last_log_step = time.perf_counter(), time.perf_counter(), start
        # The ETA counts from the first log line after compilation finished: compiling in
        # the background slows the steps beside it, and the first step waits for it.
        eta_from = None
        batches = run.data.batches(start)
        stop_if_interrupted()
        for step in range(start, end):
            widths = sampling.sample_widths(run.sampler, step, run.steps_per_epoch,
                                            run.total_steps)
            done = step + 1
            log_now = done % config.train.log_every_steps == 0 or done in (end, start + 1)
            # The hot path: batch, step and (at log steps) the explicit fetch of metrics.
            with jax.transfer_guard(config.train.transfer_guard):
                batch = next(batches)
                state, metrics = trainer.step(state, batch.images, widths, *labels(batch))
                if log_now:
                    metrics = fetch(metrics)
            if log_now:
                guard(f"at step {done}")
                # A diverged probe is logged, not fatal: it does not touch the training.
                if not all(np.isfinite(v) for k, v in metrics.items()
                           if not k.startswith("probe/")):
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step}: " + ", ".join(
                            f"{k}={float(v):.4g}" for k, v in sorted(metrics.items())) +
                        f"; the last good checkpoint is {ckpt.all_steps()[-1:] or 'none'}")
                now = time.perf_counter()
                # The first step waits for compilation: no rate or ETA from it.
                first = done == start + 1
                rate = (done - last_log_step) * config.optim.batch_size / (now - last_log_t)
                last_log_t, last_log_step = now, done
                still_compiling = any(not f.done() for f in compiling)
                if eta_from is None and not still_compiling:
                    eta_from = (now, done)
                # Seconds per unit of compute since compilation finished, times what remains.
                eta = ("compiling" if still_compiling else "?" if eta_from[1] == done else
                       _fmt_time(cost.between(done, end) * (now - eta_from[0]) /
                                 cost.between(eta_from[1], done)))
                extra = {"widths": list(widths), "epoch": done / run.steps_per_epoch,
                         "programs": trainer.num_programs,
                         "compile_s": trainer.programs.compile_seconds}
                if not first:
                    extra["images_per_s_per_device"] = rate / run.mesh.devices.size
                width_of = {"width/base": widths[0],
                            **{f"width/sub{i}": w for i, w in enumerate(widths[1:])}}
                writer.write(done, {**metrics, **width_of, "num_widths": len(widths),
                                    **{k: v for k, v in extra.items() if k != "widths"}})
                speed = ("first step, incl. compilation" if first else
                         f"{extra['images_per_s_per_device']:.0f} img/s/dev")
                programs = (trainer.num_programs, trainer.programs.compiled)
                compiled = ("" if programs == shown_programs else
                            f" | programs {programs[0]} ({programs[1]} compiled ahead, "
                            f"{trainer.programs.compile_seconds:.0f}s)")
                shown_programs = programs
                probe = ("" if "probe/acc1" not in metrics else
                         f" | probe acc1 {float(metrics['probe/acc1']):.1f}%")
                log.info("step %d/%d ep %.2f | %s%s | widths %s | %s%s | ETA %s", done, end,
                         extra["epoch"], " ".join(
                             f"{k.split('/')[-1]} {float(v):.4f}"
                             for k, v in sorted(metrics.items()) if k.startswith("loss/")),
                         probe, ",".join(f"{w:.3g}" for w in widths), speed, compiled, eta)
            if online_eval is not None and online_every and done % online_every == 0:
                out = (online_eval(state.params, done) if state.probe is None else
                       online_eval(state.params, done, probe=state.probe))
                writer.write(done, out)
                log.info("online eval at step %d: %s", done, ", ".join(
                    f"{k} {v:.4f}" for k, v in sorted(out.items())))
            # Every process must ask at every step (the agreement protocol counts on it).
            stop_now = ckpt.reached_preemption(done) if agreed else preempted["flag"]
            ckpt.check_saved()  # a failed background save stops the run here
            if done % every == 0 or stop_now or done == end:
                if not _all_finite(state.params):
                    raise NonFiniteLossError(
                        f"parameters became non-finite by step {step}; not saving. The last "
                        f"good checkpoint is {ckpt.all_steps()[-1:] or 'none'}")
                guard(f"at step {done}")  # never save into another (or no) workdir
                ckpt.save(done, state)
                if change is not None:  # the first checkpoint under the new config
                    ckpt.wait()
                    guard(f"at step {done}")
                    change.record(workdir, config, done)
                    change = None
            if stop_now:
                ckpt.wait()
                raise Preempted(done, preempted["signum"])
        ckpt.wait()
        guard(f"at step {end}")  # the last save went where it should: only then "finished"
        log.info("finished %d steps in %s", end - start, _fmt_time(time.perf_counter() - t0))
        return state
    except checkpointing.CheckpointSaveError:
        guard("during a save")  # a save failed because the workdir vanished: say that
        raise
    finally:
        # The callbacks learn why the run stops, as a ``with`` block would tell them (W&B's
        # exit status, which error the checkpointer reports); stack.close() passes none.
        stack.__exit__(*sys.exc_info())


def wandb_run(config: ml_collections.ConfigDict) -> metrics_lib.WandbRun | None:
    """Where the run logs to Weights & Biases (None: it does not), with its whole config."""
    t = config.train
    if not t.wandb_project:
        return None
    return metrics_lib.WandbRun(project=t.wandb_project, entity=t.wandb_entity,
                                name=t.wandb_name, config=config_lib.flatten(config))


def _exit_code(exc: BaseException | None) -> int:
    """The exit status the command line gives a run that stops with ``exc``."""
    if exc is None:
        return 0
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED_EXIT_CODE
    return exc.exit_code if isinstance(exc, Preempted) else 1


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
