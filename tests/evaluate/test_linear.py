"""The paper's linear evaluation: schedule, optimizer semantics, frozen backbone."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import demo_config, load_config_module, jit_init
from us3l_jax import calibration as calib, config as config_lib, mesh as mesh_lib, models
from us3l_jax.data import augment, datasets, feeding
from us3l_jax.evaluate import linear


def test_cifar_schedule_is_30_then_3_at_60_then_0_3_at_80():
    spe = 3
    lr = linear.lr_schedule(linear.CIFAR, spe)
    expect = {0: 30.0, 59 * spe + 2: 30.0, 60 * spe: 3.0, 79 * spe + 2: 3.0, 80 * spe: 0.3,
              100 * spe - 1: 0.3}
    for step, value in expect.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6)
    assert linear.CIFAR.epochs == 100 and linear.CIFAR.batch_size == 512
    assert linear.CIFAR.momentum == 0.9 and linear.CIFAR.weight_decay == 0.0
    # Shortened recipes keep the milestones at the same fractions.
    assert linear.CIFAR.with_epochs(10).milestones == (6, 8)


def test_imagenet_recipe_is_lars_cosine_over_60_epochs():
    r = linear.recipe_for("auto", "imagenet2012")
    assert (r.epochs, r.lr, r.lars, r.schedule) == (60, 0.8, True, "cosine")
    lr = linear.lr_schedule(r, 10)
    np.testing.assert_allclose([float(lr(0)), float(lr(309)), float(lr(599))],
                               [0.8, 0.4, 0.8 * 0.5 * (1 + np.cos(np.pi * 59 / 60))], rtol=1e-5)
    assert linear.recipe_for("auto", "dtd").batch_size == 256
    assert linear.recipe_for("auto", "cifar100", epochs=2).epochs == 2
    with pytest.raises(ValueError, match="unknown linear recipe 'fancy'"):
        linear.recipe_for("fancy", "cifar100")


def test_sgd_has_pytorch_momentum_semantics():
    tx = linear.make_optimizer(linear.CIFAR, steps_per_epoch=1)
    p = {"w": jnp.array([1.0])}
    state = tx.init(p)
    g1, g2 = {"w": jnp.array([0.5])}, {"w": jnp.array([-0.2])}
    u1, state = tx.update(g1, state, p)
    p1 = optax.apply_updates(p, u1)
    u2, state = tx.update(g2, state, p1)
    p2 = optax.apply_updates(p1, u2)
    b1 = 0.5
    b2 = 0.9 * b1 - 0.2
    np.testing.assert_allclose(p1["w"], [1.0 - 30 * b1], rtol=1e-6)
    np.testing.assert_allclose(p2["w"], [1.0 - 30 * b1 - 30 * b2], rtol=1e-6)


def _params_and_toy_data(backbone, n):
    """The backbone's initial params and ``n`` random 8-px images in 4 classes on the mesh."""
    params = jit_init(backbone, jax.random.key(0), jnp.zeros((8, 8, 8, 3)), width=1.0,
                           train=True)["params"]
    rng = np.random.default_rng(0)
    toy = datasets.ArrayDataset(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                                (np.arange(n) % 4).astype(np.int32), 4, "toy", "train")
    return params, feeding.DeviceDataset(toy, mesh_lib.make_mesh())


@pytest.mark.slow
def test_only_the_classifier_changes():
    backbone = models.create("cifar_resnet18", base_width=8, stage_sizes=(1, 1, 1, 1),
                             bn_group_size=None)
    params, data = _params_and_toy_data(backbone, 32)
    view = augment.ViewConfig(size=8, scale=(0.8, 1.0), jitter_p=0.0, grayscale_p=0.0)
    test_view = augment.EvalConfig(resize=9, crop=8)
    stats = calib.calibrate(backbone, params, 0.5, [augment.eval_view(data.images, test_view)])
    params_before = jax.tree.map(np.array, params)
    stats_before = jax.tree.map(np.array, stats)
    recipe = dataclasses.replace(linear.CIFAR.with_epochs(2), batch_size=8)
    init = linear.init_classifier(jax.random.split(jax.random.key(0))[0],
                                  backbone.feature_dim(0.5), backbone.feature_dim(1.0), 4)
    clf, losses = linear.train(backbone, params, stats, data, 0.5, view, recipe, seed=0)
    assert clf["w"].shape == (backbone.feature_dim(0.5), 4) and clf["b"].shape == (4,)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert not np.allclose(clf["w"], init["w"])  # trained from the documented init
    jax.tree.map(np.testing.assert_array_equal, params, params_before)
    jax.tree.map(np.testing.assert_array_equal, stats, stats_before)


