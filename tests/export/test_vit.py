"""ViT weights in the timm / MoCo v3 layout: every official key, exact round trips."""
import jax
import numpy as np
import pytest

from us3l_jax import export, models
from tests.models.vit_helpers import perturbed_init as _perturbed_init

TINY = dict(dim=32, depth=2, heads=4, patch_size=4, image_size=8)


def _expected_keys(depth, head):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"] + (["head.weight", "head.bias"] if head else [])
    for i in range(depth):
        keys += [f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                  "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")]
    return set(keys)


@pytest.fixture(scope="module")
def variables():
    model = models.create("vit_tiny", num_classes=10, slicing="embed", **TINY)
    return jax.jit(_perturbed_init(model))(jax.random.key(0))


def test_every_official_key_with_torch_shapes(variables):
    sd = export.to_torch_state_dict("vit_tiny", variables, 1.0, slicing="embed", **TINY)
    assert set(sd) == _expected_keys(2, head=True)
    assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert sd["blocks.1.mlp.fc2.weight"].shape == (32, 128)
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 4, 4)
    assert sd["pos_embed"].shape == (1, 5, 32) and sd["cls_token"].shape == (1, 1, 32)
    # torch's qkv rows are [q heads | k heads | v heads]: row 32 is k of head 0, feature 0
    q = np.asarray(variables["params"]["blocks_0"]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(sd["blocks.0.attn.qkv.weight"][32], q[:, 1, 0, 0])


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_round_trip_is_exact(variables, width):
    sd = export.to_torch_state_dict("vit_tiny", variables, width, slicing="embed", **TINY)
    back = export.from_torch_state_dict("vit_tiny", sd, width, slicing="embed", **TINY)
    _, sliced = export.slice_to_width("vit_tiny", variables, width, slicing="embed", **TINY)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 back, jax.device_get(sliced))
    # A MoCo v3 checkpoint (backbone + projector under module.base_encoder) loads too.
    ckpt = {f"module.base_encoder.{k}": v for k, v in sd.items() if not k.startswith("head")}
    ckpt["module.base_encoder.head.0.weight"] = np.zeros((8, 8))
    ckpt["module.predictor.0.weight"] = np.zeros((8, 8))
    feats = export.from_torch_state_dict("vit_tiny", export.moco_v3_backbone(ckpt), width,
                                         slicing="embed", **TINY)
    assert "head" not in feats["params"]
    bad = dict(sd, pos_embed=sd["pos_embed"] + 1.0)
    with pytest.raises(ValueError, match="pos_embed"):
        export.from_torch_state_dict("vit_tiny", bad, width, slicing="embed", **TINY)


def test_official_slicing_exports_the_full_weights_only(variables):
    sd = export.to_torch_state_dict("vit_tiny", variables, 1.0, slicing="official", **TINY)
    assert set(sd) == _expected_keys(2, head=True)
    with pytest.raises(ValueError, match="official"):
        export.to_torch_state_dict("vit_tiny", variables, 0.5, slicing="official", **TINY)
