"""Slimmable ResNets: channel counts, init, BN modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import models, slim
from tests.models.helpers import output_channels
from tests.helpers import jit_init


def test_resnet18_channels_at_0_3():
    # Official: stem/layer1 24, layer2 40, layer3 80, layer4 152; feature dim 152.
    m = models.create("cifar_resnet18")
    out, ch = output_channels(m, 0.3)
    assert ch["conv1"] == 24
    assert [ch[f"layer{i}_1/conv2"] for i in (1, 2, 3, 4)] == [24, 40, 80, 152]
    assert ch["layer2_0/downsample_conv"] == 40
    assert out.shape == (2, 152) == (2, m.feature_dim(0.3))


def test_resnet50_channels_at_0_3():
    # Official: mids 24/40/80/152, block outputs 80/152/304/616.
    m = models.create("cifar_resnet50")
    out, ch = output_channels(m, 0.3)
    last = {1: 2, 2: 3, 3: 5, 4: 2}
    assert [ch[f"layer{i}_{last[i]}/conv2"] for i in (1, 2, 3, 4)] == [24, 40, 80, 152]
    assert [ch[f"layer{i}_{last[i]}/conv3"] for i in (1, 2, 3, 4)] == [80, 152, 304, 616]
    # R-50's layer1 block 0 has a downsample (64 -> 256) although its stride is 1.
    assert ch["layer1_0/downsample_conv"] == 80
    assert out.shape == (2, 616)


@pytest.mark.parametrize("name,dim", [("cifar_resnet18", 128), ("cifar_resnet50", 512),
                                      ("resnet18", 128), ("resnet50", 512)])
def test_feature_dim_at_0_25(name, dim):
    m = models.create(name)
    assert m.feature_dim(0.25) == dim
    assert m.feature_dim(1.0) == dim * 4


def test_imagenet_stem_and_spatial_sizes():
    m = models.create("resnet18", num_classes=1000)
    out, ch = output_channels(m, 0.5, size=64)
    assert out.shape == (2, 1000)  # fc output is not slimmed
    assert ch["conv1"] == 32


def test_channel_config_matches_traced_shapes():
    m = models.create("cifar_resnet50")
    for w in (0.25, 0.33, 0.6, 0.9, 1.0):
        _, ch = output_channels(m, w)
        traced = sorted({c for k, c in ch.items() if k.split("/")[-1] != "fc"} - {3})
        assert sorted(set(m.channel_config(w))) == traced, w


def test_param_counts_full_width():
    # Official: CIFAR US-R18 backbone (conv + BN affine) 11,168,832; US-R50 23,500,352.
    for name, n in [("cifar_resnet18", 11_168_832), ("cifar_resnet50", 23_500_352)]:
        m = models.create(name)
        shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        assert sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)) == n


@pytest.fixture(scope="module")
def tiny():
    m = models.create("cifar_resnet18", num_classes=10, base_width=16, stage_sizes=(1, 1, 1, 1))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    return m, jit_init(m, jax.random.key(0), x), x


def test_init_schemes():
    # CIFAR ResNet: PyTorch defaults, U(+-1/sqrt(fan_in)); ImageNet: N(0, 2/fan_out).
    x = jnp.zeros((1, 32, 32, 3))
    p = jit_init(models.create("cifar_resnet18"), jax.random.key(0), x)["params"]
    k = p["layer3_0"]["conv2"]["kernel"]  # (3, 3, 256, 256)
    bound = 1 / np.sqrt(9 * 256)
    assert float(jnp.abs(k).max()) <= bound
    np.testing.assert_allclose(float(k.std()), bound / np.sqrt(3), rtol=0.02)
    p = jit_init(models.create("resnet18"), jax.random.key(0), x)["params"]
    k = p["layer3_0"]["conv2"]["kernel"]
    np.testing.assert_allclose(float(k.std()), np.sqrt(2 / (9 * 256)), rtol=0.02)
    assert float(jnp.abs(k).max()) > 3 * np.sqrt(2 / (9 * 256))  # normal, not truncated at 2 std
    bn = p["layer3_0"]["bn2"]
    assert float(bn["scale"].min()) == float(bn["scale"].max()) == 1.0
    assert float(jnp.abs(bn["bias"]).max()) == 0.0


def test_slimmed_forward_uses_leading_channels_only(tiny):
    m, v, x = tiny
    w = 0.5
    y = m.apply(v, x, width=w)
    # Perturbing parameters beyond the width-0.5 prefix must not change the output.
    def perturb(path, a):
        if a.ndim == 4:
            return a.at[..., -1].add(100.0)
        if path[-1].key in ("scale", "bias") and "fc" not in str(path):
            return a.at[-1].add(100.0)
        return a
    v2 = {"params": jax.tree_util.tree_map_with_path(perturb, v["params"])}
    np.testing.assert_allclose(m.apply(v2, x, width=w), y, rtol=1e-5, atol=1e-5)
    assert not np.allclose(m.apply(v2, x, width=1.0), m.apply(v, x, width=1.0))


@pytest.mark.slow
def test_bn_group_size_equals_separate_batches(tiny):
    m, v, x = tiny
    mg = m.clone(bn_group_size=2, num_classes=None)
    mf = m.clone(num_classes=None)
    y = mg.apply(v, x, width=0.75)
    ref = jnp.concatenate([mf.apply(v, x[:2], width=0.75), mf.apply(v, x[2:], width=0.75)])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_eval_mode_needs_and_uses_batch_stats(tiny):
    m, v, x = tiny
    with pytest.raises(ValueError, match="needs calibrated BN statistics"):
        m.apply(v, x, width=0.5, train=False)
    # Eval with the exact batch statistics of a single example equals train mode on it.
    abstract = jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
    assert "batch_stats" in abstract
    y_train, st = m.apply(v, x[:1], width=0.5, train=True, mutable=["bn_moments"])
    stats = jax.tree.map(lambda s: s, abstract["batch_stats"])
    flat_m = st["bn_moments"]

    def fill(path, spec):
        node = flat_m
        for p in path[:-1]:
            node = node[p.key]
        val = node[path[-1].key][0]
        full = jnp.zeros(spec.shape) if path[-1].key == "mean" else jnp.ones(spec.shape)
        return full.at[: val.shape[0]].set(val)

    stats = jax.tree_util.tree_map_with_path(fill, abstract["batch_stats"])
    y_eval = m.apply({"params": v["params"], "batch_stats": stats}, x[:1], width=0.5,
                     train=False)
    np.testing.assert_allclose(y_eval, y_train, rtol=1e-4, atol=1e-4)


def test_bfloat16(tiny):
    m, v, x = tiny
    mb = m.clone(dtype=jnp.bfloat16)
    y = mb.apply(v, x, width=0.5)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), m.apply(v, x, width=0.5),
                               rtol=0.1, atol=0.1)


def test_width_errors(tiny):
    m, v, x = tiny
    with pytest.raises(ValueError, match=r"width 0.2 is outside the allowed range \[0.25, 1.0\]"):
        m.apply(v, x, width=0.2)
    with pytest.raises(ValueError, match="outside the allowed range"):
        m.apply(v, x, width=1.5)
    with pytest.raises(ValueError, match="outside the allowed range"):
        m.feature_dim(float("nan"))


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'; valid names: cifar_resnet18, "
                                         "cifar_resnet50, resnet18, resnet50"):
        models.create("resnet19")


def test_distinct_widths_of_a_model():
    m = models.create("cifar_resnet18")
    grid = slim.distinct_widths(m.channel_config, 0.25, 1.0, step=1 / 16)
    assert len(grid) == 13  # every 1/16 step changes md(512w) for ResNet-18
    ws = slim.distinct_widths(m.channel_config, 0.25, 1.0)
    assert len(ws) == len({m.channel_config(float(w)) for w in np.linspace(0.25, 1, 5001)})
