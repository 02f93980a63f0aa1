"""The engine: one iteration of any ``Method`` over a set of widths, as cached programs.

One iteration (paper Algorithm 1) on the widths the sampler chose (``widths[0]`` is the base
network's, the rest are sub-networks):

1. ``views``: the method's batch (e.g. two augmented views) in the compute dtype;
2. ``base``: the method's teacher step (the EMA update, from the parameters at the start of
   the iteration), the base network's loss and gradients, and the targets of the
   sub-networks;
3. ``sub``: every sub-network's loss against the targets (preceded, for a method with
   ``teacher_per_width``, by another teacher step from the parameters that sub-network sees);
4. with an online linear probe (``online_probe``), its own update from the base network's
   detached features of the first view, before the training updates; no training program
   reads it;
5. the update. ``accumulate`` (paper) makes one update per iteration with the summed
   gradients (``apply``); ``per_width`` (official code) updates after each width
   (``base_update`` / ``sub_update``), later widths seeing the already-updated parameters,
   and ``finish`` counts the iteration. The method's ``after_step`` (an enqueue) runs last.

Every program is a pure function of arrays, jitted once per (kind, channel configuration):
widths reach compiled code as static Python floats, so a sub-network costs in proportion to
its FLOPs (no ``lax.switch`` or masking, which are slower or keep every branch's residuals).
Gradients stay per-device partial sums between programs where the loss allows it
(``us3l_jax.engine.grads``): one all-reduce per iteration.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from us3l_jax import mesh as mesh_lib
from us3l_jax.engine import grads as grads_lib, online_probe
from us3l_jax.engine.programs import Programs
from us3l_jax.engine.state import TrainState
from us3l_jax.methods.base import Context, Method

UPDATE_MODES = ("accumulate", "per_width")


# ------------------------------------------------------------------------------ state


def init_state(rng: jax.Array, *, method: Method, tx: optax.GradientTransformation,
               view_spec: jax.ShapeDtypeStruct,
               probe: online_probe.OnlineProbe | None = None) -> TrainState:
    """The method's full-width parameters, teacher and queue, the optimizer's state and the
    online probe's (None without one)."""
    init_rng, data_rng = jax.random.split(rng)
    # The extra key is derived from, not split off, ``rng``: methods without a queue keep
    # exactly the initialisation they always had.
    params, teacher, queue = method.init(init_rng, jax.random.fold_in(rng, 1), view_spec)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=teacher,
                      opt_state=tx.init(params), rng=jax.random.key_data(data_rng), queue=queue,
                      probe=None if probe is None else probe.init())


# ------------------------------------------------------------------------------ programs


def views(rng, step, images, labels, *, method: Method):
    """The batch of iteration ``step``; floating arrays in the compute dtype."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    batch = method.views(key, images, labels)
    return jax.tree.map(lambda a: a.astype(method.dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, batch)


def probe_update(params, probe_state, batch, labels, *, probe: online_probe.OnlineProbe):
    """The online probe's update on the first view of the batch (``online_probe.step``)."""
    return online_probe.step(probe, probe_state, params, batch[0], labels)


def _base(params, teacher, queue, constants, step, batch, *, method: Method, width: float,
          mesh: Mesh, sharded: bool):
    """Teacher step, the base network's partial gradients, targets and metrics."""
    metrics = {}
    if method.teacher_step is not None:
        teacher, metrics = method.teacher_step(params, teacher, step)

    def loss_fn(p, ctx, b):
        return method.base_loss(p, ctx, b, width)

    partial, targets, out = grads_lib.partial_grads(
        loss_fn, params, Context(teacher, queue, constants), batch, mesh=mesh, sharded=sharded)
    total = {"loss/total": out["loss/base"], **{k: jnp.float32(0) for k in method.sub_sums}}
    return teacher, partial, targets, {**out, **metrics}, total


