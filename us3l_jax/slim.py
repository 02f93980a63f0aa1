"""Width arithmetic and universally slimmable layers.

A slimmable layer holds full-size parameters and, at width ``w``, uses only the **leading**
channels. Width is always a static Python float: channel counts are Python
ints computed on the host with the official rounding, so every width is an ordinary,
fully-sliced XLA program whose cost follows its FLOPs (no masking).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

MAX_WIDTH = 1.0


# ------------------------------------------------------------------------------------------
# Width arithmetic (host-side Python ints, float64, official argument order)
# ------------------------------------------------------------------------------------------


def make_divisible(v: float, divisor: int = 8, min_value: int | None = 1) -> int:
    """The official rounding (US-Net/US3L ``make_divisible``), evaluated in Python float64.

    Rounds to the nearest multiple of ``divisor`` (halves up), at least ``min_value``, and adds
    ``divisor`` when that lands more than 10% below ``v``. E.g. 19.2 -> 24 (``int`` gives 19),
    44.00000000000001 -> 48 but 43.99 -> 40.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def channels(c_max: int, width: float, ratio: int = 1) -> int:
    """Channels a slimmed layer of full size ``c_max`` uses at ``width``.

    Same float expression as the official layers: ``make_divisible((c_max * w) / ratio) * ratio``
    (conv/BN; ``ratio`` > 1 only inside MobileNetV2 blocks). For ``ratio == 1`` this is also the
    Linear rule ``make_divisible(c_max * w)``, since division by 1 is exact.
    """
    return make_divisible((c_max * width) / ratio) * ratio


def validate_width(width: Any, min_width: float = 0.0, max_width: float = MAX_WIDTH) -> float:
    """Returns ``width`` as a float or raises ``ValueError`` naming it and the allowed range."""
    if isinstance(width, jax.core.Tracer):
        raise TypeError(
            "width must be a static Python float, got a traced value; pass it as a Python "
            "number (e.g. mark it static in jax.jit)")
    try:
        w = float(width)
    except (TypeError, ValueError):
        raise ValueError(f"width must be a number in ({min_width}, {max_width}], got {width!r}")
    lo_ok = w > 0.0 and w >= min_width
    if math.isnan(w) or not lo_ok or w > max_width:
        if min_width > 0:
            allowed = f"[{min_width}, {max_width}]"
        else:
            allowed = f"(0, {max_width}]"
        raise ValueError(f"width {width!r} is outside the allowed range {allowed}")
    return w


def switch_index(widths: Sequence[float], width: float) -> int:
    """Index of ``width`` in a switchable network's fixed width list (S-Net), or a
    ``ValueError`` naming the width and the list: an S-Net only runs at its own widths."""
    for i, w in enumerate(widths):
        if abs(float(w) - float(width)) < 1e-9:
            return i
    raise ValueError(f"width {width!r} is not one of the switchable (S-Net) widths "
                     f"{tuple(float(w) for w in widths)}; an S-Net has private BatchNorm "
                     "parameters for those widths only")


def channel_config(dims: Iterable[tuple[int, int]], width: float) -> tuple[int, ...]:
    """Channel counts at ``width`` of slimmed outputs given as ``(c_max, ratio)`` pairs."""
    return tuple(channels(c, width, r) for c, r in dims)


def distinct_widths(config_fn: Callable[[float], tuple[int, ...]], lo: float, hi: float,
                    step: float | None = None) -> list[float]:
    """Widths in ``[lo, hi]`` that give pairwise distinct channel configurations.

    With ``step=None`` the interval is scanned exhaustively (every change of configuration is
    found to 1e-6 by bisection) and the **smallest** width of each configuration interval is
    returned, plus ``hi``'s interval. With a ``step`` the grid ``lo, lo+step, ..., hi`` is
    deduplicated, keeping the first width of each configuration. Sorted ascending.
    This bounds the number of distinct compiled programs a width sampler can need.
    """
    lo = float(lo)
    hi = float(hi)
    if not 0 < lo <= hi <= MAX_WIDTH:
        raise ValueError(f"need 0 < lo <= hi <= 1, got lo={lo}, hi={hi}")
    if step is not None:
        n = int(round((hi - lo) / step))
        grid = sorted({round(min(hi, lo + i * step), 10) for i in range(n + 1)} | {hi})
        seen: dict[tuple[int, ...], float] = {}
        for w in grid:
            seen.setdefault(config_fn(w), w)
        return sorted(seen.values())
    # Exhaustive: configurations are piecewise constant in w and monotone, so scan a fine grid
    # and bisect each change point.
    out = [lo]
    scan = np.linspace(lo, hi, max(2, int((hi - lo) * 4096) + 1))
    prev_w, prev_c = lo, config_fn(lo)
    for w in scan[1:]:
        w = float(w)
        c = config_fn(w)
        if c != prev_c:
            a, b = prev_w, w
            while b - a > 1e-7:
                m = 0.5 * (a + b)
                if config_fn(m) == prev_c:
                    a = m
                else:
                    b = m
            out.append(b)
            prev_c = c
        prev_w = w
    return out


