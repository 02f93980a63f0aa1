"""The online linear probe: a linear classifier trained beside pretraining (solo-learn's
online classifier), a cheap running measure of how linearly separable the features are.

Every iteration, before the training updates, it reads the base network's backbone features
of the batch's first view (at the base width: the width range's maximum, or an individual
baseline's width; BN with batch statistics, as the training forward) under
``stop_gradient``, and takes one SGD step (momentum 0.9, no weight decay, learning rate
``config.eval.online_linear_lr`` cosine-decayed to 0 over the run, as solo-learn's classifier
follows the pretraining schedule) on the cross-entropy with the batch's labels. Its weights
start at zero (no random key: the training's keys are untouched).

The features come from a forward of their own (one view, no backward) rather than from the
method's loss: methods compute them inside their losses without returning them, and exposing
them would change every method's programs. The training programs never read the probe, so
parameters, teacher and optimizer state are bitwise those of a run without it.

Its state ``{"params": {"w", "b"}, "opt_state"}`` is the ``probe`` field of the
``TrainState`` (None without a probe), so checkpoints hold it and resumes are exact.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True, eq=False)
class OnlineProbe:
    """``features(network params, view) -> float[B, feature_dim]``: the base network's
    backbone features; ``tx``: the probe's own optimizer."""
    features: Callable[[PyTree, jax.Array], jax.Array]
    feature_dim: int
    num_classes: int
    tx: optax.GradientTransformation

    def init(self) -> dict[str, PyTree]:
        params = {"w": jnp.zeros((self.feature_dim, self.num_classes), jnp.float32),
                  "b": jnp.zeros((self.num_classes,), jnp.float32)}
        return {"params": params, "opt_state": self.tx.init(params)}


def make(features: Callable[[PyTree, jax.Array], jax.Array], *, feature_dim: int,
         num_classes: int, lr: float, total_steps: int) -> OnlineProbe:
    """SGD with momentum 0.9, no weight decay, ``lr`` cosine-decayed over ``total_steps``."""
    if not lr > 0:
        raise ValueError(f"online_linear_lr must be > 0, got {lr}")
    if num_classes < 2:
        raise ValueError(f"the online probe needs at least 2 classes, got {num_classes}")
    tx = optax.sgd(optax.cosine_decay_schedule(lr, max(1, total_steps)), momentum=MOMENTUM)
    return OnlineProbe(features, int(feature_dim), int(num_classes), tx)


def logits(probe_params: PyTree, x: jax.Array) -> jax.Array:
    return x @ probe_params["w"] + probe_params["b"]


def step(probe: OnlineProbe, probe_state: PyTree, params: PyTree, view: jax.Array,
         labels: jax.Array) -> tuple[PyTree, dict[str, jax.Array]]:
    """One update on the detached features of ``view``; metrics ``probe/loss`` and
    ``probe/acc1`` (top-1 % on this batch, before the update)."""
    x = jax.lax.stop_gradient(probe.features(params, view)).astype(jnp.float32)

    def loss_fn(p):
        out = logits(p, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, labels)), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe_state["params"])
    updates, opt_state = probe.tx.update(grads, probe_state["opt_state"],
                                         probe_state["params"])
    acc = 100.0 * jnp.mean((jnp.argmax(out, axis=-1) == labels).astype(jnp.float32))
    return ({"params": optax.apply_updates(probe_state["params"], updates),
             "opt_state": opt_state}, {"probe/loss": loss, "probe/acc1": acc})


def accuracy(probe_state: PyTree, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 % of the probe on features ``x`` (e.g. the validation split's) with labels
    ``y``."""
    # Replicated: any local copy (on several processes the whole array is not addressable).
    p = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array)
                     else np.asarray(a), probe_state["params"])
    pred = np.argmax(np.asarray(x, np.float32) @ p["w"] + p["b"], axis=-1)
    return 100.0 * float(np.mean(pred == np.asarray(y)))