def test_vit_recipe_is_main_lincls():
    r = linear.RECIPES["vit"]
    assert r is linear.VIT and linear.recipe_for("vit", "cifar10") is r
    assert (r.epochs, r.lr, r.batch_size, r.momentum, r.weight_decay) == (90, 0.1, 256, 0.9, 0.0)
    assert (r.schedule, r.lars, r.classifier_init) == ("cosine", False, "normal")
    lr = linear.lr_schedule(r, 10)  # cosine per epoch: constant within an epoch
    np.testing.assert_allclose([float(lr(0)), float(lr(9)), float(lr(450)), float(lr(899))],
                               [0.1, 0.1, 0.05, 0.1 * 0.5 * (1 + np.cos(np.pi * 89 / 90))],
                               rtol=1e-5)
    assert all(linear.RECIPES[n].classifier_init == "uniform"
               for n in ("cifar", "transfer", "imagenet"))
    with pytest.raises(ValueError, match="unknown classifier init 'zeros'"):
        dataclasses.replace(r, classifier_init="zeros")


def test_auto_recipe_follows_the_model():
    """What the Evaluator asks for: the ViT recipe for ViT runs, the dataset's for CNNs."""
    def chosen(c):
        config_lib.validate(c)
        return linear.recipe_for(c.eval.linear_recipe, c.data.dataset, c.eval.linear_epochs,
                                 c.model.name)

    vit = load_config_module("configs/vit_cifar10.py").get_config("tiny,us3l")
    assert vit.model.name in models.VIT_NAMES and chosen(vit) is linear.VIT
    assert chosen(demo_config("vit")) is linear.VIT
    cnn = config_lib.get_default()
    cnn.data.dataset = "cifar10"
    assert chosen(cnn) is linear.CIFAR
    vit.eval.linear_recipe = "cifar"  # a name still wins over auto
    assert chosen(vit) is linear.CIFAR
    assert linear.recipe_for("auto", "imagenet2012", model="vit_small") is linear.VIT


def test_normal_init_statistics_and_zero_bias():
    clf = linear.init_classifier(jax.random.key(3), 512, 512, 1000, "normal")
    w = np.asarray(clf["w"])
    assert w.shape == (512, 1000) and clf["b"].shape == (1000,)
    np.testing.assert_array_equal(np.asarray(clf["b"]), 0.0)
    # 512k draws: the sample std is within ~0.1% of 0.01 and the mean within ~1.4e-5 of 0.
    assert abs(w.std() - 0.01) < 1e-4 and abs(w.mean()) < 1e-4
    assert np.abs(w).max() > 0.04  # Gaussian tails, not a U(±0.01·sqrt(3)) bound
    uni = np.asarray(linear.init_classifier(jax.random.key(3), 512, 512, 1000)["w"])
    assert np.abs(uni).max() <= 1 / np.sqrt(512) and abs(uni.std() - 1 / np.sqrt(3 * 512)) < 1e-3
    with pytest.raises(ValueError, match="unknown classifier init 'xavier'"):
        linear.init_classifier(jax.random.key(3), 4, 4, 2, "xavier")


@pytest.mark.slow
def test_vit_recipe_trains_a_head_on_a_frozen_vit():
    """A ViT has no BN statistics ({}); the head starts N(0, 0.01) with zero bias."""
    backbone = models.create("vit_tiny", dim=32, depth=1, heads=2, patch_size=4, image_size=8)
    params, data = _params_and_toy_data(backbone, 16)
    view = augment.ViewConfig(size=8, scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0)
    # A tiny rate keeps the trained head next to its init, which shows which init train drew.
    recipe = dataclasses.replace(linear.VIT.with_epochs(1), batch_size=8, lr=1e-6)
    init = linear.init_classifier(jax.random.split(jax.random.key(0))[0], 32, 32, 4, "normal")
    np.testing.assert_array_equal(init["b"], 0.0)
    clf, losses = linear.train(backbone, params, {}, data, 0.5, view, recipe, seed=0)
    assert clf["w"].shape == (32, 4)  # official slicing: the feature stays full width
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert 0 < np.abs(clf["w"] - init["w"]).max() < 1e-4  # trained from the N(0, 0.01) draw
    assert 0 < np.abs(clf["b"]).max() < 1e-4
