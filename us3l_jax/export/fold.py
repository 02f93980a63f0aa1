"""BatchNorm folded into the convolution before it: the deployed form of an eval-mode network.

In eval mode ``bn(conv(x)) = (conv(x) - mean) * scale / sqrt(var + eps) + bias`` is affine per
output channel, so it equals one conv with kernel ``k * f`` and bias ``bias - mean * f`` where
``f = scale / sqrt(var + eps)``. Every BN of our plain networks directly follows a conv (the
``*_bn`` layer after its ``*_conv``), so folding removes all BN layers and their statistics;
the folded network is one conv (+ bias) per layer, which is what ONNX / StableHLO consumers
run fastest and what ``model_card.json`` describes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import linen as nn
from flax import traverse_util

from us3l_jax.models.plain import PlainMobileNetV2, PlainResNet
from us3l_jax.models.vit import VisionTransformer
from us3l_jax.slim import SlimBatchNorm

# SlimBatchNorm's epsilon, as the plain networks use its default.
EPSILON = SlimBatchNorm.epsilon


def _conv_of(bn_layer: tuple[str, ...]) -> tuple[str, ...]:
    """The conv a BN follows: ``bn1`` <- ``conv1``, ``downsample_bn`` <- ``downsample_conv``,
    ``dw_bn`` <- ``dw_conv`` (our naming in both families)."""
    return bn_layer[:-1] + (bn_layer[-1].replace("bn", "conv"),)


def fold_batchnorm(plain: nn.Module, variables: Mapping[str, Any]
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """``(folded module, {'params': ...})`` computing ``plain.apply(variables, x, train=False)``.

    ``plain`` is a plain network (``us3l_jax.models.plain``) and ``variables`` its ``params``
    and calibrated ``batch_stats`` (e.g. from ``export.slice_module``). Folding is done in
    float64 on the host and stored as float32. A ViT has no BatchNorm: it is returned as it
    is, with its ``params``. Raises ``ValueError`` when statistics are missing or a BN has no
    conv before it.
    """
    if isinstance(plain, VisionTransformer):
        return plain, {"params": variables["params"]}
    if not isinstance(plain, (PlainResNet, PlainMobileNetV2)):
        raise TypeError("expected a plain ResNet, MobileNetV2 or ViT, got "
                        f"{type(plain).__name__}")
    if plain.folded:
        raise ValueError("the network is already folded")
    if "batch_stats" not in variables:
        raise ValueError("folding BatchNorm needs calibrated 'batch_stats' (eval statistics)")
    params = traverse_util.flatten_dict(dict(variables["params"]))
    stats = traverse_util.flatten_dict(dict(variables["batch_stats"]))
    out = {k: np.asarray(v, np.float32) for k, v in params.items()}
    bn_layers = sorted({k[:-1] for k in stats})
    for bn in bn_layers:
        conv = _conv_of(bn)
        if conv + ("kernel",) not in params:
            raise ValueError(f"BN {'/'.join(bn)} has no conv {'/'.join(conv)} to fold into")
        f = np.asarray(params[bn + ("scale",)], np.float64) / np.sqrt(
            np.asarray(stats[bn + ("var",)], np.float64) + EPSILON)
        kernel = np.asarray(params[conv + ("kernel",)], np.float64)
        out[conv + ("kernel",)] = (kernel * f).astype(np.float32)  # HWIO: out channels last
        out[conv + ("bias",)] = (np.asarray(params[bn + ("bias",)], np.float64)
                                 - np.asarray(stats[bn + ("mean",)], np.float64) * f
                                 ).astype(np.float32)
        del out[bn + ("scale",)], out[bn + ("bias",)]
    return (plain.clone(folded=True),
            {"params": traverse_util.unflatten_dict(out)})
