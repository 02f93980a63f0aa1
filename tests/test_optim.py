"""Grouped weight decay against the official GroupReg numbers, the per-epoch
cosine learning rate and SGD/LARS steps computed by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from us3l_jax import optim

LAM, ALPHA, G, E = 5e-5, 0.05, 8, 400
SPE = 3  # steps per epoch in these tests
# Final official per-group factors, 8 channels per group for K = 64.
FACTORS_64 = np.repeat([1.0, 0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65], 8)


def official_reg(params, factors):
    """R = Σ λ_i p² over a BN γ (grouped on axis 0), an HWIO conv (grouped on the output axis)
    and a dense kernel (uniform), written out directly from the official rule."""
    return (LAM * jnp.sum(factors * params["bn"]["scale"] ** 2)
            + LAM * jnp.sum(factors * params["conv"]["kernel"] ** 2)
            + LAM * jnp.sum(params["dense"]["kernel"] ** 2))


def ones_params():
    return {"bn": {"scale": jnp.ones(64)}, "conv": {"kernel": jnp.ones((3, 3, 64, 64))},
            "dense": {"kernel": jnp.ones((64, 32))}}


def decay_terms(tx, params, step):
    """The decay alone: updates of zero gradients at training iteration ``step``."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = tx.update(zeros, tx.init(params), params, step=step)
    return out


@pytest.fixture(scope="module")
def group_tx():
    return optim.grouped_weight_decay(LAM, ALPHA, G, warmup=0, total=E, steps_per_epoch=SPE)


def test_official_totals():
    # Official values at epoch >= 200: 2.64e-3 for a 64-ones BN γ, 1.52064 for the ones conv.
    f = optim.group_decay_factors(64, G, ALPHA)
    np.testing.assert_allclose(f, FACTORS_64, atol=1e-12)
    assert LAM * f.sum() == pytest.approx(2.64e-3, rel=1e-9)
    assert LAM * 3 * 3 * 64 * f.sum() == pytest.approx(1.52064, rel=1e-9)


def test_gradient_is_twice_lambda_i_p(group_tx):
    params = ones_params()
    got = decay_terms(group_tx, params, step=250 * SPE)
    want = jax.grad(lambda p: official_reg(p, jnp.asarray(FACTORS_64, jnp.float32)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    np.testing.assert_allclose(got["bn"]["scale"], 2 * LAM * FACTORS_64, rtol=1e-6)
    np.testing.assert_allclose(got["dense"]["kernel"], 2 * LAM, rtol=1e-6)  # always uniform
    # Random values: still exactly the gradient of R.
    rnd = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape), params)
    got = decay_terms(group_tx, rnd, step=399 * SPE)
    want = jax.grad(lambda p: official_reg(p, jnp.asarray(FACTORS_64, jnp.float32)))(rnd)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12), got, want)


def test_conv_grouped_on_output_axis(group_tx):
    # Flax HWIO: output channels are the last axis. One nonzero output channel vs input channel.
    k_out = jnp.zeros((3, 3, 64, 64)).at[:, :, 0, 63].set(1.0)
    k_in = jnp.zeros((3, 3, 64, 64)).at[:, :, 63, 0].set(1.0)
    for k, factor in ((k_out, 0.65), (k_in, 1.0)):
        got = decay_terms(group_tx, {"k": k}, step=300 * SPE)["k"]
        assert float(jnp.sum(got)) == pytest.approx(9 * 2 * LAM * factor, rel=1e-5)


def test_alpha_ramp(group_tx):
    # Official: epoch 0 uses exactly λ everywhere; epoch 100 of 400 (α_t = 0.025) gives a
    # last-group factor of 0.825; the factor is constant within an epoch.
    assert float(optim.alpha_schedule(ALPHA, 0, 0, E)) == 0.0
    assert float(optim.alpha_schedule(ALPHA, 100, 0, E)) == pytest.approx(0.025)
    assert float(optim.alpha_schedule(ALPHA, 200, 0, E)) == pytest.approx(0.05)
    f = optim.group_decay_factors(64, G, optim.alpha_schedule(ALPHA, 100, 0, E))
    assert f[-1] == pytest.approx(0.825, abs=1e-7)
    bn = {"scale": jnp.ones(64)}
    np.testing.assert_array_equal(decay_terms(group_tx, bn, 0)["scale"], np.float32(2 * LAM))
    for it in range(SPE):
        last = decay_terms(group_tx, bn, 100 * SPE + it)["scale"][-1]
        assert float(last) == pytest.approx(2 * LAM * 0.825, rel=1e-6)
    # Warm-up 200 of 400 (CIFAR R-50): uniform until 200, then full α with no ramp.
    assert float(optim.alpha_schedule(ALPHA, 199, 200, E)) == 0.0
    assert float(optim.alpha_schedule(ALPHA, 200, 200, E)) == pytest.approx(0.05)
    # Warm-up 200 of 800 (MBv2-BYOL): ramp from 200 to 400.
    assert float(optim.alpha_schedule(ALPHA, 300, 200, 800)) == pytest.approx(0.025)


