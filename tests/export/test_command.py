"""python -m us3l_jax.export on a tiny run: every file checked against the JAX model, budget
picks, the width table, and the one-line errors of bad inputs (nothing written)."""
import ast
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import build, calibration as calib, checkpointing, export
from us3l_jax.evaluate import report
from us3l_jax.export import artifacts, command, widths
from us3l_jax.export.__main__ import main
from tests import helpers
from tests.export.conftest import STEP

ALL = "onnx,stablehlo,torch,flax"
TINY_KEY = "custom-cumulative-linear_train-2x64-s0"  # the tiny run's calibration procedure


def _import_file(path, name="exported_model"):
    """The Python file ``path`` imported as a module (as ``import model`` would)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference(workdir, width, x):
    """The slimmable backbone of the checkpoint in eval mode at ``width``, with the stored
    calibrated statistics: what every export must compute."""
    pre = checkpointing.load_pretrained(workdir, abstract_state=build.abstract_state)
    stats, meta = calib.load_stats(calib.stats_path(workdir, pre.step, width, TINY_KEY))
    backbone = build.backbone(pre.config)
    y = backbone.apply({"params": pre.params["backbone"], "batch_stats": stats}, x,
                       width=width, train=False)
    return np.asarray(y), meta


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exports") / "w05")
    card = command.export_run(tiny_run, out, 0.5, formats=ALL.split(","), batch=2,
                              repeats=3, echo=None)
    return out, card


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7])
def test_every_artifact_matches_the_jax_model_at_any_batch(tiny_run, exported, batch):
    """Files take any batch size (exported at a symbolic / dynamic batch; timed at 2)."""
    out, card = exported
    assert sorted(os.listdir(out)) == ["model.msgpack", "model.onnx", "model.py",
                                       "model.safetensors", "model.stablehlo",
                                       "model_card.json"]
    x = np.asarray(jax.random.normal(jax.random.key(7), (batch, 16, 16, 3)), np.float32)
    ref, meta = _reference(tiny_run, 0.5, x)
    assert ref.shape == (batch, 64)  # 0.5 x 128 channels
    assert meta["num_batches"] == 2 and meta["step"] == STEP  # calibrated by the export
    tol = 1e-4 * np.abs(ref).max()
    with open(os.path.join(out, "model.onnx"), "rb") as f:
        np.testing.assert_allclose(artifacts.run_onnx(f.read(), x), ref, rtol=0, atol=tol)
    with open(os.path.join(out, "model.stablehlo"), "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))  # plain JAX, no us3l_jax
    assert str(exp.in_avals[0].shape) == "(batch, 16, 16, 3)"
    assert str(exp.out_avals[0].shape) == "(batch, 64)"
    assert set(exp.platforms) == {"cpu", "cuda", "tpu"}
    np.testing.assert_allclose(np.asarray(exp.call(jnp.asarray(x))), ref, rtol=0, atol=tol)
    plain, variables = command.load_flax(out)
    np.testing.assert_allclose(np.asarray(plain.apply(variables, x, train=False)), ref,
                               rtol=0, atol=tol)
    sd = export.load_safetensors(os.path.join(out, "model.safetensors"))
    assert sd["conv1.weight"].shape == (8, 3, 3, 3)  # OIHW, 0.5 x 16 stem channels
    assert sd["layer4.0.downsample.0.weight"].shape == (64, 32, 1, 1)
    np.testing.assert_array_equal(sd["layer1.0.bn1.running_var"],
                                  variables["batch_stats"]["layer1_0"]["bn1"]["var"])
    # The export checked each file the same way (at batches 1 and 7) before writing it.
    assert card["verified_batches"] == [1, 7]
    checked = {"folded", "onnx", "stablehlo", "torch", "flax"}
    assert checked <= set(card["max_abs_diff_vs_jax"]) <= checked | {"torch model.py"}
    assert max(card["max_abs_diff_vs_jax"].values()) <= tol


def test_onnx_has_a_dynamic_batch_axis(exported):
    import onnx

    out, _ = exported
    model = onnx.load(os.path.join(out, "model.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 16, 16, 3]
    assert model.graph.input[0].name == "images" and model.graph.output[0].name == "features"


@pytest.mark.slow
def test_model_card_describes_the_export(tiny_run, exported):
    out, card = exported
    with open(os.path.join(out, "model_card.json")) as f:
        assert json.load(f) == card
    cost = widths.costs(build.backbone(checkpointing.read_config(tiny_run)), 0.5, 16)
    assert (card["params"], card["macs"]) == (cost["params"], cost["macs"]) == (77352, 1038336)
    assert card["width"] == 0.5 and card["channel_config"] == [8, 16, 32, 64]
    assert card["channels"]["conv1"] == 8 and card["channels"]["layer4_0/conv2"] == 64
    assert card["input"]["shape"] == ["batch", 16, 16, 3]
    assert card["input"]["layout"].startswith("NHWC")
    assert card["input"]["mean"] == [0.4914, 0.4822, 0.4465] and card["input"]["crop"] == 16
    assert card["output"]["shape"] == ["batch", 64]
    assert card["latency_ms"]["batch"] == 2 and card["latency_ms"]["median"] > 0
    assert card["latency_ms"]["device"] == widths.device_name()
    assert card["source"]["step"] == STEP and card["source"]["config_identity"] == \
        checkpointing.identity(checkpointing.read_config(tiny_run))
    assert card["batchnorm"]["folded_into_convs"] and card["probe_accuracy"] == {}
    assert card["batchnorm"]["calibration_procedure"] == {"name": "custom", "key": TINY_KEY}
    assert card["batchnorm"]["calibration"]["num_batches"] == 2
    # Folding drops BN's scale and bias (2 per channel) and adds a conv bias (1 per channel).
    bn_channels = sum(card["channels"].values())
    assert card["folded_params"] == card["params"] - bn_channels
    for name in [*artifacts.FILES.values(), command.TORCH_BUILDER]:
        assert card["files"][name]["bytes"] == os.path.getsize(os.path.join(out, name))
    # The torch builder's description of the network: the CIFAR stem, every channel count.
    arch = card["torch_arch"]
    assert (arch["family"], arch["stem"], arch["stem_channels"]) == ("resnet", "cifar", 8)
    assert arch["blocks"][3] == [[[[3, 2, 32, 64], [3, 1, 64, 64]], 2]]


@pytest.mark.slow
def test_model_py_builds_the_torch_network_of_the_export(exported):
    """``model.py`` (plain PyTorch, written beside the weights) loads ``model.safetensors``
    with every key matched and computes the exported width, imported from the export
    directory as a user would."""
    torch = pytest.importorskip(
        "torch", reason="torch not installed: CI must install the CPU build "
                        "(pip install torch --index-url https://download.pytorch.org/whl/cpu) "
                        "so that model.py is tested")
    out, card = exported
    with open(os.path.join(out, "model.py")) as f:
        tree = ast.parse(f.read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "json", "os", "sys", "torch", "safetensors"}
    net = _import_file(os.path.join(out, "model.py")).load(out)
    assert isinstance(net.maxpool, torch.nn.Identity)  # CIFAR stem: no max-pool
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    plain, variables = command.load_flax(out)
    for batch in (1, 7):
        x = np.asarray(jax.random.normal(jax.random.key(3), (batch, 16, 16, 3)), np.float32)
        ref = np.asarray(plain.apply(variables, x, train=False))
        with torch.no_grad():
            got = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # With torch installed, the export itself checked model.py before writing it.
    assert card["max_abs_diff_vs_jax"]["torch model.py"] <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
def test_budgets_pick_the_widest_width_that_fits(tiny_run, tmp_path):
    """Through the CLI; ``test_widths`` checks budgets on both sides of every width's cost."""
    backbone = build.backbone(checkpointing.read_config(tiny_run))
    macs = widths.costs(backbone, 0.5, 16)["macs"]
    for flag, expected in [(f"--max-macs={macs - 1}", 0.45), ("--max-latency-ms=1e6", 1.0)]:
        out = tmp_path / flag.split("=")[0]
        assert main([f"--workdir={tiny_run}", flag, f"--out={out}", "--format=flax",
                     "--repeats=2"]) == 0
        with open(out / "model_card.json") as f:
            card = json.load(f)
        assert card["width"] == card["budget"]["picked"] == expected, flag
        assert card["budget"]["candidates"] == 19
    # Widest first: an hour-long budget fits 1.0, the first width measured.
    assert card["budget"]["latency_ms"] > 0 and card["budget"]["latency_measured"] == 1


