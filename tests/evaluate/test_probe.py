"""The fast probe: separable features, shuffled labels, agreement with scikit-learn."""
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from us3l_jax.evaluate import probe


def clusters(n_per_class, num_classes=10, dim=16, spread=0.5, seed=0):
    """Class c is N(8·e_c, spread²·I): linearly separable with margin ~8/sqrt(2)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = 8.0 * np.eye(dim)[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y.astype(np.int32)


def test_separable_features_reach_100_percent():
    x, y = clusters(50)
    xt, yt = clusters(50, seed=1)
    clf = probe.fit(x, y, 10)
    assert probe.accuracy(clf, x, y) == 1.0
    assert probe.accuracy(clf, xt, yt) == 1.0


def test_shuffled_labels_give_chance():
    # Features carry no information about shuffled labels: test accuracy is Binomial(2000,
    # 0.1)/2000 = 0.100 +- 0.0067; the +-0.04 tolerance is 6 standard deviations.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 64)).astype(np.float32)
    y = rng.permutation(np.arange(2000) % 10).astype(np.int32)
    xt = rng.normal(size=(2000, 64)).astype(np.float32)
    yt = (np.arange(2000) % 10).astype(np.int32)
    acc = probe.fast_probe(x, y, xt, yt, 10)
    assert abs(acc - 0.1) < 0.04, acc


def test_agrees_with_sklearn_logistic_regression_on_digits():
    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:1400], perm[1400:]
    ours = probe.fast_probe(x[tr], y[tr], x[te], y[te], 10)
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    ref = LogisticRegression(max_iter=3000).fit((x[tr] - mean) / std, y[tr])
    theirs = ref.score((x[te] - mean) / std, y[te])
    assert ours > 0.93 and abs(ours - theirs) < 0.03, (ours, theirs)


def test_minibatch_mode_also_separates():
    x, y = clusters(50)
    clf = probe.fit(x, y, 10, probe.FastProbeConfig(batch_size=64))
    assert probe.accuracy(clf, x, y) == 1.0


def test_bad_inputs_are_named():
    x, y = clusters(2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        probe.fit(x, y, 5)
    with pytest.raises(ValueError, match="need features"):
        probe.fit(x[0], y, 10)
