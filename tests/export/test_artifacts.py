"""ONNX (onnxruntime) and StableHLO (jax.export.deserialize) files of folded networks agree
with the slimmable JAX model in eval mode, for a ResNet and a MobileNetV2 at several widths."""
import numpy as np
import pytest

from us3l_jax import export
from us3l_jax.export import artifacts
from us3l_jax.export.fold import fold_batchnorm
from tests.export.test_fold import _backbone


@pytest.mark.parametrize("name, width", [
    pytest.param("cifar_resnet18", 1.0, marks=pytest.mark.slow), ("cifar_resnet18", 0.25),
    pytest.param("cifar_mobilenet_v2", 0.5, marks=pytest.mark.slow),
    pytest.param("cifar_mobilenet_v2", 0.25, marks=pytest.mark.slow)])
def test_onnx_and_stablehlo_match_the_jax_model(name, width):
    model, x, variables = _backbone(name)
    folded, fv = fold_batchnorm(*export.slice_module(model, variables, width))
    ref = np.asarray(model.apply(variables, x, width=width, train=False))

    def fn(x):
        return folded.apply(fv, x, train=False)

    tol = 1e-4 * np.abs(ref).max()
    onnx = artifacts.onnx_bytes(fn, x.shape)
    np.testing.assert_allclose(artifacts.run_onnx(onnx, np.asarray(x)), ref, rtol=0, atol=tol)
    hlo = artifacts.stablehlo_bytes(fn, x.shape)
    np.testing.assert_allclose(artifacts.run_stablehlo(hlo, np.asarray(x)), ref, rtol=0,
                               atol=tol)
    assert artifacts.max_abs_diff(artifacts.run_stablehlo(hlo, np.asarray(x)), ref) <= tol


def test_formats_are_checked():
    assert artifacts.check_formats("torch, onnx,torch") == ["torch", "onnx"]
    for bad, named in [("onnx,tflite", "'tflite'"), ("", "''"), ("ONNX", "'ONNX'")]:
        with pytest.raises(ValueError, match=f"unknown format {named}; valid: onnx, "
                                             "stablehlo, torch, flax"):
            artifacts.check_formats(bad)
    with pytest.raises(ValueError, match=r"output shapes differ: \(2,\) vs \(3,\)"):
        artifacts.max_abs_diff(np.zeros(2), np.zeros(3))
