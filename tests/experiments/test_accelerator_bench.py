"""experiments/accelerator_bench.py: one ``--smoke`` run (the CIFAR bf16 case: base-only and
US3L steps in both update modes, cold and cached compiles, input, projections) checked for
field presence and arithmetic consistency; in process, the projection from synthetic case
records (noisy and inverted step times, a mode or the whole US3L step cut by the budget,
unmeasured cases), the smoke ViT's shape, the peak table and argument errors. No assertion
depends on how fast this machine is."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_experiment, xla_flags

bench = load_experiment("accelerator_bench")
SCRIPT = os.path.join(REPO, "experiments", "accelerator_bench.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel") / "smoke.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=xla_flags())
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out), "--cases",
                           "cifar_r18_bf16", "--budget-s", "600"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isdir(str(out) + ".xla_cache")  # the persistent cache next to --out
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_cases_and_variants(result):
    r, stdout = result
    assert r["complete"] and r["smoke"] and r["device"]["platform"] == "cpu"
    assert r["device"]["peak"]["bfloat16"] is None  # CPU: no peak, so no MFU
    by = {c["name"]: c for c in r["cases"]}
    assert list(by) == [c.name for c in bench.CASES]
    assert by["imagenet_r50_bf16"] == dict(name="imagenet_r50_bf16", config=by[
        "imagenet_r50_bf16"]["config"], estimate_s=by["imagenet_r50_bf16"]["estimate_s"],
        status="skipped", reason="not selected (--cases)")
    c = by["cifar_r18_bf16"]
    assert c["status"] == "ok", c.get("traceback")
    assert [v["variant"] for v in c["variants"]] == ["base", "us3l_accumulate",
                                                     "us3l_per_width"]
    assert c["base_widths"] == [1.0] and c["us3l_widths"] == [1.0, 0.25]  # stage 4, s=2
    assert c["input"]["device_views"]["images_per_s"] > 0
    base, acc, pw = c["variants"]
    assert acc["macs_per_image_view"] == pw["macs_per_image_view"] > base[
        "macs_per_image_view"] > 0
    for v in c["variants"]:
        assert v["step_s"] > 0 and len(v["step_times"]) == 2 and v["pipelined_step_s"] > 0
        assert v["step_s"] == sorted(v["step_times"])[0] + (
            sorted(v["step_times"])[1] - sorted(v["step_times"])[0]) / 2  # median
        assert math.isclose(v["images_per_s"], c["batch"] / v["step_s"])
        assert v["flops_per_step"] == 2 * v["macs_per_image_view"] * 2 * c["batch"]
        assert math.isclose(v["flops_per_s"], v["flops_per_step"] / v["step_s"])
        assert v["mfu"] is None and v["device_peak_bytes"] is None
        assert v["program_peak_bytes"] > 0 and math.isfinite(v["loss"])
        cold, cached = v["compile"]["cold"], v["compile"]["cached"]
        assert set(cold["programs"]) == set(cached["programs"]) and len(cold["programs"]) \
            == v["programs"]
        assert all(s > 0 for s in [*cold["programs"].values(), *cached["programs"].values()])
    # Programs: base-only views/base/apply; accumulate adds one sub and the apply that decays
    # the head; per_width compiles its own views, base+update, sub+update and finish.
    assert base["compile"]["cold"]["new_programs"] == ["views", "base@1", "apply[base]"]
    assert sorted(acc["compile"]["cold"]["new_programs"]) == sorted(
        ["sub@0.25", "apply[sub]"])
    assert sorted(pw["compile"]["cold"]["new_programs"]) == ["base@1", "finish", "sub@0.25",
                                                             "views"]
    assert "cifar_r18_bf16" in stdout and "a full run takes about" in stdout


@pytest.mark.slow
def test_projections_follow_the_step_times(result):
    r, _ = result
    case = next(c for c in r["cases"] if c["name"] == "cifar_r18_bf16")
    t_base = next(v for v in case["variants"] if v["variant"] == "base")["step_s"]
    # The paper configs run the official update mode (one update per width).
    t_us3l = next(v for v in case["variants"] if v["variant"] == "us3l_per_width")["step_s"]
    ok = [p for p in r["projections"] if p["status"] == "ok"]
    assert {p["config"] for p in ok} == {"configs/us3l_cifar100.py:resnet18",
                                         "configs/us3l_cifar100.py:resnet18,800",
                                         "configs/us3l_cifar10.py:resnet18"}
    skipped = {p["config"]: p["reason"] for p in r["projections"] if p["status"] == "skipped"}
    assert skipped["configs/us3l_imagenet.py:resnet50"] == \
        "case imagenet_r50_bf16 was skipped: not selected (--cases)"
    assert {p["status"] for p in r["projections"]} == {"ok", "skipped"}  # never an error
    for p in ok:
        assert p["total_steps"] == p["epochs"] * p["steps_per_epoch"] == sum(
            s["iterations"] for s in p["stages"].values())
        assert p["steps_per_epoch"] == 50000 // 512 and p["batch_scale"] == 512 / case["batch"]
        assert p["from_mode"] == p["update_mode"] == "per_width"
        assert math.isclose(p["base_step_s"], t_base * p["batch_scale"])
        assert math.isclose(p["us3l_step_s"], t_us3l * p["batch_scale"])
        # Stage 1 is base-only; stage 4 draws exactly the measured widths (s=2: 1.0, 0.25),
        # unless this machine's noise measured the US3L step faster (then the base time).
        assert math.isclose(p["stages"]["1"]["step_s"], p["base_step_s"])
        assert p["fit"]["clipped"] == (t_us3l < t_base)
        assert math.isclose(p["stages"]["4"]["step_s"], max(p["us3l_step_s"],
                                                            p["base_step_s"]))
        assert all(s["step_s"] >= p["base_step_s"] > 0 for s in p["stages"].values())
        assert math.isclose(p["compute_s"], sum(s["iterations"] * s["step_s"]
                                                for s in p["stages"].values()))
        assert math.isclose(p["hours"], (p["compute_s"] + p["compile_s"]["cold"]) / 3600)
        assert p["compile_s"]["cold"] > 0 and p["compile_s"]["cached"] > 0
        assert p["run_mfu"] is None
    g = r["goals"]
    assert g["h100_class"] is False and g["projected_minutes"] == pytest.approx(
        60 * next(p for p in ok if p["config"] == g["config"])["hours"])


# ------------------------------------------------------------------ projections in process

MEASURED = "cifar_r18_bf16"
LABEL = "configs/us3l_cifar100.py:resnet18"


@pytest.fixture(scope="module")
def smoke_config():
    """The CIFAR-100 ResNet-18 paper config on the smoke run's tiny shapes (fast MAC counts)."""
    config = bench.bench_compile.load_config(LABEL)
    config.model.dtype = "bfloat16"
    bench.shrink(config)
    return config


