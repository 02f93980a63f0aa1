"""BN calibration: exact statistics (cumulative), the official EMA recursion, per-width
isolation in memory and on disk."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from us3l_jax import calibration as calib, models, slim
from us3l_jax.slim import SlimBatchNorm
from tests.helpers import jit_init

WIDTH = 0.5


@pytest.fixture(scope="module")
def model():
    # Group size 4 < batch 8: train-mode BN normalises per group, statistics are per batch.
    backbone = models.create("cifar_resnet18", base_width=8, stage_sizes=(1, 1, 1, 1),
                             bn_group_size=4)
    params = jit_init(backbone, jax.random.key(0), jnp.zeros((8, 8, 8, 3)), width=1.0,
                           train=True)["params"]
    return backbone, params


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.normal(1.0, 2.0, (8, 8, 8, 3)), jnp.float32) for _ in range(3)]


def bn_inputs(backbone, params, images, width):
    """Every BN's input in a train-mode forward: {'layer1_0/bn1': array}."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, SlimBatchNorm) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        backbone.apply({"params": params}, images, width=width, train=True)
    return seen


def flat(stats):
    return traverse_util.flatten_dict(stats, sep="/")


def test_cumulative_equals_exact_moments_over_all_batches(model, batches):
    backbone, params = model
    stats = flat(calib.calibrate(backbone, params, WIDTH, batches, "cumulative"))
    per_batch = [bn_inputs(backbone, params, b, WIDTH) for b in batches]
    layers = sorted(per_batch[0])
    sliced = 0
    assert len(layers) == 12 and {k.rsplit("/", 1)[0] for k in stats} == set(layers)
    for layer in layers:
        x = np.concatenate([p[layer] for p in per_batch])
        c = x.shape[-1]
        full = stats[f"{layer}/mean"].shape[0]
        assert c == slim.channels(full, WIDTH)
        sliced += c < full
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        np.testing.assert_allclose(stats[f"{layer}/mean"][:c], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[f"{layer}/var"][:c], var, rtol=1e-4, atol=1e-5)
        # Unused channels keep the neutral 0 / 1.
        assert np.all(stats[f"{layer}/mean"][c:] == 0) and np.all(stats[f"{layer}/var"][c:] == 1)
    assert sliced >= 6  # the 16/32/64-channel layers use half their channels
    # The exact statistics do not depend on the batch order.
    rev = flat(calib.calibrate(backbone, params, WIDTH, batches[::-1], "cumulative"))
    for k in stats:
        np.testing.assert_allclose(rev[k], stats[k], rtol=1e-5, atol=1e-6)


def test_ema_matches_the_official_recursion_with_unbiased_variance(model, batches):
    backbone, params = model
    stats = flat(calib.calibrate(backbone, params, WIDTH, batches, "ema", momentum=0.1))
    per_batch = [bn_inputs(backbone, params, b, WIDTH) for b in batches]
    for layer in per_batch[0]:
        c = per_batch[0][layer].shape[-1]
        run_mean, run_var = np.zeros(c), np.ones(c)
        for p in per_batch:
            x = p[layer].reshape(-1, c)
            run_mean = 0.9 * run_mean + 0.1 * x.mean(axis=0)
            run_var = 0.9 * run_var + 0.1 * x.var(axis=0, ddof=1)
        np.testing.assert_allclose(stats[f"{layer}/mean"][:c], run_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[f"{layer}/var"][:c], run_var, rtol=1e-4, atol=1e-5)


def test_calibrated_stats_run_in_eval_mode(model, batches):
    backbone, params = model
    stats = calib.calibrate(backbone, params, WIDTH, batches)
    y = backbone.apply({"params": params, "batch_stats": stats}, batches[0], width=WIDTH,
                       train=False)
    assert y.shape == (8, backbone.feature_dim(WIDTH)) and bool(jnp.all(jnp.isfinite(y)))