# ------------------------------------------------------------------------------------------
# Initialisers
# ------------------------------------------------------------------------------------------

# PyTorch's default conv/linear init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# kaiming_normal(mode='fan_out', nonlinearity='relu'): N(0, 2/fan_out), not truncated.
kaiming_fan_out_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init U(+-1/sqrt(fan_in)) (needs fan_in, unlike Flax's)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ------------------------------------------------------------------------------------------
# Slimmable layers
# ------------------------------------------------------------------------------------------


def _check_in(name: str, got: int, expected: int, c_max: int, width: float) -> None:
    if got != expected:
        raise ValueError(
            f"{name}: input has {got} channels but width {width} expects {expected} "
            f"(full size {c_max}); the previous layer and this one disagree on the width")


class SlimConv(nn.Module):
    """2-D convolution (NHWC/HWIO) slimmed on input and/or output channels.

    ``ratio_in``/``ratio_out`` implement MobileNetV2's expansion ratio. With
    ``depthwise`` the kernel is (kh, kw, 1, C) and ``feature_group_count`` equals the used
    channels. Padding is symmetric ``kernel // 2`` as in PyTorch (not XLA's 'SAME').
    """
    in_features: int
    features: int
    kernel_size: int = 3
    strides: int = 1
    use_bias: bool = False
    slim_in: bool = True
    slim_out: bool = True
    ratio_in: int = 1
    ratio_out: int = 1
    depthwise: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = torch_default_kernel_init

    @nn.compact
    def __call__(self, x: Array, width: float) -> Array:
        cin = x.shape[-1]
        exp_in = channels(self.in_features, width, self.ratio_in) if self.slim_in \
            else self.in_features
        _check_in(self.name or "SlimConv", cin, exp_in, self.in_features, width)
        if self.depthwise:
            if self.features != self.in_features:
                raise ValueError("depthwise SlimConv needs features == in_features")
            cout = cin
            kshape = (self.kernel_size, self.kernel_size, 1, self.features)
            groups = cin
        else:
            cout = channels(self.features, width, self.ratio_out) if self.slim_out \
                else self.features
            kshape = (self.kernel_size, self.kernel_size, self.in_features, self.features)
            groups = 1
        kernel = self.param("kernel", self.kernel_init, kshape, self.param_dtype)
        kernel = kernel[:, :, : (1 if self.depthwise else cin), :cout]
        pad = self.kernel_size // 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype),
            window_strides=(self.strides, self.strides),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups)
        if self.use_bias:
            fan_in = kshape[0] * kshape[1] * kshape[2]
            bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,),
                              self.param_dtype)
            y = y + bias[:cout].astype(self.dtype)
        return y


class SlimDense(nn.Module):
    """Dense layer slimmed on its input (``slim_in``) and/or output (``slim_out``) side.

    The default init is PyTorch's nn.Linear default (weight and bias U(+-1/sqrt(fan_in))).
    """
    in_features: int
    features: int
    use_bias: bool = True
    slim_in: bool = True
    slim_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = torch_default_kernel_init
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x: Array, width: float = MAX_WIDTH) -> Array:
        cin = x.shape[-1]
        exp_in = channels(self.in_features, width) if self.slim_in else self.in_features
        _check_in(self.name or "SlimDense", cin, exp_in, self.in_features, width)
        cout = channels(self.features, width) if self.slim_out else self.features
        kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features),
                            self.param_dtype)[:cin, :cout]
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            binit = self.bias_init or torch_default_bias_init(self.in_features)
            bias = self.param("bias", binit, (self.features,), self.param_dtype)
            y = y + bias[:cout].astype(self.dtype)
        return y


