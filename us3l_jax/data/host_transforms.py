"""Host-side (numpy + PIL) image geometry with torchvision's semantics on PIL images.

The official pipeline runs torchvision transforms on PIL images. These
functions reproduce that path on the host for what cannot run on device with static shapes:
decoded images of arbitrary size (ImageNet, the transfer sets) are resized / cropped here to
a fixed size, and the on-device ops in ``augment.py`` are checked against them in tests.

Images are ``uint8[H, W, 3]`` numpy arrays.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

Box = tuple[int, int, int, int]  # (top, left, height, width), torchvision's (i, j, h, w)


def check_interpolation(name: str) -> None:
    """Raises ``ValueError`` unless ``name`` is a supported interpolation."""
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; allowed: {', '.join(INTERPOLATIONS)}")


def rrc_box(rng: np.random.Generator, height: int, width: int,
            scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Box:
    """``torchvision.transforms.RandomResizedCrop.get_params``: 10 tries, then a center crop.

    Python's ``round`` (half to even) as torchvision; the random source is numpy's.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return center_box(height, width, ratio)


def center_box(height: int, width: int, ratio: Sequence[float]) -> Box:
    """RandomResizedCrop's fallback: the largest central crop with aspect ratio in ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: np.ndarray, box: Box, size: int,
                 interpolation: str = "bilinear") -> np.ndarray:
    """``F.resized_crop`` on a PIL image: crop ``box`` then resize to ``size x size``."""
    check_interpolation(interpolation)
    top, left, h, w = box
    pil = Image.fromarray(as_rgb(image)).crop((left, top, left + w, top + h))
    return np.asarray(pil.resize((size, size), INTERPOLATIONS[interpolation]))


def resize_shorter(image: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """``transforms.Resize(size)`` with an int: the shorter side becomes ``size``, the longer
    ``int(size * long / short)`` (torchvision's truncation)."""
    check_interpolation(interpolation)
    image = as_rgb(image)
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), INTERPOLATIONS[interpolation]))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """``transforms.CenterCrop(size)``: offsets ``int(round((H - size) / 2))``."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"center crop {size} is larger than the image ({h}x{w})")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top:top + size, left:left + size]


def resize_center_crop(image: np.ndarray, resize: int, crop: int,
                       interpolation: str = "bilinear") -> np.ndarray:
    """``Resize(resize)`` then ``CenterCrop(crop)``: the evaluation transform."""
    return center_crop(resize_shorter(image, resize, interpolation), crop)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Grey (H, W) or (H, W, 1) images become 3 equal channels; uint8 contiguous."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    return np.ascontiguousarray(image, dtype=np.uint8)