def test_one_width_never_changes_another(model, batches, tmp_path):
    backbone, params = model
    workdir = str(tmp_path)
    s_full = calib.calibrate(backbone, params, 1.0, batches)
    key = calib.procedure_key("custom", calib.CalibrationSettings())
    path_full = calib.stats_path(workdir, 7, 1.0, key)
    calib.save_stats(path_full, s_full, {"width": 1.0})
    before_bytes = open(path_full, "rb").read()
    before_tree = jax.tree.map(np.copy, s_full)

    s_half = calib.calibrate(backbone, params, 0.5, batches)
    path_half = calib.stats_path(workdir, 7, 0.5, key)
    calib.save_stats(path_half, s_half, {"width": 0.5})

    assert path_full != path_half
    assert path_full == os.path.join(workdir, "bn_stats", "step_7",
                                     "custom-cumulative-linear_train-100x512-s0",
                                     "width_1.0.msgpack")
    assert open(path_full, "rb").read() == before_bytes
    jax.tree.map(np.testing.assert_array_equal, s_full, before_tree)
    loaded, meta = calib.load_stats(path_full)
    jax.tree.map(np.testing.assert_array_equal, loaded, s_full)
    assert meta == {"width": 1.0}
    # The stem's BN sees the same channels at both widths (its conv input is not slimmed);
    # deeper BNs see different inputs, so their statistics differ in the shared channels.
    np.testing.assert_allclose(s_half["bn1"]["mean"], s_full["bn1"]["mean"], rtol=1e-5)
    deep_half, deep_full = s_half["layer4_0"]["bn1"], s_full["layer4_0"]["bn1"]
    assert not np.allclose(deep_half["mean"][:32], deep_full["mean"][:32])
    assert np.all(deep_half["mean"][32:] == 0) and np.all(deep_full["mean"][32:] != 0)
    assert calib.load_stats(calib.stats_path(workdir, 7, 0.75, key)) is None
    assert not [f for f in os.listdir(os.path.dirname(path_full)) if f.startswith(".")]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="calibration mode 'median'"):
        calib.CalibrationSettings(mode="median")
    with pytest.raises(ValueError, match="calibration augment 'crop'"):
        calib.CalibrationSettings(augment="crop")
    with pytest.raises(ValueError, match="num_batches must be a positive integer, got 0"):
        calib.CalibrationSettings(num_batches=0)


def test_official_procedures():
    """The official CIFAR path: EMA over 3 epochs of the linear-evaluation loader (batch 512 on
    4 GPUs: 3 x 98 forwards of 128 images for 50,000 images); ImageNet: 501 batches of one BN
    group, SSL views."""
    cifar = calib.official_settings("official_cifar", train_size=50000, linear_batch=512,
                                    group_size=128)
    assert (cifar.num_batches, cifar.batch_size, cifar.mode, cifar.augment, cifar.momentum) == \
        (294, 128, "ema", "linear_train", 0.1)
    # A MoCo v2 run (pretraining batch 256, BN groups of 64) is calibrated like any other:
    # 294 forwards, not 3 epochs of its pretraining batch (3 x 196 = 588). 128 images are two
    # of its BN groups.
    moco = calib.official_settings("official_cifar", train_size=50000, linear_batch=512,
                                   group_size=64)
    assert (moco.num_batches, moco.batch_size) == (294, 128)
    # Transfer recipe (batch 256 = 4 x 64): 3 x ceil(2040 / 256) = 24 forwards of 64 images,
    # rounded up to whole BN groups when the group is larger.
    flowers = calib.official_settings("official_cifar", train_size=2040, linear_batch=256,
                                      group_size=None)
    assert (flowers.num_batches, flowers.batch_size) == (24, 64)
    assert calib.official_settings("official_cifar", train_size=2040, linear_batch=256,
                                   group_size=128).batch_size == 128
    with pytest.raises(ValueError, match="4 devices share evenly, got 510"):
        calib.official_settings("official_cifar", train_size=1, linear_batch=510,
                                group_size=None)
    imagenet = calib.official_settings("official_imagenet", train_size=0, linear_batch=1024,
                                       group_size=60)
    assert (imagenet.num_batches, imagenet.batch_size, imagenet.mode, imagenet.augment) == \
        (501, 60, "ema", "ssl")
    # Whole groups that the devices share: 60 -> 120 on 8 devices, 128 stays 128.
    assert [calib.official_settings("official_imagenet", train_size=0, linear_batch=1024,
                                    group_size=g, num_devices=8).batch_size
            for g in (60, 128)] == [120, 128]
    assert calib.official_settings("official_cifar", train_size=2040, linear_batch=256,
                                   group_size=None, num_devices=16).batch_size == 64
    assert calib.official_settings("official_imagenet", train_size=0, linear_batch=1024,
                                   group_size=None).batch_size == 128
    with pytest.raises(ValueError, match="unknown calibration preset 'custom'"):
        calib.official_settings("custom", train_size=1, linear_batch=4, group_size=None)
    with pytest.raises(ValueError, match="calibration augment 'ssl' needs the pretraining view"):
        next(calib.input_batches(None, calib.CalibrationSettings(augment="ssl"), None, None))


def test_official_cifar_counts_the_linear_loader_not_the_pretraining_batch():
    """A run's official CIFAR calibration takes 3 epochs of the linear-evaluation loader
    (batch 512), whatever its pretraining batch: MoCo v2 (batch 256) and US3L (batch 512)
    both get 3 x ceil(1100 / 512) = 9 forwards on 1,100 images (3 x ceil(1100 / 256) = 15
    before)."""
    import tensorflow_datasets as tfds

    from configs import mocov2_cifar100, us3l_cifar100
    from us3l_jax.evaluate.evaluator import calibration_settings

    moco, us3l = mocov2_cifar100.get_config(), us3l_cifar100.get_config()
    assert (moco.optim.batch_size, us3l.optim.batch_size) == (256, 512)
    with tfds.testing.mock_data(num_examples=1100):
        got = [calibration_settings(c) for c in (moco, us3l)]
    assert [(s.num_batches, s.batch_size, s.mode) for s in got] == [(9, 128, "ema")] * 2
