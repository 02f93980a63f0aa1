"""Intermediate-feature distillation (official ResNet-50 configs; docs/fidelity.md): hooked
features (against a numpy re-statement of both official blocks), proj_conv, the teacher's
features, the cross-view MSE in the sub-network loss, its gradients, decay and a few
training steps.

One tiny bottleneck ResNet (base width 16, stages (1, 2, 1, 1), 16 px) and one module-scoped
engine running ``methods.us3l`` in the official ``per_width`` mode, so each program compiles
once; the block test also builds the basic-block (ResNet-18) variant.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import engine as engine_lib
from us3l_jax import mesh as mesh_lib
from us3l_jax import models, optim, slim
from us3l_jax.methods import us3l
from us3l_jax.models.heads import SSLModel, hooked_layers
from us3l_jax.models.resnet import STAGE_STRIDES
from tests.helpers import jit_init

BATCH, SIZE, GROUP = 16, 16, 8
LAYERS = ("layer2_1", "layer3_0", "layer4_0")  # the last block of stages 2-4
CHANNELS = (32, 64, 128)  # full-width planes of stages 2-4
FEATURE_WEIGHT = 0.5  # not 1, so that the weighting is visible
METHOD = us3l.Config(group_size=GROUP, feature_distill=True,
                     feature_distill_weight=FEATURE_WEIGHT)
WIDTHS = (1.0, 0.5, 0.25)


def noisy_views(key, images):
    """A cheap, deterministic stand-in for the SSL augmentation: two noisy copies."""
    x = images.astype(jnp.float32) / 255.0
    k1, k2 = jax.random.split(key)
    return (x + 0.1 * jax.random.normal(k1, x.shape),
            x + 0.1 * jax.random.normal(k2, x.shape))


def make_model(method=METHOD):
    bb = models.create("cifar_resnet50", base_width=16, stage_sizes=(1, 2, 1, 1),
                       bn_group_size=GROUP)
    layers = tuple(n for n, _ in hooked_layers(bb)) if method.feature_distill else ()
    return SSLModel(bb, proj_hidden=32, proj_out=16, head_hidden=32,
                    use_distill_head=method.uses_distill_head, feature_layers=layers,
                    bn_group_size=GROUP)


@pytest.fixture(scope="module")
def tr():
    tx, schedule = optim.make_optimizer(0.1, 20, reg_lambda=5e-5, reg_alpha=0.05)
    return engine_lib.Engine(us3l.make(METHOD, make_model(), noisy_views, total_steps=20), tx,
                             mesh_lib.make_mesh(jax.devices()[:1]), batch_size=BATCH,
                             group_size=GROUP, update_mode="per_width", lr_schedule=schedule)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return jax.device_put(rng.integers(0, 256, (BATCH, SIZE, SIZE, 3)).astype(np.uint8))


@pytest.fixture(scope="module")
def state0(tr, images):
    return tr.init_state(jax.random.key(0), images)


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(1)
    return tuple(jnp.asarray(rng.uniform(0, 1, (BATCH, SIZE, SIZE, 3)), jnp.float32)
                 for _ in range(2))


def hooked_outputs(model, params, x, width):
    """The hooked maps computed independently of ``encode_features`` (this bottleneck model):
    flax's own capture of every ``bn2`` call of the backbone alone (the same BN groups: the
    batch is one view), through the ReLU that the official code runs in place on it."""
    _, state = model.backbone.apply({"params": params["backbone"]}, x, width=width, train=True,
                                    capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    return {n: np.maximum(np.asarray(inter[n]["bn2"]["__call__"][0]), 0) for n in LAYERS}


# ------------------------------------------------------------------ numpy re-statement
# The official blocks (models/OFA/us_cifar_resnet.py, models/OFA/us_resnet.py), in numpy with
# their in-place ops, and the tensor the official forward hook on ``bn2`` keeps a reference to
# (utils/forward_hook.py): a view of bn2's output, changed by the ops that follow it.


def np_conv(x, kernel, stride):
    """NHWC x HWIO convolution, symmetric padding k // 2 (PyTorch's ``padding=k // 2``)."""
    k = kernel.shape[0]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h = (x.shape[1] + 2 * pad - k) // stride + 1
    w = (x.shape[2] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], h, w, kernel.shape[-1]), np.float64)
    for i in range(k):
        for j in range(k):
            patch = xp[:, i:i + stride * h:stride, j:j + stride * w:stride, :]
            out += np.einsum("bhwc,cd->bhwd", patch, kernel[i, j])
    return out


