"""Supervised slimmable training (paper Table 1): US-Net and S-Net with cross-entropy.

One iteration over the widths chosen by the sampler (``widths[0]`` is the largest):

1. ``view``: one augmented view of the batch (the linear-evaluation training crops);
2. ``base``: the network at ``widths[0]`` with cross-entropy on the labels; its softmax
   predictions, detached, are the sub-networks' soft targets;
3. ``sub``: every other width with the soft cross-entropy against those targets (inplace
   distillation, ``distill=True``: US-Net and "S-Net+Distill"), or with cross-entropy on
   the labels (``distill=False``: plain S-Net, every width on its own);
4. the update: ``accumulate`` sums the gradients of all widths into one update (US-Net),
   ``per_width`` updates after each width, later widths seeing the updated parameters (the
   official S-Net worker), exactly as the SSL step's two modes.

Universally slimmable (US-Net) or switchable (S-Net) is the backbone's business: an S-Net
backbone (``switchable_widths``) has private BatchNorm per width and the sampler then
trains its whole width list every step. The pure functions below reuse the SSL step's
gradient, update and program machinery (``us3l_jax.train``); ``SupervisedTrainer`` binds
them like ``train.Trainer``.

Parameters: ``{"backbone": <backbone incl. its classifier fc>}``; there is no teacher.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from us3l_jax import mesh as mesh_lib
from us3l_jax import train as train_lib
from us3l_jax.data import augment
from us3l_jax.method import UPDATE_MODES
from us3l_jax.train import TrainState

DECAY = {"backbone": True}  # plain weight decay on everything (the classifier is in it)


@dataclasses.dataclass(frozen=True)
class SupervisedConfig:
    """The supervised loss design.

    * ``distill``: sub-networks learn from the largest width's detached soft predictions
      (inplace distillation) instead of the labels.
    * ``label_smoothing``: of the largest width's (and, without ``distill``, every width's)
      cross-entropy; 0 as the official worker.
    * ``group_size``: examples per BN statistics group (None: the whole batch).
    * ``update_mode``: ``accumulate`` or ``per_width`` (see the module docstring).
    """
    distill: bool = True
    label_smoothing: float = 0.0
    group_size: int | None = None
    update_mode: str = "accumulate"

    def __post_init__(self):
        if self.update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode={self.update_mode!r} is not one of {UPDATE_MODES}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")


# ------------------------------------------------------------------------------ losses


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Mean cross-entropy of ``logits`` [B, C] against integer ``labels`` [B], with the
    targets smoothed towards uniform by ``label_smoothing`` (PyTorch's definition)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return soft_cross_entropy(logits, targets)


def soft_cross_entropy(logits: jax.Array, probs: jax.Array):
    """Mean over the batch of ``-sum_c probs_c log softmax(logits)_c`` (the official inplace
    distillation loss; its gradient is softmax(logits) - probs)."""
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), probs))


def top1(logits: jax.Array, labels: jax.Array):
    """Fraction of rows whose largest logit is the label."""
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def _logits(model: nn.Module, params, x, width: float):
    return model.apply({"params": params["backbone"]}, x, width=width, train=True)


def base_loss(params, x, labels, *, model: nn.Module, cfg: SupervisedConfig, width: float):
    """Cross-entropy of the largest width; aux: (detached softmax predictions, metrics)."""
    logits = _logits(model, params, x, width)
    loss = cross_entropy(logits, labels, cfg.label_smoothing)
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32)))
    return loss, (probs, {"loss/base": loss, "top1/base": top1(logits, labels)})


def sub_loss(params, targets, x, labels, *, model: nn.Module, cfg: SupervisedConfig,
             width: float):
    """A sub-network's loss: soft cross-entropy against ``targets`` (``distill``) or
    cross-entropy on the labels; aux: (None, {"raw": loss})."""
    logits = _logits(model, params, x, width)
    if cfg.distill:
        loss = soft_cross_entropy(logits, targets)
    else:
        loss = cross_entropy(logits, labels, cfg.label_smoothing)
    return loss, (None, {"raw": loss})


# ------------------------------------------------------------------------------ programs


def view(rng, step, images, *, view_cfg: augment.ViewConfig, dtype):
    """The augmented batch of iteration ``step`` in the compute dtype."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return augment.view(key, images, view_cfg).astype(dtype)