def test_group_rules():
    # K < G: everything in the last group.
    np.testing.assert_allclose(optim.group_decay_factors(5, G, ALPHA), 0.65)
    # Remainder goes to the last group: K = 20, K_G = 2 -> channels 14..19 in group 7.
    assert list(optim.group_indices(20, G)) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] + [6, 6] + [7] * 6
    # Paper Eq. 5 (1-based k): boundaries shift by one channel, the last channel reaches G.
    paper = optim.group_indices(64, G, rule="paper")
    assert list(paper[:9]) == [0] * 7 + [1, 1] and paper[-1] == G and paper[-2] == G - 1
    assert optim.group_decay_factors(64, G, ALPHA, rule="paper")[-1] == pytest.approx(0.6)


def test_alpha_zero_is_plain_weight_decay():
    params = {"conv": jax.random.normal(jax.random.key(1), (3, 3, 4, 16)),
              "bn": jax.random.normal(jax.random.key(2), (16,)),
              "dense": jax.random.normal(jax.random.key(3), (16, 8))}
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    ours = optim.grouped_weight_decay(LAM, 0.0, G, total=E)
    ref = optax.add_decayed_weights(2 * LAM)
    got, _ = ours.update(grads, ours.init(params), params, step=300)
    want, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_masks(group_tx):
    params = {"backbone": {"scale": jnp.ones(64)}, "predictor": {"scale": jnp.ones(64)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    mask = {"backbone": {"scale": True}, "predictor": {"scale": False}}
    tx = optim.grouped_weight_decay(LAM, ALPHA, G, total=E, mask=lambda p: mask)
    out, state = tx.update(zeros, tx.init(params), params)
    assert float(jnp.sum(out["backbone"]["scale"])) > 0
    np.testing.assert_array_equal(out["predictor"]["scale"], 0.0)
    assert int(state.count) == 1
    # Per-call override (e.g. predictor included at sub-widths).
    all_on = jax.tree.map(lambda _: True, params)
    out, _ = group_tx.update(zeros, group_tx.init(params), params, decay_mask=all_on)
    assert float(jnp.sum(out["predictor"]["scale"])) > 0


def test_count_drives_schedule_without_step():
    tx = optim.grouped_weight_decay(LAM, ALPHA, G, total=4)  # per step: α ramps 0 -> α by 2
    p = {"s": jnp.ones(16)}
    zeros = {"s": jnp.zeros(16)}
    state = tx.init(p)
    lasts = []
    for _ in range(3):
        out, state = jax.jit(tx.update)(zeros, state, p)
        lasts.append(float(out["s"][-1]) / (2 * LAM))
    assert lasts == pytest.approx([1.0, 1 - 7 * ALPHA / 2, 1 - 7 * ALPHA], abs=1e-6)


def test_lr_schedule():
    # Official US3L CIFAR, lr 0.5 over 400 epochs, stepped per epoch.
    lr = optim.cosine_lr(0.5, E, steps_per_epoch=98)
    assert float(lr(0)) == 0.5
    assert float(lr(200 * 98)) == pytest.approx(0.25, rel=1e-6)
    want = 0.5 * 0.5 * (1 + math.cos(math.pi * 399 / 400))
    assert float(lr(399 * 98)) == pytest.approx(want, rel=1e-4)
    assert want == pytest.approx(7.7e-6, rel=0.01)
    assert len({float(lr(137 * 98 + i)) for i in range(98)}) == 1
    assert float(lr(138 * 98)) < float(lr(137 * 98))
    # Per step with a warm-up of 10 steps: linear up to the base, then cosine to 0.
    lr = optim.cosine_lr(1.0, 110, warmup=10)
    assert [float(lr(t)) for t in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert float(lr(10)) == 1.0
    assert float(lr(60)) == pytest.approx(0.5, rel=1e-6)
    assert float(lr(110)) == pytest.approx(0.0, abs=1e-7)


def formula_lr(base_lr, total, warmup, steps_per_epoch, step):
    """The learning rate as computed before it was built from optax pieces (float32)."""
    t = jnp.asarray(step, jnp.int32)
    t = (t // steps_per_epoch if steps_per_epoch else t).astype(jnp.float32)
    frac = jnp.clip((t - warmup) / (total - warmup), 0.0, 1.0)
    lr = base_lr * jnp.square(jnp.cos(0.5 * math.pi * frac))
    if warmup:
        lr = jnp.where(t < warmup, base_lr * (t + 1) / warmup, lr)
    return lr.astype(jnp.float32)


def formula_alpha(alpha, t, warmup, total):
    """α_t as computed before it was built from optax pieces (float32)."""
    half = total // 2
    t = jnp.asarray(t, jnp.float32)
    if warmup >= half:
        return jnp.where(t < warmup, 0.0, alpha).astype(jnp.float32)
    ramp = alpha * (t - warmup) / (half - warmup)
    return jnp.where(t < warmup, 0.0, jnp.where(t < half, ramp, alpha)).astype(jnp.float32)


@pytest.mark.parametrize("base_lr,total,warmup,steps_per_epoch", [
    (0.5, 800, 0, 4),          # official per-epoch cosine, 800 epochs
    (0.5, 400, 10, 3),         # per epoch with a warm-up
    (0.06, 30, 2, 11),         # the digits demo's shape
    (0.1, 78000, 0, None),     # per step, 200 epochs x 390
    (6e-4, 117000, 15600, None),  # per step with a 40-epoch warm-up
])
def test_lr_schedule_equals_the_formula_at_every_step(base_lr, total, warmup, steps_per_epoch):
    steps = jnp.arange(total * (steps_per_epoch or 1) + 5)  # past the end too
    lr = optim.cosine_lr(base_lr, total, steps_per_epoch=steps_per_epoch, warmup=warmup)
    formula = lambda s: formula_lr(base_lr, total, warmup, steps_per_epoch, s)
    # Op by op and compiled (XLA may round a fused expression differently from op-by-op).
    for got, want in ((lr(steps), formula(steps)), (jax.jit(lr)(steps), jax.jit(formula)(steps))):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-7, atol=0)


@pytest.mark.parametrize("alpha,warmup,total", [
    (0.05, 0, 400), (0.05, 10, 400), (0.05, 200, 400), (0.05, 300, 400), (0.05, 0, 78000),
    (0.05, 3, 20)])
def test_alpha_schedule_equals_the_formula(alpha, warmup, total):
    ours = lambda t: optim.alpha_schedule(alpha, t, warmup, total)
    formula = lambda t: formula_alpha(alpha, t, warmup, total)
    for t in (jnp.arange(total + 5), jnp.linspace(0.0, total + 1.0, 4001)):  # steps or epochs
        for got, want in ((ours(t), formula(t)), (jax.jit(ours)(t), jax.jit(formula)(t))):
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-7, atol=0)


def test_cosine_keeps_its_relative_precision_near_the_end():
    """Why the cosine is base·cos²(π/2·frac) and not ``optax.cosine_decay_schedule``'s
    base·½(1 + cos): the same numbers to about one float32 step of the base rate, but the
    small rates of the last epochs stay close to the float64 value relative to themselves."""
    epochs = np.arange(800)
    lr = np.asarray(optim.cosine_lr(0.5, 800)(jnp.asarray(epochs)))
    want = 0.5 * 0.5 * (1 + np.cos(np.pi * epochs / 800))
    np.testing.assert_allclose(lr, want, rtol=1e-4)
    library = np.asarray(optax.cosine_decay_schedule(0.5, 800)(jnp.asarray(epochs)))
    np.testing.assert_allclose(library, lr, rtol=0, atol=2e-7 * 0.5)


def test_sgd_momentum_steps_by_hand():
    # torch.optim.SGD(lr=lr(e), momentum=0.9, weight_decay=2λ): b = 0.9 b + g + 2λ p; p -= lr·b.
    tx, lr = optim.make_optimizer(0.5, 4, steps_per_epoch=1, reg_lambda=LAM, reg_alpha=0.0)
    p = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
    g1 = {"w": jnp.array([0.1, 0.2, -0.3]), "b": jnp.array([1.0])}
    g2 = {"w": jnp.array([-0.4, 0.0, 0.2]), "b": jnp.array([-1.0])}
    state = tx.init(p)
    upd, state = tx.update(g1, state, p)
    p1 = optax.apply_updates(p, upd)
    upd, state = tx.update(g2, state, p1)
    p2 = optax.apply_updates(p1, upd)
    lr0, lr1 = 0.5, 0.5 * 0.5 * (1 + math.cos(math.pi / 4))
    assert float(lr(1)) == pytest.approx(lr1, rel=1e-6)
    for k in p:
        x0, a, b = (np.asarray(t[k], np.float64) for t in (p, g1, g2))
        buf = a + 2 * LAM * x0
        x1 = x0 - lr0 * buf
        buf = 0.9 * buf + b + 2 * LAM * x1
        x2 = x1 - lr1 * buf
        np.testing.assert_allclose(p2[k], x2, rtol=1e-5)  # float32 arithmetic


def test_step_extra_arg_for_several_updates_per_iteration():
    # Per-width updates: three updates in one iteration all use that iteration's lr and α.
    tx, lr = optim.make_optimizer(0.5, 10, steps_per_epoch=2, reg_lambda=LAM, reg_alpha=ALPHA)
    p = {"s": jnp.ones(16)}
    zeros = {"s": jnp.zeros(16)}
    state = tx.init(p)
    update = jax.jit(tx.update)  # the iteration is traced
    for _ in range(3):
        upd, state = update(zeros, state, p, step=jnp.int32(9))  # epoch 4: α_t = α·4/5 (ramp to epoch 5)
    # With zero gradients the momentum buffer holds decays: b3 = (1 + 0.9 + 0.81)·d.
    alpha_t = float(optim.alpha_schedule(ALPHA, 4, 0, 10))
    d_last = 2 * LAM * (1 - 7 * alpha_t)
    assert float(upd["s"][-1]) == pytest.approx(-float(lr(9)) * 2.71 * d_last, rel=1e-5)
    assert float(lr(9)) == pytest.approx(0.5 * math.cos(math.pi / 2 * 0.4) ** 2, rel=1e-6)


def test_lars_trust_ratio():
    tx, lr = optim.make_optimizer(2.0, 10, reg_lambda=LAM, reg_alpha=0.0, lars=True)
    p = {"w": jnp.array([[3.0, 4.0]]), "b": jnp.array([1.0])}
    g = {"w": jnp.array([[0.6, -0.8]]), "b": jnp.array([0.5])}
    upd, _ = tx.update(g, tx.init(p), p)
    for k in p:
        u = np.asarray(g[k]) + 2 * LAM * np.asarray(p[k])
        ratio = 0.001 * np.linalg.norm(p[k]) / np.linalg.norm(u)
        np.testing.assert_allclose(upd[k], -2.0 * ratio * u, rtol=1e-5)
    # SimCLR-style: leave 1-D params out of the adaptation.
    tx, _ = optim.make_optimizer(2.0, 10, lars=True,
                                 lars_mask=lambda ps: jax.tree.map(lambda x: x.ndim > 1, ps))
    upd, _ = tx.update(g, tx.init(p), p, step=0)
    np.testing.assert_allclose(upd["b"], -2.0 * np.asarray(g["b"]), rtol=1e-6)
    assert float(jnp.linalg.norm(upd["w"])) == pytest.approx(2.0 * 0.001 * 5.0, rel=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown group rule 'eq5'; valid: official, paper"):
        optim.grouped_weight_decay(LAM, ALPHA, total=E, rule="eq5")
    with pytest.raises(ValueError, match="groups must be a positive integer, got 0"):
        optim.grouped_weight_decay(LAM, ALPHA, 0, total=E)
    with pytest.raises(ValueError, match="lam .* must be >= 0, got -1"):
        optim.grouped_weight_decay(-1.0, ALPHA, total=E)
    with pytest.raises(ValueError, match="warmup must be a non-negative integer, got -5"):
        optim.grouped_weight_decay(LAM, ALPHA, total=E, warmup=-5)
    with pytest.raises(ValueError, match="total must be a positive integer, got 0"):
        optim.alpha_schedule(ALPHA, 0, 0, 0)
    with pytest.raises(ValueError, match="base learning rate must be > 0"):
        optim.cosine_lr(0.0, 10)
    with pytest.raises(ValueError, match=r"warmup must be an integer in \[0, total=10\)"):
        optim.cosine_lr(0.1, 10, warmup=10)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        optim.make_optimizer(0.1, 10, momentum=1.0)
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        optim.make_optimizer(0.1, 10, steps_per_epoch=0)
    tx = optim.grouped_weight_decay(LAM, ALPHA, total=E)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"a": jnp.ones(2)}, tx.init(None))


def test_freeze_keeps_parameters_bitwise_under_decay_and_momentum():
    """A frozen parameter (e.g. MoCo v3's fixed patch embedding) never changes, even with
    weight decay and momentum, and has no optimizer state, as a PyTorch parameter with
    requires_grad=False; the others train exactly as without freezing, ``decay_mask=``
    included (it reaches the wrapped optimizer masked like the parameters)."""
    params = {"backbone": {"patch_embed": {"kernel": jnp.ones((2, 5)), "bias": jnp.ones(5)},
                           "block": {"kernel": jnp.ones((3, 3))}},
              "projector": {"kernel": jnp.ones((3, 2))}}
    frozen_shapes = {(2, 5), (5,)}
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
    grads["backbone"]["patch_embed"] = jax.tree.map(jnp.zeros_like,
                                                    params["backbone"]["patch_embed"])
    decay_mask = {"backbone": jax.tree.map(lambda _: True, params["backbone"]),
                  "projector": {"kernel": False}}
    for tx, _ in (optim.make_adamw(1e-2, 10, weight_decay=0.1),
                  optim.make_optimizer(0.1, 10, momentum=0.9, reg_lambda=1e-2)):
        frozen = optim.freeze(tx, [("backbone", "patch_embed")])
        state, ref_state = frozen.init(params), tx.init(params)
        shapes = lambda st: [np.shape(x) for x in jax.tree.leaves(st)]
        assert not frozen_shapes & set(shapes(state))  # no moments for frozen parameters
        assert sorted(s for s in shapes(ref_state) if s not in frozen_shapes) == sorted(
            shapes(state))
        update = jax.jit(frozen.update)
        p, ref = params, params
        for step in range(3):
            u, state = update(grads, state, p, step=step, decay_mask=decay_mask)
            p = optax.apply_updates(p, u)
            ru, ref_state = tx.update(grads, ref_state, ref, step=step, decay_mask=decay_mask)
            ref = optax.apply_updates(ref, ru)
        for a, b in zip(jax.tree.leaves(p["backbone"]["patch_embed"]),
                        jax.tree.leaves(params["backbone"]["patch_embed"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # Without freezing, decay alone would have moved it.
        assert not np.allclose(ref["backbone"]["patch_embed"]["kernel"], 1.0)
        for path in (("backbone", "block"), ("projector",)):
            a, b = p[path[0]], ref[path[0]]
            if len(path) > 1:
                a, b = a[path[1]], b[path[1]]
            np.testing.assert_array_equal(np.asarray(a["kernel"]), np.asarray(b["kernel"]))
        assert not np.allclose(p["projector"]["kernel"], 1.0)
    # Nothing frozen: tx itself, with its own state.
    assert jax.tree.structure(optim.freeze(tx, []).init(params)) == jax.tree.structure(
        tx.init(params))


def test_vit_stop_grad_patch_freezes_the_patch_embedding_in_the_built_optimizer():
    from us3l_jax import build
    from tests.helpers import demo_config
    for on in (True, False):
        c = demo_config("vit", model__stop_grad_patch=on)
        tx, _ = build.optimizer(c, steps_per_epoch=2)
        params = {"backbone": {"patch_embed": {"kernel": jnp.ones(3)},
                               "norm": {"scale": jnp.ones(3)}}}
        grads = jax.tree.map(jnp.ones_like, params)
        u, _ = tx.update(grads, tx.init(params), params, step=1)
        assert bool(jnp.all(u["backbone"]["patch_embed"]["kernel"] == 0)) == on
        assert not bool(jnp.all(u["backbone"]["norm"]["scale"] == 0))


# ------------------------------------------------------------------------------------------
# AdamW with PyTorch's per-parameter step counts
# ------------------------------------------------------------------------------------------

B1, B2, EPS, WD = 0.9, 0.999, 1e-8, 0.1


def torch_adamw_reference(params, grads_seq, lrs):
    """``torch.optim.AdamW.step`` (PyTorch 1.10's ``_functional.adamw``) restated in float64:
    a parameter whose ``.grad`` is None is skipped (no count, no moments, no decay); the
    others: step += 1, p *= 1 − lr·wd, m = b1·m + (1 − b1)·g, v = b2·v + (1 − b2)·g²,
    p −= lr/(1 − b1^step) · m / (√v/√(1 − b2^step) + eps)."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    state = {}
    for grads, lr in zip(grads_seq, lrs):
        for k, g in grads.items():
            if g is None:
                continue
            st = state.setdefault(k, {"step": 0, "m": np.zeros_like(p[k]),
                                      "v": np.zeros_like(p[k])})
            st["step"] += 1
            p[k] *= 1 - lr * WD
            st["m"] = B1 * st["m"] + (1 - B1) * g
            st["v"] = B2 * st["v"] + (1 - B2) * g * g
            denom = np.sqrt(st["v"]) / math.sqrt(1 - B2 ** st["step"]) + EPS
            p[k] -= lr / (1 - B1 ** st["step"]) * st["m"] / denom
    return p, {k: s["step"] for k, s in state.items()}


def late_head_schedule(iterations=6, first_sub=3):
    """The official per-width ViT loop: iterations before ``first_sub`` train the base width
    only (one update); later ones base + 2 sub-widths (three updates). The body has a gradient
    in every update; the head (``predictor_new``) first in the first sub-width update; after
    that ``zero_grad()`` leaves it a zero tensor, so base updates give it a zero gradient.
    Yields (iteration, head used by this update's loss)."""
    for it in range(iterations):
        yield it, False
        if it >= first_sub:
            yield it, True
            yield it, True


def late_head_run(count: str, seed: int = 0):
    """Our AdamW (``count``) and the torch reference on the schedule above; returns both
    parameter sets, the torch step counts and ours."""
    rng = np.random.default_rng(seed)
    params = {"body": rng.standard_normal((4, 3)).astype(np.float32),
              "head": rng.standard_normal((3, 2)).astype(np.float32)}
    tx, lr = optim.make_adamw(1e-2, 40, warmup_steps=2, weight_decay=WD, count=count)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    update = jax.jit(tx.update)
    p = jax.tree.map(jnp.asarray, params)
    grads_seq, lrs, started = [], [], False
    for it, head_used in late_head_schedule():
        started = started or head_used
        g = {"body": rng.standard_normal((4, 3)),
             "head": rng.standard_normal((3, 2)) if head_used else np.zeros((3, 2))}
        grads_seq.append({"body": g["body"], "head": g["head"] if started else None})
        lrs.append(float(lr(it)))
        flags = {"body": True, "head": started}  # the method's grad_flags
        u, state = update(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g), state, p,
                          step=it, decay_mask=flags, active_mask=flags)
        p = optax.apply_updates(p, u)
    ref, steps = torch_adamw_reference(params, grads_seq, lrs)
    return p, ref, steps, state


def test_per_param_adamw_matches_torch_adamw_with_a_late_head():
    p, ref, steps, state = late_head_run("per_param")
    # 3 base-only iterations, then 3 of 3 updates; the head joins at update 5 (of 12).
    assert steps == {"body": 12, "head": 8}
    counts = state[0].count  # the chain's first part: scale_by_adam_per_param
    assert (int(counts["body"]), int(counts["head"])) == (12, 8)
    for k in ("body", "head"):
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=2e-6, atol=1e-6)


def test_global_adam_count_is_not_torchs_for_a_late_head():
    """optax's single count is the same for the body, but the head's late first updates
    differ by far more than rounding (that is what ``count="per_param"`` fixes)."""
    p, ref, _, _ = late_head_run("global")
    np.testing.assert_allclose(np.asarray(p["body"]), ref["body"], rtol=2e-6, atol=1e-6)
    assert np.max(np.abs(np.asarray(p["head"]) - ref["head"])) > 1e-3


def test_first_update_of_a_late_parameter():
    """One gradient after t0 updates without one: PyTorch's first step is g/(|g| + eps)
    (count 1); optax's global count t = t0 + 1 gives (1 − b1)/(1 − b1^t) / √((1 − b2)/(1 − b2^t))
    times it: 2.5 at t0 = 1000, (1 − b1)/√(1 − b2) = 3.16 at the ~7,300 base-only updates
    before epoch 75 of the official ViT runs (97 iterations per epoch)."""
    g = jnp.array([0.3, -2.0])

    def global_ratio(t):
        return (1 - B1) / (1 - B1 ** t) / math.sqrt((1 - B2) / (1 - B2 ** t))

    assert global_ratio(7276) == pytest.approx(3.16, abs=0.01)
    for count, t0 in (("per_param", 1000), ("global", 1000), ("per_param", 0), ("global", 0)):
        tx = optim.scale_by_adam_per_param() if count == "per_param" else optax.scale_by_adam()
        tx = optax.with_extra_args_support(tx)
        params = {"w": jnp.zeros(2)}
        state = tx.init(params)
        for _ in range(t0):  # updates in which the parameter has no gradient
            _, state = tx.update({"w": jnp.zeros(2)}, state, params,
                                 active_mask={"w": False})
        u, _ = tx.update({"w": g}, state, params, active_mask={"w": True})
        want = global_ratio(t0 + 1) if count == "global" else 1.0
        np.testing.assert_allclose(np.asarray(u["w"]) / np.sign(g), want, rtol=2e-5)


def test_per_param_adam_skips_parameters_without_gradient_and_defaults_to_all():
    tx = optax.with_extra_args_support(optim.scale_by_adam_per_param())
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    grads = {"a": jnp.ones(2), "b": jnp.full(3, 5.0)}
    state = tx.init(params)
    u, state = tx.update(grads, state, params, active_mask={"a": True, "b": False})
    np.testing.assert_array_equal(np.asarray(u["b"]), 0.0)  # skipped: no update...
    assert int(state.count["b"]) == 0 and float(jnp.abs(state.mu["b"]).sum()) == 0  # ...state
    # Without a mask every parameter takes part: optax's scale_by_adam exactly.
    ref = optax.scale_by_adam()
    ours, theirs = tx.init(params), ref.init(params)
    for _ in range(3):
        u1, ours = tx.update(grads, ours, params)
        u2, theirs = ref.update(grads, theirs, params)
        for k in params:
            np.testing.assert_allclose(np.asarray(u1[k]), np.asarray(u2[k]), rtol=1e-6)
    # On device: a scalar bool array per leaf.
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params,
                              active_mask={"a": jnp.asarray(False), "b": jnp.asarray(True)})
    np.testing.assert_array_equal(np.asarray(u["a"]), 0.0)
    assert float(jnp.abs(u["b"]).min()) > 0.5


def test_per_param_adamw_matches_torch_itself():
    """The same late-head run through ``torch.optim.AdamW`` (single-tensor path), with
    ``zero_grad(set_to_none=False)`` as PyTorch 1.x's default."""
    torch = pytest.importorskip("torch")
    p, _, _, _ = late_head_run("per_param")
    rng = np.random.default_rng(0)
    params = {"body": rng.standard_normal((4, 3)).astype(np.float32),
              "head": rng.standard_normal((3, 2)).astype(np.float32)}
    tp = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64))
          for k, v in params.items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=1.0, betas=(B1, B2), eps=EPS,
                            weight_decay=WD, foreach=False)
    _, lr = optim.make_adamw(1e-2, 40, warmup_steps=2, weight_decay=WD)
    for it, head_used in late_head_schedule():
        opt.zero_grad(set_to_none=False)
        body_g = rng.standard_normal((4, 3))
        head_g = rng.standard_normal((3, 2)) if head_used else None
        tp["body"].grad = torch.tensor(body_g)
        if head_g is not None:
            tp["head"].grad = torch.tensor(head_g)
        opt.param_groups[0]["lr"] = float(lr(it))
        opt.step()
    for k in ("body", "head"):
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), rtol=2e-6,
                                   atol=1e-6)
    assert int(opt.state[tp["head"]]["step"]) == 8


