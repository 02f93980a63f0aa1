"""BatchNorm folding: the folded plain network equals the unfolded eval-mode slimmable one."""
import jax
import numpy as np
import pytest

from us3l_jax import export
from us3l_jax.export.fold import fold_batchnorm
from tests.test_export import _setup


def _backbone(name):
    """The feature backbone (no classifier) of ``tests.test_export``'s random setup."""
    model, x, variables = _setup(name)
    params = {k: v for k, v in variables["params"].items() if k not in ("fc", "classifier")}
    return model.clone(num_classes=None), x, {"params": params,
                                              "batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize("name", ["cifar_resnet18",
                                  pytest.param("cifar_mobilenet_v2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("width", [1.0, 0.5, 0.25])
def test_folded_network_matches_eval_mode(name, width):
    model, x, variables = _backbone(name)
    plain, sliced = export.slice_module(model, variables, width)
    folded, folded_vars = fold_batchnorm(plain, sliced)
    ref = np.asarray(model.apply(variables, x, width=width, train=False))
    got = np.asarray(jax.jit(lambda v, x: folded.apply(v, x, train=False))(folded_vars, x))
    assert got.shape == ref.shape == (x.shape[0], model.feature_dim(width))
    # float32 rounding of the folded kernels only (measured <= 4e-6 on outputs of size ~5).
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    flat = jax.tree_util.tree_leaves_with_path(folded_vars)
    names = {"/".join(p.key for p in path) for path, _ in flat}
    assert not any(n.endswith("/scale") for n in names)  # no BN left
    assert "batch_stats" not in folded_vars


def test_folding_needs_statistics_and_a_plain_network():
    model, _, variables = _backbone("cifar_resnet18")
    plain, sliced = export.slice_module(model, {"params": variables["params"]}, 0.5)
    with pytest.raises(ValueError, match="batch_stats"):
        fold_batchnorm(plain, sliced)
    with pytest.raises(TypeError, match="plain ResNet, MobileNetV2 or ViT"):
        fold_batchnorm(model, variables)
    folded, fv = fold_batchnorm(*export.slice_module(model, variables, 0.5))
    with pytest.raises(ValueError, match="already folded"):
        fold_batchnorm(folded, {**fv, "batch_stats": {}})
    with pytest.raises(ValueError, match="no train mode"):
        folded.apply(fv, np.zeros((1, 8, 8, 3), np.float32), train=True)
