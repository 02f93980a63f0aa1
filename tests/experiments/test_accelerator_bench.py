"""experiments/accelerator_bench.py: one ``--smoke`` run (the CIFAR bf16 case: base-only and
US3L steps in both update modes, cold and cached compiles, input, projections) checked for
field presence and arithmetic consistency; the peak table and argument errors in process.
No assertion depends on how fast this machine is."""
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
        "case imagenet_r50_bf16 was not measured"
    for p in ok:
        assert p["total_steps"] == p["epochs"] * p["steps_per_epoch"] == sum(
            s["iterations"] for s in p["stages"].values())
        assert p["steps_per_epoch"] == 50000 // 512 and p["batch_scale"] == 512 / case["batch"]
        assert math.isclose(p["base_step_s"], t_base * p["batch_scale"])
        assert math.isclose(p["us3l_step_s"], t_us3l * p["batch_scale"])
        # Stage 1 is base-only; stage 4 draws exactly the measured widths (s=2: 1.0, 0.25).
        assert math.isclose(p["stages"]["1"]["step_s"], p["base_step_s"])
        assert math.isclose(p["stages"]["4"]["step_s"], p["us3l_step_s"])
        assert math.isclose(p["compute_s"], sum(s["iterations"] * s["step_s"]
                                                for s in p["stages"].values()))
        assert math.isclose(p["hours"], (p["compute_s"] + p["compile_s"]["cold"]) / 3600)
        assert p["compile_s"]["cold"] > 0 and p["compile_s"]["cached"] > 0
        assert p["run_mfu"] is None
    g = r["goals"]
    assert g["h100_class"] is False and g["projected_minutes"] == pytest.approx(
        60 * next(p for p in ok if p["config"] == g["config"])["hours"])


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
