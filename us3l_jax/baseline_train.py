"""The step of the single-width baselines the US3L step does not cover: SEED and SEED-MSE (a
frozen pretrained teacher, ``us3l_jax.teacher``) and MoCo v2 (an EMA key encoder and a queue of
keys, ``us3l_jax.keyqueue``).

One program per iteration after the views: teacher (EMA update first for MoCo), loss, one
optimizer update, then the batch's keys enter the queue (after the loss used the old queue, as
the official code). What each method computes (official ``seed.py`` / ``moco.py``):

The frozen teacher's BNs use batch statistics or, when its variables hold ``batch_stats``
(``teacher.bn`` 'calibrated' / 'stored'), run in eval mode.

* SEED: student and teacher embed view 1; soft cross-entropy of their similarity
  distributions over [teacher embedding, queue] (``objectives.seed_distill``); the normalised
  teacher embeddings are enqueued.
* SEED-MSE: the student's predictor output against the teacher's projection of the other view
  (negative cosine, both view pairs), like BYOL with a frozen teacher; no queue.
* MoCo v2: query = online view 1, key = EMA encoder on view 2 (BN statistics per group of the
  batch stand in for shuffle-BN across GPUs); InfoNCE against the key and the queue
  (``objectives.moco_infonce``); the normalised keys are enqueued.

All parameters get weight decay (the official baselines use plain SGD weight decay on every
parameter).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from us3l_jax import keyqueue, objectives
from us3l_jax import train as train_lib
from us3l_jax.method import MethodConfig, ema_momentum, ema_update
from us3l_jax.models.heads import SSLModel
from us3l_jax.train import Trainer, TrainState

sg = jax.lax.stop_gradient


def _encode(model: SSLModel, params, x, width: float):
    return model.apply({"params": params}, x, width, method=SSLModel.encode)


def _teacher_encode(model: SSLModel, variables, x, width: float):
    """The teacher's projection of ``x``, detached; eval mode when ``variables`` hold BN
    statistics (a frozen teacher with ``teacher.bn`` 'calibrated' or 'stored')."""
    return sg(model.apply(variables, x, width, "batch_stats" not in variables,
                          method=SSLModel.encode))


def baseline_loss(params, teacher_vars, queue, v1, v2, *, model: SSLModel,
                  teacher_model: SSLModel, method: MethodConfig, width: float,
                  teacher_width: float):
    """The loss of one baseline; aux: (keys to enqueue or None, metrics). ``teacher_vars``:
    the teacher's variables (``{'params'[, 'batch_stats']}``)."""
    if method.base_loss == "seed":
        z = _encode(model, params, v1, width)
        keys = objectives.l2_normalize(_teacher_encode(teacher_model, teacher_vars, v1,
                                                       teacher_width))
        loss = objectives.seed_distill(z, keys, queue["keys"], method.tau, method.teacher_tau)
    elif method.base_loss == "moco":
        z = _encode(model, params, v1, width)
        keys = objectives.l2_normalize(_teacher_encode(teacher_model, teacher_vars, v2,
                                                       teacher_width))
        loss = objectives.moco_infonce(z, keys, queue["keys"], method.tau)
    else:  # SEED-MSE: BYOL's loss against the frozen teacher
        if "batch_stats" in teacher_vars:  # eval mode: both views in one pass, always
            k = _teacher_encode(teacher_model, teacher_vars, jnp.concatenate([v1, v2]),
                                teacher_width)
            targets = (k[:v1.shape[0]], k[v1.shape[0]:])
        else:  # batch statistics: both views in one pass where BN groups allow
            targets = train_lib.teacher_outputs(teacher_vars["params"], v1, v2,
                                                model=teacher_model, width=teacher_width)
        loss, z, _ = train_lib._own_loss(model, method, params, v1, v2, width, targets)
        keys = None
    return loss, (keys, {"loss/base": loss, "embed_std": objectives.embedding_std(z)})


def baseline_step(state: TrainState, v1, v2, frozen, *, tx, lr_schedule, model: SSLModel,
                  teacher_model: SSLModel, method: MethodConfig, width: float,
                  teacher_width: float, total_steps: int, mesh, sharded: bool):
    """One iteration: (new state, metrics). ``frozen``: the frozen teacher's variables (None
    for MoCo, whose teacher is ``state.ema_params``)."""
    mom, ema = jnp.float32(0), state.ema_params
    if method.teacher == "ema":
        mom = ema_momentum(method, state.step, total_steps)
        ema = ema_update(ema, state.params, mom)
        frozen = {"params": ema}
    loss_fn = functools.partial(baseline_loss, model=model, teacher_model=teacher_model,
                                method=method, width=width, teacher_width=teacher_width)
    partial, keys, metrics = train_lib.partial_grads(
        loss_fn, state.params, (frozen, state.queue), (v1, v2), mesh=mesh, sharded=sharded)
    step = state.step
    state, gn = train_lib._update(state.replace(ema_params=ema),
                                  train_lib._sum_partials(partial), tx,
                                  train_lib.decay_flags(method, True, step, None))
    queue = state.queue if keys is None else keyqueue.enqueue(state.queue, keys)
    metrics = {**metrics, "ema_momentum": mom, "loss/total": metrics["loss/base"],
               "grad_norm": gn}
    if lr_schedule is not None:
        metrics["lr"] = lr_schedule(step)
    return state.replace(step=step + 1, queue=queue), metrics


class BaselineTrainer(Trainer):
    """``Trainer`` for SEED, SEED-MSE and MoCo v2: one width per iteration (the sampler's
    individual width), a frozen ``teacher`` (``us3l_jax.teacher.FrozenTeacher``, not imported
    here: the teacher module builds models through ``us3l_jax.build``) for SEED/SEED-MSE."""

    def __init__(self, model: SSLModel, method: MethodConfig, tx, views_fn, mesh, *,
                 teacher: Any = None, **kw: Any):
        super().__init__(model, method, tx, views_fn, mesh, **kw)
        if (method.teacher == "frozen") != (teacher is not None):
            raise ValueError("a frozen teacher is needed exactly when method.teacher='frozen'")
        self.teacher = teacher
        self.teacher_vars = None if teacher is None else jax.device_put(teacher.variables,
                                                                        self._repl)
        self._teacher_model = model if teacher is None else teacher.model
        if teacher is not None:
            self._teacher["teacher_width"] = teacher.width

    def _make(self, kind: str, width: float | None = None, sub: bool | None = None):
        if kind != "baseline":
            return super()._make(kind, width, sub)
        r, b = self._repl, self._batch
        fn = functools.partial(baseline_step, tx=self.tx, lr_schedule=self.lr_schedule,
                               width=width, teacher_model=self._teacher_model, **self._static,
                               **self._teacher)
        return self._jit(fn, (r, b, b, r), (r, r), donate=(0,))

    def _iteration(self, run, state, images, widths: Sequence[float]):
        if len(widths) != 1:
            raise ValueError(f"{self.method.base_loss!r} with teacher={self.method.teacher!r} "
                             f"trains one width per run, got widths {list(widths)}")
        prog = functools.partial(self._program, run)
        v1, v2 = prog("views", state.rng, state.step, images)
        return prog("baseline", state, v1, v2, self.teacher_vars, width=float(widths[0]))
