"""Supervised slimmable training (paper Table 1, ``us3l_jax.methods.supervised``): losses,
inplace distillation, S-Net's private BatchNorm, the engine's two update modes on it, top-1
evaluation and the config checks.

One tiny ResNet (base width 16, one block per stage, 8x8 inputs, 10 classes) is shared.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from us3l_jax import build, calibration, config as config_lib, engine, mesh as mesh_lib
from us3l_jax import models, optim, sampling
from us3l_jax.data import augment
from us3l_jax.methods import Context, supervised
from us3l_jax.evaluate.evaluator import Evaluator, top1_accuracy
from tests.helpers import demo_config, jit_init

BATCH, SIZE, GROUP, CLASSES = 16, 8, 8, 10
S_NET = (1.0, 0.5)
VIEW = augment.ViewConfig(size=SIZE, scale=(0.8, 1.0), jitter_p=0.0, grayscale_p=0.0)


def tiny(switchable=(), num_classes=CLASSES):
    return models.create("cifar_resnet18", num_classes=num_classes, base_width=16,
                         stage_sizes=(1, 1, 1, 1), bn_group_size=GROUP,
                         switchable_widths=switchable)


def init(model, seed=0):
    x = jnp.zeros((BATCH, SIZE, SIZE, 3))
    return {"backbone": jit_init(model, jax.random.key(seed), x,
                                   width=max(model.switchable_widths or (1.0,)))["params"]}


def batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (BATCH, SIZE, SIZE, 3)).astype(np.uint8)
    labels = rng.integers(0, CLASSES, (BATCH,)).astype(np.int32)
    return jax.device_put(images), jax.device_put(labels)


def x_of(images):
    return augment.normalize(images.astype(jnp.float32) / 255.0, augment.CIFAR_MEAN,
                             augment.CIFAR_STD)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def make_trainer(switchable=(), update_mode="accumulate", distill=True, lr=0.05):
    cfg = supervised.Config(distill=distill, group_size=GROUP)
    tx, schedule = optim.make_optimizer(lr, 100, reg_lambda=5e-5, reg_alpha=0.0)
    return engine.Engine(supervised.make(cfg, tiny(switchable), VIEW), tx,
                         mesh_lib.make_mesh(jax.devices()[:1]), batch_size=BATCH,
                         group_size=GROUP, update_mode=update_mode, lr_schedule=schedule)


NO_CONTEXT = Context(teacher=None, queue=None, constants=None)


def losses(model, cfg):
    """The method's base and sub-network losses as functions of (params, x, labels, width)."""
    m = supervised.make(cfg, model, VIEW)
    return (lambda p, x, labels, width: m.base_loss(p, NO_CONTEXT, (x, labels), width),
            lambda p, targets, x, labels, width: m.sub_loss(p, targets, (x, labels), width))


# ------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_equals_numpy(smoothing):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = np.array([0, 4, 2, 2, 1, 3])
    targets = np.eye(5)[labels] * (1 - smoothing) + smoothing / 5
    want = np.mean(-(targets * np_log_softmax(logits.astype(np.float64))).sum(-1))
    got = supervised.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    probs = rng.dirichlet(np.ones(5), size=6)
    want_soft = np.mean(-(probs * np_log_softmax(logits.astype(np.float64))).sum(-1))
    np.testing.assert_allclose(float(supervised.soft_cross_entropy(logits, probs)), want_soft,
                               rtol=1e-6)


