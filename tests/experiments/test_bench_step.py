"""experiments/bench_step.py on a tiny ResNet: record schema, FLOP model, program counts.

One benchmark run (both update modes, the base-only case and one US3L case, 1 timed step) is
shared by the tests; no assertion depends on timings.
"""
import json
import math

import pytest

from tests.helpers import load_experiment
from us3l_jax import profile

# Base width 16: 8 channels cannot run at 0.25x (the official rounding gives 9).
TINY = ["--model", "cifar_resnet18", "--base-width", "16", "--stage-sizes", "1,1,1,1",
        "--batch", "16", "--image-size", "8"]


bench = load_experiment("bench_step")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.json"
    records = bench.main(TINY + ["--steps", "1", "--widths", "1.0,0.5", "--breakdown",
                                 "--out", str(out)])
    return records, json.loads(out.read_text())


@pytest.mark.slow
def test_records_schema_and_ratios(run):
    records, saved = run
    assert saved == json.loads(json.dumps(records))
    assert [(r["update_mode"], r["case"]) for r in saved] == [
        ("accumulate", "base"), ("accumulate", "us3l_0.5"),
        ("per_width", "base"), ("per_width", "us3l_0.5")]
    types = dict(case=str, update_mode=str, model=str, device=str, sub_widths=list, batch=int,
                 step_s=float, time_ratio=float, flop_ratio=float, ratio_error=float,
                 step_cpu_s=float, cpu_ratio=float, cpu_ratio_error=float,
                 compile_s=float, programs=int, programs_total=int, loss=float)
    for r in saved:
        for key, typ in types.items():
            assert isinstance(r[key], typ), (key, r[key])
        assert r["step_s"] > 0 and r["time_ratio"] > 0 and r["flop_ratio"] > 0
        assert r["step_cpu_s"] > 0 and r["cpu_ratio"] > 0
        assert math.isclose(r["ratio_error"], r["time_ratio"] / r["flop_ratio"] - 1)
        assert math.isclose(r["cpu_ratio_error"], r["cpu_ratio"] / r["flop_ratio"] - 1)
        assert math.isfinite(r["loss"])
        assert r["model"] == "cifar_resnet18" and r["batch"] == 16
        assert len(r["step_times"]) == len(r["step_cpu_times"]) == 1
    base, sub = saved[0], saved[1]
    assert base["sub_widths"] == [] and sub["sub_widths"] == [0.5]
    assert base["time_ratio"] == base["cpu_ratio"] == base["flop_ratio"] == 1.0
    assert sub["flop_ratio"] > 1.0


@pytest.mark.slow
def test_programs_compiled_per_case(run):
    """accumulate: views, base, apply without head decay, then one sub program and the apply
    with head decay; per_width: views, base+update, finish, then one sub program."""
    records, _ = run
    got = [(r["programs"], r["programs_total"]) for r in records]
    assert got == [(3, 3), (2, 5), (3, 3), (1, 4)]
    assert all(r["compile_s"] > 0 for r in records)


@pytest.mark.slow
def test_breakdown_covers_every_program(run):
    records, _ = run
    assert set(records[1]["program_s"]) == {"views", "base@1", "sub@0.5", "apply"}
    assert set(records[3]["program_s"]) == {"views", "base@1", "sub@0.5", "finish"}
    assert set(records[1]["program_cpu_s"]) == set(records[1]["program_s"])
    for key in ("program_gmacs_per_s", "program_gmacs_per_cpu_s"):
        assert set(records[1][key]) == {"base@1", "sub@0.5"}
        assert all(v > 0 for v in records[1][key].values())


def test_flop_model_uses_profiler_and_heads():
    config = bench.make_config("cifar_resnet18", 16, 8, base_width=16, stage_sizes=(1, 1, 1, 1))
    fwd = bench.forward_macs(config, 0.5, 8, head=True)
    prof = profile.profile("cifar_resnet18", 0.5, input_size=8, num_classes=None,
                           convention="backbone", base_width=16, stage_sizes=(1, 1, 1, 1))
    assert fwd["backbone"] == prof["macs"]
    feat, h = 64, config.heads  # 128 * 0.5 channels after the last stage
    assert fwd["projector"] == (feat * h.proj_hidden + h.proj_hidden ** 2
                                + h.proj_hidden * h.proj_out)
    assert fwd["head"] == 2 * h.proj_out * h.head_hidden
    it = bench.iteration_macs(config, (1.0, 0.5), 8)
    assert it["base"] == 3 * it["teacher"]  # fwd+bwd = 3 forwards, both at width 1.0
    assert it["sub@0.5"] == 3 * fwd["total"]
    assert it["total"] == it["teacher"] + it["base"] + it["sub@0.5"]