def _sub(params, targets, batch, *, method: Method, width: float, mesh: Mesh, sharded: bool):
    # The targets are per-example (sharded like the batch), so they travel with the batch.
    def loss_fn(p, _, targets_and_batch):
        targets, b = targets_and_batch
        loss, metrics = method.sub_loss(p, targets, b, width)
        return loss, (None, {**metrics, "loss": loss})
    partial, _, metrics = grads_lib.partial_grads(loss_fn, params, None, (targets, batch),
                                                  mesh=mesh, sharded=sharded)
    return partial, metrics


def _add(method: Method, total: dict, metrics: dict) -> dict:
    """The running sums after one more sub-network."""
    return {"loss/total": total["loss/total"] + metrics["loss"],
            **{k: total[k] + metrics[k] for k in method.sub_sums}}


def _lr(lr_schedule, step) -> dict:
    return {} if lr_schedule is None else {"lr": lr_schedule(step)}


def base_grads(params, teacher, queue, constants, step, batch, **kw):
    """accumulate mode: (new teacher, partial gradients, targets, metrics, running sums)."""
    return _base(params, teacher, queue, constants, step, batch, **kw)


def _sub_teacher(method: Method, params, teacher, step):
    """The teacher step a sub-network's forward takes (``teacher_per_width``), else none."""
    if not method.teacher_per_width or method.teacher_step is None:
        return teacher
    return method.teacher_step(params, teacher, step)[0]


def _active(method: Method, sub: bool, step, first_sub_step: int | None):
    return None if method.active is None else method.active(sub, step, first_sub_step)


def sub_grads(params, teacher, step, partial, total, targets, batch, *, method: Method, **kw):
    """accumulate mode: the sub-network's teacher step (if per width; every width sees the
    iteration's start parameters here) and its partial gradients added (no communication);
    returns (teacher, partial, running sums, this width's unweighted loss)."""
    teacher = _sub_teacher(method, params, teacher, step)
    g, m = _sub(params, targets, batch, method=method, **kw)
    return teacher, jax.tree.map(jnp.add, partial, g), _add(method, total, m), m["raw"]


def apply_update(state: TrainState, partial, targets, *, method: Method, tx, sub: bool,
                 first_sub_step: int | None, lr_schedule):
    """accumulate mode: reduces the partial gradients once, updates, runs the method's
    ``after_step`` and counts the iteration."""
    step = state.step
    state, gn = grads_lib.update(state, grads_lib.sum_partials(partial), tx,
                                 method.decay(sub, step, first_sub_step),
                                 _active(method, sub, step, first_sub_step))
    state = _after(method, state, targets)
    return state.replace(step=step + 1), {"grad_norm": gn, **_lr(lr_schedule, step)}


def base_update(state: TrainState, constants, batch, *, tx, lr_schedule,
                first_sub_step: int | None, **kw):
    """per_width mode: teacher step, the base network and its own update."""
    teacher, partial, targets, metrics, total = _base(
        state.params, state.ema_params, state.queue, constants, state.step, batch, **kw)
    method = kw["method"]
    state, gn = grads_lib.update(state.replace(ema_params=teacher),
                                 grads_lib.sum_partials(partial), tx,
                                 method.decay(False, state.step, first_sub_step),
                                 _active(method, False, state.step, first_sub_step))
    return state, targets, {**metrics, "grad_norm": gn, **_lr(lr_schedule, state.step)}, total


def sub_update(state: TrainState, total, targets, batch, *, tx, method: Method,
               first_sub_step: int | None, **kw):
    """per_width mode: one sub-network (after its teacher step, if per width, from the
    parameters the earlier widths' updates left) and its own update (one reduction per
    update)."""
    state = state.replace(ema_params=_sub_teacher(method, state.params, state.ema_params,
                                                  state.step))
    g, m = _sub(state.params, targets, batch, method=method, **kw)
    state, gn = grads_lib.update(state, grads_lib.sum_partials(g), tx,
                                 method.decay(True, state.step, first_sub_step),
                                 _active(method, True, state.step, first_sub_step))
    return state, _add(method, total, m), m["raw"], gn


