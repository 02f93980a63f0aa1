"""The loss design of a run (paper Table 7 as flags) and the momentum teacher's schedule.

``MethodConfig`` is the single statement of the method's fields and defaults: the config
schema (``config.get_default``) is derived from it, and the step (``us3l_jax.train``) reads it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

BASE_LOSSES = ("infonce", "mse", "mocov3")
DISTILL_LOSSES = ("none", "mse", "infonce", "mocov3")
AUX_HEAD_INITS = ("independent", "copy")
AUX_HEADS = ("none", "shared", "new")
UPDATE_MODES = ("accumulate", "per_width")
EMA_SCHEDULES = ("constant", "cosine")
TEACHER_KEYS = ("backbone", "projector")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The loss design of paper Table 7 as flags; US3L is case 13 (the defaults).

    * ``base_loss``: ``infonce`` (NT-Xent: against the teacher's other view when
      ``momentum_base``, else SimCLR between the two online views) or ``mse`` (negative cosine
      of the predictor output against the teacher / the stop-gradient online other view:
      BYOL / SimSiam), or ``mocov3`` (MoCo v3: the predictor's queries against the teacher's
      keys of the other view, ``objectives.moco_v3``; needs ``momentum_base``).
    * ``distill_loss``: loss of each sub-network against the targets; ``none`` trains every
      sub-network with the base loss on its own outputs (no inplace distillation).
    * ``aux_head``: ``new`` (a separate head g for sub-networks, Eq. 3), ``shared`` (the base
      network's predictor; needs ``base_loss='mse'``), or ``none``.
    * ``momentum_base`` / ``momentum_sub``: targets from the EMA teacher (width 1.0) for the
      base network / the sub-networks; without ``momentum_sub`` the targets are the base
      network's own outputs, detached (Algorithm 1, line 6).
    * ``group_size``: examples per group for BN statistics and contrastive negatives (the
      official per-GPU batch), so results do not depend on the device count; None: the batch.
    * ``update_mode``: ``accumulate`` (paper Algorithm 1: one update per iteration with the
      summed gradients) or ``per_width`` (official code: one update after each width).
    * ``aux_head_init``: the new head g starts ``independent`` (its own initialisation, as the
      CNN code) or as a ``copy`` of the predictor (the official ViT code's deepcopy).
    """
    base_loss: str = "infonce"
    distill_loss: str = "mse"
    aux_head: str = "new"
    momentum_base: bool = True
    momentum_sub: bool = True
    tau: float = 0.5
    distill_weight: float = 1.0
    group_size: int | None = None
    update_mode: str = "accumulate"
    ema_momentum: float = 0.99
    ema_schedule: str = "constant"
    aux_head_init: str = "independent"

    def __post_init__(self):
        for name, value, allowed in [("base_loss", self.base_loss, BASE_LOSSES),
                                     ("distill_loss", self.distill_loss, DISTILL_LOSSES),
                                     ("aux_head", self.aux_head, AUX_HEADS),
                                     ("update_mode", self.update_mode, UPDATE_MODES),
                                     ("ema_schedule", self.ema_schedule, EMA_SCHEDULES),
                                     ("aux_head_init", self.aux_head_init, AUX_HEAD_INITS)]:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")
        if self.aux_head == "shared" and not self.uses_predictor:
            raise ValueError("aux_head='shared' shares the base network's predictor, which only "
                             "exists with base_loss='mse' or 'mocov3'; use aux_head='new' or "
                             "'none'")
        if self.base_loss == "mocov3" and not self.momentum_base:
            raise ValueError("base_loss='mocov3' contrasts against the momentum encoder's keys; "
                             "it needs momentum_base=True")
        if self.aux_head_init == "copy" and not (self.uses_predictor and
                                                 self.uses_distill_head):
            raise ValueError("aux_head_init='copy' copies the predictor into the new head: it "
                             "needs aux_head='new' and a base loss with a predictor ('mse' or "
                             "'mocov3')")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")

    @property
    def uses_teacher(self) -> bool:
        return self.momentum_base or self.momentum_sub

    @property
    def uses_predictor(self) -> bool:
        return self.base_loss in ("mse", "mocov3")

    @property
    def uses_distill_head(self) -> bool:
        return self.aux_head == "new"

    def param_groups(self) -> frozenset[str]:
        return frozenset({"backbone", "projector"}
                         | ({"predictor"} if self.uses_predictor else set())
                         | ({"distill_head"} if self.uses_distill_head else set()))

    def decay_groups(self, sub: bool) -> frozenset[str]:
        """Top-level parameter groups that get weight decay in an update.

        As the official GroupReg: heads (``predictor*``) are left out at width 1.0 and
        included at sub-widths. So the base-only updates (per-width mode, and stage-1
        iterations in accumulate mode) decay {backbone, projector}; updates that include
        sub-networks decay everything. This also keeps a head that has not been used yet
        untouched (its gradient is zero), like PyTorch skipping parameters whose grad is None.
        MoCo v3 (AdamW, no GroupReg) decays every parameter that has a gradient, so its
        predictor, used by the base network, is decayed at width 1.0 too.
        """
        if sub:
            return self.param_groups()
        base = {"predictor"} if self.base_loss == "mocov3" else set()
        return frozenset({"backbone", "projector"} | base)


def ema_momentum(method: MethodConfig, step: jax.Array | int, total_steps: int) -> jax.Array:
    """Constant m, or the cosine ramp m_t = 1 - (1 - m)(1 + cos(pi t / T)) / 2 (BYOL/MoCo v3),
    i.e. one minus optax's cosine decay of 1 - m."""
    m = jnp.asarray(method.ema_momentum, jnp.float32)
    if method.ema_schedule == "constant":
        return m
    decay = optax.cosine_decay_schedule(1.0 - method.ema_momentum, max(total_steps, 1))
    return (1.0 - decay(step)).astype(jnp.float32)


def teacher_subset(params: dict) -> dict:
    """The parameters the momentum teacher copies: {backbone, projector}."""
    return {k: params[k] for k in TEACHER_KEYS}


def ema_update(ema: dict, params: dict, momentum: jax.Array) -> dict:
    """One EMA step of the teacher towards the online {backbone, projector}: m e + (1 - m) p."""
    return optax.incremental_update(teacher_subset(params), ema, step_size=1.0 - momentum)
