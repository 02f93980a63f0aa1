"""Width sampler: schedule "A" stages, sandwich rule, determinism, grid mode and
the expected forward count (appendix Eq. 12)."""
import pytest

from us3l_jax import slim
from us3l_jax.models import create
from us3l_jax.sampling import (SamplerConfig, expected_forward_count, first_sub_network_step, min_width, sample_widths,
                               stage)

SPE = 98  # official CIFAR: 50000 / 512 without drop_last
EPOCHS = 400
TOTAL = EPOCHS * SPE


def widths_at_epoch(cfg, epoch, it=0):
    return sample_widths(cfg, epoch * SPE + it, SPE, TOTAL)


def test_schedule_a_by_epoch():
    cfg = SamplerConfig()
    assert widths_at_epoch(cfg, 0) == (1.0,)
    assert widths_at_epoch(cfg, 99, SPE - 1) == (1.0,)
    for epoch, lo in ((100, 0.75), (199, 0.75), (200, 0.5), (300, 0.25), (399, 0.25)):
        assert min_width(cfg, epoch * SPE, SPE, TOTAL) == lo
        for it in range(0, SPE, 7):
            w = widths_at_epoch(cfg, epoch, it)
            assert len(w) == 3 and w[0] == 1.0 and w[-1] == lo
            assert lo <= w[1] < 1.0
    assert [stage(cfg, e * SPE, SPE, TOTAL) for e in (0, 99, 100, 200, 300, 399)] == \
        [1, 1, 2, 3, 4, 4]
    # Other run lengths: boundaries at E//4 epochs (100 epochs: 25/50/75).
    assert [stage(cfg, e * 10, 10, 1000) for e in (24, 25, 49, 50, 74, 75)] == [1, 2, 2, 3, 3, 4]


def test_schedule_a_by_iteration():
    cfg = SamplerConfig(stage_by="iteration")
    total = 1003  # T_p = 250; the 3 leftover iterations stay in stage 4
    assert [stage(cfg, s, 7, total) for s in (0, 249, 250, 499, 500, 749, 750, 1002)] == \
        [1, 1, 2, 2, 3, 3, 4, 4]
    assert min_width(cfg, 1002, 7, total) == 0.25
    # Epoch mode with the same numbers uses ceil(1003/7) = 144 epochs, P = 36.
    ep = SamplerConfig(stage_by="epoch")
    assert stage(ep, 36 * 7 - 1, 7, total) == 1 and stage(ep, 36 * 7, 7, total) == 2


def test_custom_range_stage_minimums():
    cfg = SamplerConfig(width_range=(0.4, 1.0))
    mins = [min_width(cfg, e * SPE, SPE, TOTAL) for e in (0, 100, 200, 300)]
    assert mins == pytest.approx([1.0, 0.8, 0.6, 0.4])


def test_no_schedule_and_no_sandwich():
    cfg = SamplerConfig(schedule=None)
    w = sample_widths(cfg, 0, SPE, TOTAL)
    assert w[0] == 1.0 and w[-1] == 0.25 and len(w) == 3
    # Without the sandwich rule the base step runs at the largest *sampled* width (official).
    nos = SamplerConfig(sandwich=False, schedule=None, num_samples=3)
    for step in range(50):
        w = sample_widths(nos, step, SPE, TOTAL)
        assert len(w) == 3 and list(w) == sorted(w, reverse=True)
        assert all(0.25 <= x < 1.0 for x in w)
    nos_a = SamplerConfig(sandwich=False)
    assert sample_widths(nos_a, 0, SPE, TOTAL) == (1.0,)  # stage 1 still trains only hi
    assert all(0.75 <= x < 1.0 for x in widths_at_epoch(nos_a, 150))


def test_four_samples_without_duplicates():
    # The official sandwich loop gives [max, max, r, r, min, min] for N = 4; we give 4.
    cfg = SamplerConfig(num_samples=4)
    for epoch in (100, 250, 350):
        for it in range(20):
            w = widths_at_epoch(cfg, epoch, it)
            assert len(w) == 4 and len(set(w)) == 4
            assert w[0] == 1.0 and w[-1] == min_width(cfg, epoch * SPE, SPE, TOTAL)
    assert sample_widths(SamplerConfig(num_samples=2), 300 * SPE, SPE, TOTAL) == (1.0, 0.25)


def test_deterministic_per_step_and_host():
    # A fresh config and fresh calls (another host, a resumed run) give the same widths.
    steps = [100 * SPE + i for i in range(40)] + [350 * SPE + i for i in range(40)]
    a = [sample_widths(SamplerConfig(seed=3), s, SPE, TOTAL) for s in steps]
    b = [sample_widths(SamplerConfig(seed=3), s, SPE, TOTAL) for s in reversed(steps)][::-1]
    assert a == b
    middles = {w[1] for w in a}
    assert len(middles) == len(steps)  # a different draw every step
    c = [sample_widths(SamplerConfig(seed=4), s, SPE, TOTAL) for s in steps]
    assert all(x[1] != y[1] for x, y in zip(a, c))


def test_draws_are_uniform():
    cfg = SamplerConfig(schedule=None)
    mids = [sample_widths(cfg, s, SPE, TOTAL)[1] for s in range(2000)]
    mean = sum(mids) / len(mids)
    assert mean == pytest.approx(0.625, abs=0.02)  # U(0.25, 1): mean 0.625, sd/sqrt(n) ~ 0.005
    assert min(mids) < 0.27 and max(mids) > 0.98


