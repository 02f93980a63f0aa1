"""experiments/cpu_ratio.py on tiny shapes: one run, its JSON fields and their arithmetic.

No assertion depends on which side is faster (a shared CPU makes timings noise)."""
import json
import math

import pytest

from tests.helpers import load_experiment

pytest.importorskip("torch", reason="cpu_ratio.py times the official step in PyTorch, which "
                                    "is not installed")

# Every test shares one run of the experiment (the module fixture): the whole file is slow.
pytestmark = pytest.mark.slow

# Base width 8 cannot run at 0.25x (the official rounding gives 9 channels): widths 1.0, 0.5.
TINY = ["--base-width", "8", "--image-size", "8", "--batch", "4", "--steps", "1",
        "--widths", "1.0,0.5", "--conv-steps", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_ratio") / "ratio.json"
    record = load_experiment("cpu_ratio").main(TINY + ["--breakdown", "--convs", "--out",
                                                       str(out)])
    return record, json.loads(out.read_text())


def test_step_fields_and_ratio(run):
    record, saved = run
    assert saved == json.loads(json.dumps(record))
    for key in ("official_s", "ours_s", "official_cpu_s", "ours_cpu_s"):
        assert isinstance(saved[key], float) and saved[key] > 0, key
    assert math.isclose(saved["ratio"], saved["official_s"] / saved["ours_s"])
    assert math.isclose(saved["cpu_ratio"], saved["official_cpu_s"] / saved["ours_cpu_s"])
    assert len(saved["official_times"]) == len(saved["ours_times"]) == 1
    assert saved["widths"] == [1.0, 0.5] and saved["batch"] == 4
    assert math.isfinite(saved["loss"])
    assert len(saved["loadavg_before"]) == len(saved["loadavg_after"]) == 3


def test_breakdown_programs(run):
    _, saved = run
    # per_width: augmentation, base network with its update, one sub-network, the finish.
    assert set(saved["program_s"]) == {"views", "base@1", "sub@0.5", "finish"}
    assert all(v > 0 for v in saved["program_s"].values())
    rest = sum(v for k, v in saved["program_s"].items() if k != "views")
    assert math.isclose(saved["ratio_no_views"], saved["official_s"] / (
        saved["ours_s"] * rest / sum(saved["program_s"].values())))


def test_conv_rates(run):
    _, saved = run
    convs = saved["convs"]
    # 4 stages x 2 widths; stage 1 at base 8 has 8 channels at both widths (rounding to 8).
    assert [(r["stage"], r["width"]) for r in convs] == [
        (s, w) for s in (1, 2, 3, 4) for w in (1.0, 0.5)]
    assert convs[0]["channels"] == 8 and convs[0]["side"] == 8 and convs[-1]["side"] == 1
    for r in convs:
        flops = 3 * 2 * r["images"] * r["side"] ** 2 * r["channels"] ** 2 * 9
        assert math.isclose(r["gflop"], flops / 1e9)
        for name in ("xla_nhwc", "xla_nchw", "torch_nchw", "torch_channels_last"):
            assert r[f"{name}_s"] > 0
            assert math.isclose(r[f"{name}_gflops"], flops / r[f"{name}_s"] / 1e9)
        for name in ("xla_nhwc_fwd", "torch_nchw_fwd"):  # the forward: a third of the FLOPs
            assert math.isclose(r[f"{name}_gflops"], flops / 3 / r[f"{name}_s"] / 1e9)
        assert math.isclose(r["xla_over_torch"], r["xla_nhwc_gflops"] / r["torch_nchw_gflops"])
