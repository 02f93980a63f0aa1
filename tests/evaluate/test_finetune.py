"""Fine-tuning transfer: the official recipes, PyTorch's running-statistics update, and a
tiny fine-tuning run that trains the whole network and its BN statistics."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import demo_config, jit_init
from us3l_jax import calibration as calib, config as config_lib, mesh as mesh_lib, models, slim
from us3l_jax.data import augment, datasets, feeding
from us3l_jax.evaluate import finetune, linear
from us3l_jax.evaluate.evaluator import Evaluator, top1_accuracy
from us3l_jax.slim import SlimBatchNorm


def test_recipes_are_the_official_files():
    """(epochs, lr, weight decay, milestones) of the official fine-tuning configs; SGD
    momentum 0.9, batch 64 per GPU x 4, BN per 64 images, running statistics momentum 0.1."""
    want = {"us": (100, 0.1, 1e-4, (60, 80)), "r50_dtd": (50, 1e-3, 1e-4, (30, 40)),
            "r50_flowers": (50, 1e-3, 1e-4, (30, 40)), "r50_pets": (50, 5e-4, 5e-4, (30, 40)),
            "r50_aircraft": (50, 5e-3, 1e-4, (30, 40)),
            "r18_aircraft": (50, 1e-3, 1e-4, (30, 40))}
    for name, (epochs, lr, wd, ms) in want.items():
        r = finetune.recipe_for(name)
        assert (r.epochs, r.lr, r.weight_decay, r.milestones) == (epochs, lr, wd, ms), name
        assert (r.momentum, r.batch_size, r.bn_group_size, r.bn_momentum, r.lars) == \
            (0.9, 256, 64, 0.1, False)
    lr = linear.lr_schedule(finetune.recipe_for("us"), 8)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 479, 480, 639, 640, 799)],
                               [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    assert finetune.recipe_for("us", epochs=10).milestones == (6, 8)
    with pytest.raises(ValueError, match="unknown fine-tuning recipe 'pets'"):
        finetune.recipe_for("pets")
    with pytest.raises(ValueError, match="batch 100 is not a multiple of its BN group 64"):
        dataclasses.replace(finetune.RECIPES["us"], batch_size=100)


def test_ema_update_is_pytorch_running_stats():
    """One BN at width 0.5 of 32 channels, two training forwards: the leading 16 entries
    follow run = 0.9 run + 0.1 batch (unbiased variance, n = N*H*W), the other 16 keep
    0 / 1."""
    bn = SlimBatchNorm(32, group_size=None)
    rng = np.random.default_rng(0)
    xs = [rng.normal(2.0, 3.0, (6, 5, 5, 16)).astype(np.float32) for _ in range(2)]
    params = bn.init(jax.random.key(0), jnp.asarray(xs[0]), 0.5, True)["params"]
    stats = {"bn": {"mean": jnp.zeros(32), "var": jnp.ones(32)}}
    run_mean, run_var = np.zeros(16), np.ones(16)
    for x in xs:
        _, state = bn.apply({"params": params}, jnp.asarray(x), 0.5, True,
                            mutable=["bn_moments"])
        stats = calib.ema_update(stats, {"bn": state["bn_moments"]})
        flat = x.reshape(-1, 16).astype(np.float64)
        run_mean = 0.9 * run_mean + 0.1 * flat.mean(0)
        run_var = 0.9 * run_var + 0.1 * flat.var(0, ddof=1)
    mean, var = np.asarray(stats["bn"]["mean"]), np.asarray(stats["bn"]["var"])
    np.testing.assert_allclose(mean[:16], run_mean, rtol=1e-5)
    np.testing.assert_allclose(var[:16], run_var, rtol=1e-5)
    np.testing.assert_array_equal(mean[16:], 0.0)
    np.testing.assert_array_equal(var[16:], 1.0)


def _toy(n: int, seed: int) -> datasets.ArrayDataset:
    """8-px images in 4 classes: class k is brighter in quadrant k (learnable)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 4).astype(np.int32)
    images = rng.integers(0, 96, (n, 8, 8, 3))
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        images[i, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 150
    return datasets.ArrayDataset(images.astype(np.uint8), labels, 4, "toy", "train")


@pytest.mark.slow
def test_finetuning_trains_every_parameter_and_the_running_stats():
    width = 0.5
    recipe = dataclasses.replace(finetune.RECIPES["us"], epochs=6, milestones=(4, 5),
                                 batch_size=16, bn_group_size=8, lr=0.05)
    backbone = models.create("cifar_resnet18", base_width=8, stage_sizes=(1, 1, 1, 1),
                             bn_group_size=8)
    model = models.create("cifar_resnet18", base_width=8, stage_sizes=(1, 1, 1, 1),
                          bn_group_size=recipe.bn_group_size, num_classes=4)
    params = jit_init(backbone, jax.random.key(0), jnp.zeros((8, 8, 8, 3)), width=1.0,
                      train=True)["params"]
    mesh = mesh_lib.make_mesh()
    train = feeding.DeviceDataset(_toy(64, 0), mesh)
    test = feeding.DeviceDataset(_toy(32, 1), mesh)
    view = augment.ViewConfig(size=8, scale=(0.8, 1.0), jitter_p=0.0, grayscale_p=0.0)
    test_view = augment.EvalConfig(resize=8, crop=8)
    stats = calib.calibrate(backbone, params, width, [augment.eval_view(train.images,
                                                                       test_view)], "ema")
    before = jax.tree.map(np.array, (params, stats))

    tuned, new_stats, losses = finetune.train(model, params, stats, train, width, view, recipe)

    # Measured: 1.362 1.102 0.900 0.811 0.767 0.712.
    assert len(losses) == 6 and np.all(np.diff(losses) < 0) and losses[-1] < 0.6 * losses[0]
    # A new full-size classifier: [full feature size, classes].
    assert tuned["fc"]["kernel"].shape == (model.feature_dim(1.0), 4)
    assert tuned["fc"]["bias"].shape == (4,)
    # The used channels of the backbone moved (the whole network trains); the inputs did not.
    kernel = np.asarray(tuned["layer4_0"]["conv1"]["kernel"])  # 64 channels at full width
    c = slim.channels(kernel.shape[-1], width)
    assert c == 32
    moved = np.abs(kernel - before[0]["layer4_0"]["conv1"]["kernel"])
    assert moved[..., :c].min() > 0
    jax.tree.map(np.testing.assert_array_equal, (params, stats), before)
    # Running statistics moved in the used channels only.
    m_new = np.asarray(new_stats["layer4_0"]["bn1"]["mean"])
    m_old = before[1]["layer4_0"]["bn1"]["mean"]
    assert np.abs(m_new[:c] - m_old[:c]).min() > 0
    np.testing.assert_array_equal(m_new[c:], m_old[c:])
    # Eval mode with the tuned statistics classifies held-out images well above chance (0.25;
    # measured 0.625 after these 24 steps).
    logits, labels = jax.jit(lambda p, s, x: model.apply(
        {"params": p, "batch_stats": s}, augment.eval_view(x, test_view), width=width,
        train=False))(tuned, new_stats, test.images), np.asarray(test.labels)
    acc = top1_accuracy(np.asarray(logits)[:32], labels[:32])
    assert acc >= 0.5, acc


@pytest.mark.slow
def test_evaluator_finetune_protocol_on_digits():
    """``protocol='finetune'`` through the Evaluator: a randomly initialised demo backbone at
    width 0.5 on digits, the ``us`` recipe shortened to 8 epochs (batch 256, BN per 64)."""
    c = demo_config(None)
    c.eval.linear_epochs = 8
    config_lib.validate(c)
    assert c.eval.finetune_recipe == "us"
    ev = Evaluator(c)
    params = jit_init(ev.backbone, jax.random.key(0),
                      jnp.zeros((c.method.group_size, 16, 16, 3)), width=1.0,
                      train=True)["params"]
    stats = ev.calibrate(params, 0.5, calib.CalibrationSettings(num_batches=2, batch_size=64))
    acc = ev.run("finetune", params, stats, 0.5)
    assert 0.3 < acc <= 1.0, acc  # 10 classes