def base_grads(params, x, labels, *, model, cfg, width, mesh, sharded):
    """accumulate mode: the largest width's partial gradients, soft targets and metrics."""
    fn = functools.partial(base_loss, model=model, cfg=cfg, width=width)
    partial, targets, metrics = train_lib.partial_grads(fn, params, (), (x, labels),
                                                        mesh=mesh, sharded=sharded)
    return partial, targets, {**metrics, "loss/total": metrics["loss/base"]}


def _sub_partial(params, targets, x, labels, *, model, cfg, width, mesh, sharded):
    fn = functools.partial(sub_loss, model=model, cfg=cfg, width=width)
    partial, _, metrics = train_lib.partial_grads(fn, params, (), (targets, x, labels),
                                                  mesh=mesh, sharded=sharded)
    return partial, metrics["raw"]


def sub_grads(params, partial, total, targets, x, labels, **kw):
    """accumulate mode: adds a sub-network's partial gradients; (partial, total, raw)."""
    g, raw = _sub_partial(params, targets, x, labels, **kw)
    return jax.tree.map(jnp.add, partial, g), total + raw, raw


def base_update(state: TrainState, x, labels, *, tx, lr_schedule, **kw):
    """per_width mode: the largest width and its own update."""
    partial, targets, metrics = base_grads(state.params, x, labels, **kw)
    state, metrics["grad_norm"] = train_lib._update(
        state, train_lib._sum_partials(partial), tx, DECAY)
    if lr_schedule is not None:
        metrics["lr"] = lr_schedule(state.step)
    return state, targets, metrics


def sub_update(state: TrainState, total, targets, x, labels, *, tx, **kw):
    """per_width mode: one sub-network and its own update."""
    g, raw = _sub_partial(state.params, targets, x, labels, **kw)
    state, gn = train_lib._update(state, train_lib._sum_partials(g), tx, DECAY)
    return state, total + raw, raw, gn


def init_state(rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               view_spec: jax.ShapeDtypeStruct) -> TrainState:
    """Full-size parameters (an S-Net's every private BN included), no teacher."""
    init_rng, data_rng = jax.random.split(rng)
    width = max(getattr(model, "switchable_widths", ()) or (1.0,))
    variables = model.init(init_rng, jnp.zeros(view_spec.shape, jnp.float32), width=width,
                           train=True)
    params = {"backbone": flax.core.unfreeze(variables["params"])}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=None,
                      opt_state=tx.init(params), rng=jax.random.key_data(data_rng))


# ------------------------------------------------------------------------------ the trainer


