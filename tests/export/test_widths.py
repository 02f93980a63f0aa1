"""Distinct widths, their exact costs, latency timing and the budget picker."""
import functools

import numpy as np
import pytest

from us3l_jax import models, profile, slim
from us3l_jax.export import widths

TINY = dict(base_width=16, stage_sizes=(1, 1, 1, 1), min_width=0.25)


def _backbone():
    return models.create("cifar_resnet18", **TINY)


def test_parse_count():
    assert widths.parse_count("300M") == 3e8 and widths.parse_count("2.5k") == 2500
    assert widths.parse_count("1G") == 1e9 and widths.parse_count(" 5 ") == 5
    assert widths.parse_count("1e3") == 1000 and widths.parse_count("2m") == 2e6
    for bad in ("", "M", "-3", "0", "3T", "lots"):
        with pytest.raises(ValueError, match=r"--max-macs .* is not a positive number"):
            widths.parse_count(bad, "--max-macs")


def test_candidates_are_round_and_one_per_channel_configuration():
    m = _backbone()
    got = widths.candidates(m, 0.25)
    assert got == [0.25, 0.3, 0.4, 0.41, 0.45, 0.5, 0.55, 0.59, 0.6, 0.68, 0.7, 0.75, 0.8,
                   0.83, 0.84, 0.9, 0.93, 0.95, 1.0]
    configs = [m.channel_config(w) for w in got]
    exact = slim.distinct_widths(m.channel_config, 0.25, 1.0)
    assert len(set(configs)) == len(got) == len(exact)
    assert set(configs) == {m.channel_config(w) for w in exact}
    mb = models.create("cifar_mobilenet_v2", min_width=0.25)
    got = widths.candidates(mb, 0.25)
    assert got[0] == 0.25 and got[-1] == 1.0 and len(got) == 57
    assert len({mb.channel_config(w) for w in got}) == 57


def test_costs_are_the_profilers():
    m = _backbone()
    for w in (0.25, 0.5, 1.0):
        p = profile.profile("cifar_resnet18", w, 16, None, "backbone", **TINY)
        assert widths.costs(m, w, 16) == {"params": p["params"], "macs": p["macs"]}
    # A BN group size (the run's) cannot trace a batch of one; it changes no count.
    grouped = models.create("cifar_resnet18", bn_group_size=32, **TINY)
    assert widths.costs(grouped, 0.5, 16) == widths.costs(m, 0.5, 16)


def test_costs_of_a_vit_are_the_profilers():
    """A ViT has no conv or BN layers: the layer trace counted 0 params and 0 MACs."""
    for slicing in ("official", "embed"):
        m = models.create("vit_tiny", slicing=slicing)
        for w in (0.25, 1.0):
            p = profile.profile("vit_tiny", w, 32, None, "backbone", slicing=slicing)
            got = widths.costs(m, w, 32)
            assert got == {"params": p["params"], "macs": p["macs"]}
            assert got["params"] > 6e5 and got["macs"] > 3e6
    assert widths.costs(models.create("vit_tiny"), 1.0, 32)["params"] == 5_486_592


@functools.lru_cache(maxsize=None)
def _rows():
    m = _backbone()
    return tuple(widths.Row(w, m.channel_config(w), **widths.costs(m, w, 16))
                 for w in widths.candidates(m, 0.25))


@pytest.mark.parametrize("key", ["macs", "params"])
def test_pick_on_both_sides_of_every_widths_cost(key):
    rows = _rows()
    for below, row in zip((None,) + rows[:-1], rows):
        assert widths.pick(rows, key, row.value(key)).width == row.width
        if below is not None:
            assert widths.pick(rows, key, row.value(key) - 1).width == below.width
    assert widths.pick(rows, key, 1e30).width == 1.0
    with pytest.raises(ValueError) as e:
        widths.pick(rows, key, rows[0].value(key) - 1)
    assert f"the smallest width 0.25 needs {rows[0].value(key):,}" in str(e.value)


def test_pick_measured_stops_at_the_widest_fit():
    rows = _rows()
    fake = {r.width: 10.0 * r.width for r in rows}
    fake[0.95] = 1.0  # not monotone: a narrower width can be slower
    seen = []

    def measure(w):
        seen.append(w)
        return fake[w]

    row, n = widths.pick_measured(rows, 9.4, measure)
    assert (row.width, row.latency_ms, n) == (0.95, 1.0, 2) and seen == [1.0, 0.95]
    with pytest.raises(ValueError, match=r"no width fits latency_ms <= 0.9 ms: the smallest width 0.25 "
                                         r"needs 2.5 ms"):
        widths.pick_measured(rows, 0.9, lambda w: fake[w])


def test_measure_latency_is_a_median_in_ms():
    calls = []

    def fn(x):
        calls.append(1)
        return x

    ms = widths.measure_latency(fn, np.zeros(3), warmup=2, repeats=5)
    assert len(calls) == 7 and 0 <= ms < 50
    with pytest.raises(ValueError, match="--repeats"):
        widths.measure_latency(fn, np.zeros(3), repeats=0)


def test_sweep_accuracy_labels_the_row_of_the_same_network():
    m = _backbone()
    records = [{"width": 0.5, "protocol": "fast", "accuracy": 70.0},
               {"width": 0.5, "protocol": "knn", "accuracy": 60.0},
               {"width": 0.46, "protocol": "fast", "accuracy": 66.0}]
    acc = widths.sweep_accuracy(m, records)
    assert acc == {m.channel_config(0.5): {"fast": 70.0, "knn": 60.0},
                   m.channel_config(0.46): {"fast": 66.0}}  # 0.46 is the 0.45 network
    assert m.channel_config(0.46) == m.channel_config(0.45)
    text = widths.format_rows([widths.Row(0.5, (8,), 10, 20, 1.25, {"fast": 70.0})], "cpu", 4)
    assert text.splitlines()[0].split() == ["width", "params", "MACs", "latency", "ms",
                                            "(batch", "4)", "fast", "top-1", "%"]
    assert text.splitlines()[2].split() == ["0.5", "10", "20", "1.250", "70.0"]
