"""Frozen features: the backbone at one width in eval mode (calibrated BN) on the test
transform, every example once. The cached features feed the fast probe and kNN."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from us3l_jax.data import augment, feeding

PyTree = Any


@functools.lru_cache(maxsize=64)
def forward_fn(backbone: nn.Module, width: float, eval_view: augment.EvalConfig):
    """jit(params, batch_stats, uint8 images) -> float32 features at ``width`` (eval mode)."""
    def forward(params, batch_stats, images):
        x = augment.eval_view(images, eval_view)
        y = backbone.apply({"params": params, "batch_stats": batch_stats}, x, width=width,
                           train=False)
        return y.astype(jnp.float32)

    return jax.jit(forward)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process sharded) array as one host numpy array."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def extract(backbone: nn.Module, params: PyTree, batch_stats: PyTree,
            data: feeding.DeviceDataset, width: float, eval_view: augment.EvalConfig,
            batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(features float32[N, d], labels int32[N])`` of every example of ``data``, in order."""
    fn = forward_fn(backbone, float(width), eval_view)
    feats, labels, masks = [], [], []
    for batch in feeding.eval_batches(data, batch_size):  # dispatch all, fetch once
        feats.append(fn(params, batch_stats, batch.images))
        labels.append(batch.labels)
        masks.append(batch.mask)
    keep = np.concatenate([to_host(m) for m in masks])
    x = np.concatenate([to_host(f) for f in feats])[keep]
    y = np.concatenate([to_host(lab) for lab in labels])[keep]
    return x, y.astype(np.int32)
