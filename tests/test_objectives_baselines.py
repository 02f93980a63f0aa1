"""SEED and MoCo v2 losses against hand-written numpy versions of the official code
(``seed.py`` + ``soft_distill``; ``moco.py`` + CrossEntropy), including the queue."""
import numpy as np
import pytest

from us3l_jax import objectives


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def seed_reference(s, t, queue_dk, tau_s, tau_t):
    """Official SEED forward + soft cross-entropy; ``queue_dk`` is the (dim, K) buffer."""
    s, t = _normalize(s), _normalize(t)
    logit_stu = np.concatenate([np.sum(s * t, 1, keepdims=True), s @ queue_dk], 1) / tau_s
    logit_tea = _softmax(np.concatenate([np.sum(t * t, 1, keepdims=True), t @ queue_dk], 1)
                         / tau_t)
    log_softmax = logit_stu - np.log(np.exp(logit_stu).sum(1, keepdims=True))
    return -(logit_tea * log_softmax).sum() / s.shape[0]


def moco_reference(q, k, queue_dk, tau):
    q, k = _normalize(q), _normalize(k)
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue_dk], 1) / tau
    return np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((8, 16)), rng.standard_normal((8, 16))
    queue = _normalize(rng.standard_normal((32, 16)))  # (K, dim) rows
    return s, t, queue


def test_seed_toy_value():
    # s = t = e1, queue [e2]: the teacher's target is one-hot on the positive (tau_t 1e-4), the
    # student's logits are [1, 0] / 0.5, so the loss is log(1 + e^-2).
    e1, e2 = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert float(objectives.seed_distill(e1, e1, e2, 0.5, 1e-4)) == pytest.approx(
        np.log(1 + np.exp(-2.0)), rel=1e-6)


@pytest.mark.parametrize("tau_s,tau_t", [(0.5, 1e-4), (0.2, 0.04), (0.1, 0.07)])
def test_seed_matches_the_official_computation(arrays, tau_s, tau_t):
    s, t, queue = arrays
    got = float(objectives.seed_distill(s, t, queue, tau_s, tau_t))
    assert got == pytest.approx(seed_reference(s, t, queue.T, tau_s, tau_t), rel=1e-5)


def test_seed_depends_on_the_queue(arrays):
    s, t, queue = arrays
    a = float(objectives.seed_distill(s, t, queue, 0.2, 0.04))
    b = float(objectives.seed_distill(s, t, queue[::-1][:16], 0.2, 0.04))
    assert abs(a - b) > 1e-3


def test_moco_matches_the_official_computation(arrays):
    q, k, queue = arrays
    got = float(objectives.moco_infonce(q, k, queue, 0.2))
    assert got == pytest.approx(moco_reference(q, k, queue.T, 0.2), rel=1e-5)
    e1, e2 = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert float(objectives.moco_infonce(e1, e1, e2, 0.2)) == pytest.approx(
        np.log(1 + np.exp(-5.0)), rel=1e-5)


def test_bad_temperature_and_shapes(arrays):
    s, t, queue = arrays
    with pytest.raises(ValueError, match="temperature tau must be > 0, got 0"):
        objectives.seed_distill(s, t, queue, 0.5, 0)
    with pytest.raises(AssertionError, match="seed_distill takes two arrays of the same shape"):
        objectives.seed_distill(s, t[:4], queue, 0.5, 0.1)
    # The official buffer's (dim, K) layout: a message that names the layout, not einsum's.
    with pytest.raises(AssertionError, match=r"key queue is \(size, dim\)"):
        objectives.moco_infonce(s, t, queue.T, 0.2)
