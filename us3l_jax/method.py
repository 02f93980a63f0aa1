"""The loss design of a run (paper Table 7 as flags) and the momentum teacher's schedule.

``MethodConfig`` is the single statement of the method's fields and defaults: the config
schema (``config.get_default``) is derived from it, and the step (``us3l_jax.train``) reads it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

BASE_LOSSES = ("infonce", "mse", "seed", "moco", "mocov3")
DISTILL_LOSSES = ("none", "mse", "infonce", "mocov3")
AUX_HEAD_INITS = ("independent", "copy")
AUX_HEADS = ("none", "shared", "new")
UPDATE_MODES = ("accumulate", "per_width")
EMA_SCHEDULES = ("constant", "cosine")
DECAY_RULES = ("group_reg", "weight_decay")
TEACHER_KEYS = ("backbone", "projector")
TEACHERS = ("ema", "frozen")


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
    * ``decay_rule``: which parameter groups an update decays (``decay_groups``):
      ``group_reg`` when the regularizer is group regularization (the official GroupReg loss
      term, which skips the heads at the base width) or ``weight_decay`` for plain weight
      decay (the official SGD ``weight_decay``: every parameter that has had a gradient).
      See docs/fidelity.md, "Weight decay".

    Single-width baselines (``us3l_jax.baseline_train``; they need ``sampler.individual_width``):

    * ``teacher``: ``ema`` (the momentum teacher above) or ``frozen`` (a pretrained network of
      another run, ``us3l_jax.teacher``, never updated: SEED / SEED-MSE).
    * ``base_loss='seed'``: SEED's soft cross-entropy of the student's against the frozen
      teacher's similarities to a queue of teacher embeddings, with temperatures ``tau``
      (student) and ``teacher_tau``; ``base_loss='mse'`` with ``teacher='frozen'`` is SEED-MSE.
    * ``base_loss='moco'``: MoCo v2's InfoNCE of the online view 1 against the EMA key of view 2
      and a queue of past keys, temperature ``tau``.
    * ``queue_size``: K, the number of queued keys (0: no queue).
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
    decay_rule: str = "group_reg"
    teacher: str = "ema"
    queue_size: int = 0
    teacher_tau: float = 1e-4
    aux_head_init: str = "independent"

    def __post_init__(self):
        for name, value, allowed in [("base_loss", self.base_loss, BASE_LOSSES),
                                     ("distill_loss", self.distill_loss, DISTILL_LOSSES),
                                     ("aux_head", self.aux_head, AUX_HEADS),
                                     ("update_mode", self.update_mode, UPDATE_MODES),
                                     ("ema_schedule", self.ema_schedule, EMA_SCHEDULES),
                                     ("decay_rule", self.decay_rule, DECAY_RULES),
                                     ("teacher", self.teacher, TEACHERS),
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
        self._check_baseline()

    def _check_baseline(self):
        """The single-width baselines' combinations (SEED, SEED-MSE, MoCo v2)."""
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if not self.teacher_tau > 0:
            raise ValueError(f"teacher_tau must be > 0, got {self.teacher_tau}")
        needs_queue = self.base_loss in ("seed", "moco")
        if needs_queue and self.queue_size <= 0:
            raise ValueError(f"base_loss={self.base_loss!r} needs a queue: set queue_size > 0")
        if not needs_queue and self.queue_size:
            raise ValueError(f"queue_size={self.queue_size} is only used by base_loss 'seed' "
                             f"or 'moco', not {self.base_loss!r}; set it to 0")
        if self.base_loss == "seed" and self.teacher != "frozen":
            raise ValueError("base_loss='seed' distills a frozen pretrained teacher: set "
                             "teacher='frozen'")
        if self.teacher == "frozen" and self.base_loss not in ("seed", "mse"):
            raise ValueError(f"teacher='frozen' needs base_loss 'seed' (SEED) or 'mse' "
                             f"(SEED-MSE), got {self.base_loss!r}")
        if (needs_queue or self.teacher == "frozen") and not self.momentum_base:
            raise ValueError(f"base_loss={self.base_loss!r} with teacher={self.teacher!r} "
                             f"learns from the teacher: set momentum_base=True")

    @property
    def uses_teacher(self) -> bool:
        return self.momentum_base or self.momentum_sub

    @property
    def uses_ema_teacher(self) -> bool:
        """A momentum (EMA) copy of the online network is kept in ``TrainState.ema_params``."""
        return self.uses_teacher and self.teacher == "ema"

    @property
    def is_single_width_baseline(self) -> bool:
        """SEED, SEED-MSE or MoCo v2: trained by ``us3l_jax.baseline_train``."""
        return self.teacher == "frozen" or self.queue_size > 0

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
        """Top-level parameter groups decayed by an update that trains sub-networks (``sub``)
        or only the base network.

        ``group_reg``: as the official GroupReg loss term, the heads (``predictor``,
        ``distill_head``) are left out at the base width and included at sub-widths, so
        base-only updates decay {backbone, projector} and the others everything.
        ``weight_decay``: as PyTorch's SGD weight decay, every group the update's losses reach:
        the base network's (with the predictor when its loss uses one) and, with sub-networks,
        everything. Groups that only sub-networks reach are also decayed by later base-only
        updates (``late_decay_groups``).
        """
        if sub:
            return self.param_groups()
        base = {"backbone", "projector"}
        if self.decay_rule == "weight_decay" and self.uses_predictor:
            base.add("predictor")
        return frozenset(base)

    def late_decay_groups(self) -> frozenset[str]:
        """``weight_decay`` rule: groups only sub-networks train (the auxiliary head). PyTorch's
        SGD skips a parameter until its first gradient and then decays it in every update, so
        base-only updates decay these once a sub-network update has run. Empty for
        ``group_reg``."""
        if self.decay_rule != "weight_decay":
            return frozenset()
        return self.param_groups() - self.decay_groups(sub=False)


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