def test_make_adamw_arguments():
    with pytest.raises(ValueError, match="count='torch' is not one of"):
        optim.make_adamw(1e-3, 10, count="torch")
    with pytest.raises(ValueError, match="replaces AdamW's weight decay"):
        optim.make_adamw(1e-3, 10, weight_decay=0.1, reg_lambda=0.05, steps_per_epoch=2)
    with pytest.raises(ValueError, match="pass steps_per_epoch"):
        optim.make_adamw(1e-3, 10, reg_lambda=0.05)


# ------------------------------------------------------------------------------------------
# The official ViT group regularizer (--group-regularizer) with AdamW
# ------------------------------------------------------------------------------------------

VIT_KW = dict(dim=20, depth=1, heads=2, patch_size=4, image_size=8)


def official_vit_reg_grad(sd, lam, alpha, bins, warmup, total, epoch):
    """The gradient of the official ``GroupRegularizer`` (main_moco_ofa_ddp.py) over a
    torch-layout state dict, in float64: 2-D tensors (Linear weights (out, in)) get
    lambda·(1 − a·i) on input group i (dim_in // bins columns each, the last group taking the
    rest), every other tensor a uniform lambda; a = 0 before ``warmup``, then ramps linearly to
    ``alpha`` at ``total // 2`` (cal_lambda); R = sum(mask·p²), so the gradient is 2·mask·p."""
    def cal_lambda(i):
        if epoch < warmup:
            return lam
        a, ramp = alpha, total // 2
        if epoch < ramp:
            a *= (epoch - warmup) / (ramp - warmup)
        return lam * (1 - a * i)

    out = {}
    for name, p in sd.items():
        p = np.asarray(p, np.float64)
        mask = np.full(p.shape, lam)
        if p.ndim == 2:
            d_in = p.shape[1]
            g = d_in // bins
            for i in range(bins):
                end = d_in if i == bins - 1 else (i + 1) * g
                mask[:, i * g:end] = cal_lambda(i)
        out[name] = 2 * mask * p
    return out


