"""MoCo v2 (one width per run, paper Table 2): InfoNCE of the online query against the
momentum key encoder's key of the other view and a queue of past keys (official ``moco.py``).

Query = online projection of view 1, key = the EMA encoder on view 2 (BN statistics per group
of the batch stand in for shuffle-BN across GPUs); the normalised keys are enqueued after the
update. Every parameter gets plain weight decay.
"""
from __future__ import annotations

import dataclasses

import jax

from us3l_jax import keyqueue, objectives
from us3l_jax.methods import ema, forward
from us3l_jax.methods.base import Method, decay_all
from us3l_jax.models.heads import SSLModel


@dataclasses.dataclass(frozen=True)
class Config:
    tau: float = 0.2
    queue_size: int = 2048
    ema_momentum: float = 0.999
    ema_schedule: str = "constant"
    group_size: int | None = None

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.queue_size <= 0:
            raise ValueError(f"base_loss='moco' needs a queue: set queue_size > 0, got "
                             f"{self.queue_size}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")
        if self.ema_schedule not in ema.EMA_SCHEDULES:
            raise ValueError(f"ema_schedule={self.ema_schedule!r} is not one of "
                             f"{ema.EMA_SCHEDULES}")

    uses_predictor = uses_distill_head = feature_distill = False
    uses_teacher = True


def make(cfg: Config, model: SSLModel, views_fn, *, total_steps: int,
         teacher_width: float = 1.0) -> Method:
    def encode(params, x, width):
        return model.apply({"params": params}, x, width, method=SSLModel.encode)

    def init(key, extra_key, view_spec):
        params = forward.init_params(model, key, view_spec)
        return params, ema.init(params), keyqueue.init(extra_key, cfg.queue_size,
                                                       model.proj_out)

    def base_loss(params, ctx, batch, width):
        v1, v2 = batch
        z = encode(params, v1, width)
        keys = objectives.l2_normalize(jax.lax.stop_gradient(encode(ctx.teacher, v2,
                                                                    teacher_width)))
        loss = objectives.moco_infonce(z, keys, ctx.queue["keys"], cfg.tau)
        return loss, (keys, {"loss/base": loss, "embed_std": objectives.embedding_std(z)})

    return Method(init=init, views=lambda key, images, labels: views_fn(key, images),
                  base_loss=base_loss, decay=decay_all(frozenset({"backbone", "projector"})),
                  config_key=model.backbone.channel_config, dtype=model.dtype,
                  teacher_step=ema.teacher_step(cfg.ema_momentum, cfg.ema_schedule,
                                                total_steps),
                  after_step=keyqueue.enqueue, name="MoCo v2")
