"""Universally slimmable Vision Transformer (the MoCo v3 ViT: timm layout, fixed 2-D sin-cos
position embedding, qkv bias, LayerNorm eps 1e-6, MoCo v3 initialisation).

Two ways to run it at width ``w`` (``slicing``):

* ``official`` (what produced paper Table 3): only the Linear layers inside the blocks are
  slimmable, on their **input** side. qkv and fc1 read the first ``md(d*w)`` features of the
  normalised tokens (``md`` = ``slim.channels``), proj reads the leading ``md(d*w)`` channels
  of the concatenated head outputs (all heads are computed at full head dimension), fc2 reads
  the first ``md(4d*w)`` hidden units. Every output, the LayerNorms, the patch embedding, the
  residual stream, the class token and the feature stay full width (``d``).
* ``embed`` (the paper's text, "reduce the embedding dimension in all layers"): the residual
  width is ``h(w) * head_dim`` with ``h(w)`` leading heads at full head dimension
  (``h(w) = make_divisible(heads * w, 1)``), and every layer shrinks with it: patch embedding,
  class token, LayerNorms, qkv/proj, the MLP (hidden ``mlp_ratio`` times the width) and the
  final norm. A sub-network is then exactly a smaller ViT (``plain_vit``), which
  ``us3l_jax.export.slice_to_width`` cuts out. Its position embedding is the sin-cos table of
  its own dimension (the leading columns of the full table would hold only one spatial axis).

Parameters are stored so that every sub-network uses **leading** slices: the qkv kernel is
(d, 3, heads, head_dim), the class token (1, 1, d). Names follow timm (``patch_embed``,
``cls_token``, ``blocks_{i}/{norm1,attn/qkv,attn/proj,norm2,mlp/fc1,mlp/fc2}``, ``norm``,
``head``) for the torch-layout export.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from us3l_jax import slim
from us3l_jax.slim import LeadingDense, SlimLayerNorm

SLICINGS = ("official", "embed")
LN_EPS = 1e-6  # MoCo v3: partial(nn.LayerNorm, eps=1e-6)


@dataclasses.dataclass(frozen=True)
class ViTDims:
    """What a ViT uses at one width (host-side ints): residual width ``embed``, ``heads``
    computed, the inputs read by qkv/proj/fc1 (``block_in``) and fc2 (``fc2_in``), and the
    MLP ``hidden`` size produced by fc1."""
    embed: int
    heads: int
    block_in: int
    hidden: int
    fc2_in: int


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """MoCo v3's fixed 2-D sin-cos table (1 + grid_h * grid_w, dim), float32, with a zero row
    for the class token: [sin(a w), cos(a w), sin(a h), cos(a h)] with frequencies
    1/10000^(i/(dim/4)), where (w, h) come from ``meshgrid(arange(grid_w), arange(grid_h))``
    in 'ij' indexing, as the official code writes it."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a dimension divisible by 4, "
                         f"got {dim}")
    gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float32),
                         np.arange(grid_h, dtype=np.float32), indexing="ij")
    pos_dim = dim // 4
    omega = np.arange(pos_dim, dtype=np.float32) / np.float32(pos_dim)
    omega = (1.0 / np.power(np.float32(10000.0), omega)).astype(np.float32)
    out_w = np.einsum("m,d->md", gw.reshape(-1), omega)
    out_h = np.einsum("m,d->md", gh.reshape(-1), omega)
    table = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], 1)
    return np.concatenate([np.zeros((1, dim), np.float32), table.astype(np.float32)], 0)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> ``out_features`` leading channels of a (p, p, C, d)
    kernel (torch's Conv2d(C, d, p, stride=p)); Xavier-uniform with fan-in 3*p*p as MoCo v3."""
    patch_size: int
    in_channels: int
    features: int
    stop_gradient: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, out_features: int) -> jax.Array:
        p = self.patch_size
        b, h, w, c = x.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        bound = math.sqrt(6.0 / float(3 * p * p + self.features))
        kernel = self.param("kernel", _uniform(bound), (p, p, self.in_channels,
                                                        self.features))[..., :out_features]
        bias = self.param("bias", nn.initializers.zeros, (self.features,))[:out_features]
        if self.stop_gradient:  # MoCo v3's --stop-grad-conv1: a frozen random projection
            kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
        patches = x.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        y = jnp.einsum("bhiwjc,ijcd->bhwd", patches, kernel.astype(self.dtype))
        return (y + bias.astype(self.dtype)).reshape(b, (h // p) * (w // p), out_features)


class QKV(nn.Module):
    """The qkv Linear with its kernel stored (d, 3, heads, head_dim) (= torch's (3d, d) weight
    transposed and split), so leading heads are a leading slice. Init: Xavier-uniform of each
    of q, k, v as a (d, d) matrix, zero bias (MoCo v3)."""
    dim: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, heads: int) -> jax.Array:
        hd = self.dim // self.heads
        bound = math.sqrt(6.0 / float(self.dim + self.dim))
        kernel = self.param("kernel", _uniform(bound), (self.dim, 3, self.heads, hd))
        bias = self.param("bias", nn.initializers.zeros, (3, self.heads, hd))
        kernel, bias = kernel[: x.shape[-1], :, :heads], bias[:, :heads]
        y = jnp.einsum("bnc,cshk->bnshk", x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)  # (B, N, 3, heads, head_dim)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm)."""
    dim: int
    heads: int
    mlp_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, dims: ViTDims) -> jax.Array:
        cin = dims.block_in
        ln = dict(epsilon=LN_EPS, dtype=self.dtype)
        y = SlimLayerNorm(self.dim, name="norm1", **ln)(x)
        x = x + _Attention(self.dim, self.heads, self.dtype, name="attn")(y[..., :cin], dims)
        y = SlimLayerNorm(self.dim, name="norm2", **ln)(x)
        return x + _MLP(self.dim, self.dim * self.mlp_ratio, self.dtype, name="mlp")(
            y[..., :cin], dims)


