"""Where calibrated BN statistics are stored: one file per step, width, dataset and
calibration procedure, named by a readable key; the layout before procedures were keyed is
read only for the procedure its stored settings are."""
import os

import numpy as np
import pytest

from us3l_jax import calibration as calib

CUSTOM = calib.CalibrationSettings()
EMA = calib.CalibrationSettings(num_batches=9, batch_size=128, mode="ema")


def test_keys_name_the_preset_and_every_setting():
    assert calib.procedure_key("custom", CUSTOM) == "custom-cumulative-linear_train-100x512-s0"
    assert calib.procedure_key("official_cifar", EMA) == "official_cifar-ema-linear_train-9x128-s0"
    # Each field of the settings changes the key, so different procedures never share a file.
    variants = [CUSTOM, EMA, calib.CalibrationSettings(seed=1),
                calib.CalibrationSettings(augment="ssl"), calib.CalibrationSettings(num_batches=4),
                calib.CalibrationSettings(batch_size=64), calib.CalibrationSettings(momentum=0.01)]
    keys = {calib.procedure_key("custom", s) for s in variants}
    assert len(keys) == len(variants)
    assert calib.procedure_key("custom", variants[-1]).endswith("-s0-m0.01")
    with pytest.raises(ValueError, match="unknown calibration 'exact'; valid: custom, "
                                         "official_cifar, official_imagenet$"):
        calib.procedure_key("exact", CUSTOM)


def test_paths_keep_procedures_datasets_and_the_old_layout_apart(tmp_path):
    w = str(tmp_path)
    key = calib.procedure_key("custom", CUSTOM)
    assert calib.stats_path(w, 8, 0.5, key) == \
        f"{w}/bn_stats/step_8/custom-cumulative-linear_train-100x512-s0/width_0.5.msgpack"
    assert calib.stats_path(w, 8, 0.5, key, "dtd") == \
        f"{w}/bn_stats/step_8/dtd/custom-cumulative-linear_train-100x512-s0/width_0.5.msgpack"
    assert calib.stored_paths(w, 8, 0.5, key, "dtd") == (
        calib.stats_path(w, 8, 0.5, key, "dtd"), f"{w}/bn_stats/step_8/dtd/width_0.5.msgpack")


def test_a_file_is_found_only_where_its_meta_is_the_requested_one(tmp_path):
    w = str(tmp_path)
    meta = calib.settings_meta(CUSTOM, 0.5, 8, "digits")
    other = calib.settings_meta(EMA, 0.5, 8, "digits")
    key = calib.procedure_key("custom", CUSTOM)
    keyed, legacy = calib.stored_paths(w, 8, 0.5, key)
    never = lambda path, e: pytest.fail(f"{path}: {e}")  # noqa: E731
    assert calib.find_stats([keyed, legacy], meta, never) is None
    calib.save_stats(legacy, {"bn1": {"mean": np.zeros(2), "var": np.ones(2)}}, other)
    assert calib.find_stats([keyed, legacy], meta, never) is None  # another procedure's
    calib.save_stats(legacy, {"bn1": {"mean": np.full(2, 3.0), "var": np.ones(2)}}, meta)
    stats, path = calib.find_stats([keyed, legacy], meta, never)
    assert path == legacy and stats["bn1"]["mean"].tolist() == [3.0, 3.0]
    calib.save_stats(keyed, {"bn1": {"mean": np.full(2, 5.0), "var": np.ones(2)}}, meta)
    stats, path = calib.find_stats([keyed, legacy], meta, never)  # the keyed file first
    assert path == keyed and stats["bn1"]["mean"].tolist() == [5.0, 5.0]
    with open(keyed, "wb") as f:
        f.write(b"\x93 not msgpack")
    seen = []
    stats, path = calib.find_stats([keyed, legacy], meta, lambda p, e: seen.append(p))
    assert seen == [keyed] and path == legacy  # the unreadable file reported and passed over
    assert sorted(os.listdir(os.path.dirname(legacy))) == [key, "width_0.5.msgpack"]