def _variant(name, mode, widths, step_s, macs, programs):
    compile_ = {phase: {"wall_s": sum(programs.values()), "programs": dict(programs)}
                for phase in ("cold", "cached")}
    return dict(variant=name, update_mode=mode, widths=list(widths), step_s=step_s,
                macs_per_image_view=macs, compile=compile_)


def synthetic_case(config, t_base, t_us3l, measured=("accumulate", "per_width"),
                   skipped=(), name=MEASURED):
    """A case record as ``measure_case`` writes it, with the given step times: ``measured``
    US3L modes have a variant, ``skipped`` ones are listed as cut by the budget."""
    macs = bench.MacCache.of(config)
    hi = (config.sampler.width_range[1],)
    stage4 = bench.last_stage_widths(config, bench.steps_per_epoch(config))
    modes = ("accumulate", "per_width")
    variants = [] if "base" in skipped else [_variant(
        "base", modes[0], hi, t_base, macs.iteration(hi),
        {"views": 1.0, "base@1": 2.0, "apply[base]": 0.5})]
    for m in measured:
        variants.append(_variant(f"us3l_{m}", m, stage4, t_us3l, macs.iteration(stage4),
                                 {"views": 1.0, "base@1": 2.0, "sub@0.25": 3.0, "finish": 0.5}))
    return dict(name=name, status="ok", batch=bench.SMOKE_BATCH, devices=1,
                peak_flops_per_device=None, update_modes=list(modes), variants=variants,
                skipped_variants=[f"us3l_{m}" if m != "base" else m for m in skipped])


