"""MoCo v3 and US3L for ViTs: the loss against a hand-written reference, the momentum ramp,
the method flags, and a few AdamW steps of a tiny slimmable ViT in the per-width step."""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import mesh as mesh_lib
from us3l_jax import models, objectives, optim
from us3l_jax.engine import Engine
from us3l_jax.methods import ema, us3l
from us3l_jax.models.heads import SSLModel

BATCH = 16


def _reference_ctr(q, k, tau):
    """MoCo v3 contrastive_loss written out: CE(n(q) n(k)^T / T, labels = arange) * 2T."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = qn @ kn.T / tau
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.mean(np.diag(logp)) * 2 * tau


def test_moco_v3_loss_matches_reference():
    rng = np.random.default_rng(0)
    q1, q2, k1, k2 = (rng.standard_normal((8, 16)) for _ in range(4))
    got = objectives.moco_v3(q1, q2, k1, k2, 0.2)
    want = _reference_ctr(q1, k2, 0.2) + _reference_ctr(q2, k1, 0.2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Closed form: q = k = I_4 -> each side 2T[log(e^{1/T} + 3) - 1/T].
    eye = np.eye(4)
    closed = 2 * 2 * 0.2 * (math.log(math.exp(5.0) + 3) - 5.0)
    np.testing.assert_allclose(float(objectives.moco_v3(eye, eye, eye, eye, 0.2)), closed,
                               atol=1e-6)  # float32: the value (0.016) comes from a difference
    # Groups of 4 are two independent problems (per-device keys, no all-gather).
    g = objectives.moco_v3_contrast(q1, k2, 0.2, group_size=4)
    np.testing.assert_allclose(float(g), 0.5 * (_reference_ctr(q1[:4], k2[:4], 0.2) +
                                                _reference_ctr(q1[4:], k2[4:], 0.2)), rtol=1e-5)


def test_cosine_momentum_ramp_end_points():
    m = us3l.Config(base_loss="mocov3", ema_schedule="cosine", ema_momentum=0.99)
    values = [float(ema.momentum(m.ema_momentum, m.ema_schedule, t, 100)) for t in (0, 50, 100)]
    np.testing.assert_allclose(values, [0.99, 0.995, 1.0], atol=1e-7)


def test_method_flags():
    us = us3l.Config(base_loss="mocov3", distill_loss="mocov3", aux_head="new",
                     aux_head_init="copy", tau=0.2, decay_rule="weight_decay")
    assert us.uses_predictor and us.uses_distill_head
    # AdamW's decay reaches every parameter with a gradient: the predictor at width 1.0, the
    # new head once sub-networks have trained.
    assert us.decay_groups(sub=False) == {"backbone", "projector", "predictor"}
    assert us.late_decay_groups() == {"distill_head"}
    baseline = us3l.Config(base_loss="mocov3", distill_loss="mocov3", aux_head="shared")
    assert baseline.param_groups() == {"backbone", "projector", "predictor"}
    # Existing defaults keep their behaviour.
    assert not us3l.Config().uses_predictor
    assert us3l.Config().decay_groups(sub=False) == {"backbone", "projector"}
    with pytest.raises(ValueError, match="momentum_base"):
        us3l.Config(base_loss="mocov3", momentum_base=False)
    with pytest.raises(ValueError, match="aux_head_init"):
        us3l.Config(aux_head_init="clone")
    with pytest.raises(ValueError, match="copies the predictor"):
        us3l.Config(aux_head_init="copy")


def _views(key, images):
    x = images.astype(jnp.float32) / 255.0
    k1, k2 = jax.random.split(key)
    return x + 0.1 * jax.random.normal(k1, x.shape), x + 0.1 * jax.random.normal(k2, x.shape)


@pytest.fixture(scope="module")
def us3l_vit():
    cfg = us3l.Config(base_loss="mocov3", distill_loss="mocov3", aux_head="new",
                      aux_head_init="copy", tau=0.2, ema_schedule="cosine", group_size=None)
    bb = models.create("vit_tiny", dim=32, depth=1, heads=4, patch_size=4, image_size=8,
                       slicing="embed")
    model = SSLModel(bb, proj_hidden=32, proj_out=16, proj_style="mocov3", head_hidden=32,
                     use_predictor=True, use_distill_head=True)
    tx, lr = optim.make_adamw(1e-3, 40, warmup_steps=2, weight_decay=0.1)
    trainer = Engine(us3l.make(cfg, model, _views, total_steps=40), tx,
                     mesh_lib.make_mesh(jax.devices()[:1]), batch_size=BATCH,
                     group_size=cfg.group_size, update_mode="per_width", lr_schedule=lr)
    images = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (BATCH, 8, 8, 3)).astype(np.uint8))
    state = trainer.init_state(jax.random.key(0), jax.ShapeDtypeStruct(images.shape,
                                                                       images.dtype))
    return trainer, state, images


@pytest.mark.slow
def test_us3l_vit_steps_decrease_the_losses(us3l_vit):
    trainer, state, images = us3l_vit
    p = state.params
    assert set(p) == {"backbone", "projector", "predictor", "distill_head"}
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p["predictor"],
                              p["distill_head"])
    assert all(jax.tree.leaves(chex_equal))  # the new head starts as a copy of the predictor
    # 3-layer projector, bias-free Linears, BN after each (the last one without affine)
    assert set(p["projector"]) == {"fc1", "fc2", "fc3", "bn1", "bn2"}
    assert set(p["projector"]["fc1"]) == {"kernel"} and set(p["predictor"]) == {"fc1", "fc2",
                                                                                "bn1"}
    history = []
    for _ in range(10):
        state, metrics = trainer.step(state, images, (1.0, 0.5))
        history.append((float(metrics["loss/base"]), float(metrics["loss/sub0"])))
    assert int(state.step) == 10
    (b0, s0), (b1, s1) = history[0], history[-1]
    assert b1 < b0 - 0.05 and s1 < s0 - 0.05, history
    # ema momentum follows the cosine ramp from 0.99
    np.testing.assert_allclose(float(metrics["ema_momentum"]),
                               1 - 0.01 * 0.5 * (1 + math.cos(math.pi * 9 / 40)), rtol=1e-6)
    assert trainer.num_programs == 4  # views, base_update, sub_update at 0.5, finish


# ------------------------------------------------------------------------ US+MoCo v3's teacher


def _vit_engine(cfg, update_mode, tx=None, first_sub_step=0, total_steps=40):
    bb = models.create("vit_tiny", dim=32, depth=1, heads=4, patch_size=4, image_size=8,
                       slicing="official")
    model = SSLModel(bb, proj_hidden=32, proj_out=16, proj_style="mocov3", head_hidden=32,
                     use_predictor=True, use_distill_head=cfg.uses_distill_head)
    if tx is None:
        tx, lr = optim.make_adamw(1e-3, total_steps, warmup_steps=2, weight_decay=0.1)
    else:
        tx, lr = tx
    return Engine(us3l.make(cfg, model, _views, total_steps=total_steps), tx,
                  mesh_lib.make_mesh(jax.devices()[:1]), batch_size=BATCH,
                  group_size=cfg.group_size, update_mode=update_mode, lr_schedule=lr,
                  first_sub_step=first_sub_step)


US_MOCOV3 = us3l.Config(base_loss="mocov3", distill_loss="mocov3", aux_head="shared", tau=0.2,
                        ema_schedule="cosine", group_size=None, decay_rule="weight_decay")
WIDTHS = (1.0, 0.75, 0.5)


def _host(tree):
    """A host copy (the engine's programs donate their input buffers)."""
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def _images(seed=0):
    return jax.device_put(np.random.default_rng(seed).integers(
        0, 256, (BATCH, 8, 8, 3)).astype(np.uint8))


def _recorded_iteration(trainer, state, images, widths):
    """One iteration, keeping the state each update program returns."""
    after = []

    def run(key, make, *args):
        out = trainer.programs.call(key, make, *args)
        if key[0] in ("base_update", "sub_update"):
            after.append(_host(out[0]))
        return out

    state, metrics = trainer.iteration(run, state, images, widths)
    return state, metrics, after


def _ema(e, p, m):
    return jax.tree.map(lambda a, b: m * np.asarray(a, np.float64) +
                        (1 - m) * np.asarray(b, np.float64), e, ema.teacher_subset(p))


@pytest.mark.slow
def test_us_mocov3_teacher_steps_once_per_width_after_each_update():
    """The official MoCo_USBaselineViT forward updates the momentum encoder at every width,
    with the iteration's m, from the parameters that width sees (the base width's from the
    iteration's start, each later width's after the previous width's optimizer step), and
    the students keep the base width's keys; one EMA step per iteration is the option."""
    images = _images()
    per_width = _vit_engine(dataclasses.replace(US_MOCOV3, ema_updates="width"), "per_width")
    once = _vit_engine(US_MOCOV3, "per_width")
    state = per_width.init_state(jax.random.key(0), jax.ShapeDtypeStruct(images.shape,
                                                                         images.dtype))
    state, _ = per_width.step(state, images, (1.0,))  # make the teacher differ
    start = _host(state)
    new, metrics, after = _recorded_iteration(per_width, state, images, WIDTHS)
    ref, ref_metrics, _ = _recorded_iteration(once, jax.tree.map(jnp.asarray, start), images,
                                              WIDTHS)
    m = float(ema.momentum(0.99, "cosine", 1, 40))
    assert m > 0.99  # the ramp has moved: the same m for all widths of the iteration
    want = _ema(start.ema_params, start.params, m)  # base width: the start parameters
    want = _ema(want, after[0].params, m)  # 0.75 after the base update
    want = _ema(want, after[1].params, m)  # 0.5 after the 0.75 update
    chex.assert_trees_all_close(jax.tree.map(np.asarray, new.ema_params), want, rtol=1e-5,
                                atol=1e-6)
    # One step per iteration: the start parameters only.
    chex.assert_trees_all_close(jax.tree.map(np.asarray, ref.ema_params),
                                _ema(start.ema_params, start.params, m), rtol=1e-5, atol=1e-6)
    # The teacher's moves after the base update change nothing within the iteration: the
    # students learn from the base width's keys, so parameters and losses agree.
    chex.assert_trees_all_close(new.params, ref.params, rtol=1e-5, atol=1e-6)
    for k in ("loss/base", "loss/sub0", "loss/sub1"):
        assert float(metrics[k]) == pytest.approx(float(ref_metrics[k]), rel=1e-6)
    assert np.max(np.abs(np.asarray(new.ema_params["projector"]["fc1"]["kernel"]) -
                         np.asarray(ref.ema_params["projector"]["fc1"]["kernel"]))) > 1e-6


@pytest.mark.slow
def test_per_width_teacher_in_accumulate_mode_steps_from_the_start_parameters():
    """With one update per iteration every width's forward sees the start parameters, so the
    teacher takes len(widths) EMA steps towards them: m^3 e + (1 - m^3) p."""
    images = _images(1)
    tr = _vit_engine(dataclasses.replace(US_MOCOV3, ema_updates="width"), "accumulate")
    state = tr.init_state(jax.random.key(1), jax.ShapeDtypeStruct(images.shape, images.dtype))
    state, _ = tr.step(state, images, (1.0,))
    start = _host(state)
    new, _ = tr.step(state, images, WIDTHS)
    m = float(ema.momentum(0.99, "cosine", 1, 40))
    chex.assert_trees_all_close(jax.tree.map(np.asarray, new.ema_params),
                                _ema(start.ema_params, start.params, m ** 3), rtol=1e-5,
                                atol=1e-6)


def test_ema_updates_validation():
    with pytest.raises(ValueError, match="ema_updates='layer' is not one of"):
        us3l.Config(ema_updates="layer")
    with pytest.raises(ValueError, match="needs momentum_base or momentum_sub"):
        us3l.Config(ema_updates="width", momentum_base=False, momentum_sub=False)


# ------------------------------------------------------------------------ AdamW step counts


@pytest.mark.slow
@pytest.mark.parametrize("mode,counts", [("per_width", (5, 5, 3)), ("accumulate", (3, 3, 2))])
def test_engine_counts_adam_steps_per_parameter_from_the_first_gradient(mode, counts):
    """US3L's new head first has a gradient in iteration 1 (first_sub_step), in its first
    sub-network update; the backbone and predictor from the first update. Per-width
    iterations: base only, then (1.0, 0.5) twice: 1 + 2 + 2 updates; the head joins at the
    second. accumulate: one update per iteration, the head from the second."""
    cfg = us3l.Config(base_loss="mocov3", distill_loss="mocov3", aux_head="new",
                      aux_head_init="copy", tau=0.2, ema_schedule="cosine", group_size=None,
                      decay_rule="weight_decay")
    tx = optim.make_adamw(1e-3, 40, warmup_steps=2, weight_decay=0.1, count="per_param")
    tr = _vit_engine(cfg, mode, tx=tx, first_sub_step=1)
    images = _images(2)
    state = tr.init_state(jax.random.key(2), jax.ShapeDtypeStruct(images.shape, images.dtype))
    head0 = _host(state.params["distill_head"])
    state, _ = tr.step(state, images, (1.0,))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params["distill_head"]), head0)
    for _ in range(2):
        state, _ = tr.step(state, images, (1.0, 0.5))
    count = state.opt_state[0].count
    got = tuple(int(jax.tree.leaves(count[k])[0]) for k in ("backbone", "predictor",
                                                             "distill_head"))
    assert got == counts
    for group in count.values():  # one count per group: all its leaves agree
        assert len({int(c) for c in jax.tree.leaves(group)}) == 1
