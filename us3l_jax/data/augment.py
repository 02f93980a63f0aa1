"""On-device augmentation: jitted, vmapped per example, keyed by a PRNG key.

Input: a uint8 NHWC batch. Output: float32 NHWC, normalised with the config's mean/std.
Example ``i`` of a batch uses ``jax.random.split(key, N)[i]``, so views do not depend on how
the batch is sharded.

Semantics. The official pipeline applies torchvision transforms to PIL
images, so every op here follows torchvision-on-PIL, computed in float32 on [0, 1] without
PIL's uint8 rounding between ops:

* RandomResizedCrop: ``RandomResizedCrop.get_params`` (10 tries, then the central-crop
  fallback; round half to even), then crop + resize with PIL's resampling filters
  (antialiased when shrinking: support scaled by the shrink factor; bicubic a = -0.5; taps
  restricted to the crop as ``F.resized_crop`` crops first), clipped to [0, 1] as PIL does.
* ColorJitter: factors ~ U[max(0, 1-s), 1+s], hue ~ U[-h, h], the 4 ops in a random order
  (``torch.randperm(4)``), each clamped to [0, 1]: brightness blends with black, contrast with
  the mean grey level, saturation with the grey image (``ImageEnhance``), hue shifts H in HSV
  (``dm_pix.adjust_hue``, the same modular shift as torchvision). dm-pix's brightness
  (additive), contrast (per-channel mean) and saturation (HSV) follow TensorFlow, not
  torchvision, so those three blends are written here.
* Grayscale: PIL ``convert("L")`` weights 0.299 / 0.587 / 0.114, copied to 3 channels.
* Gaussian blur: the official ``GaussianBlur`` = PIL ``ImageFilter.GaussianBlur(radius=σ)``,
  σ ~ U[σ_min, σ_max]: a Gaussian of std σ, here truncated to ``blur_kernel_size`` taps
  (23: ≥ 5.5σ for σ ≤ 2) with edge pixels repeated as PIL does (torchvision's
  ``transforms.GaussianBlur`` reflects instead).
* Solarize: ``ImageOps.solarize`` / ``RandomSolarize``: values ≥ threshold become 1 - x
  (``dm_pix.solarize``); threshold 128/255.
* Horizontal flip: ``dm_pix.flip_left_right``.
* Normalize: ``(x - mean) / std``.

Order: crop → jitter → grayscale → blur → solarize → flip → normalise (BYOL's
flip-first order gives the same distribution, flip commutes with the others).

``ViewConfig.round_uint8`` puts the image back on the 256 uint8 levels after every op that
leaves them, as PIL stores each intermediate image (off by default): the colour blends
truncate, as PIL's ``Image.blend``; resampling, grey conversion, the contrast mean, hue and
blur round half up. A chain of six jitter blends then matches PIL exactly on 99 % of the
pixels and to one level elsewhere, against a mean error of 2.5 levels without it; the crop's and blur's own
approximations (see above) remain.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import dm_pix as pix
import jax
import jax.numpy as jnp

from us3l_jax.data import host_transforms

Array = jax.Array

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL convert("L")
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize default

_BICUBIC_A = -0.5  # PIL's bicubic (torchvision's tensor bicubic without antialias uses -0.75)
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """One augmented view. Probabilities ``*_p`` in [0, 1]; a 0 skips the op at trace time.

    ``crop=False`` means the input is already cropped to ``size`` on the host (the streaming
    ImageNet pipeline); every other op still runs on device.
    """
    size: int = 32
    crop: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 23
    solarize_p: float = 0.0
    flip_p: float = 0.5
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    # Round to the 256 uint8 levels after every op that leaves them (crop/resize, each colour
    # blend, hue, grayscale, blur), as PIL stores each intermediate image; off: float32 all
    # the way, the default.
    round_uint8: bool = False

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        host_transforms.check_interpolation(self.interpolation)
        for f in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"{f} must be in [0, 1], got {getattr(self, f)}")
        for f in ("brightness", "contrast", "saturation"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0, got {getattr(self, f)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if self.blur_kernel_size <= 0 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd and positive, "
                             f"got {self.blur_kernel_size}")
        _check_mean_std(self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``Resize(resize)`` (shorter side) then ``CenterCrop(crop)``, then normalisation."""
    resize: int = 36
    crop: int = 32
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD

    def __post_init__(self):
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop}, "
                             f"resize={self.resize}")
        host_transforms.check_interpolation(self.interpolation)
        _check_mean_std(self.mean, self.std)


