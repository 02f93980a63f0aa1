"""The explicit state of a run: everything it needs to continue exactly."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class TrainState:
    """``step`` (iterations done), ``params`` (top-level groups: backbone, projector, ...),
    ``ema_params`` (the momentum teacher, or None), ``opt_state`` and the base PRNG key
    ``rng`` (per-step keys are ``fold_in(rng, step)``, so resuming at step k reproduces the
    same randomness; raw key data, which checkpoints store as a plain array). ``queue``: the
    key queue of MoCo v2 / SEED (``us3l_jax.keyqueue``), None for every other method.
    ``probe``: the online linear probe's classifier and optimizer state
    (``us3l_jax.engine.online_probe``), None without one."""
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    queue: Any = None
    probe: Any = None

    def replace(self, **updates: Any) -> TrainState:
        return dataclasses.replace(self, **updates)


_FIELDS = ("step", "params", "ema_params", "opt_state", "rng", "queue")


def _children(state: TrainState) -> tuple[str, ...]:
    # Without a probe the tree has exactly the fields it had before the probe existed (a None
    # field would still be a node of its own), so checkpoints of earlier versions restore.
    return _FIELDS + (("probe",) if state.probe is not None else ())


jax.tree_util.register_pytree_with_keys(
    TrainState,
    lambda s: ([(jax.tree_util.GetAttrKey(n), getattr(s, n)) for n in _children(s)],
               len(_children(s))),
    lambda _, children: TrainState(*children),
    flatten_func=lambda s: ([getattr(s, n) for n in _children(s)], len(_children(s))))
