"""Compact sub-networks (slice_to_width), torchvision layouts and safetensors files."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from us3l_jax import export, models, slim
from us3l_jax.models import plain as plain_mod
from tests.export.conftest import random_variables

TINY = dict(base_width=16, stage_sizes=(1, 1, 1, 1))
# name -> (model keywords, image size); the ImageNet stem needs 32 px to keep a 1x1 map.
CASES = {
    "cifar_resnet18": (TINY, 8),
    "resnet50": (TINY, 32),
    "cifar_mobilenet_v2": ({}, 8),
}


def _flat(tree):
    return traverse_util.flatten_dict(tree)


@functools.lru_cache(maxsize=None)
def _setup(name):
    """Model, input and full-size variables: random params and eval statistics taken from a
    width-1.0 training batch (so eval-mode activations stay normalised)."""
    kw, size = CASES[name]
    model = models.create(name, num_classes=10, **kw)
    x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, width=1.0))
    params = random_variables(abstract["params"])
    _, moments = jax.jit(lambda p, x: model.apply({"params": p}, x, width=1.0, train=True,
                                                  mutable=["bn_moments"]))(params, x)
    shift = {"mean": lambda m: m[0] + 0.1, "var": lambda v: v[0] * 1.5 + 0.1}
    stats = traverse_util.unflatten_dict(
        {k: np.asarray(shift[k[-1]](v)) for k, v in _flat(moments["bn_moments"]).items()
         if k[-1] in shift})
    return model, x, {"params": params, "batch_stats": stats}


@functools.lru_cache(maxsize=None)
def _slim_fn(name, width, train):
    model = _setup(name)[0]
    return jax.jit(lambda v, x: model.apply(v, x, width=width, train=train))


def _plain_fn(plain, train):
    return jax.jit(lambda v, x: plain.apply(v, x, train=train))


# Width 1.0 is test_width_one_is_identity_slice. MobileNetV2 compiles slowly: one width, the
# one where make_divisible's 8-channel minimum and the full-size residual rule matter.
@pytest.mark.slow
@pytest.mark.parametrize("name,width", [
    ("cifar_resnet18", 0.75), ("cifar_resnet18", 0.3), ("cifar_resnet18", 0.25),
    ("resnet50", 0.3), ("resnet50", 0.25), ("cifar_mobilenet_v2", 0.25),
])
def test_slimmable_equals_sliced_plain_network(name, width):
    model, x, variables = _setup(name)
    plain, sliced = export.slice_to_width(name, variables, width, **CASES[name][0])
    # The compact network is smaller than the full one.
    n_params = sum(a.size for a in jax.tree.leaves(sliced["params"]))
    assert n_params < sum(a.size for a in jax.tree.leaves(variables["params"]))
    for train in (True, False):
        want = _slim_fn(name, width, train)(variables, x)
        got = _plain_fn(plain, train)(sliced, x)
        assert got.shape == want.shape == (4, 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_plain_network_keeps_bn_groups():
    # Training BN over groups of 2 of the 4 examples (the per-device statistics option).
    _, x, variables = _setup("cifar_resnet18")
    kw = dict(TINY, bn_group_size=2)
    model = models.create("cifar_resnet18", num_classes=10, **kw)
    plain, sliced = export.slice_to_width("cifar_resnet18", variables, 0.3, **kw)
    want = jax.jit(lambda v, x: model.apply(v, x, width=0.3, train=True))(variables, x)
    np.testing.assert_allclose(_plain_fn(plain, True)(sliced, x), want, rtol=1e-5, atol=1e-5)
    ungrouped = _slim_fn("cifar_resnet18", 0.3, True)(variables, x)
    assert np.max(np.abs(want - ungrouped)) > 1e-3  # the grouping changes the function


def test_sliced_channel_counts_follow_make_divisible():
    _, _, variables = _setup("resnet50")
    _, sliced = export.slice_to_width("resnet50", variables, 0.3, **TINY)
    p = sliced["params"]
    md = lambda c: slim.channels(c, 0.3)  # noqa: E731
    assert p["conv1"]["kernel"].shape == (7, 7, 3, md(16))
    assert p["layer1_0"]["conv3"]["kernel"].shape == (1, 1, md(16), md(64))
    assert p["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, md(256), md(512))
    assert p["fc"]["kernel"].shape == (md(512), 10)
    assert sliced["batch_stats"]["layer4_0"]["bn3"]["var"].shape == (md(512),)


def test_mobilenet_plain_keeps_full_size_residual_rule():
    # At 0.25 the first block maps 8 -> 8 channels, but the full-size block (32 -> 16) has
    # no shortcut; the CIFAR t6c24 stride-1 block (16 -> 24) is 8 -> 8 too.
    model = models.create("cifar_mobilenet_v2")
    plain = plain_mod.plain_network(model, 0.25)
    ins, outs, res = zip(*[(b[0], b[2], b[5]) for b in plain.blocks])
    assert (ins[0], outs[0], res[0]) == (8, 8, False)
    assert (ins[1], outs[1], res[1]) == (8, 8, False)
    assert res[2] and outs[-1] == 80


def test_width_one_is_identity_slice():
    name = "cifar_resnet18"
    model, x, variables = _setup(name)
    plain, sliced = export.slice_to_width(name, variables, 1.0, **TINY)
    flat_in, flat_out = _flat(variables), _flat(sliced)
    assert flat_in.keys() == flat_out.keys()
    for k in flat_in:
        np.testing.assert_array_equal(flat_in[k], flat_out[k])
    # The plain network with the very same variables computes the same function.
    for train in (True, False):
        np.testing.assert_allclose(_plain_fn(plain, train)(variables, x),
                                   _slim_fn(name, 1.0, train)(variables, x), rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_round_trip_is_lossless(name):
    kw = CASES[name][0]
    _, _, variables = _setup(name)
    sd = export.to_torch_state_dict(name, variables, 1.0, **kw)
    back = export.from_torch_state_dict(name, sd, **kw)
    flat_in, flat_back = _flat(variables), _flat(back)
    assert flat_in.keys() == flat_back.keys()
    for k in flat_in:
        np.testing.assert_array_equal(np.asarray(flat_in[k]), flat_back[k])
    again = export.to_torch_state_dict(name, back, **kw)
    assert again.keys() == sd.keys()
    for k in sd:
        assert again[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(again[k], sd[k])
    # A narrower export loads into the plain network of that width, losslessly.
    _, sliced = export.slice_to_width(name, variables, 0.3, **kw)
    narrow = export.from_torch_state_dict(name, export.to_torch_state_dict(
        name, variables, 0.3, **kw), 0.3, **kw)
    for k, v in _flat(sliced).items():
        np.testing.assert_array_equal(np.asarray(v), _flat(narrow)[k])


def _random_full_variables(name, **kw):
    """Full-size variables (params + batch_stats) of a full-size model, made on the host."""
    model = models.create(name, **kw)
    return random_variables(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)))


def _torchvision_resnet_keys(blocks, bottleneck):
    """torchvision resnet key -> shape at 1000 classes, written from torchvision's layout."""
    def bn(prefix, c):
        return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean",
                                                 "running_var")} | {
            f"{prefix}.num_batches_tracked": ()}
    keys = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    exp = 4 if bottleneck else 1
    inp = 64
    for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for j in range(n):
            p = f"layer{i}.{j}"
            if bottleneck:
                convs = [(planes, inp, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            else:
                convs = [(planes, inp, 3), (planes, planes, 3)]
            for c, (o, ci, k) in enumerate(convs, start=1):
                keys[f"{p}.conv{c}.weight"] = (o, ci, k, k)
                keys |= bn(f"{p}.bn{c}", o)
            if j == 0 and (i > 1 or bottleneck):
                keys[f"{p}.downsample.0.weight"] = (planes * exp, inp, 1, 1)
                keys |= bn(f"{p}.downsample.1", planes * exp)
            inp = planes * exp
    keys |= {"fc.weight": (1000, 512 * exp), "fc.bias": (1000,)}
    return keys


@pytest.mark.parametrize("name,blocks,bottleneck,n_params", [
    ("resnet18", (2, 2, 2, 2), False, 11_689_512),
    ("resnet50", (3, 4, 6, 3), True, 25_557_032),
])
def test_resnet_torchvision_names_and_layouts(name, blocks, bottleneck, n_params):
    variables = _random_full_variables(name, num_classes=1000)
    sd = export.to_torch_state_dict(name, variables)
    want = _torchvision_resnet_keys(blocks, bottleneck)
    assert {k: v.shape for k, v in sd.items()} == want
    # torchvision's published parameter counts (weights and biases, no buffers).
    assert sum(v.size for k, v in sd.items() if k.endswith(("weight", "bias"))) == n_params
    p, s = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(sd["conv1.weight"][5, 2, 1, 4], p["conv1"]["kernel"][1, 4, 2, 5])
    np.testing.assert_array_equal(sd["fc.weight"], p["fc"]["kernel"].T)
    np.testing.assert_array_equal(sd["layer2.0.downsample.1.running_var"],
                                  s["layer2_0"]["downsample_bn"]["var"])
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    # A torchvision state dict (here: those names and shapes) loads into our model.
    tv = {k: np.full(shape, 0.5, np.float32) if shape else np.array(7, np.int64)
          for k, shape in want.items()}
    tv["conv1.weight"] = np.arange(64 * 3 * 49, dtype=np.float32).reshape(64, 3, 7, 7)
    loaded = export.from_torch_state_dict(name, tv)
    assert loaded["params"]["fc"]["kernel"].shape == (512 * (4 if bottleneck else 1), 1000)
    np.testing.assert_array_equal(loaded["params"]["conv1"]["kernel"][1, 4, 2, 5],
                                  tv["conv1.weight"][5, 2, 1, 4])


def test_mobilenet_v2_torchvision_names_and_layouts():
    variables = _random_full_variables("mobilenet_v2", num_classes=1000)
    sd = export.to_torch_state_dict("mobilenet_v2", variables)
    assert len(sd) == 314  # torchvision mobilenet_v2: 52 convs, 52 BN x 5, classifier x 2
    assert sum(v.size for k, v in sd.items() if k.endswith(("weight", "bias"))) == 3_504_872
    shapes = {k: v.shape for k, v in sd.items()}
    assert shapes["features.0.0.weight"] == (32, 3, 3, 3)
    assert shapes["features.1.conv.0.0.weight"] == (32, 1, 3, 3)  # depthwise, t=1
    assert shapes["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert shapes["features.1.conv.2.running_var"] == (16,)
    assert shapes["features.2.conv.0.0.weight"] == (96, 16, 1, 1)  # expand
    assert shapes["features.2.conv.1.0.weight"] == (96, 1, 3, 3)  # depthwise
    assert shapes["features.2.conv.2.weight"] == (24, 96, 1, 1)  # project
    assert shapes["features.17.conv.3.weight"] == (320,)
    assert shapes["features.18.0.weight"] == (1280, 320, 1, 1)
    assert shapes["classifier.1.weight"] == (1000, 1280)
    dw = variables["params"]["block1"]["dw_conv"]["kernel"]  # (3, 3, 1, 96)
    np.testing.assert_array_equal(sd["features.2.conv.1.0.weight"][7, 0, 2, 1], dw[2, 1, 0, 7])


def test_missing_batch_stats_export_as_identity_statistics():
    _, _, variables = _setup("cifar_resnet18")
    sd = export.to_torch_state_dict("cifar_resnet18", {"params": variables["params"]}, 0.5,
                                    **TINY)
    c = slim.channels(16, 0.5)
    np.testing.assert_array_equal(sd["bn1.running_mean"], np.zeros(c))
    np.testing.assert_array_equal(sd["layer4.0.bn2.running_var"], np.ones(slim.channels(128, 0.5)))


@pytest.mark.parametrize("width", [0.2, 1.5, float("nan")])
def test_bad_width_is_rejected(width):
    _, _, variables = _setup("cifar_resnet18")
    with pytest.raises(ValueError, match="width"):
        export.slice_to_width("cifar_resnet18", variables, width, **TINY)


def test_bad_names_and_state_dicts_are_rejected():
    _, _, variables = _setup("cifar_resnet18")
    with pytest.raises(ValueError, match="unknown model 'resnet99'.*cifar_resnet18"):
        export.to_torch_state_dict("resnet99", variables)
    with pytest.raises(ValueError, match=r"params .*: shape \(.*16.*\), the model expects "
                                         r"\(.*32.*\)"):
        export.slice_to_width("cifar_resnet18", variables, 0.5, base_width=32,
                              stage_sizes=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="collections"):
        export.slice_to_width("cifar_resnet18", {**variables, "cache": {}}, 0.5, **TINY)
    sd = export.to_torch_state_dict("cifar_resnet18", variables, **TINY)
    missing = {k: v for k, v in sd.items() if k != "layer2.0.conv1.weight"}
    with pytest.raises(ValueError, match=r"missing layer2\.0\.conv1\.weight"):
        export.from_torch_state_dict("cifar_resnet18", missing, **TINY)
    with pytest.raises(ValueError, match=r"unexpected layer9\.0\.conv1\.weight"):
        export.from_torch_state_dict("cifar_resnet18",
                                     {**sd, "layer9.0.conv1.weight": np.zeros(1)}, **TINY)
    bad = {**sd, "bn1.weight": np.zeros(7, np.float32)}
    with pytest.raises(ValueError, match=r"'bn1\.weight': shape \(7,\), expected \(16,\)"):
        export.from_torch_state_dict("cifar_resnet18", bad, **TINY)
    # A width-0.5 export read as width 1.0 names the first mismatching key.
    half = export.to_torch_state_dict("cifar_resnet18", variables, 0.5, **TINY)
    with pytest.raises(ValueError, match="shape .* expected .* at width 1.0"):
        export.from_torch_state_dict("cifar_resnet18", half, **TINY)
    # num_batches_tracked is optional on input.
    no_nbt = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert export.from_torch_state_dict("cifar_resnet18", no_nbt, **TINY).keys() == {
        "params", "batch_stats"}


def test_safetensors_round_trip(tmp_path):
    _, _, variables = _setup("cifar_resnet18")
    sd = export.to_torch_state_dict("cifar_resnet18", variables, 0.3, **TINY)
    path = tmp_path / "r18_w0.3.safetensors"
    export.save_safetensors(path, sd, metadata={"format": "pt"})
    back = export.load_safetensors(path)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape
        np.testing.assert_array_equal(back[k], sd[k])
    assert os.listdir(tmp_path) == ["r18_w0.3.safetensors"]


def test_safetensors_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    old = {"a": np.arange(3, dtype=np.float32)}
    export.save_safetensors(path, old)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        export.save_safetensors(path, {"a": np.zeros(1000, np.float32)})
    # The previous file is intact and no temporary file is left behind.
    assert os.listdir(tmp_path) == ["w.safetensors"]
    np.testing.assert_array_equal(export.load_safetensors(path)["a"], old["a"])
