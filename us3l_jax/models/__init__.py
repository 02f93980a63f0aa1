"""Backbone registry: ``create(name, num_classes=None, **kw)``.

Every model is a ``flax.linen.Module`` with ``__call__(x, width=1.0, train=True)``, and
host-side ``feature_dim(width)``, ``slim_dims()`` and ``channel_config(width)``.
"""
from __future__ import annotations

from typing import Any

from flax import linen as nn

from us3l_jax.models.mobilenet_v2 import MobileNetV2
from us3l_jax.models.resnet import ResNet
from us3l_jax.models.vit import VisionTransformer

# name -> (constructor, default keyword arguments). Init schemes follow the official models:
# the CIFAR ResNets use PyTorch defaults, the ImageNet ResNets kaiming-normal fan-out.
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "cifar_resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), block="basic", stem="cifar")),
    "cifar_resnet50": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", stem="cifar")),
    "resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), block="basic", stem="imagenet",
                              init_scheme="kaiming_fan_out")),
    "resnet50": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", stem="imagenet",
                              init_scheme="kaiming_fan_out")),
    "cifar_mobilenet_v2": (MobileNetV2, dict(input_size=32)),
    "mobilenet_v2": (MobileNetV2, dict(input_size=224)),
    # MoCo v3 ViTs (patch 16, 224 px by default; ``slicing="official"`` or ``"embed"``).
    "vit_tiny": (VisionTransformer, dict(dim=192, depth=12, heads=6)),
    "vit_small": (VisionTransformer, dict(dim=384, depth=12, heads=12)),
}
VIT_NAMES: tuple[str, ...] = ("vit_tiny", "vit_small")

NAMES: tuple[str, ...] = tuple(_REGISTRY)


def create(name: str, num_classes: int | None = None, **kw: Any) -> nn.Module:
    """Builds backbone ``name``; ``num_classes=None`` returns features, else logits.

    Extra keywords override the defaults (e.g. ``dtype=jnp.bfloat16``, ``bn_group_size=128``,
    ``min_width=0.25``, and for tests ``stage_sizes=(1, 1, 1, 1)``; ViTs take ``image_size``,
    ``patch_size``, ``slicing``, ``stop_grad_patch`` and, for small variants,
    ``dim``/``depth``/``heads``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(NAMES)}")
    cls, defaults = _REGISTRY[name]
    kwargs = {**defaults, **kw}
    try:
        return cls(num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for model {name!r}: {e}") from None
