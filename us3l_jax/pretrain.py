"""The pretraining loop: config -> data -> US3L steps -> checkpoints and logs.

Resuming is exact: the batch, the widths and the augmentation key of iteration k are pure
functions of (seed, k), and the checkpoint holds the whole TrainState, so a run restarted from
its latest checkpoint (also after ``kill -9``) ends with the same parameters as an
uninterrupted one (bitwise on CPU).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from us3l_jax import checkpointing, config as config_lib, mesh as mesh_lib, sampling, slim
from us3l_jax.data import augment, datasets, feeding
from us3l_jax.train import TrainState, US3LTrainer

log = logging.getLogger("us3l")

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped, resume me", not "finished"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf; the last good checkpoint is left intact."""


class Preempted(Exception):
    """SIGTERM arrived; the state was saved at ``step``."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; checkpoint saved")
        self.step = step


@dataclasses.dataclass
class Run:
    """Everything built from a config for one pretraining run."""
    config: ml_collections.ConfigDict
    mesh: Any
    batches: Callable[[int], Iterator[feeding.Batch]] | None  # start step -> batches
    image_spec: jax.ShapeDtypeStruct  # one training batch of uint8 images
    trainer: US3LTrainer
    sampler: sampling.SamplerConfig
    steps_per_epoch: int
    total_steps: int


def _views_fn(config):
    v1, v2 = config_lib.build_views(config)
    return functools.partial(augment.ssl_views, cfg1=v1, cfg2=v2)


def build_trainer(config, mesh, steps_per_epoch: int) -> US3LTrainer:
    model = config_lib.build_model(config)
    tx, lr = config_lib.build_optimizer(config, steps_per_epoch)
    # The teacher runs at the largest width, or at the one width of an individual baseline.
    teacher = config.sampler.individual_width or config.sampler.width_range[1]
    return US3LTrainer(model, config_lib.build_method(config), tx, _views_fn(config), mesh,
                       total_steps=config.optim.epochs * steps_per_epoch,
                       teacher_width=teacher, lr_schedule=lr)


def image_spec(config, mesh, image_shape: tuple[int, ...] | None = None) -> jax.ShapeDtypeStruct:
    """A training batch of uint8 images: (B, H, W, 3) held on device, or (B, 2, S, S, 3) host
    crops when streaming. Parameter shapes do not depend on it (only views and BN groups do)."""
    size = config_lib.build_views(config)[0].size
    if config_lib.is_streaming(config):
        shape = (2, size, size, 3)
    else:
        shape = image_shape or (size, size, 3)
    return jax.ShapeDtypeStruct((config.optim.batch_size,) + tuple(shape), jnp.uint8,
                                sharding=mesh_lib.batch_sharding(mesh))


def abstract_state(config, mesh=None) -> TrainState:
    """Shapes, dtypes and shardings of the TrainState a config trains (for restoring)."""
    mesh = mesh or mesh_lib.make_mesh()
    trainer = build_trainer(config, mesh, steps_per_epoch=1)
    shapes = jax.eval_shape(trainer.init_state, jax.random.key(0), image_spec(config, mesh))
    repl = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), shapes)


def _streaming_batches(config, mesh):
    from us3l_jax.data import streaming
    source = datasets.open_source(config.data.dataset, "train", data_dir=config.data.data_dir)
    crops = streaming.HostCrops.from_views(*config_lib._view_recipe(config))
    stream = streaming.StreamingDataset(source, global_batch_size=config.optim.batch_size,
                                        transform=crops, seed=config.seed, train=True, mesh=mesh,
                                        num_threads=config.data.num_threads)
    return stream.iterator, stream.steps_per_epoch


def setup(config, mesh=None) -> Run:
    """Validates the config and builds data, model and trainer for ``train``."""
    config_lib.validate(config)
    mesh = mesh or mesh_lib.make_mesh()
    mesh_lib.check_batch_size(config.optim.batch_size, mesh)
    if config_lib.is_streaming(config):
        batches, steps_per_epoch = _streaming_batches(config, mesh)
        spec = image_spec(config, mesh)
    else:
        ds = datasets.load(config.data.dataset, "train", data_dir=config.data.data_dir,
                           image_size=config.data.image_size)
        feeder = feeding.TrainFeeder(feeding.DeviceDataset(ds, mesh), config.optim.batch_size,
                                     config.seed)
        batches, steps_per_epoch = feeder.iterate, feeder.steps_per_epoch
        spec = image_spec(config, mesh, ds.images.shape[1:])
    if steps_per_epoch < 1:
        raise config_lib.ConfigError(
            f"config.optim.batch_size={config.optim.batch_size} is larger than the "
            f"{config.data.dataset} training split")
    return Run(config=config, mesh=mesh, batches=batches, image_spec=spec,
               trainer=build_trainer(config, mesh, steps_per_epoch),
               sampler=config_lib.build_sampler(config), steps_per_epoch=steps_per_epoch,
               total_steps=config.optim.epochs * steps_per_epoch)


def _possible_sub_widths(run: Run) -> list[float]:
    """Every sub-width the sampler can draw, in the order stages need them (widest first)."""
    s = run.sampler
    lo, hi = s.width_range
    if s.individual_width is not None:
        return []
    if s.grid is not None:
        ws = set(s.grid)
    else:
        ws = set(slim.distinct_widths(run.trainer.config_key, lo, hi))
    ws |= {sampling.min_width(s, k, run.steps_per_epoch, run.total_steps)
           for k in range(0, run.total_steps, max(1, run.steps_per_epoch))}
    key = run.trainer.config_key
    unique = {key(w): w for w in sorted(ws)}
    return sorted(unique.values(), reverse=True)


class MetricWriter:
    """JSON lines (``metrics.jsonl``) and TensorBoard events (``tb/``), process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
                                   for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, float):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


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
            return np.asarray(a.addressable_data(0))
        return np.asarray(jax.device_get(a))
    return jax.tree.map(one, tree)