@pytest.mark.slow
def test_inplace_distillation_uses_the_detached_largest_width_predictions():
    model = tiny()
    params = init(model)
    images, labels = batch()
    x = x_of(images)
    cfg = supervised.Config(distill=True, group_size=GROUP)
    base_loss, sub_loss = losses(model, cfg)
    loss, (targets, metrics) = base_loss(params, x, labels, width=1.0)
    full = model.apply({"params": params["backbone"]}, x, width=1.0)
    np.testing.assert_allclose(targets, jax.nn.softmax(full), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(loss), float(supervised.cross_entropy(full, labels)),
                               rtol=1e-6)
    # The sub-network's loss is the soft cross-entropy against those targets ...
    sub = np.asarray(model.apply({"params": params["backbone"]}, x, width=0.25), np.float64)
    raw = sub_loss(params, targets, x, labels, width=0.25)[0]
    want = np.mean(-(np.asarray(targets, np.float64) * np_log_softmax(sub)).sum(-1))
    np.testing.assert_allclose(float(raw), want, rtol=1e-5)

    # ... and no gradient flows into the largest width through them: differentiating the
    # chained loss gives exactly the gradient with the targets held constant.
    def chained(p):
        t = base_loss(p, x, labels, width=1.0)[1][0]
        return sub_loss(p, t, x, labels, width=0.25)[0]

    def fixed(p):
        return sub_loss(p, targets, x, labels, width=0.25)[0]

    g_chained, g_fixed = jax.jit(jax.grad(chained))(params), jax.jit(jax.grad(fixed))(params)

    # Without the stop-gradient the chained gradient differs (so the check can fail).
    def leaky(p):
        logits = model.apply({"params": p["backbone"]}, x, width=1.0)
        return sub_loss(p, jax.nn.softmax(logits), x, labels, width=0.25)[0]

    def max_diff(a, b):
        return max(jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))),
                                                a, b)))

    d_chained = max_diff(g_chained, g_fixed)
    d_leaky = max_diff(jax.jit(jax.grad(leaky))(params), g_fixed)
    print(f"max |grad difference|: detached {d_chained:.2e}, not detached {d_leaky:.2e}")
    assert d_chained < 1e-6 and d_leaky > 1000 * max(d_chained, 1e-7)
    # distill=False: the labels, not the targets.
    hard = losses(model, supervised.Config(distill=False))[1](params, targets, x, labels,
                                                              width=0.25)[0]
    np.testing.assert_allclose(float(hard), float(supervised.cross_entropy(sub, labels)),
                               rtol=1e-5)


# ------------------------------------------------------------------------------ S-Net BN


@pytest.mark.slow
def test_s_net_widths_have_private_batchnorm_parameters_and_statistics():
    model = tiny(S_NET)
    params = init(model)
    bn = params["backbone"]["bn1"]
    assert set(bn) == {"w0", "w1"}  # one private BN per width, none shared
    assert set(params["backbone"]["conv1"]) == {"kernel"}  # convolutions are shared
    images, labels = batch()
    x = x_of(images)

    def loss(p, width):
        logits = model.apply({"params": p["backbone"]}, x, width=width)
        return supervised.cross_entropy(logits, labels)

    g_half = traverse_util.flatten_dict(
        jax.jit(jax.grad(loss), static_argnums=1)(params, 0.5)["backbone"], sep="/")
    bn_keys = [k for k in g_half if "/w0/" in k or "/w1/" in k]
    assert len(bn_keys) == 12 * 2 * 2  # 12 BNs (stem, 2 per block, 3 shortcuts) x 2 widths x 2
    for k in bn_keys:  # width 0.5 trains its own BN and never touches width 1.0's
        if "/w0/" in k:
            assert not np.any(g_half[k]), k
    assert any(np.any(g_half[k]) for k in bn_keys if "/w1/" in k)

    # Statistics: calibrating one width fills only that width's private statistics.
    batches = [x_of(batch(s)[0]) for s in range(2)]
    stats_half = calibration.calibrate(model, params["backbone"], 0.5, batches)
    stats_full = calibration.calibrate(model, params["backbone"], 1.0, batches)
    s_half, s_full = (traverse_util.flatten_dict(s, sep="/") for s in (stats_half, stats_full))
    assert set(s_half) == set(s_full) and "bn1/w1/mean" in s_half
    np.testing.assert_array_equal(s_half["bn1/w0/mean"], 0.0)  # untouched: defaults
    np.testing.assert_array_equal(s_half["bn1/w0/var"], 1.0)
    np.testing.assert_array_equal(s_full["bn1/w1/mean"], 0.0)
    assert np.any(s_half["bn1/w1/mean"]) and np.any(s_full["bn1/w0/mean"])
    # The stem's first 8 channels see the same input at both widths: equal statistics,
    # kept in two separate places.
    np.testing.assert_allclose(s_half["bn1/w1/mean"][:8], s_full["bn1/w0/mean"][:8], rtol=1e-5)
    # Eval mode at 0.5 reads w1's statistics only: overwriting w0's changes nothing.
    variables = {"params": params["backbone"], "batch_stats": stats_half}
    out = model.apply(variables, x, width=0.5, train=False)
    poisoned = jax.tree.map(lambda a: a, stats_half)
    poisoned["bn1"]["w0"]["mean"] = np.full_like(poisoned["bn1"]["w0"]["mean"], 7.0)
    np.testing.assert_array_equal(
        out, model.apply({"params": params["backbone"], "batch_stats": poisoned}, x,
                         width=0.5, train=False))


