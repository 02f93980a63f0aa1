"""Each BN calibration procedure keeps its own statistics: evaluating with one never replaces
another's, a later evaluation with the same procedure reuses its file, and a file of the
layout before procedures were keyed serves only the procedure it was made with. Calibration
itself is replaced by a stand-in (``fake_calibrations``) that counts its calls."""
import glob
import os

import numpy as np
import pytest

from us3l_jax import build, calibration as calib, checkpointing
from us3l_jax.evaluate.evaluator import Evaluator, calibration_settings
from us3l_jax.evaluate.sweep import format_calibration, run_sweep
from tests import helpers
from tests.export.conftest import STEP, make_run

CUSTOM = "custom-cumulative-linear_train-2x64-s0"
IMAGENET = "official_imagenet-ema-ssl-501x32-s0"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny run (random weights), its evaluator and backbone parameters."""
    config = helpers.demo_config("smoke", eval__calibration_batches=2)
    workdir = make_run(str(tmp_path_factory.mktemp("procedures")), config)
    params = checkpointing.load_pretrained(
        workdir, abstract_state=build.abstract_state).params["backbone"]
    return workdir, config, Evaluator(config), params


def _stored(workdir):
    return sorted(os.path.relpath(p, workdir)
                  for p in glob.glob(f"{workdir}/bn_stats/**/*.msgpack", recursive=True))


def test_two_procedures_keep_two_files_each_reused(tiny, fake_calibrations, tmp_path):
    _, config, ev, params = tiny
    store = str(tmp_path)  # where statistics go: any folder, here a fresh one per test
    custom = calibration_settings(config)
    imagenet = calibration_settings(config, preset="official_imagenet")
    a, reused_a = ev.calibrated(params, 0.5, custom, store, STEP)  # the config's: custom
    b, reused_b = ev.calibrated(params, 0.5, imagenet, store, STEP, preset="official_imagenet")
    assert (reused_a, reused_b, len(fake_calibrations)) == (False, False, 2)
    assert _stored(store) == [f"bn_stats/step_{STEP}/{CUSTOM}/width_0.5.msgpack",
                              f"bn_stats/step_{STEP}/{IMAGENET}/width_0.5.msgpack"]
    assert a["bn1"]["mean"][0] == 1.0 and b["bn1"]["mean"][0] == 2.0
    for settings, preset, want in ((custom, None, a), (imagenet, "official_imagenet", b),
                                   (custom, None, a)):
        got, reused = ev.calibrated(params, 0.5, settings, store, STEP, preset=preset)
        assert reused and helpers.leaves_equal(got, want)
    assert len(fake_calibrations) == 2  # both reused, neither replaced
    # Other custom settings are another procedure again.
    fewer = calibration_settings(config, num_batches=1)
    _, reused = ev.calibrated(params, 0.5, fewer, store, STEP)
    assert not reused and len(_stored(store)) == 3


def test_the_old_layout_serves_only_its_own_procedure(tiny, fake_calibrations, tmp_path):
    _, config, ev, params = tiny
    store = str(tmp_path)
    custom = calibration_settings(config)
    imagenet = calibration_settings(config, preset="official_imagenet")
    old = calib.legacy_stats_path(store, STEP, 0.5)
    template = ev.calibrate(params, 0.5, custom)  # mean 1, var 2
    calib.save_stats(old, template, calib.settings_meta(custom, 0.5, STEP, "digits"))
    with open(old, "rb") as f:
        old_bytes = f.read()
    got, reused = ev.calibrated(params, 0.5, custom, store, STEP)
    assert reused and helpers.leaves_equal(got, template)
    got, reused = ev.calibrated(params, 0.5, imagenet, store, STEP, preset="official_imagenet")
    assert not reused and got["bn1"]["mean"][0] == 2.0  # calibrated: not the old file's
    assert len(fake_calibrations) == 2
    assert _stored(store) == [f"bn_stats/step_{STEP}/{IMAGENET}/width_0.5.msgpack",
                              f"bn_stats/step_{STEP}/width_0.5.msgpack"]
    with open(old, "rb") as f:
        assert f.read() == old_bytes  # never written again
    got, reused = ev.calibrated(params, 0.5, custom, store, STEP)
    assert reused and np.all(got["bn1"]["mean"] == 1.0)


def test_the_sweep_says_which_procedure_it_reused_or_calibrated(tiny, fake_calibrations,
                                                                 tmp_path):
    workdir, _, _, _ = tiny
    printed = []
    for out in ("a", "b"):
        records = run_sweep(workdir, [0.25], "knn", out=str(tmp_path / out),
                            echo=printed.append, calibration="official_imagenet")
    assert records[0]["calibration_procedure"] == IMAGENET
    assert [p for p in printed if p.startswith("BN statistics")] == [
        f"BN statistics {IMAGENET}: calibrated at 0.25", f"BN statistics {IMAGENET}: reused at 0.25"]
    assert len(fake_calibrations) == 1
    both = [{"width": w, "calibration_reused": r, "calibration_procedure": CUSTOM}
            for w, r in ((1.0, False), (0.5, True), (0.25, False))]
    assert format_calibration(both) == f"BN statistics {CUSTOM}: reused at 0.5, calibrated " \
                                       "at 1.0, 0.25"