def test_grid_mode_only_yields_grid_widths():
    model = create("cifar_resnet18", base_width=16)
    grid = tuple(slim.distinct_widths(model.channel_config, 0.25, 1.0, step=1 / 16))
    cfg = SamplerConfig(grid=grid)
    seen = set()
    for epoch in (100, 200, 300, 399):
        lo = min_width(cfg, epoch * SPE, SPE, TOTAL)
        for it in range(40):
            w = widths_at_epoch(cfg, epoch, it)
            assert w[0] == 1.0 and w[-1] == lo
            assert w[1] in grid and lo < w[1] < 1.0
            seen.add(w[1])
    assert len(seen) >= len(grid) - 3  # every interior grid width is reachable
    nos = SamplerConfig(grid=grid, sandwich=False, schedule=None)
    assert all(x in grid for s in range(30) for x in sample_widths(nos, s, SPE, TOTAL))


def test_individual_mode():
    cfg = SamplerConfig.individual(0.5)
    assert [sample_widths(cfg, s, SPE, TOTAL) for s in (0, TOTAL - 1)] == [(0.5,), (0.5,)]
    assert expected_forward_count(cfg, TOTAL, SPE) == TOTAL
    assert min_width(cfg, 0, SPE, TOTAL) == 0.5


def test_first_sub_network_step():
    """Where sub-networks first train (plain weight decay reaches their head from then on)."""
    a = SamplerConfig()
    # 400 epochs of 98 steps: stage 2 starts at epoch 100.
    assert first_sub_network_step(a, 98, 400 * 98) == 100 * 98
    assert len(sample_widths(a, 100 * 98 - 1, 98, 400 * 98)) == 1
    assert len(sample_widths(a, 100 * 98, 98, 400 * 98)) == 3
    assert first_sub_network_step(SamplerConfig(schedule=None), 98, 400 * 98) == 0
    assert first_sub_network_step(SamplerConfig(schedule="gradual"), 98, 400 * 98) == 0
    assert first_sub_network_step(SamplerConfig.individual(0.5), 98, 400 * 98) is None
    assert first_sub_network_step(SamplerConfig(width_range=(1.0, 1.0)), 98, 400) is None


def test_expected_forward_count():
    assert expected_forward_count(SamplerConfig(), TOTAL, SPE) == 2.5 * TOTAL
    assert expected_forward_count(SamplerConfig(stage_by="iteration"), 1000, 7) == 2500
    # Table 13: s = 4 without dynamic sampling is 4T; s = 3 is 3T.
    assert expected_forward_count(SamplerConfig(num_samples=4, schedule=None), 1000, 10) == 4000
    assert expected_forward_count(SamplerConfig(schedule=None), 1000, 10) == 3000
    # Agrees with counting the sampled widths step by step (uneven run: 1003 steps).
    cfg = SamplerConfig(stage_by="iteration", num_samples=4)
    assert expected_forward_count(cfg, 1003, 7) == \
        sum(len(sample_widths(cfg, s, 7, 1003)) for s in range(1003))


@pytest.mark.parametrize("kw, msg", [
    (dict(width_range=(1.0, 0.25)), r"width_range \(1.0, 0.25\) is invalid"),
    (dict(width_range=(0.0, 1.0)), "need 0 < lo <= hi <= 1"),
    (dict(width_range=(0.25, 1.5)), "need 0 < lo <= hi <= 1"),
    (dict(num_samples=1), "sandwich rule needs num_samples >= 2"),
    (dict(num_samples=0, sandwich=False), "num_samples must be an integer >= 1, got 0"),
    (dict(schedule="B"), "unknown width schedule 'B'"),
    (dict(stage_by="epochs"), "stage_by must be one of"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(individual_width=0.5), "individual_width trains one fixed width"),
    (dict(grid=(0.3, 0.5)), r"no width in \[0.75, 1.0\]"),
    (dict(grid=(0.0, 1.0)), "grid must be a non-empty list of widths in"),
])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplerConfig(**kw)


def test_bad_run_arguments():
    cfg = SamplerConfig()
    with pytest.raises(ValueError, match=r"step must be an integer in \[0, total_steps=10\)"):
        sample_widths(cfg, 10, 1, 10)
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        sample_widths(cfg, 0, 0, 10)
    with pytest.raises(ValueError, match="schedule 'A' needs at least 4 epochs"):
        sample_widths(cfg, 0, 5, 15)


def test_table13_half_schedules():
    """Appendix Table 13: 'max first' alone (case 4, 2.5T) and 'gradually reduce' alone
    (case 3, 3T) are the two halves of schedule A (case 5)."""
    spe, total = 10, 400  # 40 epochs: stages of 10 epochs
    mf = SamplerConfig(schedule="max_first")
    gr = SamplerConfig(schedule="gradual")
    assert sample_widths(mf, 99, spe, total) == (1.0,)
    assert min(sample_widths(mf, 100, spe, total)) == 0.25  # full range right after stage 1
    assert min(sample_widths(gr, 0, spe, total)) == 0.75  # sub-networks from step 0
    assert min(sample_widths(gr, 199, spe, total)) == 0.75
    assert min(sample_widths(gr, 200, spe, total)) == 0.5
    assert min(sample_widths(gr, 399, spe, total)) == 0.25
    assert expected_forward_count(mf, total, spe) == 1000 == 2.5 * total
    assert expected_forward_count(gr, total, spe) == 1200 == 3 * total
    with pytest.raises(ValueError, match="unknown width schedule 'B'"):
        SamplerConfig(schedule="B")
