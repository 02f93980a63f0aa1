"""Gradients as per-device partial sums, and the optimizer update.

**Communication.** Gradients of replicated parameters would normally be all-reduced by every
program. When whole BN/negative groups live on each device (``group_size`` divides the
per-device batch, the official per-GPU setting), the losses decompose over devices, so each
program computes only its device's partial gradient inside ``shard_map`` and keeps it sharded
(leading axis = devices); ``accumulate`` adds partials across programs and reduces once, in
its update. Otherwise (groups spanning devices) programs fall back to replicated gradients,
reduced in each program.
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from us3l_jax import mesh as mesh_lib
from us3l_jax.engine.state import TrainState

DATA = mesh_lib.DATA_AXIS


def device_local_groups(group_size: int | None, batch_size: int, num_devices: int) -> bool:
    """Whether every device holds whole BN/negative groups of ``group_size``, so the loss is
    a sum of per-device terms and gradients can stay per-device partial sums."""
    g = group_size
    return g is not None and batch_size % num_devices == 0 and \
        (batch_size // num_devices) % g == 0


def partial_grads(loss_fn, params, replicated, batch, *, mesh: Mesh, sharded: bool):
    """Gradient of ``loss_fn(params, replicated, batch) -> (loss, (batch_out, metrics))`` as
    per-device partial sums: leaves of shape (devices, *param_shape), sharded over the data
    axis, whose sum over axis 0 is the gradient. Also returns ``batch_out`` (sharded like the
    batch) and ``metrics`` (averaged over devices).

    ``sharded``: the loss decomposes over devices (``device_local_groups``). Each device then
    differentiates the mean of its own groups divided by the device count: no communication
    here. Otherwise the gradient is taken globally (XLA all-reduces it) and returned with a
    leading axis of size 1, replicated.
    """
    if not sharded:
        g, (out, metrics) = jax.grad(loss_fn, has_aux=True)(params, replicated, batch)
        return jax.tree.map(lambda x: x[None], g), out, metrics
    n = mesh.shape[DATA]

    def local(params, replicated, batch):
        def scaled(p, r, b):
            loss, aux = loss_fn(p, r, b)
            return loss / n, aux
        g, (out, metrics) = jax.grad(scaled, has_aux=True)(params, replicated, batch)
        metrics = jax.tree.map(lambda m: jax.lax.pmean(m, DATA), metrics)
        return jax.tree.map(lambda x: x[None], g), out, metrics

    # check_vma=False: the parameters enter replicated, and their gradient must stay the
    # device's own partial sum (with the check, JAX would psum it right here).
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(DATA)),
                         out_specs=(P(DATA), P(DATA), P()), check_vma=False)(
        params, replicated, batch)


def sum_partials(partial):
    """The gradient from per-device partial sums: the one all-reduce of an iteration."""
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), partial)


def _leaf_mask(params: dict, flags: dict[str, Any]) -> dict:
    """Per-group flags as a mask shaped like the parameters (absent groups: False)."""
    return {k: jax.tree.map(lambda _, on=flags.get(k, False): on, v) for k, v in params.items()}


def update(state: TrainState, grads, tx: optax.GradientTransformation,
           flags: dict[str, Any], active: dict[str, Any] | None = None
           ) -> tuple[TrainState, jax.Array]:
    """One optimizer update at iteration ``state.step``, decaying the groups ``flags`` marks.
    Groups left out (e.g. the auxiliary head while only the base width trains) get only
    their zero gradient, so an unused head stays untouched until first used. ``active``
    (per group, the method's ``active``) reaches the optimizer as ``active_mask=``: the
    groups that have a gradient in PyTorch's sense, which a per-parameter Adam count steps.
    Returns the state and the gradient's global norm."""
    chex.assert_trees_all_equal_shapes(grads, state.params)
    extra = {} if active is None else {"active_mask": _leaf_mask(state.params, active)}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, step=state.step,
                                   decay_mask=_leaf_mask(state.params, flags), **extra)
    return (state.replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), optax.tree.norm(grads))
