"""End to end on a tiny run pretrained briefly on digits: the sweep, its report, stored
statistics, online monitoring, and the errors of bad inputs (also through the CLI)."""
import json
import os
import shutil
import stat
import struct
import subprocess
import sys

import pytest

from us3l_jax import build, calibration as calib, checkpointing, paper, pretrain, profile
from us3l_jax.data import datasets
from us3l_jax.evaluate.online import OnlineEvaluator
from us3l_jax.evaluate.sweep import run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDTHS = (1.0, 0.5, 0.25)
STEP = 8
# Digits chance is 10%. A linear probe on these 16 px digits is far above chance for any
# working feature path (measured: a random-init network of this size 64% at 0.25x and 89% at
# 1.0x; this 8-step run 77% / 88% / 94% at 0.25x / 0.5x / 1.0x), while features misaligned
# with their labels give ~10% (the shuffled-label probe test). 50% (5x chance) separates the
# two with a wide margin on the 359-image test set.
THRESHOLD = 50.0


def demo_config():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    c = demo.get_config("smoke")
    c.train.max_steps = STEP  # 8 steps of the base width (dynamic sampling stage 1)
    c.train.checkpoint_every_steps = STEP
    c.train.compile_ahead = False
    c.eval.calibration_batches = 4
    c.eval.online_calibration_batches = 4
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    pretrain.train(demo_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def sweep(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    records = run_sweep(run, WIDTHS, "fast,knn", out=out, paper_row="table2/resnet18/ours",
                        echo=None)
    return out, records


@pytest.mark.slow
def test_sweep_writes_json_markdown_and_png(run, sweep):
    out, records = sweep
    with open(os.path.join(out, "sweep.json")) as f:
        saved = json.load(f)
    assert saved == records and len(records) == 6
    assert [(r["width"], r["protocol"]) for r in records] == [
        (w, p) for w in WIDTHS for p in ("fast", "knn")]
    config = checkpointing.read_config(run)
    for r in records:
        cost = profile.profile("cifar_resnet18", r["width"], 16, None, "backbone",
                               base_width=16, stage_sizes=(1, 1, 1, 1))
        assert (r["params"], r["macs"]) == (cost["params"], cost["macs"])
        assert r["dataset"] == "digits" and r["step"] == STEP and r["input_size"] == 16
        assert r["num_test"] == 359 and r["calibration_batches"] == 4
        assert r["paper_accuracy"] == paper.get("table2/resnet18/ours").at(r["width"])
        assert 0.0 <= r["accuracy"] <= 100.0
    assert config.model.name == records[0]["model"]
    macs = [r["macs"] for r in records if r["protocol"] == "fast"]
    assert macs == sorted(macs, reverse=True)
    md = open(os.path.join(out, "sweep.md")).read()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0].split("|")[4:7] == [" fast top-1 (%) ", " knn top-1 (%) ",
                                        " paper: Table 2 R-18 Ours (%) "]
    assert len(lines) == 2 + len(WIDTHS)
    fast = {r["width"]: r["accuracy"] for r in records if r["protocol"] == "fast"}
    assert lines[2].split("|")[1:2] == [" 1.0 "] and f"{fast[1.0]:.1f}" in lines[2]
    assert lines[4].rstrip(" |").endswith("60.4")  # the paper's 0.25x
    png = open(os.path.join(out, "sweep.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_fast_probe_is_well_above_chance_at_every_width(sweep):
    _, records = sweep
    fast = {r["width"]: r["accuracy"] for r in records if r["protocol"] == "fast"}
    assert set(fast) == set(WIDTHS)
    assert min(fast.values()) > THRESHOLD, fast


@pytest.mark.slow
def test_statistics_are_stored_per_width_and_reused(run, sweep, tmp_path):
    _, first = sweep
    key = first[0]["calibration_procedure"]
    assert key == "custom-cumulative-linear_train-4x64-s0"
    for w in WIDTHS:
        stats, meta = calib.load_stats(calib.stats_path(run, STEP, w, key))
        assert meta["width"] == w and meta["num_batches"] == 4 and meta["mode"] == "cumulative"
    again = run_sweep(run, [0.5], "fast", out=str(tmp_path), echo=None)
    assert again[0]["calibration_reused"] is True
    before = next(r for r in first if r["width"] == 0.5 and r["protocol"] == "fast")
    assert again[0]["accuracy"] == before["accuracy"]
    # Different settings are another procedure: calibrated into their own file; the first
    # procedure's files stay as they were.
    kept = {w: calib.load_stats(calib.stats_path(run, STEP, w, key))[1] for w in WIDTHS}
    changed = run_sweep(run, [0.5], "fast", out=str(tmp_path), calibration_batches=2,
                        echo=None)
    other = changed[0]["calibration_procedure"]
    assert changed[0]["calibration_reused"] is False
    assert other == "custom-cumulative-linear_train-2x64-s0"
    assert calib.load_stats(calib.stats_path(run, STEP, 0.5, other))[1]["num_batches"] == 2
    assert {w: calib.load_stats(calib.stats_path(run, STEP, w, key))[1]
            for w in WIDTHS} == kept


@pytest.mark.slow
def test_official_calibration_procedures(run, tmp_path):
    """Named official procedures reach the calibration: EMA, 128-image batches and the
    linear-eval crops (CIFAR); the SSL views and the per-device batch (ImageNet). Each keeps
    its own statistics: the second evaluation with a procedure reuses its file."""
    cifar = run_sweep(run, [0.5], "fast", out=str(tmp_path / "c"), calibration="official_cifar",
                      calibration_batches=2, echo=None)
    cifar_key = cifar[0]["calibration_procedure"]
    assert cifar_key == "official_cifar-ema-linear_train-2x128-s0"
    meta = calib.load_stats(calib.stats_path(run, STEP, 0.5, cifar_key))[1]
    assert (meta["mode"], meta["batch_size"], meta["augment"], meta["num_batches"]) == \
        ("ema", 128, "linear_train", 2)
    assert cifar[0]["calibration"] == "official_cifar" and not cifar[0]["calibration_reused"]
    imagenet = run_sweep(run, [0.5], "fast", out=str(tmp_path / "i"),
                         calibration="official_imagenet", calibration_batches=2, echo=None)
    imagenet_key = imagenet[0]["calibration_procedure"]
    meta = calib.load_stats(calib.stats_path(run, STEP, 0.5, imagenet_key))[1]
    assert (meta["mode"], meta["batch_size"], meta["augment"]) == ("ema", 32, "ssl")
    again = run_sweep(run, [0.5], "fast", out=str(tmp_path / "c2"),
                      calibration="official_cifar", calibration_batches=2, echo=None)
    assert again[0]["calibration_reused"] is True
    assert again[0]["accuracy"] == cifar[0]["accuracy"]
    with pytest.raises(ValueError, match="unknown calibration 'exact'; valid: custom, "):
        run_sweep(run, [0.5], "fast", out=str(tmp_path / "x"), calibration="exact", echo=None)


@pytest.mark.slow
def test_online_evaluator_matches_the_sweep_knn(run, sweep):
    _, records = sweep
    params = checkpointing.load_pretrained(run, abstract_state=build.abstract_state).params
    online = OnlineEvaluator(checkpointing.read_config(run), widths=(1.0, 0.25))
    metrics = online(params, STEP)
    knn = {r["width"]: r["accuracy"] for r in records if r["protocol"] == "knn"}
    assert set(metrics) == {"knn/w1.0", "knn/w0.25"}
    # Same calibration budget and seed as the sweep: the same statistics, the same accuracy.
    assert metrics["knn/w1.0"] == pytest.approx(knn[1.0], abs=1e-3)
    assert metrics["knn/w0.25"] == pytest.approx(knn[0.25], abs=1e-3)
    with pytest.raises(ValueError, match="online protocol 'paper' is too costly"):
        OnlineEvaluator(checkpointing.read_config(run), protocol="paper")


@pytest.mark.slow
def test_bad_inputs_raise_clear_errors(run, tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="no run in .*config.json not found"):
        run_sweep(str(tmp_path / "missing"), echo=None)
    empty = tmp_path / "empty"
    checkpointing.write_config(str(empty), checkpointing.read_config(run))
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in"):
        run_sweep(str(empty), [1.0], "fast", echo=None)
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint for step 3"):
        run_sweep(run, [1.0], "fast", step=3, echo=None)
    with pytest.raises(ValueError, match=r"width 0.2 is outside the trained range \[0.25, 1.0\]"):
        run_sweep(run, [1.0, 0.2], "fast", echo=None)
    with pytest.raises(ValueError, match="unknown protocol 'linear'; valid: fast, knn, paper"):
        run_sweep(run, [1.0], "linear", echo=None)
    with pytest.raises(datasets.DatasetNotFoundError, match="unknown dataset 'mnist'"):
        run_sweep(run, [1.0], "fast", dataset="mnist", echo=None)
    with pytest.raises(ValueError, match="unknown paper row 'table2/vgg/ours'"):
        run_sweep(run, [1.0], "fast", paper_row="table2/vgg/ours", echo=None)


def evaluate_cli(*flags):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "us3l_jax.evaluate", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def read_events(logdir):
    """(tag, step, value) of every scalar and text summary in TensorBoard event files (TFRecord
    framing: length, its CRC, the Event proto, its CRC), read without TensorFlow."""
    from tensorboardX.proto import event_pb2
    out = []
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                text = v.tensor.string_val[0].decode() if v.tensor.string_val else None
                out.append((v.tag, event.step, v.simple_value if text is None else text))
    return out


@pytest.mark.slow
def test_sweep_goes_to_tensorboard(sweep):
    out, records = sweep
    events = read_events(os.path.join(out, "tb"))
    scalars = {tag: (step, value) for tag, step, value in events if not isinstance(value, str)}
    assert scalars == {f"sweep/digits/{r['protocol']}/w{r['width']}": (STEP, pytest.approx(
        r["accuracy"], abs=1e-4)) for r in records}
    texts = {tag.split("/")[0]: value for tag, _, value in events if isinstance(value, str)}
    assert json.loads(texts["config"])["data"]["dataset"] == "digits"
    assert texts["sweep"].splitlines()[2].startswith("| width | params | MACs | fast top-1")


@pytest.mark.slow
def test_evaluate_never_overwrites_a_report(run, sweep):
    """The CLI writes each evaluation to a new folder; the run's own sweep stays as it was."""
    run_sweep(run, [1.0], "fast", echo=None)  # the run's own sweep, as pretraining writes it
    own = {f: open(os.path.join(run, f), "rb").read() for f in ("sweep.json", "sweep.md",
                                                                 "sweep.png")}
    old_umask = os.umask(0o022)
    try:  # the hyphenated spelling of the argparse version still works
        proc = evaluate_cli(f"--workdir={run}", "--widths=0.5", "--protocol=knn",
                            "--calibration-batches=4")
    finally:
        os.umask(old_umask)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = os.path.join(run, "eval", "knn-0.5")
    assert f"wrote {first}/sweep.json" in proc.stdout
    assert [(r["width"], r["protocol"]) for r in json.load(open(
        os.path.join(first, "sweep.json")))] == [(0.5, "knn")]
    for d, _, files in os.walk(first):
        for f in files:  # sweep.* and the TensorBoard events: readable by others
            assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o644, f
    # The same evaluation again: the next free folder.
    again = run_sweep(run, [0.5], "knn", echo=None, new_report=True)
    assert json.load(open(os.path.join(run, "eval", "knn-0.5-2", "sweep.json"))) == again
    assert {f: open(os.path.join(run, f), "rb").read() for f in own} == own
    # --out naming a folder that holds a sweep: refused before any work, nothing written.
    proc = evaluate_cli(f"--workdir={run}", f"--out={run}", "--widths=0.5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"python -m us3l_jax.evaluate: error: {run} already holds a sweep (sweep.json, "
        "sweep.md, sweep.png); choose another --out, or leave it out for a new folder under "
        "<workdir>/eval/"]
    assert sorted(os.listdir(os.path.join(run, "eval"))) == ["knn-0.5", "knn-0.5-2"]


def test_cli_help_lists_flags_and_protocols():
    proc = evaluate_cli("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "--calibration_batches: BN calibration batches" in proc.stdout
    assert "Protocols: fast (" in proc.stdout and "knn (" in proc.stdout
    assert "paper (" in proc.stdout
    proc = evaluate_cli("--widths=1.0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("python -m us3l_jax.evaluate: error: --workdir is required, "
                                   "e.g. --workdir=/tmp/us3l_demo")


@pytest.mark.slow
def test_cli_exits_nonzero_with_one_line(run):
    proc = evaluate_cli(f"--workdir={run}", "--widths=1.0,0.1", "--protocol=fast")
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert errors == ["python -m us3l_jax.evaluate: error: width 0.1 is outside the trained "
                      "range [0.25, 1.0] (config.sampler.width_range)"], proc.stderr


@pytest.mark.slow
def test_transfer_dataset_through_the_loaders(run, sweep, tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=96):
        records = run_sweep(run, [0.25], "fast,knn", dataset="oxford_flowers102",
                            out=str(tmp_path), echo=None)
        # Flowers trains on train+validation (the mock serves 96 examples for any split).
        n_train = datasets.num_examples("oxford_flowers102", "train+validation")
    assert [(r["dataset"], r["protocol"]) for r in records] == [
        ("oxford_flowers102", "fast"), ("oxford_flowers102", "knn")]
    assert (records[0]["num_train"], records[0]["num_test"]) == (n_train, 96) == (96, 96)
    assert records[0]["input_size"] == 16  # the run's 16 px crop of images stored at 18 px
    # Calibrated on Flowers' own training split, stored apart from the digits statistics.
    key = "custom-cumulative-linear_train-4x64-s0"
    _, meta = calib.load_stats(calib.stats_path(run, STEP, 0.25, key, "oxford_flowers102"))
    assert meta["dataset"] == "oxford_flowers102"
    assert calib.load_stats(calib.stats_path(run, STEP, 0.25, key))[1]["dataset"] == "digits"


@pytest.mark.parametrize("flag,message", [
    ("--widths=", "--widths is empty; give a value or leave the flag out for the default"),
    ("--protocol=", "--protocol is empty"),
    ("--calibration-batches=0", "--calibration_batches=0 must be > 0"),
    ("--epochs=-1", "--epochs=-1 must be > 0"),
    ("--out=/proc/us3l_eval", "--out=/proc/us3l_eval: /proc/us3l_eval is on a virtual file "
                              "system (proc)"),
])
def test_cli_refuses_empty_or_bad_flags_before_any_work(tmp_path, capsys, flag, message):
    """Checked before the run is even opened (the workdir here does not exist): an empty
    flag would otherwise silently mean its default."""
    from us3l_jax.evaluate import __main__ as cli_main
    with pytest.raises(SystemExit) as e:
        cli_main.main([f"--workdir={tmp_path}/none", flag])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m us3l_jax.evaluate: error: {message}")


def test_cli_out_naming_an_existing_file_is_refused_and_kept(tmp_path, capsys):
    from us3l_jax.evaluate import __main__ as cli_main
    target = tmp_path / "results.txt"
    target.write_text("keep")
    with pytest.raises(SystemExit) as e:
        cli_main.main([f"--workdir={tmp_path}", f"--out={target}"])
    assert e.value.code == 2 and target.read_text() == "keep"
    assert "it exists and is a file, not a directory" in capsys.readouterr().err


def test_cli_workdir_that_cannot_hold_the_report_needs_out(tmp_path, capsys):
    """The report and new BN statistics go into the workdir unless --out is given: a workdir
    where they cannot be written (here its ``eval`` is taken by a file; a read-only mount
    is the usual case) is one line and exit 2 before any work, and nothing is written."""
    from us3l_jax.evaluate import __main__ as cli_main
    (tmp_path / "eval").write_text("keep")
    with pytest.raises(SystemExit) as e:
        cli_main.main([f"--workdir={tmp_path}", "--widths=1.0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m us3l_jax.evaluate: error: --workdir={tmp_path} cannot hold the "
                   f"report ({tmp_path}/eval is a file, so no directory can be created below "
                   f"it); give --out=DIR for the report and the calibrated BN statistics"]
    assert os.listdir(tmp_path) == ["eval"] and (tmp_path / "eval").read_text() == "keep"


@pytest.mark.slow
def test_statistics_go_to_out_when_the_workdir_cannot_take_them(run, sweep, tmp_path):
    """A run whose ``bn_stats`` cannot be written (taken by a file here; read-only in
    practice) stores new statistics in ``--out`` and reuses them from there; with no place
    to store them the evaluator refuses before calibrating."""
    import shutil

    from us3l_jax.evaluate.evaluator import Evaluator
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    shutil.rmtree(os.path.join(copy, calib.STATS_DIR), ignore_errors=True)
    with open(os.path.join(copy, calib.STATS_DIR), "w") as f:
        f.write("keep")
    out = str(tmp_path / "out")
    first = run_sweep(copy, [0.25], "fast", out=out, echo=None)
    assert first[0]["calibration_reused"] is False
    _, meta = calib.load_stats(calib.stats_path(out, STEP, 0.25,
                                                first[0]["calibration_procedure"]))
    assert (meta["width"], meta["step"], meta["num_batches"]) == (0.25, STEP, 4)

    ev = Evaluator(checkpointing.read_config(copy))
    params = checkpointing.load_pretrained(
        copy, abstract_state=build.abstract_state).params["backbone"]
    settings = calib.CalibrationSettings(num_batches=2, batch_size=64, seed=0)
    _, reused = ev.calibrated(params, 0.25, settings, copy, STEP, store_in=out)
    assert reused is False  # other settings than the sweep's: calibrated, stored in out
    key = calib.procedure_key("custom", settings)
    assert calib.load_stats(calib.stats_path(out, STEP, 0.25, key))[1]["num_batches"] == 2
    _, reused = ev.calibrated(params, 0.25, settings, copy, STEP, store_in=out)
    assert reused is True
    with pytest.raises(ValueError, match="cannot store calibrated BN statistics: .*bn_stats/"
                                         f"step_8/{key}/width_0.25.msgpack: .*bn_stats is a "
                                         "file"):
        ev.calibrated(params, 0.25, settings, copy, STEP, recalibrate=True)
    assert open(os.path.join(copy, calib.STATS_DIR)).read() == "keep"


@pytest.mark.slow
def test_unverified_checkpoints_need_the_trust_flag(run, tmp_path, capsys):
    """A run whose checkpoints lack their checksum file (written before checksums existed, or
    the file was lost) is refused with the flag that uses them named; with it, the sweep
    runs on that checkpoint."""
    from us3l_jax.evaluate import __main__ as cli_main
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    for step in checkpointing.Checkpointer(copy, demo_config()).all_steps():
        os.remove(os.path.join(copy, "checkpoints", str(step), checkpointing.CHECKSUM_FILE))
    with pytest.raises(SystemExit) as e:
        cli_main.main([f"--workdir={copy}", "--widths=1.0", "--protocol=fast"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"(steps [{STEP}]); 1 of them only lack their us3l_checksums.json: "
        "--trust_unverified_checkpoints uses them")
    assert sorted(os.listdir(copy)) == sorted(os.listdir(run))  # no report, no statistics
    reports = lambda: set(os.listdir(os.path.join(copy, "eval")))  # noqa: E731
    before = reports() if os.path.isdir(os.path.join(copy, "eval")) else set()

    assert cli_main.main([f"--workdir={copy}", "--widths=1.0", "--protocol=fast",
                          "--trust_unverified_checkpoints"]) == 0
    (report,) = reports() - before
    records = json.load(open(os.path.join(copy, "eval", report, "sweep.json")))
    assert [(r["step"], r["width"]) for r in records] == [(STEP, 1.0)]
