"""Weighted kNN on a toy set whose answer is known by construction."""
import math

import numpy as np
import pytest

from us3l_jax.evaluate import knn


def toy():
    """Query at angle 0. Bank: class 0 at angles +-acos(0.8) (cosine 0.8), class 1 at angle 0
    with norm 3 (cosine 1), class 2 opposite (cosine -1)."""
    a = math.acos(0.8)
    bank = np.array([[math.cos(a), math.sin(a)], [math.cos(a), -math.sin(a)], [3.0, 0.0],
                     [-1.0, 0.0]], np.float32)
    labels = np.array([0, 0, 1, 2], np.int32)
    return bank, labels, np.array([[2.0, 0.0]], np.float32)


def test_temperature_weighted_votes():
    bank, labels, q = toy()
    # T = 0.1, k = 3: class 1 scores e^10 = 22026 > class 0's 2e^8 = 5962, although class 0
    # has the majority of the 3 neighbours.
    s = knn.knn_scores(bank, labels, q, 3, k=3, temperature=0.1)[0]
    np.testing.assert_allclose(s, [2 * math.exp(8), math.exp(10), 0.0], rtol=1e-5)
    assert np.argmax(s) == 1
    # T = 1: e^1 = 2.72 < 2e^0.8 = 4.45, so the two class-0 neighbours win.
    s = knn.knn_scores(bank, labels, q, 3, k=3, temperature=1.0)[0]
    np.testing.assert_allclose(s, [2 * math.exp(0.8), math.e, 0.0], rtol=1e-5)
    assert np.argmax(s) == 0
    # k larger than the bank uses every example: class 2 votes e^-10.
    s = knn.knn_scores(bank, labels, q, 3, k=200, temperature=0.1)[0]
    np.testing.assert_allclose(s[2], math.exp(-10), rtol=1e-4)


def test_clusters_are_classified_and_chunks_agree():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 8))
    y = np.repeat(np.arange(5), 40)
    x = centers[y] + 0.05 * rng.normal(size=(200, 8))
    yt = np.repeat(np.arange(5), 21)  # 105 queries: chunks of 32 leave a padded tail
    xt = centers[yt] + 0.05 * rng.normal(size=(105, 8))
    assert knn.knn_accuracy(x, y, xt, yt, 5, k=20) == 1.0
    whole = knn.knn_scores(x, y, xt, 5, k=20, chunk=1024)
    chunked = knn.knn_scores(x, y, xt, 5, k=20, chunk=32)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)


def test_bad_arguments():
    bank, labels, q = toy()
    with pytest.raises(ValueError, match="k >= 1 and temperature > 0"):
        knn.knn_scores(bank, labels, q, 3, k=0)
    with pytest.raises(ValueError, match="feature shapes do not match"):
        knn.knn_scores(bank, labels, np.zeros((1, 3), np.float32), 3)
