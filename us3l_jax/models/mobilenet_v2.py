"""Universally slimmable MobileNetV2.

Expanded channels are (expansion t) x (slimmed input) via the ``ratio`` rule; the final 1x1 conv
to 1280 and its BN are not slimmed, so the feature size is 1280 at every width.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from us3l_jax import slim
from us3l_jax.slim import SlimBatchNorm, SlimConv, SlimDense

# (expansion t, output channels c, repeats n, stride s); s=None is 1 at 32x32 input, else 2.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, None), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# N(0, sqrt(2 / (k*k*out_channels))) for convs, N(0, 0.01) for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.normal(0.01)


def block_specs(input_size: int) -> list[tuple[int, int, int, int]]:
    """(in, out, t, stride) of every inverted-residual block, at full width."""
    specs = []
    inp = STEM_CHANNELS
    for t, c, n, s in SETTINGS:
        s = (1 if input_size == 32 else 2) if s is None else s
        for i in range(n):
            specs.append((inp, c, t, s if i == 0 else 1))
            inp = c
    return specs


class InvertedResidual(nn.Module):
    inp: int
    out: int
    t: int
    strides: int
    conv_kw: dict[str, Any]
    bn_kw: dict[str, Any]

    @nn.compact
    def __call__(self, x, width: float, train: bool):
        hidden = self.inp * self.t
        h = x
        if self.t != 1:
            h = SlimConv(self.inp, hidden, 1, ratio_in=1, ratio_out=self.t, name="expand_conv",
                         **self.conv_kw)(h, width)
            h = nn.relu6(SlimBatchNorm(hidden, ratio=self.t, name="expand_bn",
                                       **self.bn_kw)(h, width, train))
        h = SlimConv(hidden, hidden, 3, self.strides, ratio_in=self.t, ratio_out=self.t,
                     depthwise=True, name="dw_conv", **self.conv_kw)(h, width)
        h = nn.relu6(SlimBatchNorm(hidden, ratio=self.t, name="dw_bn",
                                   **self.bn_kw)(h, width, train))
        h = SlimConv(hidden, self.out, 1, ratio_in=self.t, ratio_out=1, name="project_conv",
                     **self.conv_kw)(h, width)
        h = SlimBatchNorm(self.out, name="project_bn", **self.bn_kw)(h, width, train)
        if self.strides == 1 and self.inp == self.out:
            h = h + x
        return h


class MobileNetV2(nn.Module):
    """Slimmable MobileNetV2; ``input_size == 32`` selects the CIFAR strides (stem and t6c24
    stage at stride 1)."""
    input_size: int = 224
    num_classes: int | None = None
    bn_group_size: int | None = None
    min_width: float = 0.25
    dtype: Any = jnp.float32

    def feature_dim(self, width: float) -> int:
        slim.validate_width(width, self.min_width)
        return HEAD_CHANNELS

    def slim_dims(self) -> tuple[tuple[int, int], ...]:
        dims = {(STEM_CHANNELS, 1)}
        for inp, out, t, _ in block_specs(self.input_size):
            dims |= {(inp, 1), (out, 1), (inp * t, t)}
        return tuple(sorted(dims))

    def channel_config(self, width: float) -> tuple[int, ...]:
        return slim.channel_config(self.slim_dims(), width)

    @nn.compact
    def __call__(self, x: jax.Array, width: float = 1.0, train: bool = True) -> jax.Array:
        width = slim.validate_width(width, self.min_width)
        conv_kw = dict(dtype=self.dtype, kernel_init=conv_init)
        bn_kw = dict(dtype=self.dtype, group_size=self.bn_group_size)
        stem_stride = 1 if self.input_size == 32 else 2
        x = SlimConv(x.shape[-1], STEM_CHANNELS, 3, stem_stride, slim_in=False,
                     name="stem_conv", **conv_kw)(x, width)
        x = nn.relu6(SlimBatchNorm(STEM_CHANNELS, name="stem_bn", **bn_kw)(x, width, train))
        specs = block_specs(self.input_size)
        for i, (inp, out, t, s) in enumerate(specs):
            x = InvertedResidual(inp, out, t, s, conv_kw, bn_kw, name=f"block{i}")(
                x, width, train)
        x = SlimConv(specs[-1][1], HEAD_CHANNELS, 1, slim_in=True, slim_out=False,
                     name="head_conv", **conv_kw)(x, width)
        x = SlimBatchNorm(HEAD_CHANNELS, slim=False, name="head_bn", **bn_kw)(x, width, train)
        x = nn.relu6(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        if self.num_classes is None:
            return x
        return SlimDense(HEAD_CHANNELS, self.num_classes, slim_in=False, slim_out=False,
                         kernel_init=linear_init, bias_init=nn.initializers.zeros,
                         dtype=self.dtype, name="classifier")(x, width)