@pytest.mark.parametrize("t_base, t_us3l", [
    (0.010, 0.025),  # consistent
    (0.030, 0.010),  # inverted: the US3L step measured 3x faster than the base step
    (0.020, 0.020),  # equal
    (0.010, 0.0100001),  # the US3L step barely slower
])
def test_projection_is_never_negative(smoke_config, t_base, t_us3l):
    """Noisy, even inverted, step times: every stage's step is positive and no stage that
    trains sub-networks is projected faster than the base-only step."""
    p = bench.project(smoke_config, LABEL, synthetic_case(smoke_config, t_base, t_us3l),
                      draws=3)
    assert p["status"] == "ok" and p["from_mode"] == "per_width" and p["hours"] > 0
    scale = p["batch_scale"]
    assert math.isclose(p["base_step_s"], t_base * scale)
    stages = p["stages"]
    assert set(stages) == {"1", "2", "3", "4"}
    assert math.isclose(stages["1"]["step_s"], p["base_step_s"])  # base-only, as measured
    for k in ("2", "3", "4"):
        assert stages[k]["mean_macs"] > stages["1"]["mean_macs"]
        assert stages[k]["step_s"] >= p["base_step_s"] > 0
    assert p["fit"]["s_per_mac"] >= 0 and p["fit"]["clipped"] == (t_us3l < t_base)
    if t_us3l >= t_base:  # consistent points are kept exactly (stage 4 = measured widths)
        assert math.isclose(stages["4"]["step_s"], t_us3l * scale)
    else:
        assert all(math.isclose(s["step_s"], p["base_step_s"]) for s in stages.values())
        assert "measured faster than the base step" in p["line"] and p["notes"]
    assert math.isclose(p["compute_s"], sum(s["iterations"] * s["step_s"]
                                            for s in stages.values()))
    assert p["mean_step_s"] >= p["base_step_s"]


def test_fit_is_least_squares_clipped():
    fit = bench.fit_sub_cost((10.0, 1.0), [(20.0, 3.0), (30.0, 5.0)])  # slope 0.2
    assert math.isclose(fit["s_per_mac"], 0.2) and not fit["clipped"]
    assert math.isclose(bench.fitted_step_s(fit, 25.0), 4.0)
    assert bench.fitted_step_s(fit, 5.0) == 1.0  # never below the base step
    fit = bench.fit_sub_cost((10.0, 1.0), [(20.0, 0.5)])
    assert fit["clipped"] and fit["raw_s_per_mac"] < 0 and fit["s_per_mac"] == 0.0
    assert bench.fitted_step_s(fit, 40.0) == 1.0


def test_other_mode_stands_in(smoke_config):
    """The config's mode (per_width) was cut by the budget, accumulate was measured: the
    projection uses accumulate's time per MAC and says so."""
    case = synthetic_case(smoke_config, 0.01, 0.02, measured=("accumulate",),
                          skipped=("per_width",))
    p = bench.project(smoke_config, LABEL, case, draws=3)
    assert p["status"] == "ok" and p["update_mode"] == "per_width"
    assert p["from_mode"] == "accumulate"
    assert math.isclose(p["us3l_step_s"], 0.02 * p["batch_scale"])
    note = "US3L step time from the 'accumulate' mode: 'per_width' was skipped by the time budget"
    assert p["notes"] == [note] and note in p["line"]
    # Not measured at all (the smoke's float32 case measures only accumulate): said as such.
    case = synthetic_case(smoke_config, 0.01, 0.02, measured=("accumulate",))
    case["update_modes"] = ["accumulate"]
    p = bench.project(smoke_config, LABEL, case, draws=3)
    assert p["from_mode"] == "accumulate" and "'per_width' was not measured (the case " \
        "measures modes accumulate)" in p["line"]