@jax.jit
def _finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _all_finite(tree) -> bool:
    return bool(fetch(_finite(tree)))


def train(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
          online_eval=None) -> TrainState:
    """Pretrains (or resumes) the run in ``workdir`` and returns the final TrainState.

    ``online_eval``: optional ``callable(params, step) -> dict`` run every
    ``config.eval.online_every_epochs`` epochs; its metrics are logged.
    Raises ``Preempted`` after saving on SIGTERM, ``NonFiniteLossError`` on NaN/Inf.
    """
    t_setup = time.perf_counter()
    run = setup(config, mesh)
    trainer = run.trainer
    workdir = os.path.abspath(workdir)
    end = run.total_steps if config.train.max_steps is None else min(run.total_steps,
                                                                      config.train.max_steps)
    every = config.train.checkpoint_every_steps or run.steps_per_epoch
    ckpt = checkpointing.Checkpointer(workdir, config, keep=config.train.keep_checkpoints)
    writer = MetricWriter(workdir)
    preempted = {"flag": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True)) \
        if _main_thread() else None
    try:
        found = ckpt.restore_latest(abstract_state(config, run.mesh))
        if found is None:
            checkpointing.write_config(workdir, config)
            state = trainer.init_state(jax.random.key(config.seed), run.image_spec)
            start = 0
            log.info("new run in %s: %s on %s, %d steps (%d epochs x %d), %d device(s)",
                     workdir, config.model.name, config.data.dataset, run.total_steps,
                     config.optim.epochs, run.steps_per_epoch, run.mesh.devices.size)
        else:
            start, state = found
            log.info("resuming %s from step %d", workdir, start)
        if start >= end:
            log.info("nothing to do: the run is at step %d of %d", start, end)
            return state
        if config.train.compile_ahead:
            subs = _possible_sub_widths(run)
            bases = [run.sampler.width_range[1]] if run.sampler.sandwich else \
                [run.sampler.width_range[1]] + subs
            if run.sampler.individual_width is not None:
                bases = [run.sampler.individual_width]
            trainer.compile_ahead(state, run.image_spec, bases, subs)
            log.info("compiling %d programs ahead in the background", len(bases) +
                     len(subs) + 3)
        log.info("setup took %.1fs", time.perf_counter() - t_setup)

        online_every = config.eval.online_every_epochs * run.steps_per_epoch
        t0, last_log_t, last_log_step = time.perf_counter(), time.perf_counter(), start
        batches = run.batches(start)
        for step in range(start, end):
            widths = sampling.sample_widths(run.sampler, step, run.steps_per_epoch,
                                            run.total_steps)
            batch = next(batches)
            state, metrics = trainer.step(state, batch.images, widths, step)
            done = step + 1
            if done % config.train.log_every_steps == 0 or done == end or done == start + 1:
                metrics = fetch(metrics)
                if not all(np.isfinite(v) for v in metrics.values()):
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step}: " + ", ".join(
                            f"{k}={float(v):.4g}" for k, v in sorted(metrics.items())) +
                        f"; the last good checkpoint is {ckpt.all_steps()[-1:] or 'none'}")
                now = time.perf_counter()
                # The first step waits for compilation: no rate or ETA from it.
                first = done == start + 1
                rate = (done - last_log_step) * config.optim.batch_size / (now - last_log_t)
                remaining = (math.nan if first else
                             (end - done) * (now - last_log_t) / (done - last_log_step))
                last_log_t, last_log_step = now, done
                extra = {"widths": list(widths), "epoch": done / run.steps_per_epoch,
                         "programs": trainer.num_programs,
                         "compile_s": trainer.compile_seconds}
                if not first:
                    extra["images_per_s_per_device"] = rate / run.mesh.devices.size
                width_of = {"width/base": widths[0],
                            **{f"width/sub{i}": w for i, w in enumerate(widths[1:])}}
                writer.write(done, {**metrics, **width_of, "num_widths": len(widths),
                                    **{k: v for k, v in extra.items() if k != "widths"}})
                speed = ("first step, incl. compilation" if first else
                         f"{extra['images_per_s_per_device']:.0f} img/s/dev")
                log.info("step %d/%d ep %.2f | %s | widths %s | %s | programs %d "
                         "(%.0fs compiling) | ETA %s", done, end, extra["epoch"],
                         " ".join(f"{k.split('/')[-1]} {float(v):.4f}"
                                  for k, v in sorted(metrics.items()) if k.startswith("loss/")),
                         ",".join(f"{w:.3g}" for w in widths), speed, trainer.num_programs,
                         trainer.compile_seconds, _fmt_time(remaining))
            if online_eval is not None and online_every and done % online_every == 0:
                out = online_eval(state.params, done)
                writer.write(done, out)
                log.info("online eval at step %d: %s", done, ", ".join(
                    f"{k} {v:.4f}" for k, v in sorted(out.items())))
            stop = preempted["flag"] or done == end
            if done % every == 0 or stop:
                if not _all_finite(state.params):
                    raise NonFiniteLossError(
                        f"parameters became non-finite by step {step}; not saving. The last "
                        f"good checkpoint is {ckpt.all_steps()[-1:] or 'none'}")
                ckpt.save(done, state)
            if preempted["flag"]:
                ckpt.wait()
                raise Preempted(done)
        ckpt.wait()
        log.info("finished %d steps in %s", end - start, _fmt_time(time.perf_counter() - t0))
        return state
    finally:
        writer.close()
        ckpt.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