class SupervisedTrainer(train_lib.Trainer):
    """``train.Trainer``'s interface (``init_state``, ``abstract_state``, ``step``,
    ``compile_ahead``, ``num_programs``) for supervised training; ``step`` also takes the
    batch's labels. Programs are cached per (kind, channel configuration) as in SSL.

    Args:
      model: a slimmable backbone with a classifier (``num_classes`` set).
      cfg: the supervised loss design.
      tx, mesh, batch_size, lr_schedule, config_key, compile_threads, reduce_once: as
        ``train.Trainer``.
      view_cfg: the training augmentation (one view per example).
    """

    def __init__(self, model: nn.Module, cfg: SupervisedConfig,
                 tx: optax.GradientTransformation, view_cfg: augment.ViewConfig, mesh: Mesh, *,
                 batch_size: int, lr_schedule: Callable[[Any], Any] | None = None,
                 config_key: Callable[[float], Any] | None = None, compile_threads: int = 2,
                 reduce_once: bool | None = None):
        if getattr(model, "num_classes", None) is None:
            raise ValueError("supervised training needs a backbone with a classifier "
                             "(num_classes set)")
        # Not Trainer.__init__: there is no SSLModel, method or teacher here.
        self.model, self.cfg, self.view_cfg = model, cfg, view_cfg
        self._init_programs(tx, mesh, cfg, batch_size=batch_size, lr_schedule=lr_schedule,
                            config_key=config_key or model.channel_config,
                            compile_threads=compile_threads, reduce_once=reduce_once)
        self._static = dict(model=model, cfg=cfg, mesh=mesh, sharded=self.sharded)

    def view_spec(self, image_spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.eval_shape(functools.partial(augment.view, cfg=self.view_cfg),
                              jax.random.key(0), image_spec)

    def init_state(self, rng: jax.Array, image_spec: jax.ShapeDtypeStruct) -> TrainState:
        init = functools.partial(init_state, model=self.model, tx=self.tx,
                                 view_spec=self.view_spec(image_spec))
        return jax.jit(init, out_shardings=self._repl)(rng)

    def abstract_state(self, image_spec: jax.ShapeDtypeStruct) -> TrainState:
        return abstract_state(self.model, self.tx, self.view_spec(image_spec), self.mesh)

    def _make(self, kind: str, width: float | None = None, sub: bool | None = None):
        r, b = self._repl, self._batch
        g = b if self.sharded else r  # partial gradients
        s, tx, lr = self._static, self.tx, self.lr_schedule
        if kind == "view":
            fn = functools.partial(view, view_cfg=self.view_cfg, dtype=self.model.dtype)
            return self._jit(fn, (r, r, b), b)
        if kind == "base":
            fn = functools.partial(base_grads, width=width, **s)
            return self._jit(fn, (r, b, b), (g, b, r))
        if kind == "sub":
            fn = functools.partial(sub_grads, width=width, **s)
            return self._jit(fn, (r, g, r, b, b, b), (g, r, r), donate=(1,))
        if kind == "apply":
            fn = functools.partial(train_lib.apply_update, tx=tx, decay=lambda _: DECAY,
                                   lr_schedule=lr)
            return self._jit(fn, (r, g), (r, r), donate=(0,))
        if kind == "base_update":
            fn = functools.partial(base_update, tx=tx, lr_schedule=lr, width=width, **s)
            return self._jit(fn, (r, b, b), (r, b, r), donate=(0,))
        if kind == "sub_update":
            fn = functools.partial(sub_update, tx=tx, width=width, **s)
            return self._jit(fn, (r, r, b, b, b), (r, r, r, r), donate=(0,))
        if kind == "finish":
            return self._jit(train_lib.finish, (r,), r, donate=(0,))
        raise ValueError(f"unknown program kind {kind!r}")

    def _iteration(self, run, state, images, widths: Sequence[float], labels=None):
        if not widths:
            raise ValueError("widths must contain at least the base width")
        if labels is None:  # a dry run (compile_ahead) passes abstract images only
            labels = jax.ShapeDtypeStruct(images.shape[:1], jnp.int32, sharding=self._batch)
        base_w, subs = float(widths[0]), [float(w) for w in widths[1:]]
        prog = functools.partial(self._program, run)
        x = prog("view", state.rng, state.step, images)
        metrics: dict[str, Any] = {}
        if self.cfg.update_mode == "accumulate":
            partial, targets, out = prog("base", state.params, x, labels, width=base_w)
            total = out.pop("loss/total")
            metrics.update(out)
            for i, w in enumerate(subs):
                partial, total, metrics[f"loss/sub{i}"] = prog(
                    "sub", state.params, partial, total, targets, x, labels, width=w)
            state, out = prog("apply", state, partial, sub=bool(subs))
            metrics.update(out)
        else:
            state, targets, out = prog("base_update", state, x, labels, width=base_w)
            total = out.pop("loss/total")
            metrics.update(out)
            for i, w in enumerate(subs):
                state, total, metrics[f"loss/sub{i}"], metrics[f"grad_norm/sub{i}"] = prog(
                    "sub_update", state, total, targets, x, labels, width=w)
            state = prog("finish", state)
        metrics["loss/total"] = total
        return state, metrics

    def step(self, state: TrainState, images: jax.Array, widths: Sequence[float],
             labels: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
        """Runs iteration ``state.step`` on a uint8 batch and its int32 labels."""
        if labels is None:
            raise ValueError("supervised training needs the batch's labels")
        return self._iteration(self.programs.call, state, images, widths, labels)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation,
                   view_spec: jax.ShapeDtypeStruct, mesh: Mesh | None = None) -> TrainState:
    """Shapes of the supervised TrainState (replicated over ``mesh`` when given)."""
    shapes = jax.eval_shape(functools.partial(init_state, model=model, tx=tx,
                                              view_spec=view_spec), jax.random.key(0))
    if mesh is None:
        return shapes
    repl = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), shapes)
