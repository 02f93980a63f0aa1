"""Width arithmetic and the slimmable layers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from us3l_jax import slim


@pytest.mark.parametrize("v,expected", [
    (19.2, 24), (38.4, 40), (76.8, 80), (153.6, 152), (614.4, 616),
    (44.00000000000001, 48), (43.99, 40), (9, 16), (18, 24), (4, 8), (2, 9), (1, 1)])
def test_make_divisible_reference_table(v, expected):
    assert slim.make_divisible(v) == expected


def test_make_divisible_float64_argument_order():
    # Channel counts must be computed in Python float64 with the official expression. The
    # the official example 160*0.275 is exactly 44.0 in float64 (it rounds to 48 either way);
    # a real case is MobileNetV2's t6c160 expansion at w=0.525: (960*0.525)/6 is 84.0 in
    # float64 -> 88*6 = 528 hidden channels, but 83.99999 in float32 -> 80*6 = 480.
    assert slim.channels(160, 0.275) == 48
    assert (960 * 0.525) / 6 == 84.0
    assert slim.channels(960, 0.525, ratio=6) == 528
    f32 = float(np.float32(960) * np.float32(0.525) / np.float32(6))
    assert slim.make_divisible(f32) * 6 == 480
    # The ratio rule evaluates (c_max * w) / t, not c_max / t * w.
    assert slim.channels(96, 0.5, ratio=6) == slim.make_divisible(96 * 0.5 / 6) * 6 == 48


def test_make_divisible_intervals():
    # Exact result intervals of the official rounding (docs/fidelity.md).
    for lo, hi, out in [(4, 8.88, 8), (8.89, 17.77, 16), (17.78, 26.66, 24),
                        (26.67, 35.55, 32), (35.56, 43.99, 40), (44, 51.99, 48)]:
        for v in np.linspace(lo, hi, 25):
            assert slim.make_divisible(float(v)) == out, v


# Official: md(c*w) for c in (64, 128, 256, 512, 1024, 2048).
CHANNEL_TABLE = {
    0.25: (16, 32, 64, 128, 256, 512),
    0.275: (16, 32, 72, 144, 280, 560),
    0.3: (24, 40, 80, 152, 304, 616),
    0.33: (24, 40, 88, 168, 336, 672),
    0.35: (24, 48, 88, 176, 360, 720),
    0.4: (24, 48, 104, 208, 408, 816),
    0.5: (32, 64, 128, 256, 512, 1024),
    0.6: (40, 80, 152, 304, 616, 1232),
    0.7: (48, 88, 176, 360, 720, 1432),
    0.75: (48, 96, 192, 384, 768, 1536),
    0.8: (48, 104, 208, 408, 816, 1640),
    0.9: (56, 112, 232, 464, 920, 1840),
    1.0: (64, 128, 256, 512, 1024, 2048),
}


@pytest.mark.parametrize("w", sorted(CHANNEL_TABLE))
def test_channel_table(w):
    got = tuple(slim.channels(c, w) for c in (64, 128, 256, 512, 1024, 2048))
    assert got == CHANNEL_TABLE[w]


def test_standard_widths_equal_int():
    # Official: at 0.25/0.5/0.75/1.0 make_divisible equals int() for the ResNet widths,
    # which is why the paper's int-rounded profiles describe the trained networks...
    for c in (64, 128, 256, 512, 1024, 2048):
        for w in (0.25, 0.5, 0.75, 1.0):
            assert slim.channels(c, w) == int(c * w)
    # ...but not for all MobileNetV2 widths (t6c24 at 0.5 has 16 outputs).
    assert slim.channels(24, 0.5) == 16 != int(24 * 0.5)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, 2, float("nan"), float("inf")])
def test_validate_width_rejects(bad):
    with pytest.raises(ValueError, match=r"width .* outside the allowed range \(0, 1.0\]"):
        slim.validate_width(bad)


def test_validate_width_below_model_minimum():
    with pytest.raises(ValueError, match=r"width 0.2 is outside the allowed range \[0.25, 1.0\]"):
        slim.validate_width(0.2, min_width=0.25)
    assert slim.validate_width(0.25, min_width=0.25) == 0.25
    with pytest.raises(ValueError, match="must be a number"):
        slim.validate_width("wide")


def test_validate_width_rejects_tracer():
    with pytest.raises(TypeError, match="static Python float"):
        jax.jit(lambda w: slim.validate_width(w))(0.5)


def _r18_config(w):
    return slim.channel_config([(64, 1), (128, 1), (256, 1), (512, 1)], w)


def test_distinct_widths_grid():
    grid = slim.distinct_widths(_r18_config, 0.25, 1.0, step=1 / 16)
    configs = [_r18_config(w) for w in grid]
    assert len(set(configs)) == len(configs) == len(grid)
    # Every grid width maps to a kept configuration.
    for i in range(13):
        assert _r18_config(0.25 + i / 16) in configs
    assert grid[0] == 0.25 and grid[-1] == 1.0


def test_distinct_widths_exhaustive():
    ws = slim.distinct_widths(_r18_config, 0.25, 1.0)
    configs = [_r18_config(w) for w in ws]
    assert len(set(configs)) == len(ws)
    fine = {_r18_config(float(w)) for w in np.linspace(0.25, 1.0, 20001)}
    assert set(configs) == fine
    # md(512w) alone takes every multiple of 8 from 128 to 512: 49 values.
    assert len(ws) >= 49
    with pytest.raises(ValueError, match="lo <= hi"):
        slim.distinct_widths(_r18_config, 0.8, 0.5)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _conv_ref(x, k, stride=1, groups=1):
    pad = k.shape[0] // 2
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def test_slim_conv_uses_leading_channels():
    conv = slim.SlimConv(32, 64, 3, strides=2, use_bias=True)
    x_full = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    params = conv.init(jax.random.key(1), x_full, 1.0)["params"]
    w = 0.3
    cin, cout = slim.channels(32, w), slim.channels(64, w)
    assert (cin, cout) == (16, 24)
    x = x_full[..., :cin]
    y = conv.apply({"params": params}, x, w)
    ref = _conv_ref(x, params["kernel"][:, :, :cin, :cout], 2) + params["bias"][:cout]
    assert y.shape == (2, 4, 4, 24)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_slim_conv_rejects_wrong_input_width():
    conv = slim.SlimConv(32, 64, 3)
    params = conv.init(jax.random.key(1), jnp.ones((1, 4, 4, 32)), 1.0)["params"]
    with pytest.raises(ValueError, match="input has 32 channels but width 0.5 expects 16"):
        conv.apply({"params": params}, jnp.ones((1, 4, 4, 32)), 0.5)


def test_slim_conv_depthwise_with_ratio():
    # MobileNetV2 depthwise at expansion 6: channels = md(96*w/6)*6.
    conv = slim.SlimConv(96, 96, 3, depthwise=True, ratio_in=6, ratio_out=6)
    params = conv.init(jax.random.key(0), jnp.ones((1, 6, 6, 96)), 1.0)["params"]
    assert params["kernel"].shape == (3, 3, 1, 96)
    w = 0.5
    c = slim.channels(96, w, 6)
    assert c == 48
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, c))
    y = conv.apply({"params": params}, x, w)
    ref = _conv_ref(x, params["kernel"][..., :c], groups=c)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_slim_dense_sides():
    x_full = jax.random.normal(jax.random.key(0), (3, 64))
    for slim_in, slim_out in [(True, False), (False, True), (True, True)]:
        d = slim.SlimDense(64, 32, slim_in=slim_in, slim_out=slim_out)
        p = d.init(jax.random.key(1), x_full, 1.0)["params"]
        w = 0.5
        cin = 32 if slim_in else 64
        cout = 16 if slim_out else 32
        y = d.apply({"params": p}, x_full[:, :cin], w)
        ref = x_full[:, :cin] @ p["kernel"][:cin, :cout] + p["bias"][:cout]
        assert y.shape == (3, cout)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_torch_default_init_bounds():
    d = slim.SlimDense(256, 512)
    p = d.init(jax.random.key(0), jnp.ones((1, 256)))["params"]
    bound = 1 / math.sqrt(256)
    for a in (p["kernel"], p["bias"]):
        assert float(jnp.max(jnp.abs(a))) <= bound
        assert float(jnp.max(jnp.abs(a))) > 0.95 * bound  # uniform, not shrunk
    # Variance of U(-b, b) is b^2/3.
    np.testing.assert_allclose(float(jnp.std(p["kernel"])), bound / math.sqrt(3), rtol=0.02)


def test_batchnorm_train_uses_batch_stats_and_stores_nothing():
    bn = slim.SlimBatchNorm(16)
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 16)) * 3 + 1
    variables = bn.init(jax.random.key(1), x, 1.0, True)
    assert set(variables) == {"params"}
    p = {"params": {"scale": jnp.arange(16.0) + 1, "bias": jnp.arange(16.0)}}
    w = 0.5
    y = bn.apply(p, x[..., :8], w, True)
    xs = x[..., :8]
    mean = xs.mean((0, 1, 2))
    var = xs.var((0, 1, 2))
    ref = (xs - mean) / jnp.sqrt(var + 1e-5) * (jnp.arange(8.0) + 1) + jnp.arange(8.0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_batchnorm_groups_match_separate_batches():
    bn_g = slim.SlimBatchNorm(8, group_size=2)
    bn = slim.SlimBatchNorm(8)
    x = jax.random.normal(jax.random.key(0), (6, 2, 2, 8))
    p = bn.init(jax.random.key(1), x, 1.0, True)
    y = bn_g.apply(p, x, 1.0, True)
    ref = jnp.concatenate([bn.apply(p, x[i:i + 2], 1.0, True) for i in (0, 2, 4)])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by the BN group size 4"):
        slim.SlimBatchNorm(8, group_size=4).apply(p, x, 1.0, True)


def _autodiff_bn(x, scale, bias, group_size, eps=1e-5):
    """BatchNorm written plainly (two-pass variance per group), for autodiff to differentiate."""
    g = x.shape[0] // (group_size or x.shape[0])
    xg = x.astype(jnp.float32).reshape((g, -1, x.shape[-1]))
    mean = xg.mean(1, keepdims=True)
    var = jnp.square(xg - mean).mean(1, keepdims=True)
    return ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.slow
@pytest.mark.parametrize("group_size,dtype", [(None, jnp.float32), (2, jnp.float32),
                                              (2, jnp.bfloat16)])
def test_batchnorm_closed_form_gradient_equals_autodiff(group_size, dtype):
    """The hand-written backward of ``batch_norm_train`` against autodiff of the plain
    formula, for input, scale and bias, under a loss that weights every output differently."""
    k = jax.random.split(jax.random.key(3), 4)
    x = (jax.random.normal(k[0], (6, 3, 3, 8)) * 2 + 0.5).astype(dtype)
    scale = jax.random.uniform(k[1], (8,), minval=0.5, maxval=2.0)
    bias = jax.random.normal(k[2], (8,))
    w = jax.random.normal(k[3], x.shape)

    def ours(x, s, b):
        return jnp.sum(w * slim.batch_norm_train(x, s, b, group_size, 1e-5, dtype)[0]
                       .astype(jnp.float32))

    def ref(x, s, b):
        return jnp.sum(w * _autodiff_bn(x, s, b, group_size).astype(dtype).astype(jnp.float32))

    got = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(ref, argnums=(0, 1, 2))(x, scale, bias)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: dx is rounded to bf16 either way
    for a, b, name in zip(got, want, ("x", "scale", "bias")):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol, err_msg=name)
    # The forward is the plain formula too.
    y, mean, var = slim.batch_norm_train(x, scale, bias, group_size, 1e-5, jnp.float32)
    np.testing.assert_allclose(y, _autodiff_bn(x, scale, bias, group_size), rtol=1e-5,
                               atol=1e-5)
    assert mean.shape == var.shape == (6 // (group_size or 6), 8)


@pytest.mark.slow
def test_batchnorm_module_gradient_without_affine():
    """SimSiam's last projector BN has no scale/bias: gradients reach the input only."""
    bn = slim.SlimBatchNorm(8, affine=False, group_size=2)
    x = jax.random.normal(jax.random.key(0), (4, 8)) * 3
    w = jax.random.normal(jax.random.key(1), (4, 8))
    v = bn.init(jax.random.key(2), x, 1.0, True)
    assert "params" not in v or not v["params"]
    got = jax.grad(lambda x: jnp.sum(w * bn.apply(v, x, 1.0, True)))(x)
    want = jax.grad(lambda x: jnp.sum(w * _autodiff_bn(x, 1.0, 0.0, 2)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batchnorm_eval_uses_prefix_of_batch_stats():
    bn = slim.SlimBatchNorm(16)
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 8))
    p = bn.init(jax.random.key(1), jnp.ones((2, 2, 2, 16)), 1.0, True)["params"]
    stats = {"mean": jnp.arange(16.0), "var": jnp.arange(16.0) + 1}
    w = 0.5
    y = bn.apply({"params": p, "batch_stats": stats}, x, w, False)
    ref = (x - jnp.arange(8.0)) / jnp.sqrt(jnp.arange(8.0) + 1 + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs calibrated BN statistics"):
        bn.apply({"params": p}, x, w, False)


def test_batchnorm_records_moments_for_calibration():
    bn = slim.SlimBatchNorm(16, group_size=2)
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 16)) + 2
    p = bn.init(jax.random.key(1), x, 1.0, True)
    xs = x[..., :8]
    _, state = bn.apply(p, xs, 0.5, True, mutable=["bn_moments"])
    m = state["bn_moments"]
    # Whole-batch moments, although normalisation used per-group statistics.
    np.testing.assert_allclose(m["mean"][0], xs.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["var"][0], xs.var((0, 1, 2)), rtol=1e-4, atol=1e-6)
    assert float(m["count"][0]) == 4 * 3 * 3


def test_bfloat16_compute_float32_params():
    conv = slim.SlimConv(8, 16, 3, dtype=jnp.bfloat16)
    v = conv.init(jax.random.key(0), jnp.ones((1, 4, 4, 8)), 1.0)
    assert v["params"]["kernel"].dtype == jnp.float32
    assert conv.apply(v, jnp.ones((1, 4, 4, 8)), 1.0).dtype == jnp.bfloat16
    bn = slim.SlimBatchNorm(16, dtype=jnp.bfloat16)
    vb = bn.init(jax.random.key(0), jnp.ones((2, 2, 2, 16)), 1.0, True)
    out = bn.apply(vb, jnp.ones((2, 2, 2, 16), jnp.bfloat16), 1.0, True)
    assert out.dtype == jnp.bfloat16 and vb["params"]["scale"].dtype == jnp.float32
    assert isinstance(conv, nn.Module)
