"""Objectives against the official code's toy values and an independent numpy port
of the official ``nt_xentv2`` (plain exp/log, as the PyTorch code)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import objectives as obj

S1 = np.array([[1.0, 0.0], [0.0, 1.0]])
S2 = np.array([[1.0, 1.0], [1.0, -1.0]])
T1 = np.array([[1.0, 0.0], [0.0, 1.0]])
T2 = np.array([[2.0, 0.0], [0.0, 3.0]])


def official_nt_xentv2(a, b, tau):
    """numpy port of the official loss: S = exp(XXᵀ/τ), diagonal dropped, mean over 2B rows."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    x = np.concatenate([a, b])
    s = np.exp(x @ x.T / tau)
    n = len(x)
    denom = s.sum(1) - np.diag(s)
    pos = np.exp(np.sum(a * b, 1) / tau)
    pos = np.concatenate([pos, pos])
    assert denom.shape == (n,)
    return float(np.mean(-np.log(pos / denom)))


def rng_draws():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((8, 16)) for _ in range(4)]


def test_identity_closed_form():
    # Official nt_xentv2(I_4, I_4, 0.5) = log(e² + 6) − 2.
    eye = jnp.eye(4)
    assert float(obj.nt_xent(eye, eye, 0.5)) == pytest.approx(0.5944377, abs=1e-6)
    for b in (2, 5, 16):
        want = math.log(math.e ** 2 + 2 * (b - 1)) - 2
        assert float(obj.nt_xent(jnp.eye(b), jnp.eye(b), 0.5)) == pytest.approx(want, abs=1e-6)


def test_toy_values():
    # Official toy case (D=2, B=2, τ=0.5).
    assert float(obj.nt_xent(S1, T2, 0.5)) == pytest.approx(0.2395448, abs=1e-6)
    assert float(obj.infonce_distill(S1, S2, T1, T2, 0.5)) == pytest.approx(1.0948638, abs=1e-6)
    assert float(obj.neg_cosine(S1, S2, T1, T2)) == pytest.approx(-0.5, abs=1e-7)


def test_random_draw_values():
    a, b, c, d = rng_draws()
    assert float(obj.infonce_distill(a, b, c, d, 0.5)) == pytest.approx(2.8015996, abs=1e-5)
    assert float(obj.nt_xent(a, b, 0.5)) == pytest.approx(2.7819227, abs=1e-5)
    assert float(obj.nt_xent(a, b, 0.2)) == pytest.approx(official_nt_xentv2(a, b, 0.2), abs=1e-5)


def test_infonce_distill_is_cross_view_and_symmetric():
    # Official: only (s1, t2) and (s2, t1); swapping the views leaves the value unchanged.
    a, b, c, d = rng_draws()
    got = float(obj.infonce_distill(a, b, c, d, 0.5))
    cross = 0.5 * (official_nt_xentv2(a, d, 0.5) + official_nt_xentv2(b, c, 0.5))
    same = 0.5 * (official_nt_xentv2(a, c, 0.5) + official_nt_xentv2(b, d, 0.5))
    assert got == pytest.approx(cross, abs=1e-5)
    assert abs(got - same) > 1e-2
    assert float(obj.infonce_distill(b, a, d, c, 0.5)) == pytest.approx(got, abs=1e-6)
    # A student equal to the same-view teacher is not a positive pair for the loss.
    x, y = rng_draws()[:2]
    assert float(obj.neg_cosine(x, y, x, y)) > -0.9
    assert float(obj.neg_cosine(x, y, y, x)) == pytest.approx(-1.0, abs=1e-6)


def test_nt_xent_symmetric_and_simclr_alias():
    a, b = rng_draws()[:2]
    assert float(obj.nt_xent(b, a, 0.5)) == pytest.approx(float(obj.nt_xent(a, b, 0.5)), abs=1e-6)
    assert float(obj.simclr_infonce(a, b, 0.5)) == float(obj.nt_xent(a, b, 0.5))


