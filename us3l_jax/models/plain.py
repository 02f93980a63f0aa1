"""Plain (fixed-width) ResNet and MobileNetV2: what a slimmable backbone *is* at one width.

``plain_network(model, width)`` reads the per-layer channel counts of a slimmable backbone at
``width`` on the host and returns an ordinary network with exactly those channels. Its
submodules carry the slimmable model's names, so its variables are the slimmable variables
sliced to leading channels (``slice_to_width`` / ``slice_module``).

The layers are the slimmable layers with slimming switched off (``slim_in/slim_out/slim=False``),
not ``nn.Conv``/``nn.BatchNorm``: they have the same padding, the same (grouped, two-pass)
batch-norm statistics and the same ``batch_stats`` semantics, so the two networks agree to
rounding in train and eval mode.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from us3l_jax import models, slim
from us3l_jax.models import mobilenet_v2 as mbv2
from us3l_jax.models.mobilenet_v2 import MobileNetV2
from us3l_jax.models.resnet import STAGE_STRIDES, ResNet
from us3l_jax.models.vit import VisionTransformer, plain_vit
from us3l_jax.slim import SlimBatchNorm, SlimConv, SlimDense

# A conv in a plan: (kernel size, stride, in channels, out channels).
ConvSpec = tuple[int, int, int, int]


class _Layers:
    """Plain conv / BN / dense built from the slimmable layers with slimming off.

    ``folded``: every BN has been folded into the conv before it (``us3l_jax.export.fold``),
    so convs carry a bias and BN is the identity: the deployed form of an eval-mode network.
    """

    def __init__(self, dtype: Any, bn_group_size: int | None, folded: bool = False):
        self.dtype = dtype
        self.bn_group_size = bn_group_size
        self.folded = folded

    def conv(self, x, spec: ConvSpec, name: str, depthwise: bool = False):
        k, s, cin, cout = spec
        return SlimConv(cin, cout, k, s, use_bias=self.folded, slim_in=False, slim_out=False,
                        depthwise=depthwise, dtype=self.dtype, name=name)(x, slim.MAX_WIDTH)

    def bn(self, x, name: str, train: bool):
        if self.folded:
            if train:
                raise ValueError("a network with folded BatchNorm has no train mode")
            return x
        return SlimBatchNorm(x.shape[-1], slim=False, group_size=self.bn_group_size,
                             dtype=self.dtype, name=name)(x, slim.MAX_WIDTH, train)

    def dense(self, x, features: int, name: str):
        return SlimDense(x.shape[-1], features, slim_in=False, slim_out=False,
                         dtype=self.dtype, name=name)(x)


def _pool(x, dtype):
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)


class PlainResBlock(nn.Module):
    """Basic (two convs) or bottleneck (three) block: conv->BN(->ReLU) per spec, then the
    shortcut (1x1 conv + BN when ``downsample_stride`` is set) is added and ReLU applied."""
    convs: tuple[ConvSpec, ...]
    downsample_stride: int | None
    dtype: Any = jnp.float32
    bn_group_size: int | None = None
    folded: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        L = _Layers(self.dtype, self.bn_group_size, self.folded)
        out = x
        for i, spec in enumerate(self.convs, start=1):
            out = L.bn(L.conv(out, spec, f"conv{i}"), f"bn{i}", train)
            if i < len(self.convs):
                out = nn.relu(out)
        if self.downsample_stride is None:
            short = x
        else:
            spec = (1, self.downsample_stride, x.shape[-1], self.convs[-1][3])
            short = L.bn(L.conv(x, spec, "downsample_conv"), "downsample_bn", train)
        return nn.relu(out + short)


class PlainResNet(nn.Module):
    """A ResNet with fixed channel counts; ``blocks[i][j]`` is block ``layer{i+1}_{j}``."""
    stem: str
    stem_channels: int
    blocks: tuple[tuple[tuple[tuple[ConvSpec, ...], int | None], ...], ...]
    num_classes: int | None = None
    bn_group_size: int | None = None
    dtype: Any = jnp.float32
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        L = _Layers(self.dtype, self.bn_group_size, self.folded)
        k, s = (3, 1) if self.stem == "cifar" else (7, 2)
        x = nn.relu(L.bn(L.conv(x, (k, s, x.shape[-1], self.stem_channels), "conv1"), "bn1",
                         train))
        if self.stem != "cifar":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, stage in enumerate(self.blocks):
            for j, (convs, down) in enumerate(stage):
                x = PlainResBlock(convs, down, self.dtype, self.bn_group_size, self.folded,
                                  name=f"layer{i + 1}_{j}")(x, train)
        x = _pool(x, self.dtype)
        return x if self.num_classes is None else L.dense(x, self.num_classes, "fc")


class PlainInvertedResidual(nn.Module):
    """MobileNetV2 block with fixed channels; ``residual`` comes from the *full-size* model
    (at a width, in == out can hold although the full-size block has no shortcut)."""
    inp: int
    hidden: int
    out: int
    strides: int
    expand: bool
    residual: bool
    dtype: Any = jnp.float32
    bn_group_size: int | None = None
    folded: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        L = _Layers(self.dtype, self.bn_group_size, self.folded)
        h = x
        if self.expand:
            h = nn.relu6(L.bn(L.conv(h, (1, 1, self.inp, self.hidden), "expand_conv"),
                              "expand_bn", train))
        h = L.conv(h, (3, self.strides, self.hidden, self.hidden), "dw_conv", depthwise=True)
        h = nn.relu6(L.bn(h, "dw_bn", train))
        h = L.bn(L.conv(h, (1, 1, self.hidden, self.out), "project_conv"), "project_bn", train)
        return h + x if self.residual else h


class PlainMobileNetV2(nn.Module):
    """A MobileNetV2 with fixed channels; ``blocks[i]`` = (in, hidden, out, stride, expand,
    residual) of block ``block{i}``. The 1280-channel head is never slimmed."""
    stem_channels: int
    stem_stride: int
    blocks: tuple[tuple[int, int, int, int, bool, bool], ...]
    num_classes: int | None = None
    bn_group_size: int | None = None
    dtype: Any = jnp.float32
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        L = _Layers(self.dtype, self.bn_group_size, self.folded)
        x = L.conv(x, (3, self.stem_stride, x.shape[-1], self.stem_channels), "stem_conv")
        x = nn.relu6(L.bn(x, "stem_bn", train))
        for i, b in enumerate(self.blocks):
            x = PlainInvertedResidual(*b, self.dtype, self.bn_group_size, self.folded,
                                      name=f"block{i}")(x, train)
        x = L.conv(x, (1, 1, self.blocks[-1][2], mbv2.HEAD_CHANNELS), "head_conv")
        x = nn.relu6(L.bn(x, "head_bn", train))
        x = _pool(x, self.dtype)
        return x if self.num_classes is None else L.dense(x, self.num_classes, "classifier")


def _plain_resnet(m: ResNet, width: float) -> PlainResNet:
    exp = m.expansion
    in_full, in_c = m.base_width, slim.channels(m.base_width, width)
    stages = []
    for n, planes, stride in zip(m.stage_sizes, m.stage_planes, STAGE_STRIDES):
        mid, out = slim.channels(planes, width), slim.channels(planes * exp, width)
        blocks = []
        for j in range(n):
            s = stride if j == 0 else 1
            if m.block == "basic":
                convs = ((3, s, in_c, mid), (3, 1, mid, out))
            else:  # torchvision v1.5: the stride sits on the 3x3
                convs = ((1, 1, in_c, mid), (3, s, mid, mid), (1, 1, mid, out))
            # Shortcut decided on full sizes, exactly as the slimmable block does.
            down = s if (s != 1 or in_full != planes * exp) else None
            blocks.append((convs, down))
            in_full, in_c = planes * exp, out
        stages.append(tuple(blocks))
    return PlainResNet(m.stem, slim.channels(m.base_width, width), tuple(stages),
                       m.num_classes, m.bn_group_size, m.dtype)


def _plain_mobilenet_v2(m: MobileNetV2, width: float) -> PlainMobileNetV2:
    blocks = []
    for inp, out, t, s in mbv2.block_specs(m.input_size):
        # The slimmable block's expanded width: (c_max * w) / t rounded, times t.
        hidden = slim.channels(inp * t, width, t)
        blocks.append((slim.channels(inp, width), hidden, slim.channels(out, width), s,
                       t != 1, s == 1 and inp == out))
    return PlainMobileNetV2(slim.channels(mbv2.STEM_CHANNELS, width),
                            1 if m.input_size == 32 else 2, tuple(blocks), m.num_classes,
                            m.bn_group_size, m.dtype)


def plain_network(model: nn.Module, width: float) -> nn.Module:
    """The plain network that slimmable ``model`` computes at ``width``.

    Apply it as ``plain.apply(variables, x, train=...)`` (no width argument). Raises
    ``ValueError`` for a width outside ``[model.min_width, 1]`` and ``TypeError`` for a model
    that is not a slimmable ResNet, MobileNetV2 or ViT (``slicing='embed'``).
    """
    if isinstance(model, ResNet):
        return _plain_resnet(model, slim.validate_width(width, model.min_width))
    if isinstance(model, MobileNetV2):
        return _plain_mobilenet_v2(model, slim.validate_width(width, model.min_width))
    if isinstance(model, VisionTransformer):
        return plain_vit(model, width)
    raise TypeError(f"no plain counterpart for {type(model).__name__}; expected a slimmable "
                    "ResNet or MobileNetV2 from us3l_jax.models.create")


# ------------------------------------------------------------------------------------------
# Variables at a width
# ------------------------------------------------------------------------------------------

COLLECTIONS = ("params", "batch_stats")
# Stem / classifier layers per family (our names).
_STEM = {"resnet": "conv1", "mobilenet_v2": "stem_conv", "vit": "patch_embed"}
_HEAD = {"resnet": "fc", "mobilenet_v2": "classifier", "vit": "head"}
# Shape-only probe input: large enough for every stride pattern (ImageNet ResNet: 32 -> 1).
_PROBE_SIZE = 32

Variables = dict[str, Any]


def family(model: nn.Module) -> str:
    """'resnet', 'mobilenet_v2' or 'vit', for a slimmable or a plain network."""
    if isinstance(model, VisionTransformer):
        return "vit"
    return "mobilenet_v2" if isinstance(model, (MobileNetV2, PlainMobileNetV2)) else "resnet"


def create_with_head(name: str, model_kw: Mapping[str, Any],
                     head_out: Callable[[str], int | None]) -> nn.Module:
    """``models.create(name, **model_kw)``; ``num_classes`` defaults to ``head_out(family)``,
    the classes found in the weights at hand (None when they have no classifier)."""
    kw = dict(model_kw)
    explicit = "num_classes" in kw
    num_classes = kw.pop("num_classes", None)
    model = models.create(name, **kw)
    return model.clone(num_classes=num_classes if explicit else head_out(family(model)))


@functools.lru_cache(maxsize=64)
def abstract_variables(module: nn.Module, in_channels: int,
                       width: float | None = None) -> Variables:
    """Shapes of ``module``'s params and batch_stats (traced, nothing allocated; cached, as
    linen modules compare and hash by their attributes). Do not mutate the result."""
    call_kw = {} if width is None else {"width": width}
    x = jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, in_channels), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False, **call_kw),
                          x)


def check_keys(what: str, got, expected) -> None:
    """Raises ``ValueError`` listing missing and unexpected keys (paths or strings)."""
    def fmt(ks: list) -> str:
        names = [k if isinstance(k, str) else "/".join(k) for k in ks]
        more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
        return ", ".join(names[:8]) + more

    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    parts = ([f"missing {fmt(missing)}"] if missing else []) + \
            ([f"unexpected {fmt(extra)}"] if extra else [])
    if parts:
        raise ValueError(f"{what}: {'; '.join(parts)}")


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def slice_to_width(name: str, variables: Mapping[str, Any], width: float,
                   **model_kw: Any) -> tuple[nn.Module, Variables]:
    """The plain network of ``width`` and its variables, sliced from slimmable ``variables``.

    ``variables`` are the full-size variables of ``models.create(name, **model_kw)``: ``params``
    and optionally ``batch_stats`` (calibrated statistics for this width); the result has the
    same collections. ``num_classes`` defaults to the classifier size found in ``variables``.
    ``plain.apply(sliced, x, train=t)`` equals ``model.apply(variables, x, width=width,
    train=t)``. Raises ``ValueError`` for an unknown name, a width outside the model's range,
    unknown collections, or missing/extra/misshaped variables (naming them).
    """
    variables = _check_collections(variables)
    params = _flat(variables["params"])
    model = create_with_head(name, model_kw, lambda fam: (
        int(np.shape(params[(_HEAD[fam], "kernel")])[1]) if (_HEAD[fam], "kernel") in params
        else None))
    return _slice(name, model, variables, width)


def slice_module(model: nn.Module, variables: Mapping[str, Any],
                 width: float) -> tuple[nn.Module, Variables]:
    """``slice_to_width`` for a slimmable ``model`` already built (e.g. by
    ``build.backbone``), so its exact keywords (dtype, BN group size) carry over."""
    return _slice(type(model).__name__, model, _check_collections(variables), width)


def _check_collections(variables: Mapping[str, Any]) -> Variables:
    variables = dict(variables)
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown or "params" not in variables:
        raise ValueError(f"variables must hold 'params' and optionally 'batch_stats'; got "
                         f"collections {sorted(variables)}")
    return variables


def _slice(name: str, model: nn.Module, variables: Variables,
           width: float) -> tuple[nn.Module, Variables]:
    plain = plain_network(model, width)
    stem = _flat(variables["params"]).get((_STEM[family(model)], "kernel"))
    in_ch = 3 if stem is None else int(np.shape(stem)[2])
    full = abstract_variables(model, in_ch, width=1.0)
    target = abstract_variables(plain, in_ch)
    out = {}
    for col, tree in variables.items():
        got, exp = _flat(tree), _flat(full[col])
        check_keys(f"{name} {col}", got, exp)
        for k, v in got.items():
            if tuple(np.shape(v)) != exp[k].shape:
                raise ValueError(f"{name} {col} {'/'.join(k)}: shape {tuple(np.shape(v))}, "
                                 f"the model expects {exp[k].shape} (check model_kw)")
        tgt = _flat(target[col])
        out[col] = traverse_util.unflatten_dict(
            {k: slim.slice_leading(v, tgt[k].shape) for k, v in got.items()})
    return plain, out