def test_vit_group_regularizer_matches_the_official_rule():
    """Through the real ViT parameter tree (qkv stored (d, 3, heads, head_dim), Dense kernels
    (in, out), a conv patch embedding, the class token): the term AdamW's chain adds before
    Adam equals the official gradient in torch layout, before, during and after the alpha
    ramp; d = 20 with 8 groups leaves a remainder for the last group, and a 6-wide Linear
    (fewer inputs than groups) puts every input in the last group."""
    from us3l_jax import models, torch_layout
    lam, alpha, bins, warmup, total, spe = 0.05, 0.05, 8, 2, 8, 3
    model = models.create("vit_tiny", **VIT_KW)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    # Random values everywhere (the init has zero biases and equal LayerNorm scales).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape)
                                       for k, x in zip(keys, leaves)])
    head = {"fc1": {"kernel": jax.random.normal(jax.random.key(2), (6, 20))}}
    tx = optim.grouped_weight_decay(lam, alpha, bins, warmup=warmup, total=total,
                                    steps_per_epoch=spe, group_axis=optim.linear_input_axis)
    full = {"backbone": params, "head": head}
    for epoch in (0, 2, 3, 5):
        term = decay_terms(tx, full, step=epoch * spe)
        torch_sd = torch_layout.to_torch_state_dict("vit_tiny", {"params": params}, **VIT_KW)
        ours_sd = torch_layout.to_torch_state_dict("vit_tiny", {"params": term["backbone"]},
                                                   **VIT_KW)
        torch_sd.pop("pos_embed"), ours_sd.pop("pos_embed")  # fixed, not a parameter here
        torch_sd["head.fc1.weight"] = np.asarray(head["fc1"]["kernel"]).T
        ours_sd["head.fc1.weight"] = np.asarray(term["head"]["fc1"]["kernel"]).T
        want = official_vit_reg_grad(torch_sd, lam, alpha, bins, warmup, total, epoch)
        assert set(want) == set(ours_sd) and "blocks.0.attn.qkv.weight" in want
        for name in want:
            np.testing.assert_allclose(ours_sd[name], want[name], rtol=1e-6, atol=1e-9,
                                       err_msg=f"{name} at epoch {epoch}")
    # The CNN grouping of the same tree differs (it groups biases and norms on axis 0).
    cnn = optim.grouped_weight_decay(lam, alpha, bins, warmup=warmup, total=total,
                                     steps_per_epoch=spe)
    other = decay_terms(cnn, full, step=5 * spe)["backbone"]["norm"]["scale"]
    assert not np.allclose(other, decay_terms(tx, full, step=5 * spe)["backbone"]["norm"]
                           ["scale"])