def _check_mean_std(mean, std) -> None:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values with std > 0, got {mean}, {std}")


# Official: the US3L SSL pipelines (both views from the same config).
CIFAR_SSL = ViewConfig()
IMAGENET_SSL = ViewConfig(size=224, blur_p=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD)
# Asymmetric BYOL (Grill et al. 2020, Table 6) / MoCo v3 views: scale 0.08-1, saturation 0.2,
# blur 1.0 on view 1, blur 0.1 + solarize 0.2 on view 2.
BYOL_VIEW1 = dataclasses.replace(IMAGENET_SSL, scale=(0.08, 1.0), saturation=0.2, blur_p=1.0)
BYOL_VIEW2 = dataclasses.replace(BYOL_VIEW1, blur_p=0.1, solarize_p=0.2)
# Official: linear-evaluation training crops (no colour ops).
CIFAR_LINEAR_TRAIN = ViewConfig(scale=(0.8, 1.0), interpolation="bicubic", jitter_p=0.0,
                                grayscale_p=0.0)
IMAGENET_LINEAR_TRAIN = ViewConfig(size=224, scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0,
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD)
CIFAR_EVAL = EvalConfig()
IMAGENET_EVAL = EvalConfig(resize=256, crop=224, interpolation="bilinear", mean=IMAGENET_MEAN,
                           std=IMAGENET_STD)


# ------------------------------------------------------------------------------------------
# Public batch functions
# ------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg",))
def view(key: Array, images: Array, cfg: ViewConfig) -> Array:
    """One augmented view of each image: uint8[N, H, W, 3] -> float32[N, size, size, 3]."""
    _check_images(images, rank=4)
    if not cfg.crop and images.shape[1:3] != (cfg.size, cfg.size):
        raise ValueError(f"ViewConfig(crop=False) needs inputs of size {cfg.size}x{cfg.size}, "
                         f"got {images.shape[1]}x{images.shape[2]}")
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(functools.partial(_one_view, cfg=cfg))(keys, images)


@functools.partial(jax.jit, static_argnames=("cfg1", "cfg2"))
def ssl_views(key: Array, images: Array, cfg1: ViewConfig,
              cfg2: ViewConfig | None = None) -> tuple[Array, Array]:
    """Two independent views per image (``cfg2`` defaults to ``cfg1``: symmetric recipes).

    ``images`` is uint8[N, H, W, 3] (cropped on device), or uint8[N, 2, S, S, 3] holding two
    host-cropped views (configs must then have ``crop=False``).
    """
    cfg2 = cfg1 if cfg2 is None else cfg2
    k1, k2 = jax.random.split(key)
    if images.ndim == 5:
        if images.shape[1] != 2 or cfg1.crop or cfg2.crop:
            raise ValueError("pre-cropped input must be uint8[N, 2, S, S, 3] and both configs "
                             "must have crop=False")
        return view(k1, images[:, 0], cfg1), view(k2, images[:, 1], cfg2)
    return view(k1, images, cfg1), view(k2, images, cfg2)


@functools.partial(jax.jit, static_argnames=("cfg",))
def eval_view(images: Array, cfg: EvalConfig) -> Array:
    """Deterministic eval transform: uint8[N, H, W, 3] -> float32[N, crop, crop, 3]."""
    _check_images(images, rank=4)
    h, w = images.shape[1:3]
    if min(h, w) == cfg.resize:
        new_h, new_w = h, w
    elif w <= h:
        new_w, new_h = cfg.resize, int(cfg.resize * h / w)
    else:
        new_h, new_w = cfg.resize, int(cfg.resize * w / h)
    top, left = int(round((new_h - cfg.crop) / 2.0)), int(round((new_w - cfg.crop) / 2.0))
    # Rows [top, top + crop) of the full resize matrices: resize and center crop at once.
    wh = _resize_weights(0.0, h, h, new_h, cfg.interpolation)[top:top + cfg.crop]
    ww = _resize_weights(0.0, w, w, new_w, cfg.interpolation)[left:left + cfg.crop]
    x = images.astype(jnp.float32) / 255.0
    return normalize(jax.vmap(_resample, (0, None, None))(x, wh, ww), cfg.mean, cfg.std)


