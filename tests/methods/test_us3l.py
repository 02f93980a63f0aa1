"""US3L's switches (Table 7), decay rules and losses (``us3l_jax.methods.us3l``)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import methods, objectives
from us3l_jax.methods import Context, us3l
from us3l_jax.models.heads import SSLModel
from us3l_jax.recipes import TABLE7_CASES, table7_method
from tests.methods.tiny_resnet import (GROUP, make_images, make_method, make_model,
                                       noisy_views)


# ------------------------------------------------------------------------ configuration


def test_config_validation():
    with pytest.raises(ValueError, match=r"base_loss='l2' is not one of \('infonce', 'mse', "
                                         r"'mocov3'\)"):
        us3l.Config(base_loss="l2")
    # The flat config section names every method's base loss.
    with pytest.raises(ValueError, match=r"base_loss='l2' is not one of \('infonce', 'mse', "
                                         r"'mocov3', 'seed', 'moco', 'vicreg'\)"):
        methods.select({"base_loss": "l2"})
    with pytest.raises(ValueError, match="distill_loss='kl' is not one of"):
        us3l.Config(distill_loss="kl")
    with pytest.raises(ValueError, match="tau must be > 0, got 0.0"):
        us3l.Config(tau=0.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        us3l.Config(tau=-1)
    with pytest.raises(ValueError, match="aux_head='shared' shares the base network's predictor"):
        us3l.Config(base_loss="infonce", aux_head="shared")
    with pytest.raises(ValueError, match="group_size must be positive"):
        us3l.Config(group_size=0)
    # update_mode is the engine's (tests/engine/test_engine.py); the config section checks it.
    with pytest.raises(ValueError, match="update_mode='sgd' is not one of"):
        methods.select({"update_mode": "sgd"})
    kind, cfg = methods.select({"tau": 0.2, "update_mode": "per_width"})
    assert kind == "us3l" and cfg == us3l.Config(tau=0.2)


def test_table7_cases():
    # Paper Table 7 (= appendix Table 17 cases 1, 3, 7, 8, 9, 12, 15, 17, 18-20, 22-25, 27, 28).
    assert sorted(TABLE7_CASES) == list(range(1, 18))
    c13 = table7_method(13)
    assert (c13.base_loss, c13.distill_loss, c13.aux_head, c13.momentum_base,
            c13.momentum_sub) == ("infonce", "mse", "new", True, True)
    assert table7_method(13) == us3l.Config()  # the defaults are US3L
    c1 = table7_method(1)  # SimSiam on every width: collapses in the paper
    assert (c1.base_loss, c1.distill_loss, c1.uses_teacher) == ("mse", "none", False)
    c2 = table7_method(2)  # US+SimSiam: inplace distillation through the shared predictor
    assert (c2.aux_head, c2.uses_predictor, c2.uses_distill_head) == ("shared", True, False)
    for case in TABLE7_CASES:
        m = table7_method(case, tau=0.2)
        assert m.tau == 0.2
        assert m.uses_teacher == (m.momentum_base or m.momentum_sub)
    with pytest.raises(ValueError, match="Table 7 has cases 1-17, got 18"):
        table7_method(18)


def test_decay_groups_follow_official_groupreg():
    m = us3l.Config()
    assert m.decay_groups(sub=False) == {"backbone", "projector"}
    assert m.decay_groups(sub=True) == {"backbone", "projector", "distill_head"}
    byol = us3l.Config(base_loss="mse", aux_head="new")
    # GroupReg skips every predictor* at width 1.0, even the one the base loss uses.
    assert byol.decay_groups(sub=False) == {"backbone", "projector"}
    assert byol.decay_groups(sub=True) == {"backbone", "projector", "predictor", "distill_head"}
    assert m.late_decay_groups() == byol.late_decay_groups() == frozenset()
    # ... and only there: an individually trained BYOL below 1.0 (Table 15) regularizes its
    # predictor in every update.
    single = us3l.Config(base_loss="mse", aux_head="none", distill_loss="none")
    assert single.decay_groups(sub=False) == {"backbone", "projector"}
    assert single.decay_groups(sub=False, base_width=0.5) == {"backbone", "projector",
                                                              "predictor"}
    assert byol.decay_groups(sub=False, base_width=0.75) == byol.decay_groups(sub=True)


def test_plain_weight_decay_groups_are_every_used_parameter():
    """Official SGD weight decay: every parameter with a gradient so far, in every update."""
    byol = us3l.Config(base_loss="mse", aux_head="none", distill_loss="none",
                       decay_rule="weight_decay")
    assert byol.decay_groups(sub=False) == {"backbone", "projector", "predictor"}
    assert byol.late_decay_groups() == frozenset()
    us = us3l.Config(base_loss="mse", aux_head="new", decay_rule="weight_decay")
    assert us.late_decay_groups() == {"distill_head"}
    flags = lambda step, first: {k: bool(v) for k, v in
                                 us.decay_flags(False, jnp.int32(step), first).items()}
    # The head's first gradient comes in iteration 3's sub-network updates: base-only updates
    # decay it from iteration 4 on (never, when no iteration trains sub-networks).
    assert flags(3, 3) == {"backbone": True, "projector": True, "predictor": True,
                           "distill_head": False}
    assert flags(4, 3)["distill_head"] and not flags(9, None)["distill_head"]
    with pytest.raises(ValueError, match="decay_rule='l1' is not one of"):
        us3l.Config(decay_rule="l1")


# ------------------------------------------------------------------------ the losses


@pytest.mark.slow
def test_base_loss_is_infonce_against_the_teacher():
    """US3L base loss: NT-Xent of online z against the other view's teacher z."""
    cfg = us3l.Config(group_size=GROUP)
    model = make_model(cfg)
    method = make_method(cfg, model)
    images = make_images()
    params = jax.jit(method.init)(jax.random.key(4), jax.random.key(0),
                                  jax.ShapeDtypeStruct((16, 8, 8, 3), jnp.float32))[0]
    v1, v2 = noisy_views(jax.random.key(5), images)
    enc = lambda p, v: model.apply({"params": p}, v, 1.0, method=SSLModel.encode)
    teacher = jax.tree.map(lambda a: a * 1.01, {k: params[k] for k in ("backbone", "projector")})
    k1, k2 = enc(teacher, v1), enc(teacher, v2)
    z1, z2 = enc(params, v1), enc(params, v2)
    expected = objectives.infonce_distill(z1, z2, k1, k2, 0.5, group_size=GROUP)
    got, (targets, metrics) = jax.jit(functools.partial(method.base_loss, width=1.0))(
        params, Context(teacher, None, None), (v1, v2))
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    # With momentum for sub-networks, their targets are the teacher outputs (computed inside
    # the loss, on both views at once: float32 reassociation only, 5e-7 measured).
    np.testing.assert_allclose(targets.t1, k1, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(targets.t2, k2, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(float(metrics["embed_std"]),
                               float(objectives.embedding_std(z1)), rtol=1e-5)


@pytest.mark.slow
def test_without_distillation_subnetworks_train_like_the_base():
    """Table 7 case 1 (SimSiam on every width): a sub-network's loss is the SimSiam loss of
    its own predictor outputs against its own stop-gradient projections."""
    cfg = table7_method(1, group_size=GROUP)
    m = make_model(cfg)
    method = make_method(cfg, m)
    params, teacher, queue = jax.jit(method.init)(
        jax.random.key(8), jax.random.key(0), jax.ShapeDtypeStruct((16, 8, 8, 3), jnp.float32))
    assert not cfg.uses_teacher and teacher is None and queue is None
    v1, v2 = noisy_views(jax.random.key(9), make_images())
    z1 = m.apply({"params": params}, v1, 0.5, method=SSLModel.encode)
    z2 = m.apply({"params": params}, v2, 0.5, method=SSLModel.encode)
    p1 = m.apply({"params": params}, z1, method=SSLModel.predict)
    p2 = m.apply({"params": params}, z2, method=SSLModel.predict)
    expected = objectives.neg_cosine(p1, p2, z1, z2)
    weighted, aux = jax.jit(functools.partial(method.sub_loss, width=0.5))(
        params, None, (v1, v2))
    np.testing.assert_allclose(float(aux["raw"]), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(weighted), float(expected), rtol=1e-5)  # weight 1.0
    # A whole step without a teacher: tests/engine/test_engine.py.
