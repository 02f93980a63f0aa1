"""What a training method is to the engine: a ``Method`` of pure functions (optax style).

The engine (``us3l_jax.engine``) owns everything a method shares with the others: programs,
shardings, ahead-of-time compilation, the ``accumulate`` / ``per_width`` updates and the
one-all-reduce path. A method only says what to compute, as functions of arrays:

* ``init(params_key, extra_key, view_spec)``: full-width parameters, the teacher copy (or
  None) and the key queue (or None);
* ``views(key, images, labels)``: the batch every program of an iteration reads (a tuple of
  per-example arrays: two augmented views, or one view and its labels);
* ``teacher_step(params, teacher, step)``: before the loss, once per iteration (the EMA step
  of a momentum teacher); returns the new teacher and metrics. With ``teacher_per_width``
  also before every sub-network's loss, from the parameters that sub-network sees (the
  official US+MoCo v3, whose every width's forward takes an EMA step);
* ``base_loss(params, context, batch, width)``: the base network's loss and, as aux,
  (targets, metrics). The targets (a NamedTuple or array of per-example values) are what the
  sub-networks learn from, and what ``after_step`` reads;
* ``sub_loss(params, targets, batch, width)``: a sub-network's loss and metrics
  (``"raw"``, the unweighted loss, and the running sums named in ``sub_sums``); None for
  single-width methods;
* ``after_step(queue, targets)``: after the iteration's updates (MoCo/SEED's enqueue);
* ``decay(sub, step, first_sub_step)``: which top-level parameter groups an update decays;
* ``active(sub, step, first_sub_step)``: which groups have a gradient in an update, as
  PyTorch sees it (a loss has reached them in this update or an earlier one), for an
  optimizer that skips the others (``optim.scale_by_adam_per_param``); None: all, always;
* ``config_key(width)``: the channel configuration of a width (programs are shared between
  widths with the same one).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any
Metrics = dict[str, jax.Array]


class Context(NamedTuple):
    """What the base loss reads besides the parameters and the batch."""
    teacher: PyTree  # momentum teacher parameters (after this iteration's EMA step) or None
    queue: PyTree  # key queue or None
    constants: PyTree  # e.g. a frozen teacher's variables, or None


class Method(NamedTuple):
    """A training method as pure functions; see the module docstring."""
    init: Callable[[jax.Array, jax.Array, jax.ShapeDtypeStruct], tuple[PyTree, PyTree, PyTree]]
    views: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, ...]]
    base_loss: Callable[..., tuple[jax.Array, tuple[Any, Metrics]]]
    decay: Callable[[bool, jax.Array, int | None], dict[str, Any]]
    config_key: Callable[[float], Any]
    dtype: Any  # compute dtype of the views
    sub_loss: Callable[..., tuple[jax.Array, Metrics]] | None = None
    teacher_step: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, Metrics]] | None = None
    after_step: Callable[[PyTree, Any], PyTree] | None = None
    active: Callable[[bool, jax.Array, int | None], dict[str, Any]] | None = None
    teacher_per_width: bool = False
    constants: PyTree = None
    sub_sums: tuple[str, ...] = ()
    needs_labels: bool = False
    name: str = "method"


def decay_all(groups: frozenset[str]) -> Callable[[bool, jax.Array, int | None], dict]:
    """Plain weight decay on every group, whatever the update (PyTorch SGD's weight_decay)."""
    flags = {k: True for k in groups}
    return lambda sub, step, first_sub_step: flags