def grouped_moments(x: Array, group_size: int | None) -> tuple[Array, Array]:
    """Per-group mean and biased variance over all axes but the last, in float32.

    ``x`` has the batch on axis 0. Returns arrays of shape (G, C) where G = batch / group_size
    (G = 1 when ``group_size`` is None or equals the batch). Two-pass variance, as PyTorch.
    """
    b = x.shape[0]
    g = b if group_size is None else int(group_size)
    if g <= 0 or b % g:
        raise ValueError(f"batch {b} is not divisible by the BN group size {group_size}")
    xg = x.astype(jnp.float32).reshape((b // g, -1, x.shape[-1]))
    mean = jnp.mean(xg, axis=1)
    var = jnp.mean(jnp.square(xg - mean[:, None, :]), axis=1)
    return mean, var


def _normalize(x: Array, mean: Array, rstd: Array) -> Array:
    """``(x - mean) * rstd`` per group, float32, in ``x``'s shape ((G, C) statistics)."""
    g, c = mean.shape
    xg = x.astype(jnp.float32).reshape((g, -1, c))
    return ((xg - mean[:, None, :]) * rstd[:, None, :]).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: Array, scale: Array, bias: Array, group_size: int | None,
                     epsilon: float, dtype: Dtype) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm with per-group batch statistics: ``(y, mean, var)``, ``y`` in
    ``dtype``, ``mean``/``var`` (G, C) float32 (two-pass, biased, as PyTorch).

    The gradient is the closed form of BatchNorm's backward (as cuDNN's), not autodiff through
    the two-pass variance: per group, ``dx = scale * rstd * (dy - mean(dy) - xhat *
    mean(dy * xhat))``. Both means come from one pass over ``dy`` and ``x``, where autodiff
    reads the activations several more times; BN is memory-bound, so on a GPU this is most of
    what a ResNet step spends outside its convolutions. Equal to autodiff at float32
    rounding. ``mean``/``var`` are statistics for calibration: no gradient flows through them.
    """
    return _batch_norm_fwd(x, scale, bias, group_size, epsilon, dtype)[0]


def _batch_norm_fwd(x, scale, bias, group_size, epsilon, dtype):
    mean, var = grouped_moments(x, group_size)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (_normalize(x, mean, rstd) * scale + bias).astype(dtype)
    return (y, mean, var), (x, scale, mean, rstd)


def _batch_norm_bwd(group_size, epsilon, dtype, res, cotangents):
    x, scale, mean, rstd = res
    dy = cotangents[0]
    g, c = mean.shape
    xhat = _normalize(x, mean, rstd).reshape((g, -1, c))
    dyg = dy.astype(jnp.float32).reshape((g, -1, c))
    n = dyg.shape[1]
    sum_dy = jnp.sum(dyg, axis=1)  # (G, C)
    sum_dy_xhat = jnp.sum(dyg * xhat, axis=1)
    dx = (scale * rstd)[:, None, :] * (dyg - (sum_dy / n)[:, None, :]
                                       - xhat * (sum_dy_xhat / n)[:, None, :])
    return (dx.reshape(x.shape).astype(x.dtype), jnp.sum(sum_dy_xhat, axis=0),
            jnp.sum(sum_dy, axis=0))


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class SlimBatchNorm(nn.Module):
    """BatchNorm over the leading channels at the current width.

    Training normalises with the batch statistics of the used channels (optionally per group
    of ``group_size`` examples, so that e.g. a 512 batch reproduces the official per-GPU
    128-sample statistics on any device count) and stores **nothing**. Evaluation reads
    full-size ``mean``/``var`` from the ``batch_stats`` collection (the calibrated statistics
    for this width) and uses their first ``c`` entries.

    When the ``bn_moments`` collection is mutable, training also records each layer's
    whole-batch ``mean``/``var`` (biased) and the element ``count`` per channel, which is what
    BN calibration accumulates.

    ``switchable``: a fixed width list (S-Net's switchable BatchNorm). Each width of the list
    then has its **private** BN, a child ``w<i>`` (i = the width's index) with its own
    scale/bias and its own ``batch_stats``; convolutions stay shared. Any other width is
    refused. Initialisation creates every width's variables, whatever width it runs at.
    """
    num_features: int
    ratio: int = 1
    slim: bool = True
    group_size: int | None = None
    epsilon: float = 1e-5
    affine: bool = True  # False: no scale/bias (SimSiam's last projector BN)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    switchable: tuple[float, ...] = ()

    @nn.compact
    def __call__(self, x: Array, width: float, train: bool) -> Array:
        if self.switchable:
            return self._switch(x, width, train)
        c = x.shape[-1]
        exp_c = channels(self.num_features, width, self.ratio) if self.slim \
            else self.num_features
        _check_in(self.name or "SlimBatchNorm", c, exp_c, self.num_features, width)
        if train:
            scale, bias = self._affine_params(c)
            y, mean, var = batch_norm_train(x, scale, bias, self.group_size, self.epsilon,
                                            self.dtype)
            if self.is_mutable_collection("bn_moments") and not self.is_initializing():
                whole_mean = jnp.mean(mean, axis=0)
                whole_var = jnp.mean(var + jnp.square(mean), axis=0) - jnp.square(whole_mean)
                self.sow("bn_moments", "mean", whole_mean)
                self.sow("bn_moments", "var", whole_var)
                self.sow("bn_moments", "count", jnp.asarray(x.size // c, jnp.float32))
            return y
        else:
            if not self.has_variable("batch_stats", "mean") and not self.is_initializing():
                raise ValueError(
                    f"{self.name}: evaluation mode (train=False) needs calibrated BN statistics "
                    "in the 'batch_stats' collection for this width; calibrate first "
                    "(us3l_jax.evaluate) or run with train=True")
            ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (self.num_features,),
                                    jnp.float32)
            ra_var = self.variable("batch_stats", "var", jnp.ones, (self.num_features,),
                                   jnp.float32)
            mean, var = ra_mean.value[:c], ra_var.value[:c]
            y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
            scale, bias = self._affine_params(c)
            return (y * scale + bias).astype(self.dtype)

    def _affine_params(self, c: int) -> tuple[Array, Array]:
        """The leading ``c`` scale/bias entries in float32 (1 and 0 without ``affine``)."""
        if not self.affine:
            return jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (self.num_features,),
                           self.param_dtype)[:c]
        bias = self.param("bias", nn.initializers.zeros, (self.num_features,),
                          self.param_dtype)[:c]
        return scale.astype(jnp.float32), bias.astype(jnp.float32)

    def _switch(self, x: Array, width: float, train: bool) -> Array:
        i = switch_index(self.switchable, width)
        kw = dict(num_features=self.num_features, ratio=self.ratio, slim=self.slim,
                  group_size=self.group_size, epsilon=self.epsilon, affine=self.affine,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        if self.is_initializing():  # create the other widths' private variables too
            for j, w in enumerate(self.switchable):
                if j != i:
                    c_j = channels(self.num_features, w, self.ratio) if self.slim \
                        else self.num_features
                    SlimBatchNorm(**kw, name=f"w{j}")(
                        jnp.zeros(x.shape[:-1] + (c_j,), x.dtype), w, train)
        return SlimBatchNorm(**kw, name=f"w{i}")(x, width, train)


def slice_leading(a: np.ndarray | Array, sizes: Sequence[int | None]) -> Any:
    """``a[:s0, :s1, ...]`` with ``None`` meaning the whole axis."""
    return a[tuple(slice(None) if s is None else slice(0, s) for s in sizes)]


class SlimLayerNorm(nn.Module):
    """LayerNorm over the last axis with full-size ``scale``/``bias`` of which the leading
    ``x.shape[-1]`` entries are used: a Vision Transformer whose embedding dimension shrinks
    normalises each token over its used features only (the caller decides that size)."""
    num_features: int
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        if c > self.num_features:
            raise ValueError(f"{self.name}: input has {c} features, more than the "
                             f"{self.num_features} this LayerNorm holds")
        scale = self.param("scale", nn.initializers.ones, (self.num_features,),
                           self.param_dtype)[:c]
        bias = self.param("bias", nn.initializers.zeros, (self.num_features,),
                          self.param_dtype)[:c]
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LeadingDense(nn.Module):
    """Dense layer of full size (``in_features``, ``features``) that reads the leading
    ``x.shape[-1]`` input features and produces the leading ``out_features`` outputs (all by
    default): the caller decides both sizes, e.g. a ViT whose slicing rule is not
    ``channels(c_max, width)`` of this layer's own size. Defaults: Xavier-uniform kernel and a
    zero bias (the MoCo v3 ViT initialisation)."""
    in_features: int
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, out_features: int | None = None) -> Array:
        cin = x.shape[-1]
        cout = self.features if out_features is None else int(out_features)
        if cin > self.in_features or not 0 < cout <= self.features:
            raise ValueError(f"{self.name}: cannot read {cin} inputs / produce {cout} outputs "
                             f"from a ({self.in_features}, {self.features}) layer")
        kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features),
                            self.param_dtype)[:cin, :cout]
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias[:cout].astype(self.dtype)
        return y
