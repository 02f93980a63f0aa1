"""SEED and SEED-MSE (one width per run, paper Table 2): a student distils a frozen teacher
pretrained by another run (``us3l_jax.teacher``), never updated.

* SEED (official ``seed.py``): student and teacher embed view 1; soft cross-entropy of their
  similarity distributions over [teacher embedding, queue] with temperatures ``tau``
  (student) and ``teacher_tau`` (``objectives.seed_distill``); the normalised teacher
  embeddings are enqueued.
* SEED-MSE (``loss='mse'``): the student's predictor against the teacher's projection of
  the other view (negative cosine, both view pairs), BYOL with a frozen teacher; no queue.

The teacher's BNs use batch statistics or, when its variables hold ``batch_stats``
(``teacher.bn`` 'calibrated' / 'stored'), run in eval mode. Every parameter gets plain weight
decay.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from us3l_jax import keyqueue, objectives
from us3l_jax.methods import forward
from us3l_jax.methods.base import Method, decay_all
from us3l_jax.models.heads import SSLModel

LOSSES = ("seed", "mse")


@dataclasses.dataclass(frozen=True)
class Config:
    loss: str = "seed"
    tau: float = 0.5
    teacher_tau: float = 1e-4
    queue_size: int = 32768
    group_size: int | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"teacher='frozen' needs base_loss 'seed' (SEED) or 'mse' "
                             f"(SEED-MSE), got {self.loss!r}")
        if not self.tau > 0 or not self.teacher_tau > 0:
            raise ValueError(f"tau and teacher_tau must be > 0, got {self.tau}, "
                             f"{self.teacher_tau}")
        if self.loss == "seed" and self.queue_size <= 0:
            raise ValueError("base_loss='seed' needs a queue: set queue_size > 0")
        if self.loss == "mse" and self.queue_size:
            raise ValueError(f"queue_size={self.queue_size} is only used by base_loss 'seed' "
                             f"or 'moco', not 'mse'; set it to 0")

    uses_predictor = property(lambda self: self.loss == "mse")
    uses_distill_head = feature_distill = False
    uses_teacher = True  # the frozen teacher's forward


def make(cfg: Config, model: SSLModel, views_fn, *, teacher_model: SSLModel,
         teacher_variables: Any, teacher_width: float) -> Method:
    """``teacher_variables``: the frozen teacher's ``{'params'[, 'batch_stats']}``."""
    eval_mode = "batch_stats" in teacher_variables

    def teacher(variables, x):
        return jax.lax.stop_gradient(teacher_model.apply(
            variables, x, teacher_width, not eval_mode, method=SSLModel.encode))

    def init(key, extra_key, view_spec):
        params = forward.init_params(model, key, view_spec)
        queue = keyqueue.init(extra_key, cfg.queue_size, model.proj_out) \
            if cfg.loss == "seed" else None
        return params, None, queue

    def base_loss(params, ctx, batch, width):
        v1, v2 = batch
        if cfg.loss == "seed":
            z = model.apply({"params": params}, v1, width, method=SSLModel.encode)
            keys = objectives.l2_normalize(teacher(ctx.constants, v1))
            loss = objectives.seed_distill(z, keys, ctx.queue["keys"], cfg.tau,
                                           cfg.teacher_tau)
        else:
            if eval_mode:  # both views in one pass, always
                k = teacher(ctx.constants, jnp.concatenate([v1, v2]))
                t1, t2 = k[:v1.shape[0]], k[v1.shape[0]:]
            else:  # batch statistics: both views in one pass where BN groups allow
                t1, t2, _ = forward.teacher(teacher_model, ctx.constants["params"], v1, v2,
                                            teacher_width)
            z, z2, _ = forward.encode(model, params, v1, v2, width)
            p1, p2 = forward.head(model, params, z, z2, "predictor")
            loss, keys = objectives.neg_cosine(p1, p2, t1, t2), None
        return loss, (keys, {"loss/base": loss, "embed_std": objectives.embedding_std(z)})

    groups = frozenset({"backbone", "projector"} | ({"predictor"} if cfg.uses_predictor
                                                    else set()))
    return Method(init=init, views=lambda key, images, labels: views_fn(key, images),
                  base_loss=base_loss, decay=decay_all(groups),
                  config_key=model.backbone.channel_config, dtype=model.dtype,
                  teacher_step=lambda p, t, step: (t, {"ema_momentum": jnp.float32(0)}),
                  after_step=keyqueue.enqueue if cfg.loss == "seed" else None,
                  constants=teacher_variables, name="SEED" if cfg.loss == "seed" else "SEED-MSE")
