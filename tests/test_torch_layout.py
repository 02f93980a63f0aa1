"""Torch layouts (``us3l_jax.torch_layout``): leaf transposes, torchvision names, the official
BYOL encoder and safetensors bytes, each round trip exact to the number."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import models, torch_layout
from us3l_jax.models.heads import SSLModel
from tests.helpers import leaves_equal

TINY = dict(base_width=16, stage_sizes=(1, 1, 1, 1))


def _random_like(shapes, seed=0):
    """Distinct random numbers of the given shapes, made on the host (nothing compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32), shapes)


def test_leaf_layouts_and_round_trip():
    rng = np.random.default_rng(0)
    conv = rng.normal(size=(3, 5, 2, 4)).astype(np.float32)  # HWIO
    t = torch_layout.to_torch_leaf(conv)
    assert t.shape == (4, 2, 3, 5) == torch_layout.torch_shape(conv.shape)  # OIHW
    assert t[3, 1, 2, 4] == conv[2, 4, 1, 3]
    depthwise = rng.normal(size=(3, 3, 1, 6)).astype(np.float32)  # (kh, kw, 1, C)
    assert torch_layout.to_torch_leaf(depthwise).shape == (6, 1, 3, 3)
    dense = rng.normal(size=(7, 2)).astype(np.float32)  # (in, out)
    assert torch_layout.to_torch_leaf(dense).shape == (2, 7)  # (out, in)
    assert torch_layout.to_torch_leaf(dense)[1, 6] == dense[6, 1]
    vec = rng.normal(size=(5,)).astype(np.float32)
    for a in (conv, depthwise, dense, vec):
        back = torch_layout.from_torch_leaf(torch_layout.to_torch_leaf(a))
        assert back.shape == a.shape and np.array_equal(back, a)


def test_resnet_names_and_values():
    """torchvision names for every leaf; BN statistics as running_mean / running_var,
    num_batches_tracked 0; values back exactly."""
    model = models.create("cifar_resnet18", **TINY)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    v = _random_like(shapes)
    sd = torch_layout.to_torch_state_dict("cifar_resnet18", v, **TINY)
    np.testing.assert_array_equal(sd["conv1.weight"],
                                  np.transpose(v["params"]["conv1"]["kernel"], (3, 2, 0, 1)))
    np.testing.assert_array_equal(sd["layer2.0.downsample.1.running_var"],
                                  v["batch_stats"]["layer2_0"]["downsample_bn"]["var"])
    np.testing.assert_array_equal(sd["layer1.0.bn2.weight"],
                                  v["params"]["layer1_0"]["bn2"]["scale"])
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    back = torch_layout.from_torch_state_dict("cifar_resnet18", sd, **TINY)
    assert leaves_equal(back, v)
    # Without statistics: uncalibrated mean 0 / var 1 are written.
    plain = torch_layout.to_torch_state_dict("cifar_resnet18", {"params": v["params"]}, **TINY)
    assert np.all(plain["bn1.running_mean"] == 0) and np.all(plain["bn1.running_var"] == 1)


def _byol_encoder(name, seed=0, **kw):
    """A tiny backbone with a BYOL projector, and made-up running statistics."""
    model = SSLModel(models.create(name, **kw), proj_hidden=24, proj_out=8, proj_style="byol")
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(seed), x, 1.0, False,
                                                 method=SSLModel.encode),
                            jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    return _random_like(shapes, seed)


@pytest.mark.parametrize("name,kw,fc0", [
    ("cifar_resnet18", TINY, "fc.0"),
    # MobileNetV2's classifier is Sequential(Dropout, Linear): one more index.
    ("cifar_mobilenet_v2", dict(min_width=0.25), "fc.0.1"),
])
def test_official_byol_encoder_round_trip(name, kw, fc0):
    v = _byol_encoder(name, **kw)
    sd = torch_layout.to_official_state_dict(name, v, **kw)
    p = "module.encoder_q."
    assert f"{p}{fc0}.weight" in sd and f"{p}fc.1.running_mean" in sd
    np.testing.assert_array_equal(sd[f"{p}fc.6.weight"],
                                  v["params"]["projector"]["fc3"]["kernel"].T)
    params, stats, dims = torch_layout.from_official_state_dict(name, sd, **kw)
    assert dims == (24, 8)
    assert leaves_equal(params, v["params"]) and leaves_equal(stats, v["batch_stats"])
    # Without statistics: none written, none read back; a bare (unprefixed) dict loads too.
    bare = torch_layout.to_official_state_dict(name, {"params": v["params"]}, **kw)
    assert not any("running" in k for k in bare)
    params, stats, _ = torch_layout.from_official_state_dict(
        name, {k[len(p):]: a for k, a in bare.items()}, **kw)
    assert stats is None and leaves_equal(params, v["params"])
    with pytest.raises(ValueError, match="must be a CNN"):
        torch_layout.from_official_state_dict("vit_tiny", sd)


def test_safetensors_bytes_round_trip(tmp_path):
    sd = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
          "a.num_batches_tracked": np.zeros((), np.int64)}
    back = torch_layout.safetensors_from_bytes(torch_layout.safetensors_bytes(sd))
    path = tmp_path / "x.safetensors"
    torch_layout.save_safetensors(path, sd, metadata={"format": "pt"})
    for got in (back, torch_layout.load_safetensors(path)):
        assert got.keys() == sd.keys()
        for k in sd:
            assert got[k].dtype == sd[k].dtype and got[k].shape == sd[k].shape
            np.testing.assert_array_equal(got[k], sd[k])
    with pytest.raises(ValueError, match="keys must be strings"):
        torch_layout.safetensors_bytes({1: np.zeros(1)})


def test_official_backbone_drops_what_sits_on_top():
    """The backbone of an official checkpoint (online encoder with a projector, a momentum
    encoder, a queue), of a torchvision dict with its classifier, and of a MoCo v3 ViT
    checkpoint: the same variables, exactly."""
    model = models.create("cifar_resnet18", **TINY)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    v = _random_like(shapes)
    sd = torch_layout.to_torch_state_dict("cifar_resnet18", v, **TINY)
    official = {f"module.encoder_q.{k}": a for k, a in sd.items()}
    official.update({f"module.encoder_k.{k}": a + 1 for k, a in sd.items()})
    official["module.encoder_q.fc.0.weight"] = np.zeros((4, 128), np.float32)
    official["module.queue"] = np.zeros((8, 4), np.float32)
    torchvision = dict(sd, **{"fc.weight": np.zeros((10, 128), np.float32),
                              "fc.bias": np.zeros((10,), np.float32)})
    for d in (official, torchvision):
        assert leaves_equal(torch_layout.official_backbone("cifar_resnet18", d, **TINY), v)
    vit_kw = dict(dim=32, depth=1, heads=4, patch_size=4, image_size=8)
    vit = models.create("vit_tiny", **vit_kw)
    vv = _random_like(jax.eval_shape(lambda x: vit.init(jax.random.key(0), x),
                                     jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)))
    moco = {f"module.base_encoder.{k}": a
            for k, a in torch_layout.to_torch_state_dict("vit_tiny", vv, **vit_kw).items()}
    moco["module.base_encoder.head.0.weight"] = np.zeros((4, 32), np.float32)
    moco["module.predictor.0.weight"] = np.zeros((4, 4), np.float32)
    assert leaves_equal(torch_layout.official_backbone("vit_tiny", moco, **vit_kw), vv)
    with pytest.raises(ValueError, match="missing"):
        torch_layout.official_backbone("cifar_resnet18", {"module.encoder_q.conv1.weight":
                                                          sd["conv1.weight"]}, **TINY)