def test_group_size():
    a, b, c, d = rng_draws()  # B = 8
    whole = float(obj.nt_xent(a, b, 0.5))
    assert float(obj.nt_xent(a, b, 0.5, group_size=8)) == pytest.approx(whole, abs=1e-7)
    for g in (1, 2, 4):
        per_group = np.mean([official_nt_xentv2(a[i:i + g], b[i:i + g], 0.5)
                             for i in range(0, 8, g)])
        assert float(obj.nt_xent(a, b, 0.5, group_size=g)) == pytest.approx(per_group, abs=1e-5)
    assert float(obj.nt_xent(a, b, 0.5, group_size=1)) == pytest.approx(0.0, abs=1e-7)
    got = float(obj.infonce_distill(a, b, c, d, 0.5, group_size=4))
    want = 0.5 * (float(obj.nt_xent(a, d, 0.5, 4)) + float(obj.nt_xent(b, c, 0.5, 4)))
    assert got == pytest.approx(want, abs=1e-6)
    assert abs(got - float(obj.infonce_distill(a, b, c, d, 0.5))) > 1e-3


@pytest.mark.parametrize("g", [3, 0, -2, 16, 2.5])
def test_bad_group_size(g):
    a, b = rng_draws()[:2]
    with pytest.raises(ValueError, match="not divisible by the loss group size"):
        obj.nt_xent(a, b, 0.5, group_size=g)


def test_stable_small_temperature_and_jit():
    # exp(1/τ · 2) overflows float32 for τ = 0.02 in the plain formula; log-sum-exp does not.
    eye = jnp.eye(4)
    tau = 0.02
    want = math.log1p(6 * math.exp(-1 / tau))
    assert float(obj.nt_xent(eye, eye, tau)) == pytest.approx(want, abs=1e-6)
    a, b = rng_draws()[:2]
    f = jax.jit(lambda x, y: obj.nt_xent(x, y, 0.5, 4))
    assert float(f(a, b)) == pytest.approx(float(obj.nt_xent(a, b, 0.5, 4)), abs=1e-6)
    assert obj.nt_xent(a.astype(np.float16), b.astype(np.float16), 0.5).dtype == jnp.float32


@pytest.mark.slow
def test_gradients_finite():
    x = jnp.asarray(rng_draws()[0], jnp.float32)
    x = x.at[3].set(0.0)  # a zero row: F.normalize's clamp, no NaN from sqrt at 0
    losses = [
        lambda z: obj.nt_xent(z, z, 0.5),
        lambda z: obj.infonce_distill(z, z, z, z, 0.5, group_size=2),
        lambda z: obj.neg_cosine(z, z, z, z),
    ]
    for loss in losses:
        g = jax.grad(loss)(x)
        assert bool(jnp.all(jnp.isfinite(g)))
    # Rows are normalised, so the loss is scale invariant per row: gradients are orthogonal
    # to the rows (and not all zero).
    y = jnp.asarray(rng_draws()[2], jnp.float32)
    g = jax.grad(lambda z: obj.nt_xent(z, y, 0.5))(y)
    assert float(jnp.max(jnp.abs(jnp.sum(g * y, axis=1)))) < 1e-5
    assert float(jnp.max(jnp.abs(g))) > 1e-3
    # The teacher gets gradients unless the caller stops them.
    t = jnp.asarray(rng_draws()[1], jnp.float32)
    gt = jax.grad(lambda t: obj.infonce_distill(x, x, t, t, 0.5))(t)
    assert float(jnp.max(jnp.abs(gt))) > 1e-4


def test_bad_arguments():
    a, b = rng_draws()[:2]
    for tau in (0.0, -0.5):
        with pytest.raises(ValueError, match=f"tau must be > 0, got {tau}"):
            obj.nt_xent(a, b, tau)
        with pytest.raises(ValueError, match="tau must be > 0"):
            obj.infonce_distill(a, b, a, b, tau)
    # Arrays of the wrong rank or shape are a caller's bug: chex assertions, traced or not.
    with pytest.raises(AssertionError, match=r"\(4, 16\).*nt_xent takes two arrays of the same"):
        obj.nt_xent(a, b[:4], 0.5)
    with pytest.raises(AssertionError, match=r"rank 1 .*\[neg_cosine takes \(batch, dim\)"):
        jax.jit(obj.neg_cosine)(a, b, a[0], b[0])
    with pytest.raises(AssertionError, match="embedding_std takes"):
        obj.embedding_std(a[None])


