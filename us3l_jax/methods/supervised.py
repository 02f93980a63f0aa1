"""Supervised slimmable training (paper Table 1): US-Net and S-Net with cross-entropy.

The largest width (``widths[0]``) learns from the labels; its softmax predictions, detached,
are the sub-networks' soft targets (inplace distillation, ``distill=True``: US-Net and
"S-Net+Distill"), or every width learns from the labels (``distill=False``: plain S-Net).
Universally slimmable (US-Net) or switchable (S-Net, private BatchNorm per width) is the
backbone's business. Parameters: ``{"backbone": <backbone incl. its classifier fc>}``; no
teacher; plain weight decay on everything.
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from us3l_jax.data import augment
from us3l_jax.methods.base import Method, decay_all


@dataclasses.dataclass(frozen=True)
class Config:
    """``label_smoothing``: of the largest width's (and, without ``distill``, every width's)
    cross-entropy; 0 as the official worker. ``group_size``: examples per BN group."""
    distill: bool = True
    label_smoothing: float = 0.0
    group_size: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Mean cross-entropy of ``logits`` [B, C] against integer ``labels`` [B], with the
    targets smoothed towards uniform by ``label_smoothing`` (PyTorch's definition)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return soft_cross_entropy(logits, targets)


def soft_cross_entropy(logits: jax.Array, probs: jax.Array):
    """Mean over the batch of ``-sum_c probs_c log softmax(logits)_c`` (the official inplace
    distillation loss; its gradient is softmax(logits) - probs)."""
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), probs))


def top1(logits: jax.Array, labels: jax.Array):
    """Fraction of rows whose largest logit is the label."""
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def make(cfg: Config, model: nn.Module, view_cfg: augment.ViewConfig) -> Method:
    """``model``: a slimmable backbone with a classifier; ``view_cfg``: the training crops."""
    if getattr(model, "num_classes", None) is None:
        raise ValueError("supervised training needs a backbone with a classifier "
                         "(num_classes set)")

    def logits(params, x, width):
        return model.apply({"params": params["backbone"]}, x, width=width, train=True)

    def init(key, extra_key, view_spec):
        width = max(getattr(model, "switchable_widths", ()) or (1.0,))  # every private BN
        variables = model.init(key, jnp.zeros(view_spec.shape, jnp.float32), width=width,
                               train=True)
        return {"backbone": flax.core.unfreeze(variables["params"])}, None, None

    def base_loss(params, ctx, batch, width):
        x, labels = batch
        out = logits(params, x, width)
        loss = cross_entropy(out, labels, cfg.label_smoothing)
        probs = jax.lax.stop_gradient(jax.nn.softmax(out.astype(jnp.float32)))
        return loss, (probs, {"loss/base": loss, "top1/base": top1(out, labels)})

    def sub_loss(params, probs, batch, width):
        x, labels = batch
        out = logits(params, x, width)
        loss = soft_cross_entropy(out, probs) if cfg.distill else \
            cross_entropy(out, labels, cfg.label_smoothing)
        return loss, {"raw": loss}

    return Method(init=init, views=lambda key, images, labels: (
                      augment.view(key, images, view_cfg), labels),
                  base_loss=base_loss, sub_loss=sub_loss,
                  decay=decay_all(frozenset({"backbone"})), config_key=model.channel_config,
                  dtype=model.dtype, needs_labels=True, name="supervised")