def test_adamw_with_group_regularizer_is_l2_inside_adam():
    """AdamW's weight decay is off and the group term 2·λ_i·p joins the gradient before Adam
    (PyTorch: the regularizer is part of the loss), two updates against numpy's Adam on
    g + 2·λ_i·p with 16 inputs in 8 groups of 2."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((16, 3)).astype(np.float32)
    grads = [rng.standard_normal((16, 3)).astype(np.float32) * 0.05 for _ in range(2)]
    tx, lr = optim.make_adamw(1e-2, 12, reg_lambda=0.05, reg_alpha=0.05, reg_groups=8,
                              reg_warmup_epochs=0, steps_per_epoch=2, count="per_param")
    factors = np.repeat(1 - 0.05 * np.arange(8), 2)[:, None]  # epoch 4 >= 6 // 2: full alpha
    params, state = {"fc": {"kernel": jnp.asarray(p0)}}, None
    state = tx.init(params)
    p, m, v = p0.astype(np.float64), 0.0, 0.0
    for t, (g, step) in enumerate(zip(grads, (8, 9)), start=1):
        u, state = tx.update({"fc": {"kernel": jnp.asarray(g)}}, state, params, step=step)
        params = optax.apply_updates(params, u)
        full = g + 2 * 0.05 * factors * p
        m, v = B1 * m + (1 - B1) * full, B2 * v + (1 - B2) * full ** 2
        p = p - float(lr(step)) * (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
    np.testing.assert_allclose(np.asarray(params["fc"]["kernel"]), p, rtol=1e-6, atol=1e-7)


def test_vit_configs_build_torchs_adamw_and_the_vit_regularizer():
    """Every Table 3 row counts Adam's steps per parameter; ``group_reg`` builds the official
    ViT regularizer (Linear kernels grouped by input, AdamW's decay off)."""
    from us3l_jax import build
    from tests.helpers import load_config_module
    module = load_config_module("configs/vit_cifar10.py")
    for arg in ("tiny,us3l", "small,us_mocov3", "tiny,mocov3@0.5"):
        c = module.get_config(arg)
        assert (c.optim.adam_count, c.optim.reg_lambda) == ("per_param", 0.0)
        tx, _ = build.optimizer(c, steps_per_epoch=2)
        params = {"backbone": {"norm": {"scale": jnp.ones(3)}}}
        assert isinstance(tx.init(params).inner_states["trained"].inner_state[0],
                          optim.AdamPerParamState)
    c = module.get_config("tiny,us3l,group_reg")
    assert (c.optim.weight_decay, c.optim.reg_lambda, c.optim.reg_alpha,
            c.optim.reg_warmup_epochs, c.method.decay_rule) == (0.0, 0.05, 0.05, 100,
                                                                "group_reg")
    spe = 2
    tx, _ = build.optimizer(c, steps_per_epoch=spe)
    rng = np.random.default_rng(4)
    params = {"backbone": {"blocks_0": {"mlp": {"fc1": {"kernel": jnp.asarray(
        rng.standard_normal((16, 4)), jnp.float32)}}}}}
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)

    def two_updates(tx):
        state, p = tx.init(params), params
        for step in (200 * spe, 200 * spe + 1):  # alpha fully ramped
            u, state = tx.update(grads, state, p, step=step)
            p = optax.apply_updates(p, u)
        return np.asarray(p["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"])

    kw = dict(warmup_steps=40 * spe, reg_lambda=0.05, reg_alpha=0.05, reg_warmup_epochs=100,
              steps_per_epoch=spe, count="per_param")
    total = c.optim.epochs * spe
    want = two_updates(optim.make_adamw(c.optim.lr, total, **kw)[0])
    np.testing.assert_allclose(two_updates(tx), want, rtol=1e-6)
    cnn = optim.make_adamw(c.optim.lr, total, group_axis=optim.output_channel_axis, **kw)[0]
    assert np.max(np.abs(two_updates(cnn) - want)) > 1e-5  # a Dense kernel is uniform there
