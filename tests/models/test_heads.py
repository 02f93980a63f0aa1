"""SSL heads: the projector reads the slimmed feature; heads are full width."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import models
from us3l_jax.models.heads import SSLModel
from tests.helpers import jit_init


def _shapes(model, size=16):
    x = jax.ShapeDtypeStruct((4, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def test_simclr_projector_and_aux_head_layout():
    # SimCLR_Momentum: USLinear(md(512w) -> 2048, bias) -> BN -> ReLU -> Linear(2048,
    # 2048, bias) -> BN -> ReLU -> Linear(2048 -> 256); head g: Linear(256->2048, no bias)
    # -> BN -> ReLU -> Linear(2048 -> 256).
    m = SSLModel(models.create("cifar_resnet18"), use_distill_head=True)
    p = _shapes(m)
    proj = p["projector"]
    assert proj["fc1"]["kernel"].shape == (512, 2048) and "bias" in proj["fc1"]
    assert proj["fc2"]["kernel"].shape == (2048, 2048) and "bias" in proj["fc2"]
    assert proj["fc3"]["kernel"].shape == (2048, 256) and "bias" in proj["fc3"]
    g = p["distill_head"]
    assert g["fc1"]["kernel"].shape == (256, 2048) and "bias" not in g["fc1"]
    assert g["fc2"]["kernel"].shape == (2048, 256) and "bias" in g["fc2"]
    assert "predictor" not in p


def test_byol_and_simsiam_styles():
    # BYOL: middle Linear without bias, DIM 2048; SimSiam: last Linear's bias
    # is frozen and followed by a non-affine BN, which cancels it: no bias, no BN affine.
    byol = _shapes(SSLModel(models.create("cifar_resnet18"), proj_out=2048, proj_style="byol",
                            use_predictor=True))
    assert "bias" not in byol["projector"]["fc2"] and byol["projector"]["fc3"]["kernel"].shape \
        == (2048, 2048)
    assert byol["predictor"]["fc1"]["kernel"].shape == (2048, 2048)
    sim = _shapes(SSLModel(models.create("cifar_resnet18"), proj_out=2048,
                           proj_style="simsiam", use_predictor=True))
    assert "bias" not in sim["projector"]["fc3"] and "bn3" not in sim["projector"]


@pytest.mark.slow
def test_projector_reads_the_slimmed_feature():
    bb = models.create("cifar_resnet18", base_width=16, stage_sizes=(1, 1, 1, 1))
    m = SSLModel(bb, proj_hidden=32, proj_out=8, use_distill_head=True)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    v = jit_init(m, jax.random.key(0), x)
    encode = jax.jit(lambda v, x, w: m.apply(v, x, w, method=SSLModel.encode),
                     static_argnums=2)
    for w in (1.0, 0.5, 0.25):
        z = encode(v, x, w)
        assert z.shape == (4, 8)  # heads are not slimmed
        h = jax.eval_shape(lambda p: bb.apply({"params": p}, x, width=w),
                           v["params"]["backbone"])
        assert h.shape == (4, bb.feature_dim(w))
    # Channels of the projector input beyond the width's feature size are unused.
    p = jax.tree.map(lambda a: a, v["params"])
    p["projector"]["fc1"]["kernel"] = p["projector"]["fc1"]["kernel"].at[-1].add(100.0)
    np.testing.assert_allclose(encode({"params": p}, x, 0.5), encode(v, x, 0.5), atol=1e-5)


def test_mobilenet_projector_input_is_not_slimmed():
    m = SSLModel(models.create("cifar_mobilenet_v2"))
    assert _shapes(m, 32)["projector"]["fc1"]["kernel"].shape == (1280, 2048)
    with pytest.raises(ValueError, match="unknown projector style 'moco'"):
        _shapes(SSLModel(models.create("cifar_resnet18"), proj_style="moco"))