def np_bn(x, p, group):
    """Training-mode BatchNorm over groups of ``group`` consecutive examples (biased var)."""
    c = x.shape[-1]
    xg = x.reshape((x.shape[0] // group, -1, c))
    mean = xg.mean(axis=1, keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=1, keepdims=True)
    y = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    return y * np.asarray(p["scale"])[:c] + np.asarray(p["bias"])[:c]


def np_slim_conv(x, p, cout, stride):
    return np_conv(x, np.asarray(p["kernel"], np.float64)[:, :, : x.shape[-1], :cout], stride)


def np_block_hooked(kind, p, x, width, stride, planes, group):
    """The official block's forward on ``x`` at ``width``; returns (what the ``bn2`` hook
    holds after the forward, the block output)."""
    expansion = 4 if kind == "bottleneck" else 1
    mid, cout = slim.channels(planes, width), slim.channels(planes * expansion, width)
    relu_ = lambda a: np.maximum(a, 0, out=a)  # nn.ReLU(inplace=True)
    identity = x
    if kind == "basic":
        out = relu_(np_bn(np_slim_conv(x, p["conv1"], mid, stride), p["bn1"], group))
        out = np_bn(np_slim_conv(out, p["conv2"], mid, 1), p["bn2"], group)
        hooked = out  # the forward hook's reference to bn2's output
        if "downsample_conv" in p:
            identity = np_bn(np_slim_conv(x, p["downsample_conv"], cout, stride),
                             p["downsample_bn"], group)
        out += identity
        out = relu_(out)
    else:
        out = relu_(np_bn(np_slim_conv(x, p["conv1"], mid, 1), p["bn1"], group))
        out = np_bn(np_slim_conv(out, p["conv2"], mid, stride), p["bn2"], group)
        hooked = out
        out = relu_(out)
        out = np_bn(np_slim_conv(out, p["conv3"], cout, 1), p["bn3"], group)
        if "downsample_conv" in p:
            identity = np_bn(np_slim_conv(x, p["downsample_conv"], cout, stride),
                             p["downsample_bn"], group)
        out += identity
        out = relu_(out)
    return hooked, out


def proj_conv_numpy(params, feats):
    """proj_conv by hand: x @ kernel[:, :, :cin, :] (1x1, no bias)."""
    out = {}
    for n, f in feats.items():
        k = np.asarray(params["proj_conv"][n]["kernel"])[0, 0]
        out[n] = np.einsum("bhwc,cd->bhwd", f, k[: f.shape[-1]])
    return out


def cross_view_mse_numpy(s1, s2, t1, t2):
    terms = [np.mean((s1[n] - t2[n]) ** 2) for n in LAYERS] + \
        [np.mean((s2[n] - t1[n]) ** 2) for n in LAYERS]
    return float(np.mean(terms))


# ------------------------------------------------------------------------------ model


def test_hooks_and_proj_conv_shapes(state0, views):
    model = make_model()
    bb = model.backbone
    assert bb.feature_layers() == LAYERS
    assert tuple(c for _, c in hooked_layers(bb)) == CHANNELS
    # The official ResNet-50 hooks: layer2.3 / layer3.5 / layer4.2, 128 / 256 / 512 channels.
    r50 = models.create("cifar_resnet50")
    assert hooked_layers(r50) == (("layer2_3", 128), ("layer3_5", 256), ("layer4_2", 512))
    p = state0.params
    assert set(p) == {"backbone", "projector", "distill_head", "proj_conv"}
    assert set(state0.ema_params) == {"backbone", "projector"}  # the teacher has no proj_conv
    for n, c in zip(LAYERS, CHANNELS):
        assert set(p["proj_conv"][n]) == {"kernel"}  # no bias
        assert p["proj_conv"][n]["kernel"].shape == (1, 1, c, c)
    for width, slim_channels in ((0.5, (16, 32, 64)), (0.25, (8, 16, 32))):
        apply = lambda fn, a: model.apply({"params": p}, a, width, method=fn)
        feats = jax.eval_shape(functools.partial(apply, SSLModel.encode_features), views[0])[1]
        projected = jax.eval_shape(functools.partial(apply, SSLModel.project_features), feats)
        for n, c, full in zip(LAYERS, slim_channels, CHANNELS):
            assert feats[n].shape[-1] == c
            assert projected[n].shape == feats[n].shape[:-1] + (full,)  # full C at any width
    width = 0.25
    z, feats = jax.jit(lambda p, x: model.apply({"params": p}, x, width,
                                                method=SSLModel.encode_features))(p, views[0])
    ref = hooked_outputs(model, p, views[0], width)
    for n in LAYERS:
        np.testing.assert_allclose(feats[n], ref[n], rtol=1e-5, atol=1e-5)
        assert feats[n].min() == 0 and (feats[n] > 0).any()  # after the ReLU
    # The forward without hooks gives the same projection.
    np.testing.assert_allclose(
        z, model.apply({"params": p}, views[0], width, method=SSLModel.encode), rtol=1e-5,
        atol=1e-6)


@pytest.mark.parametrize("name,kind", [("cifar_resnet18", "basic"),
                                       ("cifar_resnet50", "bottleneck")])
def test_hooked_features_are_what_the_official_bn2_hook_holds(name, kind):
    """Each hooked map equals the numpy official block's ``bn2`` output after the block's
    in-place ops (basic: the block output; bottleneck: relu(bn2)), fed the block's input."""
    bb = models.create(name, base_width=16, stage_sizes=(1, 2, 1, 1), bn_group_size=GROUP)
    model = SSLModel(bb, proj_hidden=32, proj_out=16, feature_layers=LAYERS,
                     bn_group_size=GROUP)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, SIZE, SIZE, 3)), jnp.float32)
    params = jit_init(model, jax.random.key(0), x)["params"]
    pb = jax.tree.map(np.asarray, params["backbone"])
    blocks = [f"layer{i + 1}_{j}" for i, n in enumerate(bb.stage_sizes) for j in range(n)]
    for width in (1.0, 0.5):
        def run(p, x, width=width):
            _, feats = model.apply({"params": p}, x, width, method=SSLModel.encode_features)
            _, state = bb.apply({"params": p["backbone"]}, x, width=width, train=True,
                                capture_intermediates=True, mutable=["intermediates"])
            return feats, {b: state["intermediates"][b]["__call__"][0] for b in blocks}

        feats, outs = jax.jit(run)(params, x)
        for n in LAYERS:
            stage, j = int(n[5]) - 1, int(n.split("_")[1])
            block_in = np.asarray(outs[blocks[blocks.index(n) - 1]], np.float64)
            hooked, out = np_block_hooked(kind, pb[n], block_in, width,
                                          STAGE_STRIDES[stage] if j == 0 else 1,
                                          bb.stage_planes[stage], GROUP)
            np.testing.assert_allclose(out, outs[n], rtol=1e-4, atol=1e-4)  # the same block
            np.testing.assert_allclose(feats[n], hooked, rtol=1e-4, atol=1e-4)
            assert hooked.shape[-1] == slim.channels(bb.stage_planes[stage], width)
            assert hooked.min() == 0 and (hooked > 0).any()  # after the in-place ReLU
            if kind == "basic":
                np.testing.assert_array_equal(feats[n], outs[n])  # the block output


