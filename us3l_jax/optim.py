"""Grouped weight decay (paper §3.2.3), the SGD/LARS optimizer and AdamW; where the official
code differs from the paper: docs/fidelity.md, "Group regularization", "Weight decay" and
"Vision Transformers and MoCo v3".

Group regularization gives the trailing channels of a layer — used only by wide sub-networks —
a smaller L2 coefficient: channel group i of G gets λ_i = λ·(1 − α_t·i). The official code adds
R = Σ λ_i·p² (no ½) to the loss, whose gradient is 2·λ_i·p; here that gradient is added to the
updates by an optax transform, so λ = 5e-5 is weight decay 1e-4 and α = 0 is plain L2.

Schedules (learning rate, α ramp) read the update count kept in their state, or the training
iteration passed as the extra argument ``step=`` to ``update``. Pass ``step`` whenever one
iteration makes several optimizer updates (the official per-width updates), otherwise the
schedules would advance once per update.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
PyTree = Any
Schedule = Callable[[Any], Array]
MaskOrFn = PyTree | Callable[[PyTree], PyTree] | None

GROUP_RULES = ("official", "paper")


# ------------------------------------------------------------------------------------------
# Per-channel factors and the α ramp
# ------------------------------------------------------------------------------------------


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def group_indices(size: int, groups: int, rule: str = "official") -> np.ndarray:
    """Group index of each of ``size`` channels (0 = leading channels, most decay).

    ``"official"`` (GroupReg.py): K_G = K // G and channel c (0-based) is in group
    min(c // K_G, G − 1), so the last group absorbs the remainder; with K < G every channel is
    in group G − 1. ``"paper"`` (Eq. 5): ⌊k / K_G⌋ with 1-based k, i.e. the boundaries shift by
    one channel and the last channel (K divisible by G) reaches index G, a factor 1 − G·α
    (the "max decay fraction G×α" of appendix B.3); K_G is at least 1.
    """
    size = _check_positive_int("size", size)
    groups = _check_positive_int("groups", groups)
    c = np.arange(size)
    kg = size // groups
    if rule == "official":
        if kg == 0:
            return np.full(size, groups - 1)
        return np.minimum(c // kg, groups - 1)
    if rule == "paper":
        return (c + 1) // max(kg, 1)
    raise ValueError(f"unknown group rule {rule!r}; valid: {', '.join(GROUP_RULES)}")


def group_decay_factors(size: int, groups: int, alpha_t: float,
                        rule: str = "official") -> np.ndarray:
    """Per-channel factors 1 − α_t·i (λ_i = λ·factor) for a grouped axis of ``size`` channels."""
    return 1.0 - float(alpha_t) * group_indices(size, groups, rule)


def alpha_schedule(alpha: float, t: Any, warmup: int, total: int) -> Array:
    """α_t of the official ``cal_lambda`` at time ``t`` (epochs officially, or steps).

    0 before ``warmup`` (plain L2); then a linear ramp reaching α at ``total // 2``; α after.
    If ``warmup >= total // 2`` there is no ramp: α from ``warmup`` on. Traceable in ``t``.
    """
    total = _check_positive_int("total", total)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    half = total // 2
    zero, full = optax.constant_schedule(0.0), optax.constant_schedule(alpha)
    if warmup >= half:
        pieces, boundaries = [zero, full], [warmup]
    else:  # not optax.linear_schedule: its α_t cancels near 0 (5e-4 relative; see cosine_lr)
        pieces, boundaries = [zero, lambda c: alpha * c / (half - warmup), full], [warmup, half]
    t = jnp.asarray(t, jnp.float32)
    return jnp.asarray(optax.join_schedules(pieces, boundaries)(t), jnp.float32)


def default_group_axis(shape: tuple[int, ...]) -> int | None:
    """Axis grouped by the official GroupReg, in Flax layouts; None = uniform λ.

    Conv kernels (4-D, HWIO): the output channels, the last axis (PyTorch's dim 0; depthwise
    kernels (kh, kw, 1, C) too). 1-D parameters (BN scale/bias, biases): axis 0. Dense kernels
    (2-D) and anything else: uniform.
    """
    if len(shape) == 4:
        return 3
    if len(shape) == 1:
        return 0
    return None


def output_channel_axis(path: tuple[str, ...], shape: tuple[int, ...]) -> int | None:
    """The CNN grouping (``GroupReg.py``) as a ``group_axis``: ``default_group_axis(shape)``."""
    del path
    return default_group_axis(shape)


def linear_input_axis(path: tuple[str, ...], shape: tuple[int, ...]) -> int | None:
    """The official ViT ``--group-regularizer`` grouping as a ``group_axis``: every PyTorch
    ``nn.Linear`` weight (the only 2-D tensors there) is grouped along its input features,
    the side a ViT sub-network slices; every other tensor gets a uniform λ.

    In Flax layouts a Linear weight is a ``kernel`` stored (in, out), so its input is axis 0;
    the ViT's qkv kernel is stored (d, 3, heads, head_dim) (torch's (3d, d) weight) and is
    grouped on axis 0 too. The 4-D patch-embedding kernel is a conv (uniform in the official
    code as well), biases, norms and the class token are uniform.
    """
    if not path or path[-1] != "kernel":
        return None
    if len(shape) == 2 or (len(shape) == 4 and path[-2:] == ("qkv", "kernel")):
        return 0
    return None


GROUPINGS: dict[str, Callable[[tuple[str, ...], tuple[int, ...]], int | None]] = {
    "output_channels": output_channel_axis, "linear_inputs": linear_input_axis}


# ------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------


class CountState(NamedTuple):
    """Number of updates applied so far (the schedules' time when no ``step`` is passed)."""
    count: Array


def _init_count(params: PyTree) -> CountState:
    del params
    return CountState(count=jnp.zeros([], jnp.int32))


def _schedule_time(state: CountState, step: Any, steps_per_epoch: int | None) -> Array:
    """Schedule time: ``step`` (or the update count), in epochs if ``steps_per_epoch``."""
    t = state.count if step is None else jnp.asarray(step, jnp.int32)
    return t // steps_per_epoch if steps_per_epoch else t


def _resolve_mask(mask: MaskOrFn, params: PyTree) -> PyTree:
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask


def _keys(path) -> tuple[str, ...]:
    """A pytree path as its dict keys (``('backbone', 'blocks_0', ...)``)."""
    return tuple(str(getattr(k, "key", k)) for k in path)


def _check_units(steps_per_epoch: int | None) -> int | None:
    return None if steps_per_epoch is None else _check_positive_int(
        "steps_per_epoch", steps_per_epoch)


def grouped_weight_decay(
    lam: float,
    alpha: float = 0.05,
    groups: int = 8,
    *,
    warmup: int = 0,
    total: int,
    steps_per_epoch: int | None = None,
    mask: MaskOrFn = None,
    rule: str = "official",
    group_axis: Callable[[tuple[str, ...], tuple[int, ...]], int | None] = output_channel_axis,
) -> optax.GradientTransformationExtraArgs:
    """Adds the gradient of the group regularizer, 2·λ_i·p, to the updates.

    Args:
      lam: λ of R = Σ λ_i·p² (the official ``REGULARIZER_LAMBDA``; 5e-5 ⇔ weight decay 1e-4).
      alpha: decay reduction per group (0.05); α = 0 is exactly
        ``optax.add_decayed_weights(2 * lam)``.
      groups: G, number of channel groups (8).
      warmup, total: α ramp (``alpha_schedule``) in epochs if ``steps_per_epoch`` is given
        (official), else in steps.
      mask: pytree of Python bools (or a function of params giving one): True = regularized;
        a leaf may also be a scalar bool array, decided on device. The momentum teacher is not an optimizer parameter at all, so needs no mask. ``update``
        also takes ``decay_mask=`` to override it for one call (e.g. to leave the auxiliary
        head out at width 1.0, as the official code does).
      rule: "official" or "paper" channel grouping (``group_indices``).
      group_axis: which axis of a parameter is grouped (None = uniform λ), from its path
        (the dict keys leading to it) and shape: ``output_channel_axis`` (CNNs, default) or
        ``linear_input_axis`` (the official ViT regularizer); ``GROUPINGS`` names both.

    ``update(updates, state, params, step=None, decay_mask=None)``: ``step`` is the training
    iteration (defaults to this transform's update count).
    """
    if not lam >= 0:
        raise ValueError(f"lam (regularization strength) must be >= 0, got {lam!r}")
    groups = _check_positive_int("groups", groups)
    if rule not in GROUP_RULES:
        raise ValueError(f"unknown group rule {rule!r}; valid: {', '.join(GROUP_RULES)}")
    steps_per_epoch = _check_units(steps_per_epoch)
    alpha_schedule(alpha, 0, warmup, total)  # validates warmup/total now, not at first update

    def update_fn(updates, state, params=None, *, step=None, decay_mask=None, **extra):
        del extra
        if params is None:
            raise ValueError("grouped_weight_decay needs params: call update(grads, state, params)")
        alpha_t = alpha_schedule(alpha, _schedule_time(state, step, steps_per_epoch),
                                 warmup, total)
        masks = _resolve_mask(mask if decay_mask is None else decay_mask, params)

        def decay(path, u, p, m):
            if isinstance(m, (bool, np.bool_)) and not m:
                return u
            axis = group_axis(_keys(path), p.shape) if alpha != 0 else None
            if axis is None:
                coef = jnp.asarray(2.0 * lam, jnp.float32)
            else:
                idx = group_indices(p.shape[axis], groups, rule).astype(np.float32)
                shape = [1] * p.ndim
                shape[axis] = p.shape[axis]
                coef = 2.0 * lam * (1.0 - alpha_t * jnp.asarray(idx.reshape(shape)))
            term = coef * p
            if not isinstance(m, (bool, np.bool_)):  # decided on device (a scalar bool array)
                term = jnp.where(m, term, 0.0)
            return u + term.astype(u.dtype)

        new = jax.tree_util.tree_map_with_path(decay, updates, params, masks)
        return new, CountState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(_init_count, update_fn)


def scale_by_schedule_at(schedule: Schedule) -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by −schedule(t) (gradient descent), t = ``step`` extra arg or count.

    ``schedule`` takes step numbers (``cosine_lr`` converts them to epochs itself).
    """

    def update_fn(updates, state, params=None, *, step=None, **extra):
        del params, extra
        lr = schedule(_schedule_time(state, step, None))
        new = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
        return new, CountState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(_init_count, update_fn)


# ------------------------------------------------------------------------------------------
# Learning rate and the optimizer
# ------------------------------------------------------------------------------------------


def cosine_lr(base_lr: float, total: int, *, steps_per_epoch: int | None = None,
              warmup: int = 0) -> Schedule:
    """Cosine learning rate as a function of the step number (traceable).

    With ``steps_per_epoch`` the time unit is the epoch e = step // steps_per_epoch and the rate
    is constant within an epoch (official: lr(e) = base·½(1 + cos(π·e/E)), ``total`` = E).
    Without it ``total``/``warmup`` are steps. A linear warm-up gives base·(t + 1)/warmup for
    t < warmup, then the cosine runs over the remaining total − warmup (the two pieces joined
    by ``optax.join_schedules``).

    The pieces are written out rather than ``optax.cosine_decay_schedule`` and
    ``optax.linear_schedule``, whose float32 forms ½(1 + cos) and (init − end)·frac + end
    cancel where the rate is small: they agree with these to about 1.5e-7·base at every step,
    but not relative to the rate itself (0.3% at the last epoch of an 800-epoch run; exactly 0
    instead of a small rate over the last steps of a per-step schedule; about warmup·3e-8 at
    the first warm-up step). Here the cosine is base·cos²(π/2·frac), the same value accurate
    near the end.
    """
    total = _check_positive_int("total", total)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) \
            or not 0 <= warmup < total:
        raise ValueError(f"warmup must be an integer in [0, total={total}), got {warmup!r}")
    if not base_lr > 0:
        raise ValueError(f"base learning rate must be > 0, got {base_lr!r}")
    steps_per_epoch = _check_units(steps_per_epoch)

    def cosine(c):  # c: time since the warm-up ended
        frac = jnp.clip(c / (total - warmup), 0.0, 1.0)
        return base_lr * jnp.square(jnp.cos(0.5 * math.pi * frac))

    curve = cosine if not warmup else optax.join_schedules(
        [lambda t: base_lr * (t + 1) / warmup, cosine], [warmup])

    def schedule(step):
        t = jnp.asarray(step, jnp.int32)
        t = (t // steps_per_epoch if steps_per_epoch else t).astype(jnp.float32)
        return jnp.asarray(curve(t), jnp.float32)

    return schedule


def make_optimizer(
    base_lr: float,
    total: int,
    *,
    steps_per_epoch: int | None = None,
    warmup: int = 0,
    momentum: float = 0.9,
    nesterov: bool = False,
    reg_lambda: float = 0.0,
    reg_alpha: float = 0.0,
    reg_groups: int = 8,
    reg_warmup: int = 0,
    reg_rule: str = "official",
    decay_mask: MaskOrFn = None,
    lars: bool = False,
    trust_coefficient: float = 0.001,
    lars_mask: MaskOrFn = None,
) -> tuple[optax.GradientTransformationExtraArgs, Schedule]:
    """SGD with momentum (PyTorch semantics), grouped weight decay and a cosine schedule.

    Order per update: g + 2·λ_i·p (``grouped_weight_decay``; skipped when ``reg_lambda`` is 0)
    → optional LARS trust ratio (trust·||p||/||u||, as apex LARC with clip=False; ``lars_mask``
    picks the adapted params, default all) → momentum buffer b = μ·b + u → −lr(t)·b. So
    ``reg_lambda=5e-5, reg_alpha=0`` is ``torch.optim.SGD(lr, momentum=0.9, weight_decay=1e-4)``.
    ``total``, ``warmup`` and ``reg_warmup`` are epochs when ``steps_per_epoch`` is given
    (official: per-epoch lr and α), else steps.

    Returns ``(tx, lr_schedule)``; ``tx.update`` takes the extra args ``step=`` (the training
    iteration; needed when an iteration makes several updates) and ``decay_mask=``.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not trust_coefficient > 0:
        raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient!r}")
    schedule = cosine_lr(base_lr, total, steps_per_epoch=steps_per_epoch, warmup=warmup)
    parts = []
    if reg_lambda:
        parts.append(grouped_weight_decay(
            reg_lambda, reg_alpha, reg_groups, warmup=reg_warmup, total=total,
            steps_per_epoch=steps_per_epoch, mask=decay_mask, rule=reg_rule))
    if lars:
        trust = optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient)
        parts.append(trust if lars_mask is None else optax.masked(trust, lars_mask))
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(scale_by_schedule_at(schedule))
    return optax.chain(*parts), schedule