@pytest.mark.parametrize("extra, message", [
    (["--widths", "0.5,0.25"], "starts with the base width 1.0"),
    (["--widths", "1.0"], "at least one sub-width"),
    (["--modes", "fast"], "update modes must be from"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch", "12", "--group-size", "8"], "batch_size=12 is not a multiple"),
])
def test_bad_arguments(extra, message, capsys, tmp_path):
    argv = [a for a in TINY] + ["--out", str(tmp_path / "x.json")] + extra
    if "--batch" in extra:  # replace the tiny batch
        i = argv.index("--batch")
        del argv[i:i + 2]
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_hlo_collectives_counts_ops_and_bytes():
    hlo = """
  %all-reduce = f32[512,3]{1,0} all-reduce(f32[512,3]{1,0} %p), channel_id=1, to_apply=%add
  %ar2 = (f32[4]{0}, bf16[2,2]{1,0}) all-reduce(f32[4]{0} %a, bf16[2,2]{1,0} %b), to_apply=%add
  %s = f32[] all-reduce(f32[] %l), to_apply=%add
  %ag = f32[8,3]{1,0} all-gather(f32[1,3]{1,0} %x), dimensions={0}
  %mul = f32[16,3]{1,0} multiply(f32[16,3]{1,0} %all-reduce, f32[16,3]{1,0} %all-reduce)
"""
    c = bench.hlo_collectives(hlo)
    assert c["all-reduce"] == {"ops": 3, "bytes": 512 * 3 * 4 + 4 * 4 + 4 * 2 + 4,
                               "small_ops": 2}
    assert c["all-gather"] == {"ops": 1, "bytes": 8 * 3 * 4, "small_ops": 1}
    assert c["reduce-scatter"]["ops"] == 0


def test_more_devices_than_jax_sees_is_an_error(capsys, tmp_path):
    """In-process JAX already started with one CPU device; the script forces devices only when
    run as a script. The 8-device counts are checked in tests/engine/test_engine.py."""
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--devices", "8", "--collectives", "--out", str(tmp_path / "x")])
    assert "--devices 8: JAX sees only 1 device(s)" in capsys.readouterr().err


def test_collectives_table():
    rec = dict(update_mode="accumulate", case="us3l_0.5", step_s=1.0, step_cpu_s=1.0,
               time_ratio=1.0, cpu_ratio=1.0, flop_ratio=1.0, ratio_error=0.0,
               cpu_ratio_error=0.0, compile_s=1.0, programs=1, programs_total=1,
               reduce_once=True, allreduce_ops_per_iteration=3,
               gradient_allreduce_ops_per_iteration=1, allreduce_bytes_per_iteration=2 ** 20,
               allreduce_bytes_over_param_bytes=1.0, param_bytes=2 ** 20,
               reduce_every_program=dict(allreduce_ops_per_iteration=4,
                                         gradient_allreduce_ops_per_iteration=2,
                                         allreduce_bytes_per_iteration=2 ** 21,
                                         allreduce_bytes_over_param_bytes=2.0))
    table = bench.format_table([rec])
    assert "all-reduces per iteration" in table
    assert "3 (1)" in table and "4 (2)" in table and "2.000" in table


VIT = dict(dim=32, depth=1, heads=2, patch_size=4)


@pytest.mark.parametrize("slicing", ["official", "embed"])
def test_vit_flop_model_uses_profiler_per_slicing(slicing):
    config = bench.make_config("vit_tiny", 8, 8, slicing=slicing, **VIT)
    fwd = bench.forward_macs(config, 0.5, 8, head=True)
    prof = profile.profile("vit_tiny", 0.5, input_size=8, num_classes=None,
                           convention="backbone", slicing=slicing, **VIT)
    assert fwd["backbone"] == prof["macs"] > 0
    feat = 32 if slicing == "official" else 16  # embed: 1 of 2 heads at head dim 16
    h = config.heads
    assert fwd["projector"] == (feat * h.proj_hidden + h.proj_hidden ** 2
                                + h.proj_hidden * h.proj_out)
    with pytest.raises(ValueError, match="unknown ViT field 'width'"):
        bench.make_config("vit_tiny", 8, 8, width=3)


@pytest.mark.slow
def test_vit_embed_run_records_slicing_and_profiler_ratio(tmp_path):
    argv = ["--model", "vit_tiny", "--batch", "8", "--image-size", "8", "--patch-size", "4",
            "--vit-dim", "32", "--vit-depth", "1", "--vit-heads", "2", "--slicing", "embed",
            "--modes", "accumulate", "--widths", "1.0,0.5", "--steps", "1",
            "--out", str(tmp_path / "vit.json")]
    records = bench.main(argv)
    assert [r["case"] for r in records] == ["base", "us3l_0.5"]
    assert all((r["slicing"], r["dim"], r["depth"], r["heads"], r["patch_size"]) ==
               ("embed", 32, 1, 2, 4) for r in records)
    config = bench.make_config("vit_tiny", 8, 8, slicing="embed", **VIT)
    it = bench.iteration_macs(config, (1.0, 0.5), 8)
    assert records[1]["flop_ratio"] == it["total"] / bench.iteration_macs(config, (1.0,), 8)[
        "total"]
    assert records[1]["macs_per_image_view"] == it
    assert math.isfinite(records[1]["loss"]) and records[1]["time_ratio"] > 0


def test_slicing_flag_needs_a_vit(capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--slicing", "embed", "--out", str(tmp_path / "x.json")])
    assert "model.slicing only applies to ViTs" in capsys.readouterr().err