def test_bad_layers_and_backbones_are_rejected():
    bb = models.create("cifar_resnet50", base_width=16, stage_sizes=(1, 2, 1, 1))
    with pytest.raises(ValueError, match=r"unknown ResNet block 'layer2_2'.*valid: layer1_0"):
        hooked_layers(bb, ("layer2_2",))
    with pytest.raises(ValueError, match="backbone MobileNetV2 has none"):
        hooked_layers(models.create("cifar_mobilenet_v2"))
    with pytest.raises(ValueError, match="feature_distill .* needs momentum_base or"):
        us3l.Config(feature_distill=True, momentum_base=False, momentum_sub=False)
    with pytest.raises(ValueError, match="feature_distill_weight must be >= 0, got -1"):
        us3l.Config(feature_distill_weight=-1.0)
    # A model without hooked layers for a method with feature distillation (and vice versa).
    for model_cfg, method_cfg in ((us3l.Config(), METHOD), (METHOD, us3l.Config())):
        with pytest.raises(ValueError, match=r"the model's heads \(use_predictor, "
                                             r"use_distill_head, feature_layers\) must match"):
            us3l.make(method_cfg, make_model(model_cfg), noisy_views, total_steps=10)


# ------------------------------------------------------------------------------ the step
# These run the engine's own programs (the ones training uses, compiled once) one by one.


@pytest.fixture(scope="module")
def programs(tr, state0, images):
    """The jitted programs of an iteration on ``WIDTHS``, by (kind, width): found by a dry run
    of ``Engine.iteration`` with a runner that only records them (and computes shapes)."""
    found = {}

    def record(key, make, *args):
        fn = tr.programs.get(key, make)
        found[key] = fn
        return jax.eval_shape(fn, *args)

    tr.iteration(record, state0, images, WIDTHS)
    return {(kind, w): found[(kind, tr.config_key(w))]
            for kind in ("base_update", "sub_update") for w in WIDTHS
            if (kind, tr.config_key(w)) in found}


def run(programs, kind, *args, width):
    return programs[(kind, width)](*args)


@pytest.fixture(scope="module")
def base_step(tr, programs, state0, views):
    """The base (width 1.0) program on a state whose teacher differs from the online network
    (at init the two are equal): (state before, state after, targets, metrics, running sums)."""
    before = state0.replace(ema_params=jax.tree.map(lambda a: a * 1.05, state0.ema_params))
    # The program consumes (donates) its state: give it a copy.
    after, targets, metrics, total = run(programs, "base_update",
                                         jax.tree.map(jnp.copy, before), None, views,
                                         width=1.0)
    return before, after, targets, metrics, total