def test_embedding_std():
    z = np.random.default_rng(1).standard_normal((4096, 64))
    assert float(obj.embedding_std(z)) == pytest.approx(1 / 8, rel=0.02)
    collapsed = np.tile(z[:1], (32, 1)) * np.linspace(1, 3, 32)[:, None]
    assert float(obj.embedding_std(collapsed)) == pytest.approx(0.0, abs=1e-6)


def test_feature_mse_is_the_cross_view_mean_over_layers():
    """Intermediate-feature distillation: MSE over all elements of student view v against the
    teacher's other view, averaged over the 2 pairs x layers (numbers by hand in numpy)."""
    rng = np.random.default_rng(3)
    shapes = {"a": (2, 4, 4, 3), "b": (2, 2, 2, 5)}
    s1, s2, t1, t2 = ({k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
                      for _ in range(4))
    pairs = [(s1[k], t2[k]) for k in shapes] + [(s2[k], t1[k]) for k in shapes]
    expected = np.mean([np.mean((s - t) ** 2) for s, t in pairs])
    got = obj.feature_mse(s1, s2, t1, t2)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(obj.feature_mse(s1, s2, s2, s1)) == 0.0  # zero when each view matches
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in s1.items()}
    assert obj.feature_mse(bf16, bf16, bf16, bf16).dtype == jnp.float32
    with pytest.raises(AssertionError, match=r"\(2, 2, 4, 3\).*layer 'a', student and teach"):
        obj.feature_mse({**s1, "a": s1["a"][:, :2]}, s2, t1, t2)
    with pytest.raises(ValueError, match="same non-empty layers"):
        obj.feature_mse({"a": s1["a"]}, s2, t1, t2)


def official_vicreg(x, y, sim=25.0, std=25.0, cov=1.0):
    """numpy port (float64) of the official VICReg forward (facebookresearch/vicreg,
    main_vicreg.py): MSE, hinge on the unbiased std, squared off-diagonal covariances / D."""
    repr_loss = np.mean((x - y) ** 2)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = (np.sqrt(z.var(0, ddof=1) + 1e-4) for z in (x, y))
    std_loss = np.mean(np.maximum(1 - std_x, 0)) / 2 + np.mean(np.maximum(1 - std_y, 0)) / 2
    n, d = x.shape
    off = ~np.eye(d, dtype=bool)
    cov_loss = sum(np.sum(((z.T @ z) / (n - 1))[off] ** 2) / d for z in (x, y))
    return sim * repr_loss + std * std_loss + cov * cov_loss


def test_vicreg_matches_the_official_computation():
    rng = np.random.default_rng(4)
    # Half the dimensions spread less than 1 so the variance hinge is active; correlated
    # dimensions so the covariance term is not ~0.
    x = rng.standard_normal((16, 8)) * np.r_[[0.3] * 4, [2.0] * 4]
    x[:, 1] += x[:, 0]
    y = x + 0.5 * rng.standard_normal((16, 8))
    assert float(obj.vicreg(x, y)) == pytest.approx(official_vicreg(x, y), rel=1e-5)
    assert float(obj.vicreg(x, y, weights=(1.0, 0.0, 0.0))) == pytest.approx(
        np.mean((x - y) ** 2), rel=1e-6)
    # Groups of 4: the mean of the official loss over each group of consecutive examples.
    groups = np.mean([official_vicreg(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)])
    assert float(obj.vicreg(x, y, group_size=4)) == pytest.approx(groups, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 examples per group, got group size 1"):
        obj.vicreg(x, y, group_size=1)
    with pytest.raises(AssertionError, match="vicreg takes two arrays of the same shape"):
        obj.vicreg(x, y[:, :4])