def _after(method: Method, state: TrainState, targets) -> TrainState:
    if method.after_step is None:
        return state
    return state.replace(queue=method.after_step(state.queue, targets))


def finish(state: TrainState, targets, *, method: Method) -> TrainState:
    """per_width mode: the method's ``after_step``; counts the iteration."""
    return _after(method, state, targets).replace(step=state.step + 1)


# ------------------------------------------------------------------------------ the engine


class Engine:
    """Binds a ``Method`` to an optimizer and a mesh and runs its iterations.

    Args:
      method: what to compute (``us3l_jax.methods``).
      tx: an optax transformation (``us3l_jax.optim.make_optimizer``). Its ``update``
        receives the extra arguments ``step=`` (the iteration: schedules must not advance per
        update, since ``per_width`` makes several updates per iteration) and ``decay_mask=``.
      mesh: device mesh; the batch is sharded over its data axis, state replicated.
      batch_size: the global batch; group_size: examples per BN/negative group (None: the
        batch). Together they decide whether gradients can stay per-device partial sums.
      update_mode: ``accumulate`` or ``per_width``.
      lr_schedule: function of the iteration, for the logged learning rate.
      reduce_once: keep per-device partial gradients between programs (one reduction per
        iteration in ``accumulate`` mode); default: in ``accumulate`` mode whenever the
        groups allow, never in ``per_width`` mode (which reduces at every update, and sends
        fewer bytes reducing inside each program). False reduces in every program (same
        results to float32 rounding).
      first_sub_step: the first iteration that trains sub-networks (``sampling.
        first_sub_network_step``; None: none does), for the method's ``decay``.
      probe: an online linear probe (``online_probe.make``) trained beside the method; its
        iterations then need the batch's labels.
    """

    def __init__(self, method: Method, tx: optax.GradientTransformation, mesh: Mesh, *,
                 batch_size: int, group_size: int | None = None,
                 update_mode: str = "accumulate",
                 lr_schedule: Callable[[Any], Any] | None = None, compile_threads: int = 2,
                 reduce_once: bool | None = None, first_sub_step: int | None = 0,
                 probe: online_probe.OnlineProbe | None = None):
        if update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode={update_mode!r} is not one of {UPDATE_MODES}")
        self.method, self.tx, self.mesh, self.lr_schedule = method, tx, mesh, lr_schedule
        self.update_mode, self.probe = update_mode, probe
        local = grads_lib.device_local_groups(group_size, batch_size, mesh.devices.size)
        if reduce_once is None and update_mode == "per_width":
            # Kept per device, a sub-network's gradient would travel full-size and
            # zero-padded (ImageNet ResNet-50, widths 1/0.5/0.25 on 8 devices: 208 MiB per
            # iteration against 379 MiB, from the compiled programs).
            reduce_once = False
        if reduce_once and not local:
            raise ValueError(
                f"reduce_once needs whole BN/negative groups on every device: group_size="
                f"{group_size} must divide the per-device batch {batch_size} / "
                f"{mesh.devices.size}")
        self.sharded = local if reduce_once is None else bool(reduce_once)
        self.programs = Programs(compile_threads)
        self._repl = mesh_lib.replicated(mesh)
        self._batch = mesh_lib.batch_sharding(mesh)
        self._first_sub = None if first_sub_step is None else int(first_sub_step)
        self._constants = None if method.constants is None else jax.device_put(
            method.constants, self._repl)

    # ---------------------------------------------------------------- state

    @property
    def needs_labels(self) -> bool:
        """Whether iterations read the batch's labels (the method's loss or the probe)."""
        return self.method.needs_labels or self.probe is not None

    def _labels_spec(self, image_spec):
        return jax.ShapeDtypeStruct(image_spec.shape[:1], jnp.int32) \
            if self.needs_labels else None

    def _views_spec(self, image_spec):
        return self._labels_spec(image_spec) if self.method.needs_labels else None

    def view_spec(self, image_spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        """Shape and dtype of the (first) view the networks see."""
        return jax.eval_shape(self.method.views, jax.random.key(0), image_spec,
                              self._views_spec(image_spec))[0]

    def init_state(self, rng: jax.Array, image_spec: jax.ShapeDtypeStruct) -> TrainState:
        init = functools.partial(init_state, method=self.method, tx=self.tx,
                                 view_spec=self.view_spec(image_spec), probe=self.probe)
        return jax.jit(init, out_shardings=self._repl)(rng)

    def abstract_state(self, image_spec: jax.ShapeDtypeStruct) -> TrainState:
        """Shapes, dtypes and shardings of the TrainState, computing nothing (for restores)."""
        shapes = jax.eval_shape(functools.partial(
            init_state, method=self.method, tx=self.tx, view_spec=self.view_spec(image_spec),
            probe=self.probe), jax.random.key(0))
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._repl), shapes)

    # ---------------------------------------------------------------- programs
    # Shardings are explicit so that a program compiled ahead of time accepts exactly the
    # arrays the loop produces: state, teacher and metrics replicated; the batch, targets and
    # partial gradients sharded over the data axis (partials replicated in the fallback).

    def _make(self, kind: str, width: float | None = None, sub: bool | None = None):
        r, b = self._repl, self._batch
        g = b if self.sharded else r  # partial gradients
        m = self.method
        s = dict(method=m, mesh=self.mesh, sharded=self.sharded)
        upd = dict(tx=self.tx, first_sub_step=self._first_sub)

        def jit(fn, ins, outs, donate=()):
            return jax.jit(fn, in_shardings=ins, out_shardings=outs, donate_argnums=donate)

        if kind == "views":
            return jit(functools.partial(views, method=m), (r, r, b, b), b)
        if kind == "probe":
            return jit(functools.partial(probe_update, probe=self.probe), (r, r, b, b), (r, r),
                       donate=(1,))
        if kind == "base":
            return jit(functools.partial(base_grads, width=width, **s),
                       (r, r, r, r, r, b), (r, g, b, r, r), donate=(1,))
        if kind == "sub":
            return jit(functools.partial(sub_grads, width=width, **s),
                       (r, r, r, g, r, b, b), (r, g, r, r), donate=(1, 3))
        if kind == "apply":
            return jit(functools.partial(apply_update, method=m, sub=bool(sub),
                                         lr_schedule=self.lr_schedule, **upd),
                       (r, g, b), (r, r), donate=(0,))
        if kind == "base_update":
            return jit(functools.partial(base_update, width=width, lr_schedule=self.lr_schedule,
                                         **upd, **s), (r, r, b), (r, b, r, r), donate=(0,))
        if kind == "sub_update":
            return jit(functools.partial(sub_update, width=width, **upd, **s),
                       (r, r, b, b), (r, r, r, r), donate=(0,))
        if kind == "finish":
            return jit(functools.partial(finish, method=m), (r, b), r, donate=(0,))
        raise ValueError(f"unknown program kind {kind!r}")

    def _program(self, run, kind: str, *args, width: float | None = None,
                 sub: bool | None = None):
        key = (kind, self.method.config_key(width) if width is not None else sub)
        return run(key, lambda: self._make(kind, width, sub), *args)

    @property
    def config_key(self) -> Callable[[float], Any]:
        """Width -> channel configuration (programs are shared between equal ones)."""
        return self.method.config_key

    @property
    def num_programs(self) -> int:
        """Distinct programs created so far (each compiles exactly once)."""
        return len(self.programs)

    # ---------------------------------------------------------------- one iteration

    def iteration(self, run, state, images, widths: Sequence[float], labels=None):
        """One iteration with a custom program runner ``run(key, make, *args)`` (which
        calls ``make()``'s jitted program on ``args``, or traces it): what ``step``,
        ``iteration_keys`` and profilers share."""
        if not widths:
            raise ValueError("widths must contain at least the base width")
        m = self.method
        if len(widths) > 1 and m.sub_loss is None:
            raise ValueError(f"{m.name} trains one width per run, got widths {list(widths)}")
        base_w, subs = float(widths[0]), [float(w) for w in widths[1:]]
        prog = functools.partial(self._program, run)
        batch = prog("views", state.rng, state.step, images,
                     labels if m.needs_labels else None)
        metrics: dict[str, Any] = {}
        if self.probe is not None:
            # From the parameters at the start of the iteration, as the base network's loss.
            probe_state, out = prog("probe", state.params, state.probe, batch, labels)
            state = state.replace(probe=probe_state)
            metrics.update(out)
        if self.update_mode == "accumulate":
            teacher, partial, targets, out, total = prog(
                "base", state.params, state.ema_params, state.queue, self._constants,
                state.step, batch, width=base_w)
            metrics.update(out)
            for i, w in enumerate(subs):
                teacher, partial, total, metrics[f"loss/sub{i}"] = prog(
                    "sub", state.params, teacher, state.step, partial, total, targets, batch,
                    width=w)
            # The base program consumed (donated) the old teacher; hand over the new one.
            state, out = prog("apply", state.replace(ema_params=teacher), partial, targets,
                              sub=bool(subs))
            metrics.update(out)
        else:
            state, targets, out, total = prog("base_update", state, self._constants, batch,
                                              width=base_w)
            metrics.update(out)
            for i, w in enumerate(subs):
                state, total, metrics[f"loss/sub{i}"], metrics[f"grad_norm/sub{i}"] = prog(
                    "sub_update", state, total, targets, batch, width=w)
            state = prog("finish", state, targets)
        metrics.update(total)
        return state, metrics

    def step(self, state: TrainState, images: jax.Array, widths: Sequence[float],
             labels: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
        """Runs iteration ``state.step`` on a uint8 batch (and its int32 labels, for methods
        that need them and the online probe). ``widths[0]`` is the base network's width, the rest are
        sub-networks. Returns the new state and device-side metrics (fetch them only when
        logging, to keep dispatch asynchronous)."""
        if self.needs_labels and labels is None:
            raise ValueError(f"{self.method.name} needs the batch's labels" if
                             self.method.needs_labels else
                             "the online linear probe needs the batch's labels")
        if not self.needs_labels:
            labels = None
        return self.iteration(self.programs.call, state, images, widths, labels)

    def compile_ahead(self, state: TrainState, images: jax.Array,
                      width_sets: Sequence[Sequence[float]]) -> list[futures.Future]:
        """Compiles, in background threads, every program that iterations with these width
        sets run: a dry run of ``step`` on abstract values, so it needs no list of its own.
        ``state``/``images`` may be arrays or ``ShapeDtypeStruct``s. Returns the futures."""
        for widths in width_sets:
            self.iteration_keys(state, images, widths)
        return self.programs.pending()

    def iteration_keys(self, state: TrainState, images: jax.Array,
                       widths: Sequence[float]) -> list[Any]:
        """Keys of the programs an iteration with ``widths`` runs, in order (``(kind,
        channel configuration)``, ``("apply", whether sub-networks trained)`` or ``(kind,
        None)``), from a dry run that also submits their compilation."""
        spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        labels = self._labels_spec(images)
        keys = []

        def record(key, make, *args):
            keys.append(key)
            return self.programs.trace(key, make, *args)

        self.iteration(record, jax.tree.map(lambda a: spec(a, self._repl), state),
                        spec(images, self._batch),
                        widths, None if labels is None else spec(labels, self._batch))
        return keys