def normalize(images: Array, mean, std) -> Array:
    """``(x - mean) / std`` per channel; uint8 inputs are first scaled to [0, 1]."""
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def rrc_box(key: Array, height: int, width: int, scale, ratio) -> tuple[Array, ...]:
    """Jittable ``RandomResizedCrop.get_params``: (top, left, h, w) as float32 scalars.

    The 10 tries are drawn at once; the first valid one wins, else the static central crop.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = float(height * width)
    target = area * jax.random.uniform(k_area, (10,), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_ratio, (10,), minval=math.log(ratio[0]),
                               maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_r)
    w_try = jnp.round(jnp.sqrt(target * aspect))
    h_try = jnp.round(jnp.sqrt(target / aspect))
    ok = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    first = jnp.argmax(ok)
    h, w = h_try[first], w_try[first]
    # torch.randint(0, n - h + 1): uniform over {0, ..., n - h}
    top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1))
    left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1))
    fallback = host_transforms.center_box(height, width, ratio)
    found = jnp.any(ok)
    return tuple(jnp.where(found, a, jnp.float32(b)) for a, b in zip((top, left, h, w), fallback))


def resized_crop(image: Array, box, size: int, interpolation: str = "bilinear") -> Array:
    """Crops ``box`` = (top, left, h, w) (traced values allowed) from a float [H, W, C] image
    in [0, 1] and resizes it to ``size x size`` with PIL's filters; result clipped to [0, 1]."""
    top, left, h, w = box
    wh = _resize_weights(top, h, image.shape[0], size, interpolation)
    ww = _resize_weights(left, w, image.shape[1], size, interpolation)
    return _resample(image, wh, ww)


def _resample(image: Array, wh: Array, ww: Array) -> Array:
    """Separable resampling, horizontal pass first and each pass clipped to [0, 1], as PIL
    does for 8-bit images (which matters for bicubic overshoot)."""
    x = jnp.clip(jnp.einsum("pw,hwc->hpc", ww, image), 0.0, 1.0)
    return jnp.clip(jnp.einsum("oh,hpc->opc", wh, x), 0.0, 1.0)


def grayscale(x: Array) -> Array:
    """PIL ``convert("L")`` luma of float [..., 3] images (no channel axis)."""
    return x @ jnp.asarray(GRAY_WEIGHTS, x.dtype)


# ------------------------------------------------------------------------------------------
# Per-example ops
# ------------------------------------------------------------------------------------------


def _check_images(images: Array, rank: int) -> None:
    if images.dtype != jnp.uint8 or images.ndim != rank or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of rank {rank} with 3 channels, got "
                         f"{images.dtype}{list(images.shape)}")


def _one_view(key: Array, image: Array, cfg: ViewConfig) -> Array:
    k_crop, k_jit_p, k_jit, k_gray, k_blur_p, k_sigma, k_sol, k_flip = jax.random.split(key, 8)
    q = functools.partial(_levels, on=cfg.round_uint8)
    x = image.astype(jnp.float32) / 255.0
    if cfg.crop:
        box = rrc_box(k_crop, x.shape[0], x.shape[1], cfg.scale, cfg.ratio)
        x = q(resized_crop(x, box, cfg.size, cfg.interpolation))
    if cfg.jitter_p > 0:
        x = _maybe(k_jit_p, cfg.jitter_p, _color_jitter(k_jit, x, cfg), x)
    if cfg.grayscale_p > 0:
        gray = jnp.broadcast_to(q(grayscale(x))[..., None], x.shape)
        x = _maybe(k_gray, cfg.grayscale_p, gray, x)
    if cfg.blur_p > 0:
        sigma = jax.random.uniform(k_sigma, minval=cfg.blur_sigma[0], maxval=cfg.blur_sigma[1])
        x = _maybe(k_blur_p, cfg.blur_p, q(_gaussian_blur(x, sigma, cfg.blur_kernel_size)), x)
    if cfg.solarize_p > 0:  # solarize and flip keep uint8 levels
        x = _maybe(k_sol, cfg.solarize_p, pix.solarize(x, SOLARIZE_THRESHOLD), x)
    if cfg.flip_p > 0:
        x = _maybe(k_flip, cfg.flip_p, pix.flip_left_right(x), x)
    return normalize(x, cfg.mean, cfg.std)


def _levels(x: Array, on: bool, truncate: bool = False) -> Array:
    """``x`` in [0, 1] on the 256 uint8 levels (``on``; else as is): rounded half up as PIL's
    resampling, grey conversion and filters store their results, or truncated as its blends
    (``ImageEnhance``) do. The small offset keeps float32 noise below an exact level from
    truncating it one level down."""
    if not on:
        return x
    v = x * 255.0
    return (jnp.floor(v + 1e-3) if truncate else jnp.floor(v + 0.5)) / 255.0


