"""The queue of keys of MoCo v2 and SEED: K past embeddings, replaced oldest first.

The official code keeps a (dim, K) buffer of L2-normalised random vectors and a pointer; each
iteration writes the batch's keys (gathered from all GPUs) at the pointer and advances it by
the batch size modulo K (K must be a multiple of the batch). Here the buffer is (K, dim) rows
and lives in ``TrainState.queue`` as ``{"keys", "ptr"}``, so checkpoints carry it and a resumed
run continues with the same negatives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from us3l_jax.objectives import l2_normalize

Queue = dict  # {"keys": (K, D) float32, "ptr": int32 scalar}


def init(rng: jax.Array, size: int, dim: int) -> Queue:
    """K random unit vectors (``normalize(randn(dim, K), dim=0)``) and pointer 0."""
    if size <= 0:
        raise ValueError(f"queue size must be > 0, got {size}")
    keys = l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
    return {"keys": keys, "ptr": jnp.zeros((), jnp.int32)}


def check_batch(size: int, batch_size: int) -> None:
    """The official constraint: whole batches fill the queue (``K % batch == 0``)."""
    if size % batch_size:
        raise ValueError(f"queue size {size} must be a multiple of the batch size {batch_size}"
                         f" (each iteration replaces one batch of keys)")


def enqueue(queue: Queue, keys: jax.Array) -> Queue:
    """Writes ``keys`` (B, D) at the pointer (overwriting the oldest B entries) and advances the
    pointer by B modulo K. ``keys`` are stored as given (callers pass normalised, detached
    keys); B must divide K."""
    size, b = queue["keys"].shape[0], keys.shape[0]
    check_batch(size, b)
    ptr = queue["ptr"]
    new = jax.lax.dynamic_update_slice(queue["keys"], keys.astype(jnp.float32),
                                       (ptr, jnp.zeros((), ptr.dtype)))
    return {"keys": new, "ptr": ((ptr + b) % size).astype(jnp.int32)}
