"""Using a width in code: ``export.load(workdir).at(width)`` is the slimmable backbone at that
width with its calibrated statistics, as a compact network; a ViT run exports too."""
import os
import shutil

import jax
import numpy as np
import pytest

from us3l_jax import build, calibration as calib, checkpointing, export
from us3l_jax.export import command
from tests import helpers
from tests.export.conftest import STEP


@pytest.fixture(scope="module")
def run(tiny_run):
    return export.load(tiny_run)


@pytest.mark.slow  # calibrates a width: 14 s on an idle 2-core machine, 46 s under load
def test_a_width_is_the_slimmable_backbone_there(tiny_run, run):
    net = run.at(0.75)
    assert (net.width, net.step) == (0.75, STEP) and net.calibration["num_batches"] == 2
    key = "custom-cumulative-linear_train-2x64-s0"
    assert net.calibration_procedure == {"name": "custom", "key": key}
    # The compact network: stages of 16, 24, 48, 96 channels (multiples of 8 near 0.75 x
    # 16, 32, 64, 128).
    assert net.variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 16)
    assert net.variables["params"]["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 16, 24)
    stats, meta = calib.load_stats(calib.stats_path(tiny_run, STEP, 0.75, key))  # stored
    assert meta == net.calibration
    backbone = build.backbone(run.config)
    for batch in (1, 7):
        x = np.asarray(jax.random.normal(jax.random.key(batch), (batch, 16, 16, 3)),
                       np.float32)
        ref = np.asarray(backbone.apply(
            {"params": checkpointing.load_pretrained(
                tiny_run, abstract_state=build.abstract_state).params["backbone"],
             "batch_stats": stats}, x, width=0.75, train=False))
        got = np.asarray(net(x))
        assert got.shape == (batch, 96)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        folded, fv = net.folded()
        np.testing.assert_allclose(np.asarray(folded.apply(fv, x, train=False)), ref, rtol=0,
                                   atol=1e-4 * np.abs(ref).max())
    assert run.at(0.75).calibration == meta  # reused, not recalibrated


def test_widths_and_bad_widths(run, tmp_path):
    assert run.widths()[:3] == [0.25, 0.3, 0.4] and run.widths()[-1] == 1.0
    assert len(run.widths()) == 19
    with pytest.raises(ValueError, match=r"width 1.5 is outside the trained range"):
        run.at(1.5)
    with pytest.raises(checkpointing.CheckpointError, match="config.json not found"):
        export.load(str(tmp_path))


@pytest.mark.slow
def test_a_vit_run_exports_without_batchnorm(tiny_vit_run, tmp_path):
    """Every file of a ViT (embed slicing) width, checked at batches 1 and 7 by the export."""
    out = str(tmp_path / "vit")
    card = command.export_run(tiny_vit_run, out, 0.5, formats=["onnx", "stablehlo", "torch"],
                              repeats=1, echo=None)
    assert card["batchnorm"]["folded_into_convs"] is False
    assert card["output"]["shape"] == ["batch", 32]  # 2 of 4 heads x head dim 16
    assert card["torch_arch"] == {"family": "vit", "image_size": 16, "patch_size": 4,
                                  "dim": 32, "depth": 4, "heads": 2, "mlp_ratio": 4,
                                  "eps": 1e-6}
    assert sorted(os.listdir(out)) == ["model.onnx", "model.py", "model.safetensors",
                                       "model.stablehlo", "model_card.json"]
    diffs = card["max_abs_diff_vs_jax"]
    assert {"onnx", "stablehlo", "torch", "folded"} <= set(diffs)
    assert max(diffs.values()) < 1e-4
    net = export.load(tiny_vit_run).at(0.5)
    x = np.asarray(jax.random.normal(jax.random.key(0), (7, 16, 16, 3)), np.float32)
    with open(os.path.join(out, "model.stablehlo"), "rb") as f:
        got = jax.export.deserialize(bytearray(f.read())).call(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(net(x)), rtol=0, atol=1e-5)
    assert net.calibration is None


def test_each_calibration_procedure_gives_its_own_statistics(tiny_run, tmp_path,
                                                             fake_calibrations):
    """``at(w, calibration=...)`` takes that procedure's statistics (calibrated by a stand-in
    here), keeps every procedure's apart and reuses each; a file of the layout before
    procedures were keyed serves only its own procedure."""
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run, workdir)
    key = "custom-cumulative-linear_train-2x64-s0"
    export.load(workdir).at(0.5)  # the run's procedure, stored under its key; moved below
    stats, meta = calib.load_stats(calib.stats_path(workdir, STEP, 0.5, key))
    shutil.rmtree(os.path.join(workdir, calib.STATS_DIR))
    calib.save_stats(calib.legacy_stats_path(workdir, STEP, 0.5),
                     jax.tree.map(lambda v: np.full_like(v, 7.0), stats), meta)
    fake_calibrations.clear()
    run = export.load(workdir)
    nets = {name: run.at(0.5, calibration=name) for name in calib.PRESETS}
    assert {name: net.calibration_procedure for name, net in nets.items()} == {
        "custom": {"name": "custom", "key": key},
        "official_cifar": {"name": "official_cifar",
                           "key": "official_cifar-ema-linear_train-9x128-s0"},
        "official_imagenet": {"name": "official_imagenet",
                              "key": "official_imagenet-ema-ssl-501x32-s0"}}
    assert [s.mode for _, s in fake_calibrations] == ["ema", "ema"]  # custom: the old file
    means = {name: float(_stats_of(net)["bn1"]["mean"][0]) for name, net in nets.items()}
    assert means == {"custom": 7.0, "official_cifar": 1.0, "official_imagenet": 2.0}
    assert nets["official_imagenet"].calibration["num_batches"] == 501
    assert run.at(0.5).calibration_procedure["name"] == "custom"  # the run's eval.calibration
    for name, net in nets.items():
        assert helpers.leaves_equal(run.at(0.5, calibration=name).variables, net.variables)
    assert len(fake_calibrations) == 2  # every later call reused its procedure's file
    with pytest.raises(ValueError, match="unknown calibration 'exact'; valid: custom, "):
        run.at(0.5, calibration="exact")



def _stats_of(net):
    return net.variables["batch_stats"]