def _maybe(key: Array, p: float, applied: Array, original: Array) -> Array:
    """``applied`` with probability ``p`` (torchvision's ``torch.rand(1) < p``)."""
    if p >= 1.0:
        return applied
    return jnp.where(jax.random.uniform(key) < p, applied, original)


def _color_jitter(key: Array, x: Array, cfg: ViewConfig) -> Array:
    """torchvision ColorJitter with a random op order; see the module docstring."""
    k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
    factors = jnp.stack([
        jax.random.uniform(k, minval=max(0.0, 1.0 - s), maxval=1.0 + s)
        for k, s in ((k_b, cfg.brightness), (k_c, cfg.contrast), (k_s, cfg.saturation))])
    order = jax.random.permutation(k_order, 4)  # ops 0..3: brightness, contrast, sat., hue
    q = cfg.round_uint8
    if cfg.hue == 0:
        return _blends(x, order, factors, jnp.ones(4, bool), q)
    # Hue (the costly HSV round trip) runs once, between the blends drawn before and after it.
    hue_pos = jnp.argmax(order == 3)
    positions = jnp.arange(4)
    x = _blends(x, order, factors, positions < hue_pos, q)
    x = jnp.clip(pix.adjust_hue(x, jax.random.uniform(k_h, minval=-cfg.hue, maxval=cfg.hue)),
                 0.0, 1.0)
    return _blends(_levels(x, q), order, factors, positions > hue_pos, q)


def _blends(x: Array, order: Array, factors: Array, active: Array,
            round_uint8: bool = False) -> Array:
    """The brightness/contrast/saturation ops of ``order`` where ``active``, in order.

    Each is PIL's ``ImageEnhance`` blend ``f * x + (1 - f) * target`` clamped to [0, 1] with
    target black (brightness), the mean grey level (contrast) or the grey image (saturation);
    an inactive position (or the hue slot) uses f = 1, the identity. ``round_uint8`` rounds
    each result (and the grey images it blends with) to uint8 levels.
    """
    for i in range(4):
        op = order[i]
        f = jnp.where(active[i] & (op < 3), factors[jnp.minimum(op, 2)], 1.0)
        gray = _levels(grayscale(x), round_uint8)[..., None]
        mean = _levels(jnp.mean(gray), round_uint8)  # PIL: int(mean + 0.5) of the L image
        target = jnp.where(op == 0, 0.0, jnp.where(op == 1, mean, gray))
        x = _levels(jnp.clip(f * x + (1.0 - f) * target, 0.0, 1.0), round_uint8, truncate=True)
    return x


def _gaussian_blur(x: Array, sigma: Array, kernel_size: int) -> Array:
    """Separable Gaussian of std ``sigma`` over ``kernel_size`` taps, edges repeated (PIL)."""
    r = kernel_size // 2
    t = jnp.arange(-r, r + 1, dtype=jnp.float32)
    k = jnp.exp(-(t * t) / (2.0 * sigma * sigma))
    k = k / jnp.sum(k)
    h, w = x.shape[:2]
    xp = jnp.pad(x, ((r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * xp[i:i + h] for i in range(kernel_size))
    xp = jnp.pad(x, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * xp[:, i:i + w] for i in range(kernel_size))


def _filter(t: Array, interpolation: str) -> Array:
    at = jnp.abs(t)
    if interpolation == "bilinear":
        return jnp.maximum(0.0, 1.0 - at)
    a = _BICUBIC_A
    near = ((a + 2.0) * at - (a + 3.0)) * at * at + 1.0
    far = (((at - 5.0) * at + 8.0) * at - 4.0) * a
    return jnp.where(at < 1.0, near, jnp.where(at < 2.0, far, 0.0))


def _resize_weights(offset, length, in_size: int, out_size: int, interpolation: str) -> Array:
    """[out_size, in_size] resampling matrix of PIL's ``precompute_coeffs`` for the source
    interval [offset, offset + length) (taps outside it get weight 0; rows sum to 1)."""
    host_transforms.check_interpolation(interpolation)
    offset = jnp.asarray(offset, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    filter_scale = jnp.maximum(scale, 1.0)  # antialias when shrinking
    center = offset + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    pos = jnp.arange(in_size, dtype=jnp.float32)
    wts = _filter((pos[None, :] + 0.5 - center[:, None]) / filter_scale, interpolation)
    inside = (pos >= offset) & (pos < offset + length)
    wts = jnp.where(inside[None, :], wts, 0.0)
    return wts / jnp.sum(wts, axis=1, keepdims=True)
