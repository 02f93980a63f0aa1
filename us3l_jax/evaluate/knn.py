"""Weighted k-nearest-neighbour classification on cached features (InstDisc / SimCLR style).

Features are L2-normalised; each query takes its k most cosine-similar training examples and
class c scores ``sum over neighbours of class c of exp(sim / T)``; the prediction is the
highest score (ties go to the lower class index). Defaults k = 200, T = 0.1. Queries run in
fixed-size chunks (the last one padded), so one program serves every chunk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1
_EPS = 1e-12


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _scores(bank: jax.Array, bank_labels: jax.Array, queries: jax.Array, num_classes: int,
            k: int, temperature: float) -> jax.Array:
    sims = _normalize(queries) @ bank.T  # bank is already normalised
    top, idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top / temperature)
    votes = jax.nn.one_hot(bank_labels[idx], num_classes, dtype=jnp.float32)
    return jnp.einsum("qk,qkc->qc", weights, votes)


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray,
               num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
               chunk: int = 1024) -> np.ndarray:
    """Class scores float32[Q, num_classes] of each query (``k`` capped at the bank size)."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, "
                         f"temperature={temperature}")
    train_x = np.asarray(train_x, np.float32)
    query_x = np.asarray(query_x, np.float32)
    if train_x.ndim != 2 or query_x.ndim != 2 or train_x.shape[1] != query_x.shape[1]:
        raise ValueError(f"feature shapes do not match: bank {train_x.shape}, "
                         f"queries {query_x.shape}")
    bank = _normalize(jnp.asarray(train_x))
    labels = jnp.asarray(train_y, jnp.int32)
    k = min(k, train_x.shape[0])
    q = query_x.shape[0]
    chunk = min(chunk, q)
    padded = np.concatenate([query_x, np.zeros((-q % chunk, query_x.shape[1]), np.float32)])
    out = [_scores(bank, labels, jnp.asarray(padded[i:i + chunk]), num_classes, k,
                   float(temperature)) for i in range(0, len(padded), chunk)]
    return np.concatenate([np.asarray(o) for o in out])[:q]


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, num_classes: int, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE) -> float:
    """Fraction of ``test_x`` whose weighted kNN vote is ``test_y``."""
    scores = knn_scores(train_x, train_y, test_x, num_classes, k, temperature)
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(test_y)))
