"""The momentum teacher: an exponential moving average of the online {backbone, projector}."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

EMA_SCHEDULES = ("constant", "cosine")
TEACHER_KEYS = ("backbone", "projector")


def momentum(m: float, schedule: str, step: jax.Array | int, total_steps: int) -> jax.Array:
    """Constant m, or the cosine ramp m_t = 1 - (1 - m)(1 + cos(pi t / T)) / 2 (BYOL/MoCo v3),
    i.e. one minus optax's cosine decay of 1 - m."""
    if schedule not in EMA_SCHEDULES:
        raise ValueError(f"ema_schedule={schedule!r} is not one of {EMA_SCHEDULES}")
    if schedule == "constant":
        return jnp.asarray(m, jnp.float32)
    decay = optax.cosine_decay_schedule(1.0 - m, max(total_steps, 1))
    return (1.0 - decay(step)).astype(jnp.float32)


def teacher_subset(params: dict) -> dict:
    """The parameters the momentum teacher copies: {backbone, projector}."""
    return {k: params[k] for k in TEACHER_KEYS}


def init(params: dict) -> dict:
    """The teacher starts as an exact copy (``encoder_k = deepcopy(encoder_q)``)."""
    return jax.tree.map(jnp.copy, teacher_subset(params))


def update(ema: dict, params: dict, m: jax.Array) -> dict:
    """One EMA step of the teacher towards the online {backbone, projector}: m e + (1 - m) p."""
    return optax.incremental_update(teacher_subset(params), ema, step_size=1.0 - m)


def teacher_step(m: float, schedule: str, total_steps: int
                 ) -> Callable[[dict, dict, jax.Array], tuple[dict, dict]]:
    """A ``Method.teacher_step``: the EMA step at the start of every iteration, from the
    parameters the iteration starts with."""
    def step_fn(params, ema, step):
        mom = momentum(m, schedule, step, total_steps)
        return update(ema, params, mom), {"ema_momentum": mom}
    return step_fn