class _Attention(nn.Module):
    dim: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, dims: ViTDims) -> jax.Array:
        hd = self.dim // self.heads
        qkv = QKV(self.dim, self.heads, self.dtype, name="qkv")(x, dims.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, h, hd)
        logits = jnp.einsum("bqhk,bthk->bhqt", q, k) * (hd ** -0.5)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        o = jnp.einsum("bhqt,bthk->bqhk", attn, v)
        o = o.reshape(o.shape[0], o.shape[1], -1)  # heads concatenated, as torch
        return LeadingDense(self.dim, self.dim, dtype=self.dtype, name="proj")(
            o[..., :dims.block_in], dims.embed)


class _MLP(nn.Module):
    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, dims: ViTDims) -> jax.Array:
        y = LeadingDense(self.dim, self.hidden, dtype=self.dtype, name="fc1")(x, dims.hidden)
        y = nn.gelu(y, approximate=False)  # torch nn.GELU: exact erf form
        return LeadingDense(self.hidden, self.dim, dtype=self.dtype, name="fc2")(
            y[..., :dims.fc2_in], dims.embed)


class VisionTransformer(nn.Module):
    """Slimmable ViT; ``__call__(x, width=1.0, train=True)`` on NHWC images returns the
    normalised class token (``feature_dim(width)`` features) when ``num_classes`` is None, else
    logits from ``head`` (input slimmed in ``embed`` mode). ``train`` is accepted for the common
    backbone interface (no dropout or BatchNorm here). ``image_size`` is the size the
    torch-layout ``pos_embed`` is written for; the forward works at any multiple of the patch.
    ``bn_group_size`` is accepted and unused (a uniform builder interface; no BN)."""
    num_classes: int | None = None
    image_size: int = 224
    patch_size: int = 16
    dim: int = 192
    depth: int = 12
    heads: int = 6
    mlp_ratio: int = 4
    slicing: str = "official"
    stop_grad_patch: bool = False
    min_width: float = 0.25
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    has_batch_norm = False  # nothing for BN calibration to do

    # ---------------------------------------------------------------- host-side sizes

    def _check(self) -> None:
        if self.slicing not in SLICINGS:
            raise ValueError(f"slicing={self.slicing!r} is not one of {SLICINGS}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.slicing == "embed" and (self.dim // self.heads) % 4:
            raise ValueError(f"slicing='embed' needs a head dimension divisible by 4 (sin-cos "
                             f"position embedding of every width), got {self.dim // self.heads}")

    def heads_at(self, width: float) -> int:
        """Heads of the ``embed`` sub-network at ``width``: ``make_divisible(heads * w, 1)``."""
        return min(self.heads, slim.make_divisible(self.heads * width, divisor=1))

    def dims(self, width: float) -> ViTDims:
        self._check()
        w = slim.validate_width(width, self.min_width)
        hidden = self.dim * self.mlp_ratio
        if self.slicing == "official":
            return ViTDims(self.dim, self.heads, min(self.dim, slim.channels(self.dim, w)),
                           hidden, min(hidden, slim.channels(hidden, w)))
        h = self.heads_at(w)
        e = h * (self.dim // self.heads)
        return ViTDims(e, h, e, e * self.mlp_ratio, e * self.mlp_ratio)

    def feature_dim(self, width: float) -> int:
        return self.dims(width).embed

    def frozen_params(self) -> tuple[tuple[str, ...], ...]:
        """Parameter paths no optimizer may change: the patch embedding when it is a fixed
        random projection (``stop_grad_patch``, MoCo v3's ``--stop-grad-conv1``)."""
        return (("patch_embed",),) if self.stop_grad_patch else ()

    def slim_dims(self) -> tuple[tuple[int, int], ...]:
        return ((self.dim, 1), (self.dim * self.mlp_ratio, 1))

    def channel_config(self, width: float) -> tuple[int, ...]:
        """The sizes used at ``width`` (widths with equal configurations share programs)."""
        return dataclasses.astuple(self.dims(width))

    # ---------------------------------------------------------------- forward

    @nn.compact
    def __call__(self, x: jax.Array, width: float = 1.0, train: bool = True) -> jax.Array:
        del train
        d = self.dims(width)
        p = self.patch_size
        tokens = PatchEmbed(p, x.shape[-1], self.dim, self.stop_grad_patch, self.dtype,
                            name="patch_embed")(x, d.embed)
        b = tokens.shape[0]
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.dim))
        cls = jnp.broadcast_to(cls[..., :d.embed].astype(self.dtype), (b, 1, d.embed))
        pos = sincos_pos_embed(x.shape[1] // p, x.shape[2] // p, d.embed)
        h = jnp.concatenate([cls, tokens], axis=1) + jnp.asarray(pos, self.dtype)
        for i in range(self.depth):
            h = Block(self.dim, self.heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(h, d)
        h = SlimLayerNorm(self.dim, epsilon=LN_EPS, dtype=self.dtype, name="norm")(h)
        feat = h[:, 0]
        if self.num_classes is None:
            return feat
        return LeadingDense(self.dim, self.num_classes, dtype=self.dtype, name="head")(feat)


def plain_vit(model: VisionTransformer, width: float) -> VisionTransformer:
    """The ViT that ``model`` (``slicing='embed'``) is at ``width``: dimension h(w)*head_dim,
    h(w) heads, the same depth and head dimension; its variables are leading slices. With
    ``slicing='official'`` only width 1.0 is a plain ViT."""
    if model.slicing != "embed":
        if slim.validate_width(width, model.min_width) == slim.MAX_WIDTH:
            return model.clone(min_width=1.0)  # width 1.0 is the ViT itself
        raise ValueError(
            "only slicing='embed' sub-networks are smaller ViTs; with slicing='official' the "
            "residual stream stays full width and the network runs the full weights at a width")
    h = model.heads_at(slim.validate_width(width, model.min_width))
    return model.clone(dim=h * (model.dim // model.heads), heads=h, min_width=1.0)
