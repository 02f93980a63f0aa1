"""SSL heads and the model bundle.

The projector's first layer reads the slimmed backbone feature (input slimmed, output not);
everything after it, and the predictor / auxiliary distillation head, is full width. Head BNs
use batch statistics (per group of ``bn_group_size`` examples, like the official per-GPU BN);
with ``train=False`` (only a frozen teacher's forward) they read running statistics from
``batch_stats``, like the backbone's.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from us3l_jax.slim import (LeadingDense, SlimBatchNorm, SlimConv, SlimDense,
                           torch_default_bias_init, torch_default_kernel_init)

PROJECTOR_STYLES = ("simclr", "byol", "simsiam", "mocov2", "mocov3")


class Projector(nn.Module):
    """Linear(feat->hidden) -> BN -> ReLU -> Linear(hidden->hidden) -> BN -> ReLU -> Linear(->out).

    ``style`` selects the official variants: ``simclr`` (SimCLR_Momentum: middle Linear with
    bias), ``byol`` (middle Linear without bias), ``simsiam`` (as byol, and the last Linear is
    followed by a non-affine BN; its frozen bias cancels inside that BN, so it is omitted),
    ``mocov2`` (MoCo v2's MLP: Linear(feat->hidden) -> ReLU -> Linear(hidden->out), no BN).
    ``leading_in``: the first layer reads however many leading features arrive, for backbones
    whose feature size at a width is not the layer's own rounding (a ViT in ``embed`` slicing
    keeps whole heads: 64 features at 0.25x of 192, not 48).
    """
    in_features: int
    slim_in: bool
    leading_in: bool = False
    hidden: int = 2048
    out: int = 256
    style: str = "simclr"
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, width: float, train: bool = True) -> jax.Array:
        if self.style not in PROJECTOR_STYLES:
            raise ValueError(f"unknown projector style {self.style!r}; valid: {PROJECTOR_STYLES}")
        bn = dict(slim=False, group_size=self.bn_group_size, dtype=self.dtype)
        if self.leading_in:
            x = LeadingDense(self.in_features, self.hidden, dtype=self.dtype,
                             kernel_init=torch_default_kernel_init,
                             bias_init=torch_default_bias_init(self.in_features), name="fc1")(h)
        else:
            x = SlimDense(self.in_features, self.hidden, use_bias=True, slim_in=self.slim_in,
                          dtype=self.dtype, name="fc1")(h, width)
        if self.style == "mocov2":
            return SlimDense(self.hidden, self.out, use_bias=True, slim_in=False,
                             dtype=self.dtype, name="fc2")(nn.relu(x))
        x = nn.relu(SlimBatchNorm(self.hidden, name="bn1", **bn)(x, 1.0, train))
        x = SlimDense(self.hidden, self.hidden, use_bias=self.style == "simclr", slim_in=False,
                      dtype=self.dtype, name="fc2")(x)
        x = nn.relu(SlimBatchNorm(self.hidden, name="bn2", **bn)(x, 1.0, train))
        x = SlimDense(self.hidden, self.out, use_bias=self.style != "simsiam", slim_in=False,
                      dtype=self.dtype, name="fc3")(x)
        if self.style == "simsiam":
            x = SlimBatchNorm(self.out, affine=False, name="bn3", **bn)(x, 1.0, train)
        return x


class Predictor(nn.Module):
    """Linear(d->hidden, no bias) -> BN -> ReLU -> Linear(hidden->d): the BYOL/SimSiam predictor
    and the US3L auxiliary distillation head g."""
    features: int
    hidden: int = 2048
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = SlimDense(self.features, self.hidden, use_bias=False, slim_in=False,
                      dtype=self.dtype, name="fc1")(z)
        x = SlimBatchNorm(self.hidden, slim=False, group_size=self.bn_group_size,
                          dtype=self.dtype, name="bn1")(x, 1.0, True)
        return SlimDense(self.hidden, self.features, use_bias=True, slim_in=False,
                         dtype=self.dtype, name="fc2")(nn.relu(x))


class MoCoMLP(nn.Module):
    """MoCo v3's ``_build_mlp``: ``num_layers`` bias-free Linears with BN -> ReLU between them
    and a non-affine BN after the last (projector: 3 layers, predictor: 2). The first Linear
    reads the leading ``x.shape[-1]`` of its ``in_features`` inputs (a ViT feature that shrinks
    with the width in ``slicing='embed'``; always full with the official slicing). PyTorch's
    default Linear init, as the official code (it does not re-initialise the heads)."""
    num_layers: int
    in_features: int
    hidden: int
    out: int
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            fin = self.in_features if i == 0 else self.hidden
            fout = self.out if last else self.hidden
            x = LeadingDense(fin, fout, use_bias=False, dtype=self.dtype,
                             kernel_init=torch_default_kernel_init, name=f"fc{i + 1}")(x)
            x = SlimBatchNorm(fout, slim=False, affine=not last, group_size=self.bn_group_size,
                              dtype=self.dtype, name=f"bn{i + 1}")(x, 1.0, train)
            if not last:
                x = nn.relu(x)
        return x


def hooked_layers(backbone: nn.Module, layers: Sequence[str] = ()
                  ) -> tuple[tuple[str, int], ...]:
    """(block, full-width channels) of the features hooked for intermediate-feature
    distillation: ``layers``, or the backbone's default (the last block of stages 2-4).
    Raises ``ValueError`` for a backbone without hooks or an unknown block."""
    if not hasattr(backbone, "feature_channels"):
        raise ValueError(f"feature distillation hooks ResNet blocks; backbone "
                         f"{type(backbone).__name__} has none")
    layers = tuple(layers) or backbone.feature_layers()
    if len(set(layers)) != len(layers):
        raise ValueError(f"feature distillation layers repeat a block: {layers}")
    return tuple((name, backbone.feature_channels(name)) for name in layers)


class FeatureProjections(nn.Module):
    """``proj_conv`` of intermediate-feature distillation: per hooked block a 1x1 conv without
    bias, input slimmed and output full width, so a sub-network's map of ``md(C w)`` channels
    becomes comparable with the full-width teacher's ``C`` channels. Training only: no export
    includes it."""
    channels: tuple[tuple[str, int], ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: dict[str, jax.Array], width: float) -> dict[str, jax.Array]:
        return {name: SlimConv(c, c, 1, 1, slim_in=True, slim_out=False, dtype=self.dtype,
                               name=name)(feats[name], width)
                for name, c in self.channels}


class SSLModel(nn.Module):
    """Backbone + projector, with an optional ``predictor`` (the asymmetric head of MSE-based
    methods, applied to the base network) and an optional ``distill_head`` (a new auxiliary
    head g for sub-networks). Params: ``{backbone, projector[, predictor][, distill_head]
    [, proj_conv]}``; the momentum teacher is a copy of ``{backbone, projector}``.

    ``feature_layers`` (non-empty: intermediate-feature distillation) names the backbone
    blocks whose features ``encode_features`` returns (``ResNet.feature_hook``), and adds
    their ``proj_conv``.
    """
    backbone: nn.Module
    proj_hidden: int = 2048
    proj_out: int = 256
    proj_style: str = "simclr"
    use_predictor: bool = False
    use_distill_head: bool = False
    head_hidden: int = 2048
    feature_layers: tuple[str, ...] = ()
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    def setup(self):
        bb = self.backbone
        full, smallest = bb.feature_dim(1.0), bb.feature_dim(bb.min_width)
        kw = dict(bn_group_size=self.bn_group_size, dtype=self.dtype)
        if self.proj_style == "mocov3":
            self.projector = MoCoMLP(3, full, self.proj_hidden, self.proj_out, **kw)
            head = lambda: MoCoMLP(2, self.proj_out, self.head_hidden, self.proj_out, **kw)
            if self.use_predictor:
                self.predictor = head()
            if self.use_distill_head:
                self.distill_head = head()
            return
        self.projector = Projector(full, slim_in=smallest < full,
                                   leading_in=getattr(bb, "slicing", None) == "embed",
                                   hidden=self.proj_hidden, out=self.proj_out,
                                   style=self.proj_style, **kw)
        if self.use_predictor:
            self.predictor = Predictor(self.proj_out, self.head_hidden, **kw)
        if self.use_distill_head:
            self.distill_head = Predictor(self.proj_out, self.head_hidden, **kw)
        if self.feature_layers:
            self.proj_conv = FeatureProjections(hooked_layers(bb, self.feature_layers),
                                                dtype=self.dtype)

    def encode(self, x: jax.Array, width: float, train: bool = True) -> jax.Array:
        """Projector output z at ``width``. ``train``: BN with batch statistics (how every
        network trains); False: eval mode, with the ``batch_stats`` collection of backbone and
        projector (a frozen teacher with calibrated or stored statistics)."""
        h = self.backbone(x, width=width, train=train)
        if self.proj_style == "mocov3":
            return self.projector(h, train)
        return self.projector(h, width, train)

    def encode_features(self, x: jax.Array, width: float
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``encode`` and, from the same forward, the hooked features ``{block: feature}``
        (batch statistics): what the official ``bn2`` forward hook holds once the block has
        run, i.e. after the in-place ops that follow bn2 (``ResNet.feature_hook``: the basic
        block's output, the bottleneck's ``relu(bn2)``). They are recorded by a method
        interceptor, like PyTorch forward hooks, so the backbone's own forward stays
        unchanged."""
        sub, post = self.backbone.feature_hook()
        path = {("backbone", name, *sub): name for name in self.feature_layers}
        depth = 2 + len(sub)
        feats: dict[str, jax.Array] = {}

        def hook(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            name = path.get(tuple(context.module.path[-depth:]))
            if name is not None and context.method_name == "__call__":
                feats[name] = out if post is None else post(out)
            return out

        with nn.intercept_methods(hook):
            z = self.encode(x, width)
        return z, {name: feats[name] for name in self.feature_layers}

    def project_features(self, feats: dict[str, jax.Array], width: float
                         ) -> dict[str, jax.Array]:
        """``proj_conv``: hooked features at ``width`` -> full-width channels."""
        return self.proj_conv(feats, width)

    def predict(self, z: jax.Array) -> jax.Array:
        return self.predictor(z)

    def distill(self, z: jax.Array) -> jax.Array:
        return self.distill_head(z)

    def __call__(self, x: jax.Array, width: float = 1.0) -> dict[str, jax.Array]:
        """Every head's output (used by ``init`` so that all parameters are created)."""
        if self.feature_layers:
            z, feats = self.encode_features(x, width)
            out = {"z": z, "f": self.project_features(feats, width)}
        else:
            z = self.encode(x, width)
            out = {"z": z}
        if self.use_predictor:
            out["p"] = self.predict(z)
        if self.use_distill_head:
            out["g"] = self.distill(z)
        return out
