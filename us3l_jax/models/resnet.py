"""Universally slimmable ResNets: CIFAR variant and torchvision v1.5.

Submodule names mirror the PyTorch ones (``conv1``, ``bn1``, ``layer1_0``, ``fc``) so that
``us3l_jax.export`` can map weights to and from torchvision/official state dicts.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from us3l_jax import slim
from us3l_jax.slim import SlimBatchNorm, SlimConv, SlimDense

STAGE_STRIDES = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN -> (+ shortcut) -> ReLU."""
    in_planes: int
    planes: int
    strides: int
    conv_kw: dict[str, Any]
    bn_kw: dict[str, Any]
    expansion = 1
    # What feature distillation takes (``ResNet.feature_hook``): the official hook keeps a
    # reference to bn2's output, which ``out += identity`` and the in-place ReLU then
    # overwrite, so it distils the block's output.
    HOOKED = ((), None)

    @nn.compact
    def __call__(self, x, width: float, train: bool):
        out = SlimConv(self.in_planes, self.planes, 3, self.strides, name="conv1",
                       **self.conv_kw)(x, width)
        out = nn.relu(SlimBatchNorm(self.planes, name="bn1", **self.bn_kw)(out, width, train))
        out = SlimConv(self.planes, self.planes, 3, 1, name="conv2", **self.conv_kw)(out, width)
        out = SlimBatchNorm(self.planes, name="bn2", **self.bn_kw)(out, width, train)
        return nn.relu(out + _shortcut(self, x, width, train))


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3(stride, v1.5) -> BN -> ReLU -> 1x1(x4) -> BN -> (+) -> ReLU."""
    in_planes: int
    planes: int
    strides: int
    conv_kw: dict[str, Any]
    bn_kw: dict[str, Any]
    expansion = 4
    # The official in-place ReLU after bn2 overwrites the tensor its hook keeps: relu(bn2).
    HOOKED = (("bn2",), nn.relu)

    @nn.compact
    def __call__(self, x, width: float, train: bool):
        out_planes = self.planes * self.expansion
        out = SlimConv(self.in_planes, self.planes, 1, 1, name="conv1", **self.conv_kw)(x, width)
        out = nn.relu(SlimBatchNorm(self.planes, name="bn1", **self.bn_kw)(out, width, train))
        out = SlimConv(self.planes, self.planes, 3, self.strides, name="conv2",
                       **self.conv_kw)(out, width)
        out = nn.relu(SlimBatchNorm(self.planes, name="bn2", **self.bn_kw)(out, width, train))
        out = SlimConv(self.planes, out_planes, 1, 1, name="conv3", **self.conv_kw)(out, width)
        out = SlimBatchNorm(out_planes, name="bn3", **self.bn_kw)(out, width, train)
        return nn.relu(out + _shortcut(self, x, width, train))


def _shortcut(block, x, width: float, train: bool):
    out_planes = block.planes * block.expansion
    if block.strides == 1 and block.in_planes == out_planes:
        return x
    s = SlimConv(block.in_planes, out_planes, 1, block.strides, name="downsample_conv",
                 **block.conv_kw)(x, width)
    return SlimBatchNorm(out_planes, name="downsample_bn", **block.bn_kw)(s, width, train)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Slimmable ResNet. ``stem='cifar'``: 3x3 s1 conv, no maxpool (32x32 inputs);
    ``stem='imagenet'``: 7x7 s2 conv + 3x3 s2 maxpool (torchvision v1.5).

    ``__call__(x, width, train)`` returns pooled features of size ``feature_dim(width)`` when
    ``num_classes`` is None, else logits from ``fc`` (input slimmed, output not).
    """
    stage_sizes: tuple[int, ...]
    block: str = "basic"
    stem: str = "cifar"
    num_classes: int | None = None
    init_scheme: str = "torch_default"  # or "kaiming_fan_out" (ImageNet US ResNet)
    bn_group_size: int | None = None
    min_width: float = 0.25
    # S-Net: a fixed width list with private BatchNorm per width (``SlimBatchNorm.switchable``);
    # empty: universally slimmable (any width in [min_width, 1]).
    switchable_widths: tuple[float, ...] = ()
    base_width: int = 64  # stage planes are base_width * (1, 2, 4, 8); small values for tests
    dtype: Any = jnp.float32

    @property
    def stage_planes(self) -> tuple[int, ...]:
        return tuple(self.base_width * m for m in (1, 2, 4, 8))

    @property
    def expansion(self) -> int:
        return BLOCKS[self.block].expansion

    def feature_dim(self, width: float) -> int:
        """Size of the pooled feature at ``width`` (before ``fc``), computed on the host."""
        width = slim.validate_width(width, self.min_width)
        return slim.channels(self.stage_planes[-1] * self.expansion, width)

    def slim_dims(self) -> tuple[tuple[int, int], ...]:
        """(full size, ratio) of every distinct slimmed output; see ``slim.channel_config``."""
        dims = list(self.stage_planes)
        if self.expansion != 1:
            dims += [p * self.expansion for p in self.stage_planes]
        return tuple((d, 1) for d in sorted(set(dims)))

    def channel_config(self, width: float) -> tuple[int, ...]:
        cfg = slim.channel_config(self.slim_dims(), width)
        if self.switchable_widths:  # widths with equal channels still have different BNs
            cfg += (slim.switch_index(self.switchable_widths, width),)
        return cfg

    def feature_hook(self) -> tuple[tuple[str, ...], Callable | None]:
        """What intermediate-feature distillation records in a hooked block (see
        ``us3l_jax.models.heads.SSLModel.encode_features``; the forward is unchanged): the
        output of the submodule at this path below the block (``()``: the block itself) and a
        function applied to it (None: none). What the official ``bn2`` hook ends up holding:
        the block output for the basic block, ``relu(bn2)`` for the bottleneck."""
        return BLOCKS[self.block].HOOKED

    def feature_layers(self) -> tuple[str, ...]:
        """The blocks hooked by default: the last block of stages 2-4 (ResNet-50:
        ``layer2_3``, ``layer3_5``, ``layer4_2``, as the official feature-distillation
        configs)."""
        return tuple(f"layer{i + 1}_{self.stage_sizes[i] - 1}" for i in (1, 2, 3))

    def feature_channels(self, layer: str) -> int:
        """Full-width channels of block ``layer``'s hooked feature: its stage's planes, for the
        bottleneck's ``relu(bn2)`` and the basic block's output alike."""
        blocks = {f"layer{i + 1}_{j}": planes
                  for i, (n, planes) in enumerate(zip(self.stage_sizes, self.stage_planes))
                  for j in range(n)}
        if layer not in blocks:
            raise ValueError(f"unknown ResNet block {layer!r} to hook for feature "
                             f"distillation; valid: {', '.join(blocks)}")
        return blocks[layer]

    @nn.compact
    def __call__(self, x: jax.Array, width: float = 1.0, train: bool = True) -> jax.Array:
        width = slim.validate_width(width, self.min_width)
        kinit = (slim.kaiming_fan_out_init if self.init_scheme == "kaiming_fan_out"
                 else slim.torch_default_kernel_init)
        conv_kw = dict(dtype=self.dtype, kernel_init=kinit)
        bn_kw = dict(dtype=self.dtype, group_size=self.bn_group_size,
                     switchable=tuple(self.switchable_widths))
        if self.switchable_widths:
            slim.switch_index(self.switchable_widths, width)  # refuse other widths up front
        in_ch = x.shape[-1]
        if self.stem == "cifar":
            x = SlimConv(in_ch, self.base_width, 3, 1, slim_in=False, name="conv1",
                         **conv_kw)(x, width)
        else:
            x = SlimConv(in_ch, self.base_width, 7, 2, slim_in=False, name="conv1",
                         **conv_kw)(x, width)
        x = nn.relu(SlimBatchNorm(self.base_width, name="bn1", **bn_kw)(x, width, train))
        if self.stem != "cifar":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        block_cls = BLOCKS[self.block]
        in_planes = self.base_width
        for i, (n, planes, stride) in enumerate(zip(self.stage_sizes, self.stage_planes,
                                                    STAGE_STRIDES)):
            for j in range(n):
                x = block_cls(in_planes, planes, stride if j == 0 else 1, conv_kw, bn_kw,
                              name=f"layer{i + 1}_{j}")(x, width, train)
                in_planes = planes * block_cls.expansion
        # Global average pool (the CIFAR model's avg_pool2d(4) on its 4x4 map is the same).
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        if self.num_classes is None:
            return x
        return SlimDense(in_planes, self.num_classes, slim_in=True, slim_out=False,
                         dtype=self.dtype, name="fc")(x, width)
