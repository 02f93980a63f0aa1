"""The explicit state of a run: everything it needs to continue exactly."""
from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """``step`` (iterations done), ``params`` (top-level groups: backbone, projector, ...),
    ``ema_params`` (the momentum teacher, or None), ``opt_state`` and the base PRNG key
    ``rng`` (per-step keys are ``fold_in(rng, step)``, so resuming at step k reproduces the
    same randomness; raw key data, which checkpoints store as a plain array). ``queue``: the
    key queue of MoCo v2 / SEED (``us3l_jax.keyqueue``), None for every other method."""
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    queue: Any = None