def test_table_lists_every_distinct_width_with_sweep_accuracy(tiny_run, tmp_path, capsys,
                                                             monkeypatch):
    # Timing is tested with the exports; here a latency of 1 ms per million MACs makes the
    # table's numbers exact (and spares compiling 19 networks).
    def fake_latency(backbone, params, width, batch, size, repeats=20):
        assert (batch, size, repeats) == (1, 16, 2)
        return widths.costs(backbone, width, size)["macs"] / 1e6

    monkeypatch.setattr(widths, "latency", fake_latency)
    # A sweep.json as the evaluate CLI writes it, for widths 1.0 and 0.25.
    records = [{"width": w, "protocol": "fast", "accuracy": a, "model": "cifar_resnet18",
                "step": STEP, "dataset": "digits", "input_size": 16, "params": p, "macs": m,
                "calibration_mode": "cumulative"}
               for w, a, p, m in [(1.0, 91.5, 307536, 4042752), (0.25, 80.25, 20888, 542720)]]
    report.write(records, tiny_run)
    try:
        assert main([f"--workdir={tiny_run}", "--table", f"--out={tmp_path}",
                     "--repeats=2"]) == 0
    finally:
        for name in report.FILES:
            os.remove(os.path.join(tiny_run, name))
    text = capsys.readouterr().out
    with open(tmp_path / "width_table.json") as f:
        rows = json.load(f)
    assert [r["width"] for r in rows] == [0.25, 0.3, 0.4, 0.41, 0.45, 0.5, 0.55, 0.59, 0.6,
                                          0.68, 0.7, 0.75, 0.8, 0.83, 0.84, 0.9, 0.93, 0.95,
                                          1.0]
    assert rows[-1]["probe_accuracy"] == {"fast": 91.5}
    assert rows[0]["probe_accuracy"] == {"fast": 80.25} and rows[5]["probe_accuracy"] == {}
    assert (rows[5]["params"], rows[5]["macs"]) == (77352, 1038336)
    assert [r["latency_ms"] for r in rows] == [round(r["macs"] / 1e6, 4) for r in rows]
    line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["0.5"])
    assert line.split() == ["0.5", "77,352", "1,038,336", "1.038"]
    assert text.splitlines()[3].split() == ["1", "307,536", "4,042,752", "4.043", "91.5"]
    png = (tmp_path / "width_table.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("args, message", [
    (["--width=1.5"], "width 1.5 is outside the trained range [0.25, 1.0]"),
    (["--max-params=10k"], "no width fits params <= 10,000 (0.01M): the smallest width 0.25 "
                           "needs 20,888 (0.0209M)"),
    (["--width=0.5", "--format=onnx,tflite"], "unknown format 'tflite'; valid: onnx, "
                                              "stablehlo, torch, flax"),
    (["--max-macs=lots"], "--max-macs 'lots' is not a positive number"),
    (["--width=0.5", "--calibration=exact"], "unknown calibration 'exact'; valid: custom, "
                                             "official_cifar, official_imagenet"),
    (["--width=0.5", "--calibration_batches=0"], "--calibration_batches=0 must be > 0"),
    (["--table", "--calibration=official_cifar"], "--calibration applies to an export, not "
                                                  "to --table"),
    (["--table", "--format=onnx"], "--format applies to an export, not to --table"),
    (["--width=0.5", "--out={FILE}"], "--out {FILE!r} is an existing file"),
    (["--width=0.5", "--out={FULL}"], "--out {FULL!r} is a directory that is not empty"),
    (["--width=0.5", "--workdir={NORUN}"], "no run in {NORUN!r}: config.json not found"),
    # A folder no one can write in (/proc refuses new entries even to root, so this bites
    # under any user): found up front, before the checkpoint is read.
    (["--width=0.5", "--out=/proc/us3l_export_test/w"],
     "--out '/proc/us3l_export_test/w': cannot write in '/proc'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_run, tmp_path, capsys, args,
                                                         message):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep").write_text("x")
    before = sorted(os.listdir(tmp_path))
    paths = {k: str(tmp_path / k) for k in ("FILE", "FULL", "NORUN")}
    # Later flags win: the defaults below are overridden by the case's own.
    argv = [f"--workdir={tiny_run}", f"--out={tmp_path / 'new'}"]
    with pytest.raises(SystemExit) as e:
        main(argv + [a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("python -m us3l_jax.export: error: "), err
    assert message.format(**paths) in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no export, no temporary directory


def test_cli_runs_as_a_module(tmp_path):
    """The installed entry point: a user's shell, exit status 2 and one line on stderr."""
    r = subprocess.run([sys.executable, "-m", "us3l_jax.export", f"--workdir={tmp_path}",
                        "--width=0.5", "--out=" + str(tmp_path / "o")], capture_output=True,
                       text=True, cwd=helpers.REPO, env=dict(os.environ, PYTHONPATH=helpers.REPO),
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"python -m us3l_jax.export: error: no run in {str(tmp_path)!r}: "
                        "config.json not found (was it pretrained with `python -m "
                        "us3l_jax.main --workdir=...`?)\n")
    assert os.listdir(tmp_path) == []


def test_a_disagreeing_file_or_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    ref = np.array([[1.0, -4.0]])
    assert command._verify({"onnx": ref + 1e-5}, ref) == {"onnx": pytest.approx(1e-5)}
    with pytest.raises(RuntimeError, match=r"exported stablehlo disagree with the JAX model"):
        command._verify({"onnx": ref, "stablehlo": ref + 1e-3}, ref)  # > 1e-4 x 4

    def fail(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(command.fileio, "atomic_write_text", fail)  # the card, written last
    with pytest.raises(OSError, match="disk full"):
        command._write_dir(str(tmp_path / "out"), {"onnx": b"x", "torch": b"y"},
                           {"model": "m", "width": 0.5, "files": {}})
    assert os.listdir(tmp_path) == []  # neither the export nor its temporary directory


def test_image_size_defaults_to_the_evaluation_crop_and_out_must_be_new_or_empty(tmp_path):
    config = helpers.demo_config("smoke")
    assert command.image_size(config) == 16 and command.image_size(config, 24) == 24
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"--image-size must be a positive integer, got "
                                             f"{bad!r}"):
            command.image_size(config, bad)
    (tmp_path / "empty").mkdir()
    assert command.check_out(str(tmp_path / "empty")) == str(tmp_path / "empty")
    assert command.check_out(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")


@pytest.mark.slow
def test_training_only_proj_conv_is_left_out(tiny_run, exported):
    """The run trained with intermediate-feature distillation, so its checkpoint holds
    ``proj_conv`` next to the backbone; the export holds the backbone only (and matched the
    JAX model: ``test_every_artifact_matches_the_jax_model``)."""
    params = checkpointing.load_pretrained(tiny_run, abstract_state=build.abstract_state).params
    assert set(params["proj_conv"]) == {"layer2_0", "layer3_0", "layer4_0"}
    out, _ = exported
    sd = export.load_safetensors(os.path.join(out, "model.safetensors"))
    assert sd and not [k for k in sd if "proj" in k or "distill" in k]
    _, variables = command.load_flax(out)
    assert "proj_conv" not in variables["params"]


def test_unwritable_out_is_found_before_any_work(tiny_run, tmp_path, monkeypatch, capsys):
    """A folder without write permission (PermissionError as a non-root user gets it)."""
    def refuse(*args, **kw):
        raise PermissionError(13, "Permission denied")

    def no_work(*args, **kw):
        raise AssertionError("the checkpoint was read before --out was checked")

    monkeypatch.setattr(command.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(checkpointing, "load_pretrained", no_work)
    with pytest.raises(SystemExit) as e:
        main([f"--workdir={tiny_run}", "--width=0.5", f"--out={tmp_path / 'a' / 'b'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"cannot write in {str(tmp_path)!r} (Permission denied)" in err, err
    assert os.listdir(tmp_path) == []


def test_a_format_whose_dependency_is_missing_fails_before_any_work(tiny_run, tmp_path,
                                                                   monkeypatch, capsys):
    """As without the [export] extra: a format asked for by name is one line, exit 2."""
    monkeypatch.setitem(artifacts.REQUIRES, "onnx", ("jax2onnx", "us3l_no_such_module"))
    with pytest.raises(SystemExit) as e:
        main([f"--workdir={tiny_run}", "--width=0.5", f"--out={tmp_path / 'w'}",
              "--format=torch,onnx"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert ("error: format 'onnx' needs us3l_no_such_module, not installed: pip install "
            "'us3l_jax[export]'") in err, err
    assert os.listdir(tmp_path) == []


def test_default_formats_leave_out_what_is_not_installed(tiny_run, tmp_path, monkeypatch,
                                                         capsys):
    """The README's budget command without the [export] extra: the other formats, and a
    note naming what was left out and how to install it."""
    assert artifacts.default_formats() == (list(artifacts.FORMATS), None)
    monkeypatch.setitem(artifacts.REQUIRES, "onnx", ("jax2onnx", "us3l_no_such_module"))
    calls = []
    monkeypatch.setattr(command, "export_run", lambda *a, **kw: calls.append(a))
    assert main([f"--workdir={tiny_run}", "--max-macs=2M", f"--out={tmp_path / 'w'}"]) == 0
    assert calls[0][4] == ["stablehlo", "torch", "flax"]
    err = capsys.readouterr().err
    assert err == ("note: not exporting onnx: us3l_no_such_module not installed (pip install "
                   "'us3l_jax[export]' (from a checkout: pip install -e \".[export]\"))\n")


def test_stablehlo_needs_flatbuffers_and_says_so(monkeypatch):
    """jax.export cannot serialize without flatbuffers (a core dependency, which a --no-deps
    install into a prepared image may lack): found before any work, with its own hint."""
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flatbuffers" else find(name, *a))
    formats, note = artifacts.default_formats()
    assert "stablehlo" not in formats and "torch" in formats
    assert note == "note: not exporting stablehlo: flatbuffers not installed (pip install " \
                   "flatbuffers)"
    with pytest.raises(ValueError, match="format 'stablehlo' needs flatbuffers, not installed: "
                                         "pip install flatbuffers, or leave stablehlo out"):
        artifacts.check_formats("stablehlo")
    # Installed (as here), the serialization the file needs works: without it this raised
    # "Please install 'flatbuffers' in order to use Exported serialization".
    monkeypatch.undo()
    exported = jax.export.export(jax.jit(lambda x: x + 1))(
        jax.ShapeDtypeStruct((2,), jnp.float32))
    assert len(exported.serialize()) > 0


@pytest.mark.parametrize("text", ['{"width": 1.0', "[1, 2]", '{"a": 1}',
                                  '[{"width": "wide", "protocol": "fast", "accuracy": 1}]',
                                  "\udcff"])
def test_a_garbage_sweep_json_is_named_and_ignored(tmp_path, caplog, text):
    path = tmp_path / "sweep.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="us3l_jax.export.command"):
        assert command.read_sweep(str(tmp_path)) == []
    assert f"ignoring unreadable {path}" in caplog.text
    assert "going on without probe accuracies" in caplog.text
    good = [{"width": 1.0, "protocol": "fast", "accuracy": 91.5}]
    path.write_text(json.dumps(good))
    assert command.read_sweep(str(tmp_path)) == good


@pytest.mark.slow
def test_corrupt_bn_stats_and_sweep_are_named_and_the_export_goes_on(tiny_run, tmp_path,
                                                                     caplog):
    """A corrupt statistics file is moved aside (kept: the export did not write it) and
    recalibrated; a garbage sweep.json costs only the probe accuracies."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    path = calib.stats_path(run, STEP, 0.75, TINY_KEY)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x93garbage that is not msgpack")
    with open(os.path.join(run, "sweep.json"), "w") as f:
        f.write('{"width": 1.0, ')
    with caplog.at_level(logging.WARNING, logger="us3l_jax.export.command"):
        card = command.export_run(run, str(tmp_path / "out"), 0.75, formats=["flax"],
                                  repeats=1, echo=None)
    assert f"BN statistics {path} are unreadable" in caplog.text
    assert f"moved to {path}.corrupt, recalibrating" in caplog.text
    assert f"ignoring unreadable {os.path.join(run, 'sweep.json')}" in caplog.text
    with open(path + ".corrupt", "rb") as f:
        assert f.read() == b"\x93garbage that is not msgpack"
    stats, meta = calib.load_stats(path)  # recalibrated and stored
    assert meta["num_batches"] == 2 and meta["width"] == 0.75
    assert card["batchnorm"]["calibration_reused"] is False and card["probe_accuracy"] == {}
    assert os.listdir(tmp_path / "out") == ["model.msgpack", "model_card.json"] or \
        sorted(os.listdir(tmp_path / "out")) == ["model.msgpack", "model_card.json"]


def test_calibration_flag_picks_the_statistics_and_the_card_names_them(tiny_run, tmp_path,
                                                                       capsys,
                                                                       fake_calibrations):
    """``--calibration`` exports that procedure's statistics (calibrated by a stand-in here),
    says which in its output line and records name, key and settings in the card; without
    it, the run's ``eval.calibration``, whose statistics are kept apart (reuse:
    test_api.py)."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    shutil.rmtree(os.path.join(run, calib.STATS_DIR), ignore_errors=True)  # other tests'
    cifar = "official_cifar-ema-linear_train-9x128-s0"
    cards = {}
    for name, flags in (("cifar", ["--calibration=official_cifar"]), ("default", [])):
        main([f"--workdir={run}", "--width=0.5", "--format=flax", "--repeats=1",
              f"--out={tmp_path / name}", *flags])
        with open(tmp_path / name / command.CARD) as f:
            cards[name] = json.load(f)["batchnorm"]
    out = capsys.readouterr().out
    assert re.findall(r"BN statistics (\S+) (calibrated now|reused)\) to ", out) == [
        (cifar, "calibrated now"), (TINY_KEY, "calibrated now")]
    assert len(fake_calibrations) == 2
    assert cards["cifar"]["calibration_procedure"] == {"name": "official_cifar", "key": cifar}
    assert cards["default"]["calibration_procedure"] == {"name": "custom", "key": TINY_KEY}
    assert (cards["cifar"]["calibration"]["mode"], cards["cifar"]["calibration"]["num_batches"],
            cards["cifar"]["calibration"]["batch_size"]) == ("ema", 9, 128)
    assert cards["default"]["calibration"]["mode"] == "cumulative"
    # The files hold the statistics of their procedure: the stand-in's 1st and 2nd calls.
    for name, n in (("cifar", 1.0), ("default", 2.0)):
        _, variables = command.load_flax(str(tmp_path / name))
        assert variables["batch_stats"]["bn1"]["mean"][0] == n


def test_unverified_checkpoints_need_the_trust_flag(tiny_run, tmp_path, capsys,
                                                    fake_calibrations):
    """A run whose checkpoints lack their checksum file is refused in one line naming the
    flag that uses them (nothing written); with the flag, it exports."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    os.remove(os.path.join(run, "checkpoints", str(STEP), checkpointing.CHECKSUM_FILE))
    argv = [f"--workdir={run}", "--width=0.5", "--format=flax", "--repeats=1",
            f"--out={tmp_path / 'out'}"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == (
        f"python -m us3l_jax.export: error: no readable checkpoint in {run!r} (steps [{STEP}]); "
        "1 of them only lack their us3l_checksums.json: --trust_unverified_checkpoints uses "
        "them")
    assert not (tmp_path / "out").exists()

    assert main(argv + ["--trust_unverified_checkpoints"]) == 0
    with open(tmp_path / "out" / command.CARD) as f:
        assert json.load(f)["source"]["step"] == STEP
