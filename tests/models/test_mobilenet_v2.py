"""Slimmable MobileNetV2: ratio rule, unslimmed 1280 head."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import models
from us3l_jax.models import mobilenet_v2
from tests.models.helpers import output_channels
from tests.helpers import jit_init

# Official: (in, hidden, out) per block at w=0.25.
BLOCKS_AT_0_25 = ([(8, 8, 8)] + [(8, 48, 8)] * 2 + [(8, 48, 8)] * 3 + [(8, 48, 16)]
                  + [(16, 96, 16)] * 3 + [(16, 96, 24)] + [(24, 144, 24)] * 2
                  + [(24, 144, 40)] + [(40, 240, 40)] * 2 + [(40, 240, 80)])


def _blocks(ch, n):
    out = []
    prev = ch["stem_conv"]
    for i in range(n):
        hidden = ch.get(f"block{i}/expand_conv", prev)
        out.append((prev, hidden, ch[f"block{i}/project_conv"]))
        prev = out[-1][2]
    return out


def test_blocks_at_0_25():
    m = models.create("cifar_mobilenet_v2")
    out, ch = output_channels(m, 0.25)
    assert ch["stem_conv"] == 8
    assert _blocks(ch, 17) == BLOCKS_AT_0_25
    assert ch["head_conv"] == 1280 and out.shape == (2, 1280)


def test_block_t6c24_at_0_5():
    # Official: (in 8, hidden 48, out 16).
    _, ch = output_channels(models.create("cifar_mobilenet_v2"), 0.5)
    assert _blocks(ch, 2)[1] == (8, 48, 16)


def test_feature_dim_is_1280_at_every_width():
    m = models.create("mobilenet_v2", num_classes=7)
    for w in (0.25, 0.4, 1.0):
        assert m.feature_dim(w) == 1280
        out, _ = output_channels(m, w, size=64)
        assert out.shape == (2, 7)


def test_strides_depend_on_input_size():
    # CIFAR (32x32): stem and the t6c24 stage at stride 1; ImageNet: both stride 2.
    assert [s for *_, s in mobilenet_v2.block_specs(32)][:3] == [1, 1, 1]
    assert [s for *_, s in mobilenet_v2.block_specs(224)][:3] == [1, 2, 1]
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    m = models.create("cifar_mobilenet_v2")
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    _, st = jax.eval_shape(lambda v, x: m.apply(v, x, capture_intermediates=True,
                                                 mutable=["intermediates"]), v, x)
    # 32 -> strides 1,1,2,2,1,2 -> 4x4 before pooling.
    assert st["intermediates"]["head_conv"]["__call__"][0].shape == (1, 4, 4, 1280)


def test_channel_config_matches_traced_shapes():
    m = models.create("cifar_mobilenet_v2")
    for w in (0.25, 0.35, 0.525, 0.8, 1.0):
        _, ch = output_channels(m, w)
        traced = {c for k, c in ch.items()} - {1280}
        assert set(m.channel_config(w)) == traced, w


@pytest.mark.slow
def test_init_and_forward_at_several_widths():
    m = models.create("cifar_mobilenet_v2", num_classes=10)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    v = jit_init(m, jax.random.key(0), x)
    p = v["params"]
    # Official: conv N(0, sqrt(2/(k*k*out))), classifier N(0, 0.01) with zero bias.
    k = p["block16"]["project_conv"]["kernel"]  # (1, 1, 1920, 320)
    np.testing.assert_allclose(float(k.std()), np.sqrt(2 / 320), rtol=0.03)
    np.testing.assert_allclose(float(p["classifier"]["kernel"].std()), 0.01, rtol=0.05)
    assert float(jnp.abs(p["classifier"]["bias"]).max()) == 0.0
    fwd = jax.jit(lambda v, x, w: m.apply(v, x, width=w), static_argnums=2)
    for w in (1.0, 0.25):
        y = fwd(v, x, w)
        assert y.shape == (4, 10) and bool(jnp.all(jnp.isfinite(y)))


def test_width_below_minimum():
    with pytest.raises(ValueError, match=r"width 0.1 is outside the allowed range \[0.25, 1.0\]"):
        models.create("mobilenet_v2").feature_dim(0.1)