def test_s_net_refuses_a_width_outside_its_list():
    model = tiny(S_NET)
    params = init(model)
    with pytest.raises(ValueError, match=r"width 0\.75 is not one of the switchable \(S-Net\) "
                                         r"widths \(1\.0, 0\.5\)"):
        model.apply({"params": params["backbone"]}, jnp.zeros((BATCH, SIZE, SIZE, 3)),
                    width=0.75)
    # Widths with equal channel counts still get different programs (different BNs).
    assert model.channel_config(1.0)[-1] == 0 and model.channel_config(0.5)[-1] == 1
    c = demo_config("s_net", eval__sweep_widths=(1.0, 0.6))
    with pytest.raises(config_lib.ConfigError, match=r"eval.sweep_widths: width 0.6 is not one"):
        config_lib.validate(c)
    c = demo_config("s_net", sampler__width_range=(0.5, 1.0))
    with pytest.raises(config_lib.ConfigError, match=r"width_range=\(0.5, 1.0\) must be "
                                                     r"\(0.25, 1.0\)"):
        config_lib.validate(c)


def test_s_net_sampler_trains_the_whole_list_every_step():
    c = demo_config("s_net")
    config_lib.validate(c)
    s = build.sampler(c)
    assert [sampling.sample_widths(s, k, 22, 264) for k in (0, 100, 263)] == \
        [(1.0, 0.75, 0.5, 0.25)] * 3
    assert sampling.expected_forward_count(s, 264, 22) == 4 * 264
    with pytest.raises(ValueError, match="fixed=True .* needs a grid"):
        sampling.SamplerConfig(fixed=True, schedule=None)


# ------------------------------------------------------------------------------ training


@pytest.mark.slow
@pytest.mark.parametrize("switchable,update_mode,distill", [
    ((), "accumulate", True),           # US-Net: sandwich widths, one summed update
    (S_NET, "per_width", False),        # S-Net: every width on the labels, one update each
])
def test_a_few_steps_decrease_the_loss(switchable, update_mode, distill):
    trainer = make_trainer(switchable, update_mode, distill)
    images, labels = batch(3)
    state = trainer.init_state(jax.random.key(0), images)
    widths = (1.0, 0.5) if switchable else (1.0, 0.25)
    first = None
    for _ in range(12):
        state, metrics = trainer.step(state, images, widths, labels)
        metrics = jax.device_get(metrics)
        first = first or metrics
    assert int(state.step) == 12
    subs = len(widths) - 1
    assert set(first) >= {"loss/base", "loss/total", "top1/base", "grad_norm"} | \
        {f"loss/sub{i}" for i in range(subs)}
    np.testing.assert_allclose(first["loss/total"],
                               first["loss/base"] + sum(first[f"loss/sub{i}"]
                                                        for i in range(subs)), rtol=1e-6)
    assert metrics["loss/base"] < 0.7 * first["loss/base"], (first, metrics)
    assert metrics["loss/total"] < 0.7 * first["loss/total"], (first, metrics)
    # view, base, one per sub-width, apply / finish
    assert trainer.num_programs == 3 + subs
    with pytest.raises(ValueError, match="needs the batch's labels"):
        trainer.step(state, images, widths)


# ------------------------------------------------------------------------------ evaluation


def test_top1_accuracy_by_hand():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.5, 0.4], [1.0, 1.0, 0.0]])
    # argmax: 1, 0, 1, 0 (the tie goes to class 0) against labels 1, 0, 2, 1: 2 of 4 right.
    assert top1_accuracy(logits, np.array([1, 0, 2, 1])) == 0.5
    with pytest.raises(ValueError, match="need logits"):
        top1_accuracy(logits, np.array([1, 0]))