def test_base_step_alone_is_a_lower_bound(smoke_config):
    """No US3L step measured: skipped with the reason, plus the base step's lower bound."""
    case = synthetic_case(smoke_config, 0.01, None, measured=(),
                          skipped=("accumulate", "per_width"))
    p = bench.project(smoke_config, LABEL, case, draws=3)
    assert p["status"] == "skipped" and "hours" not in p
    assert p["reason"] == ("no US3L step was measured (us3l_per_width: skipped by the time "
                           "budget; us3l_accumulate: skipped by the time budget)")
    bound = p["lower_bound"]
    assert math.isclose(bound["step_s"], 0.01 * p["batch_scale"])
    assert bound["compile_s"]["cold"] == 3.5  # the base variant's programs
    assert math.isclose(bound["hours"], (p["total_steps"] * bound["step_s"] + 3.5) / 3600)
    assert p["line"].startswith(f"{LABEL} (bfloat16): skipped (no US3L step") and \
        "at least" in p["line"]
    g = bench.goals([dict(p, config=bench.GOAL["config"])], bench.device_peak("cpu"))
    assert math.isclose(g["lower_bound_minutes"], bound["hours"] * 60)
    assert "projected_minutes" not in g and "at least" in g["note"]
    # Nothing measured at all (the budget ran out before the case's first mode).
    case = synthetic_case(smoke_config, 0.01, None, measured=(),
                          skipped=("base", "accumulate", "per_width"))
    p = bench.project(smoke_config, LABEL, case, draws=3)
    assert p["status"] == "skipped" and p["reason"] == (
        f"the base step of case {MEASURED} was skipped by the time budget")


def test_unmeasured_cases_are_skipped_not_errors(smoke_config):
    cases = [synthetic_case(smoke_config, 0.01, 0.02, measured=("accumulate",),
                            skipped=("per_width",)),
             dict(name="cifar_r18_fp32", status="error", error="RuntimeError: boom"),
             dict(name="imagenet_r50_bf16", status="skipped",
                  reason="estimated 200 s > remaining budget 10 s")]
    projs = {(p["config"], p["case"]): p for p in bench.projections(cases, smoke=True)}
    assert {p["status"] for p in projs.values()} == {"ok", "skipped"}
    assert projs[LABEL, "cifar_r18_fp32"]["reason"] == \
        "case cifar_r18_fp32 failed: RuntimeError: boom"
    assert projs["configs/us3l_imagenet.py:resnet50", "imagenet_r50_bf16"]["reason"] == \
        "case imagenet_r50_bf16 was skipped: estimated 200 s > remaining budget 10 s"
    for p in projs.values():
        if p["case"] == MEASURED:
            assert p["status"] == "ok" and p["from_mode"] == "accumulate"
            assert all(s["step_s"] > 0 for s in p["stages"].values())


def test_smoke_vit_fits_its_patches():
    """The smoke's tiny ViT views split into whole patches (8 px, patch 4)."""
    case = next(c for c in bench.CASES if c.name == "vit_tiny_bf16")
    config = bench.case_config(case, smoke=True)
    assert config.data.image_size % config.model.patch_size == 0
    assert bench.bench_step.forward_macs(config, 0.25, config.data.image_size, True)


@pytest.mark.parametrize("kind, name", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L4", "L4"), ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"),
    ("TPU v5", "TPU v5p"), ("TPU v5p", "TPU v5p"), ("TPU v6 lite", "TPU v6e"), ("cpu", None),
    ("NVIDIA L40S", None)])
def test_peak_table(kind, name):
    peak = bench.device_peak(kind)
    assert peak["name"] == name
    if name is None:
        assert peak["bfloat16"] is None and kind in peak["note"]
    else:
        assert peak["bfloat16"] >= peak["float32"] > 1e13


@pytest.mark.parametrize("extra, message", [
    (["--cases", "cifar_r18,vit"], "--cases: unknown case(s) cifar_r18, vit; valid:"),
    (["--budget-s", "0"], "--budget-s must be > 0, got 0.0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--out", "/nonexistent/dir/x.json"], "folder /nonexistent/dir does not exist"),
])
def test_bad_arguments(extra, message, capsys, tmp_path):
    argv = ["--smoke", "--out", str(tmp_path / "x.json")] + extra
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


official = load_experiment("official_step_torch")


def test_official_driver_help(capsys):
    """The PyTorch driver imports nothing heavy at load time and has a --help (it needs a CUDA
    device to run, which tests do not have)."""
    with pytest.raises(SystemExit) as e:
        official.main(["--help"])
    assert e.value.code == 0 and "--widths" in capsys.readouterr().out
