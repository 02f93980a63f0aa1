"""Slimmable ViT: official slicing equals a hand-sliced numpy ViT; embed slicing equals the
compact ViT that ``export.slice_to_width`` cuts out; sizes, position table, initialisation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import export, models, slim
from tests.models.vit_helpers import perturbed_init as _perturbed_init
from us3l_jax.models.vit import sincos_pos_embed
from tests.helpers import jit_init

WIDTHS = (1.0, 0.75, 0.5, 0.25)
TINY = dict(dim=32, depth=2, heads=4, patch_size=4, image_size=8)


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (3, 8, 8, 3), jnp.float32)


def _init(slicing, num_classes=5):
    model = models.create("vit_tiny", num_classes=num_classes, slicing=slicing, **TINY)
    # Non-zero biases, cls token and LayerNorm affine, so every slice is exercised.
    return model, jax.jit(_perturbed_init(model))(jax.random.key(0))


def _np_ln(x, scale, bias):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6) * scale + bias


_erf = np.vectorize(math.erf)


def _reference_official(p, x, width, dim, heads, patch):
    """The official US-ViT forward written out in numpy with torch-layout weights: block
    Linears read the first md(d*w) (fc2: md(4d*w)) inputs, everything else full width."""
    p = jax.tree.map(np.asarray, p)
    cin, hid_in = slim.channels(dim, width), slim.channels(4 * dim, width)
    b, hh, ww, c = x.shape
    g = hh // patch
    wconv = np.transpose(p["patch_embed"]["kernel"], (3, 2, 0, 1))  # torch (d, C, p, p)
    tok = np.zeros((b, g * g, dim))
    for i in range(g):
        for j in range(g):
            crop = np.transpose(x[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch],
                                (0, 3, 1, 2))
            tok[:, i * g + j] = np.einsum("bchw,dchw->bd", crop, wconv) + p["patch_embed"]["bias"]
    h = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, dim)), tok], 1)
    h = h + sincos_pos_embed(g, g, dim)
    hd = dim // heads
    for k in range(sum(1 for n in p if n.startswith("blocks_"))):
        blk = p[f"blocks_{k}"]
        y = _np_ln(h, blk["norm1"]["scale"], blk["norm1"]["bias"])
        wqkv = blk["attn"]["qkv"]["kernel"].reshape(dim, 3 * dim).T  # torch (3d, d)
        qkv = y[..., :cin] @ wqkv[:, :cin].T + blk["attn"]["qkv"]["bias"].reshape(-1)
        qkv = qkv.reshape(b, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        a = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * hd ** -0.5
        a = np.exp(a - a.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = (a @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, -1, dim)
        h = h + o[..., :cin] @ blk["attn"]["proj"]["kernel"][:cin] + blk["attn"]["proj"]["bias"]
        y = _np_ln(h, blk["norm2"]["scale"], blk["norm2"]["bias"])
        y = y[..., :cin] @ blk["mlp"]["fc1"]["kernel"][:cin] + blk["mlp"]["fc1"]["bias"]
        y = 0.5 * y * (1 + _erf(y / math.sqrt(2)))
        h = h + y[..., :hid_in] @ blk["mlp"]["fc2"]["kernel"][:hid_in] + blk["mlp"]["fc2"]["bias"]
    f = _np_ln(h, p["norm"]["scale"], p["norm"]["bias"])[:, 0]
    return f @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("width", WIDTHS)
def test_official_slicing_equals_hand_sliced_reference(images, width):
    model, v = _init("official")
    ref = _reference_official(v["params"], np.asarray(images, np.float64), width, 32, 4, 4)
    for train in (True, False):
        out = model.apply(v, images, width=width, train=train)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
    assert model.feature_dim(width) == 32  # the residual stream never shrinks


@pytest.mark.slow
def test_embed_slicing_equals_compact_vit(images):
    model, v = _init("embed")
    outs = {}
    for width in WIDTHS:
        plain, sliced = export.slice_to_width("vit_tiny", v, width, slicing="embed", **TINY)
        heads = model.heads_at(width)
        assert (plain.dim, plain.heads) == (8 * heads, heads)
        assert sliced["params"]["blocks_1"]["attn"]["qkv"]["kernel"].shape == (8 * heads, 3,
                                                                               heads, 8)
        for train in (True, False):
            full = model.apply(v, images, width=width, train=train)
            compact = plain.apply(sliced, images, train=train)
            np.testing.assert_allclose(np.asarray(full), np.asarray(compact), atol=1e-5,
                                       rtol=1e-5)
        outs[width] = full
        # The compact ViT is an ordinary ViT: width 1.0 of it is the official forward.
        ref = _reference_official(sliced["params"], np.asarray(images, np.float64), 1.0,
                                  plain.dim, plain.heads, 4)
        np.testing.assert_allclose(np.asarray(outs[width]), ref, atol=1e-5, rtol=1e-5)
    # heads 4 -> 3 / 2 / 1: feature dims 24 / 16 / 8 in embed mode
    assert [model.feature_dim(w) for w in WIDTHS] == [32, 24, 16, 8]
    assert not np.allclose(outs[1.0], outs[0.5])


def test_sizes_of_the_paper_models():
    tiny = models.create("vit_tiny")
    d = tiny.dims(0.25)  # official: qkv/proj/fc1 read 48 of 192, fc2 reads 192 of 768
    assert (d.embed, d.heads, d.block_in, d.hidden, d.fc2_in) == (192, 6, 48, 768, 192)
    small = models.create("vit_small", slicing="embed")
    assert [small.feature_dim(w) for w in WIDTHS] == [384, 288, 192, 96]
    assert [models.create("vit_tiny", slicing="embed").heads_at(w) for w in WIDTHS] == \
        [6, 5, 3, 2]
    with pytest.raises(ValueError, match="slicing"):
        models.create("vit_tiny", slicing="narrow").dims(1.0)
    with pytest.raises(ValueError, match="outside the allowed range"):
        tiny.dims(0.2)


def test_position_table_and_initialisation():
    # dim 4: one frequency (1.0); token m = i*2 + j has (w, h) = (i, j) ('ij' meshgrid).
    t = sincos_pos_embed(2, 2, 4)
    np.testing.assert_allclose(t[0], 0.0)
    np.testing.assert_allclose(t[2], [0.0, 1.0, math.sin(1), math.cos(1)], atol=1e-7)
    np.testing.assert_allclose(t[3], [math.sin(1), math.cos(1), 0.0, 1.0], atol=1e-7)
    model = models.create("vit_tiny", dim=64, depth=1, heads=2, patch_size=4)
    p = jit_init(model, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    qkv = np.asarray(p["blocks_0"]["attn"]["qkv"]["kernel"])
    assert qkv.shape == (64, 3, 2, 32)
    assert np.abs(qkv).max() <= math.sqrt(6 / 128) and np.abs(qkv).max() > 0.9 * math.sqrt(6 / 128)
    fc1 = np.asarray(p["blocks_0"]["mlp"]["fc1"]["kernel"])  # xavier: sqrt(6 / (64 + 256))
    assert 0.9 * math.sqrt(6 / 320) < np.abs(fc1).max() <= math.sqrt(6 / 320)
    assert np.abs(np.asarray(p["patch_embed"]["kernel"])).max() <= math.sqrt(6 / (48 + 64))
    assert np.abs(np.asarray(p["cls_token"])).max() < 1e-5
    assert not np.any(np.asarray(p["blocks_0"]["attn"]["qkv"]["bias"]))
    np.testing.assert_array_equal(np.asarray(p["norm"]["scale"]), 1.0)


@pytest.mark.slow
def test_embed_vit_feeds_the_default_projector_at_every_width(images):
    """Embed slicing keeps whole heads (dim 96, 6 heads of 16: 32 features at 0.25x where the
    layer rounding of 96 * 0.25 gives 24; 80 at 0.75x against 72), which the projector's first
    layer must read as they come."""
    from us3l_jax.models.heads import SSLModel
    bb = models.create("vit_tiny", slicing="embed", dim=96, depth=1, heads=6, patch_size=4,
                       image_size=8)
    model = SSLModel(bb, proj_hidden=16, proj_out=8, head_hidden=16)
    params = jit_init(model, jax.random.key(0), images, width=1.0)["params"]
    assert params["projector"]["fc1"]["kernel"].shape == (96, 16)
    for w in WIDTHS:
        z = model.apply({"params": params}, images, w, method=SSLModel.encode)
        assert z.shape == (3, 8) and bool(jnp.all(jnp.isfinite(z))), w
    assert (bb.feature_dim(0.25), slim.channels(96, 0.25)) == (32, 24)
    assert (bb.feature_dim(0.75), slim.channels(96, 0.75)) == (80, 72)
