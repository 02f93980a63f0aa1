"""experiments/bench_compile.py on the demo config: program counts, extrapolation, the FLOP
ratio of the schedule, and argument errors (no assertion depends on timings)."""
import pytest

from tests.helpers import demo_config, load_experiment


bench = load_experiment("bench_compile")


@pytest.mark.slow
def test_programs_of_a_run_and_their_extrapolation():
    """The demo run (stage 1 then sub-networks in [0.25, 1]) compiles views, base, two apply
    variants and one program per distinct sub-network configuration; with
    ``max_sub_programs=1`` the rest are extrapolated, and the cached pass compiles the same
    programs again from the persistent cache."""
    config = demo_config("smoke")
    out = bench.measure_variant(config, steps_per_epoch=22, max_sub_programs=1)
    assert out["sub_programs_compiled"] == 1 and out["extrapolated"]
    assert out["programs_compiled"] == 4 + 1  # views, base, apply x2, one sub
    assert out["programs_total"] == 4 + out["sub_programs"]
    for phase in ("cold", "cached"):
        assert out[phase]["programs"] == 5
        assert out[phase]["wall_s_total"] == pytest.approx(
            out[phase]["wall_s"] * out["programs_total"] / 5)


def test_mean_flop_ratio_follows_the_schedule():
    config = demo_config("smoke")
    # Stage 1 (1 of 4 epochs) is base-only; later steps add sub-networks (< 2.5x).
    ratio = bench.mean_flop_ratio(config, steps_per_epoch=22, sample_every=1)
    assert 1.2 < ratio < 2.5


@pytest.mark.parametrize("extra, message", [
    (["--grid-step", "0"], "--grid-step must be in (0, 1], got 0.0"),
    (["--max-sub-programs", "0"], "--max-sub-programs must be >= 1, got 0"),
    (["--step-repeats", "0"], "--step-repeats must be >= 1, got 0"),
    (["--config", "configs/nope.py"], "--config configs/nope.py"),
])
def test_bad_arguments(extra, message, capsys, tmp_path):
    argv = ["--config", "configs/demo.py:smoke", "--out", str(tmp_path / "x.json")] + extra
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