@pytest.mark.slow
def test_teacher_features_come_from_the_ema_params_at_full_width(views, base_step):
    before, after, targets, metrics, total = base_step
    model = make_model()
    # The EMA step came first, and the teacher forward used its result.
    expected_ema = jax.tree.map(lambda e, p: 0.99 * e + 0.01 * p, before.ema_params,
                                {k: before.params[k] for k in ("backbone", "projector")})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 after.ema_params, expected_ema)
    assert len(targets) == 3
    for feats, v in zip(targets[2], views):
        ref = hooked_outputs(model, after.ema_params, v, 1.0)
        online = hooked_outputs(model, before.params, v, 1.0)
        for n, c in zip(LAYERS, CHANNELS):
            assert feats[n].shape[-1] == c
            np.testing.assert_allclose(feats[n], ref[n], rtol=1e-4, atol=1e-4)
            assert np.abs(np.asarray(feats[n]) - online[n]).max() > 1e-2  # not the online net
    assert "loss/base" in metrics
    assert float(total["loss/feature"]) == 0.0  # the base network has no feature loss


@pytest.mark.slow
def test_sub_network_loss_adds_the_cross_view_feature_mse(tr, programs, views, base_step):
    _, after, targets, _, _ = base_step
    model = make_model()
    state = jax.tree.map(jnp.copy, after)
    params = jax.tree.map(np.asarray, after.params)
    zero = {"loss/total": jnp.float32(0), "loss/feature": jnp.float32(0)}
    width = 0.5
    new, total, raw, _ = run(programs, "sub_update", state, zero, targets, views, width=width)
    s1, s2 = (proj_conv_numpy(params, hooked_outputs(model, params, v, width)) for v in views)
    t1, t2 = ({n: np.asarray(f[n]) for n in LAYERS} for f in targets[2])
    expected = cross_view_mse_numpy(s1, s2, t1, t2)
    np.testing.assert_allclose(float(total["loss/feature"]), expected, rtol=1e-4)
    # Cross-view, not same-view: the aligned pairing gives another number.
    assert abs(cross_view_mse_numpy(s1, s2, t2, t1) - expected) > 1e-3 * expected
    np.testing.assert_allclose(float(total["loss/total"]), float(raw) + FEATURE_WEIGHT * expected,
                               rtol=1e-5)

    # proj_conv learns only from sub-networks, and is neither decayed nor group-regularized:
    # the base update (zero gradient, zero momentum) left it exactly as initialised, and the
    # width-0.5 update changed only the input rows that width uses. Decay would shrink all.
    assert "proj_conv" not in METHOD.decay_groups(sub=True)
    assert "proj_conv" not in tr.method.decay(True, jnp.int32(0), 0)
    for n in LAYERS:
        k0 = np.asarray(base_step[0].params["proj_conv"][n]["kernel"])[0, 0]
        np.testing.assert_array_equal(params["proj_conv"][n]["kernel"][0, 0], k0)
        k1 = np.asarray(new.params["proj_conv"][n]["kernel"])[0, 0]
        used = k0.shape[0] // 2  # md(C * 0.5)
        # The used rows learn. A single entry whose gradient happens to be near zero can move
        # less than half a float32 ulp of its weight and round away (how often depends on the
        # CPU's float rounding), so not every entry must change.
        assert (np.abs(k1[:used] - k0[:used]) > 0).mean() > 0.99
        np.testing.assert_array_equal(k1[used:], k0[used:])


@pytest.mark.slow
def test_training_with_feature_distillation_lowers_the_feature_loss(tr, state0, images):
    state = jax.tree.map(jnp.copy, state0)
    history = []
    for _ in range(6):
        state, m = tr.step(state, images, WIDTHS)
        m = jax.device_get(m)
        history.append((float(m["loss/feature"]), float(m["loss/total"])))
    feature, total = np.array(history).T
    assert np.all(np.isfinite(feature)) and np.all(np.isfinite(total))
    # loss/feature: the two sub-networks' unweighted feature losses, summed.
    assert np.all(np.diff(feature) < 0), feature
    assert total[-1] < total[0], total
    assert int(state.step) == 6


def test_proj_conv_decay_follows_the_decay_rule():
    """Group reg (every US3L config) skips proj_conv; plain weight decay decays it like the
    auxiliary head, from its first sub-network update on (PyTorch SGD)."""
    gr = us3l.Config(feature_distill=True)
    assert "proj_conv" in gr.param_groups()
    assert "proj_conv" not in gr.decay_groups(sub=True) | gr.decay_groups(sub=False)
    assert not gr.late_decay_groups()
    wd = us3l.Config(feature_distill=True, decay_rule="weight_decay")
    assert "proj_conv" in wd.decay_groups(sub=True)
    assert wd.late_decay_groups() == {"distill_head", "proj_conv"}