@pytest.mark.slow
def test_evaluator_top1_is_the_classifier_accuracy_on_the_test_split():
    # Base width 8 cannot run at 0.25x (8 channels round up to 9): train range [0.5, 1].
    c = demo_config("supervised_us", model__base_width=8, data__image_size=8,
                    eval__batch_size=96, sampler__width_range=(0.5, 1.0),
                    eval__sweep_widths=(1.0, 0.5), eval__online_widths=(1.0, 0.5))
    config_lib.validate(c)
    model = build.classifier(c)
    params = {"backbone": jit_init(model, jax.random.key(1), jnp.zeros((32, 8, 8, 3)))["params"]}
    ev = Evaluator(c)
    settings = calibration.CalibrationSettings(num_batches=2, batch_size=96)
    stats = ev.calibrate(params["backbone"], 0.5, settings)
    got = ev.run("top1", params["backbone"], stats, 0.5)
    # By hand: every test image through the eval transform, eval mode, argmax vs labels.
    test = ev.test
    images = np.asarray(test.images)[:test.num_examples]
    labels = np.asarray(test.labels)[:test.num_examples]
    x = augment.eval_view(jnp.asarray(images), ev.data.eval_view)
    logits = model.apply({"params": params["backbone"], "batch_stats": stats}, x, width=0.5,
                         train=False)
    want = np.mean(np.argmax(np.asarray(logits), -1) == labels)
    assert len(labels) == 359  # 359 = 3 batches of 96 + 71, the last padded
    assert got == pytest.approx(want, abs=1e-9)
    assert 0.0 < got < 1.0
    ssl = Evaluator(demo_config("smoke", model__base_width=8, data__image_size=8,
                                eval__batch_size=96))
    with pytest.raises(ValueError, match="protocol 'top1' reads the classifier of a supervised"):
        ssl.top1(params["backbone"], stats, 0.5)


def test_table1_recipes_are_the_official_configs():
    from tests.helpers import load_config_module
    t1 = load_config_module("configs/table1.py")
    c = t1.get_config("supervised_s_net_distill")
    assert (c.optim.lr, c.optim.epochs, c.optim.batch_size, 2 * c.optim.reg_lambda,
            c.optim.reg_alpha) == (1.0, 200, 512, pytest.approx(1e-4), 0.0)
    assert (c.method.update_mode, c.method.group_size, c.supervised.distill) == \
        ("per_width", 128, True)
    assert build.sampler(c).grid == (0.25, 0.5, 0.75, 1.0) and build.sampler(c).fixed
    assert not t1.get_config("supervised_s_net").supervised.distill
    ind = t1.get_config("supervised_individual,0.5")
    assert build.sampler(ind).individual_width == 0.5 and ind.eval.sweep_widths == (0.5,)
    for row, distill in (("simsiam_s_net", "none"), ("simsiam_s_net_distill", "mse")):
        c = t1.get_config(row)
        m = build.method(c)
        assert (m.base_loss, m.distill_loss, m.momentum_base, c.method.update_mode) == \
            ("mse", distill, False, "per_width")
        assert (c.optim.lr, c.model.switchable_widths) == (0.05, (1.0, 0.75, 0.5, 0.25))
        assert c.eval.paper_row == f"table1/{row}"


def test_config_checks_of_supervised_runs():
    for variant in ("supervised_us", "s_net"):
        c = demo_config(variant)
        config_lib.validate(c)
        assert build.is_supervised(c) and c.eval.sweep_protocol == "top1"
    trainer = build.trainer(demo_config("s_net"), mesh_lib.make_mesh(), 22)
    assert isinstance(trainer, engine.Engine) and trainer.method.name == "supervised"
    assert trainer.method.needs_labels and build.method_kind(demo_config("s_net")) == "supervised"
    with pytest.raises(config_lib.ConfigError, match="sweep_protocol='top1' reads the "
                                                     "classifier of a supervised run"):
        config_lib.validate(demo_config(None, eval__sweep_protocol="top1"))
    with pytest.raises(config_lib.ConfigError, match="train.objective='bogus' is not one of"):
        config_lib.validate(demo_config("s_net", train__objective="bogus"))
    with pytest.raises(config_lib.ConfigError, match="label_smoothing must be in"):
        config_lib.validate(demo_config("supervised_us", supervised__label_smoothing=1.5))
    with pytest.raises(config_lib.ConfigError, match="must include 1.0"):
        config_lib.validate(demo_config("s_net", model__switchable_widths=(0.75, 0.25),
                                        sampler__width_range=(0.25, 0.75)))