ADAM_COUNTS = ("global", "per_param")


class AdamPerParamState(NamedTuple):
    """Adam's state with PyTorch's bookkeeping: ``count`` holds, per parameter (leaf), the
    number of updates it has taken part in (torch's ``state['step']``); 0 = not yet."""
    count: PyTree
    mu: PyTree
    nu: PyTree


def scale_by_adam_per_param(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                            ) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_adam`` with one step count per parameter, as ``torch.optim.AdamW``.

    PyTorch skips a parameter whose ``.grad`` is None: no step count, no moment update, no
    decay. A parameter's ``.grad`` is None until a loss first reaches it; after that
    ``zero_grad()`` (``set_to_none=False``, the default of PyTorch 1.x, which the official code
    pins at 1.10) leaves a zero tensor, so it takes part in every later step, with a zero
    gradient when the step's loss does not reach it. optax instead counts every update for
    every parameter, so a parameter first reached late (US3L's auxiliary head) gets its first
    bias corrections at a large count: a first update about (1 − b1)/√(1 − b2) ≈ 3.2 times
    PyTorch's, decaying back over thousands of updates.

    ``update(updates, state, params=None, *, active_mask=None)``: ``active_mask`` (a pytree
    like the parameters of Python bools or scalar bool arrays; default all True) marks the
    parameters whose gradient this update's loss defines. A parameter is stepped when it is
    marked now or has been stepped before (count > 0), as PyTorch's. The moments are those of
    ``optax.scale_by_adam`` (same helpers), the update (m/(1 − b1^t)) / (√(v/(1 − b2^t)) + eps)
    with t the parameter's own count: PyTorch's m/(1 − b1^t) / (√v/√(1 − b2^t) + eps).
    """

    def init_fn(params):
        return AdamPerParamState(count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
                                 mu=optax.tree.zeros_like(params),
                                 nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None, *, active_mask=None, **extra):
        del params, extra
        marked = _resolve_mask(active_mask, updates)
        on = jax.tree.map(lambda c, a: jnp.logical_or(c > 0, a), state.count, marked)
        count = jax.tree.map(lambda c, o: jnp.where(o, optax.safe_increment(c), c),
                             state.count, on)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)

        def step(m, v, t, o, m0, v0):
            t = jnp.maximum(t, 1)  # a parameter never stepped: its (unused) update stays finite
            m_hat = optax.tree.bias_correction(m, b1, t)
            v_hat = optax.tree.bias_correction(v, b2, t)
            u = m_hat / (jnp.sqrt(v_hat) + eps)
            return jnp.where(o, u, 0.0).astype(m.dtype), jnp.where(o, m, m0), jnp.where(o, v, v0)

        out = jax.tree.map(step, mu, nu, count, on, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)
        return pick(0), AdamPerParamState(count=count, mu=pick(1), nu=pick(2))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_adamw(
    base_lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay_mask: MaskOrFn = None,
    count: str = "global",
    reg_lambda: float = 0.0,
    reg_alpha: float = 0.0,
    reg_groups: int = 8,
    reg_warmup_epochs: int = 0,
    steps_per_epoch: int | None = None,
    reg_rule: str = "official",
    group_axis: Callable[[tuple[str, ...], tuple[int, ...]], int | None] = linear_input_axis,
) -> tuple[optax.GradientTransformationExtraArgs, Schedule]:
    """AdamW as ``torch.optim.AdamW`` (decoupled decay: p ← p − lr·(adam + wd·p)) with MoCo
    v3's per-iteration schedule: linear warm-up from 0 over ``warmup_steps``, then cosine to 0
    at ``total_steps``. ``tx.update`` takes ``step=`` (schedule time) and ``decay_mask=`` like
    ``make_optimizer``. Adam's moments and bias correction count updates, as PyTorch's do
    (several per iteration in the per-width mode).

    ``count``: ``"global"`` (``optax.scale_by_adam``: one count for all parameters, advanced by
    every update) or ``"per_param"`` (``scale_by_adam_per_param``: PyTorch's count per
    parameter from its first gradient; ``tx.update`` then reads ``active_mask=``).

    ``reg_lambda`` > 0 adds the official ViT ``--group-regularizer`` term R = Σ λ_i·p² to the
    loss, i.e. 2·λ_i·p to the gradient before Adam (``grouped_weight_decay`` with
    ``group_axis``, default ``linear_input_axis``; α ramp in epochs of ``steps_per_epoch``
    iterations, which it then needs). The official code sets AdamW's own weight decay to 0
    then, so ``weight_decay`` must be 0 with it; ``decay_mask=`` applies to whichever is on.
    """
    total_steps = _check_positive_int("total_steps", total_steps)
    if isinstance(warmup_steps, bool) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be an integer in [0, {total_steps}), got "
                         f"{warmup_steps!r}")
    if not base_lr > 0:
        raise ValueError(f"base learning rate must be > 0, got {base_lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if count not in ADAM_COUNTS:
        raise ValueError(f"count={count!r} is not one of {ADAM_COUNTS}")
    if reg_lambda and weight_decay:
        raise ValueError(f"reg_lambda={reg_lambda} (group regularization) replaces AdamW's "
                         f"weight decay, as in the official code: set weight_decay=0, or "
                         f"reg_lambda=0 to keep the decay (got weight_decay={weight_decay})")
    schedule = optax.warmup_cosine_decay_schedule(0.0, base_lr, int(warmup_steps),
                                                  total_steps, end_value=0.0)
    parts = []
    if reg_lambda:
        spe = _check_units(steps_per_epoch)
        if spe is None:
            raise ValueError("group regularization with AdamW ramps alpha per epoch: pass "
                             "steps_per_epoch")
        parts.append(grouped_weight_decay(
            reg_lambda, reg_alpha, reg_groups, warmup=reg_warmup_epochs,
            total=max(total_steps // spe, 1), steps_per_epoch=spe, mask=decay_mask,
            rule=reg_rule, group_axis=group_axis))
    parts.append(scale_by_adam_per_param(b1, b2, eps) if count == "per_param"
                 else optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        # grouped_weight_decay with alpha 0 adds 2·lam·p = wd·p and honours decay_mask=.
        parts.append(grouped_weight_decay(weight_decay / 2.0, 0.0, total=total_steps,
                                          mask=decay_mask))
    parts.append(scale_by_schedule_at(lambda t: schedule(t).astype(jnp.float32)))
    return optax.chain(*parts), lambda t: schedule(t).astype(jnp.float32)


def freeze(tx: optax.GradientTransformation,
           prefixes: Sequence[tuple[str, ...]]) -> optax.GradientTransformationExtraArgs:
    """``tx`` for every parameter except those under one of ``prefixes`` (paths of dict keys,
    e.g. ``('backbone', 'patch_embed')``), which ``optax.set_to_zero`` never changes and which
    have no optimizer state: as a PyTorch parameter with ``requires_grad=False``, which the
    optimizer skips (no step, no weight decay, no momentum). A zero gradient alone is not
    enough: decay would still shrink it. ``optax.multi_transform`` masks the extra args shaped
    like the parameters (``decay_mask=``) for ``tx``; ``step=`` passes through."""
    tx = optax.with_extra_args_support(tx)
    prefixes = tuple(tuple(p) for p in prefixes)
    if not prefixes:
        return tx

    def labels(params):
        def label(path, _):
            keys = _keys(path)
            return "frozen" if any(keys[:len(p)] == p for p in prefixes) else "trained"
        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels,
                                 mask_compatible_extra_args=True)
