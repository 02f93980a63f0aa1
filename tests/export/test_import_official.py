"""python -m us3l_jax.import_official: a state dict in the official layout, written here from
one of our own runs, becomes a workdir whose features at a width equal the original run's,
and that evaluate's and export's loaders accept; bad input is one line, exit 2, nothing
written."""
import json
import os

import jax
import numpy as np
import pytest

from us3l_jax import build, checkpointing, export, torch_layout
from us3l_jax.export import command
from us3l_jax.import_official import main

SMOKE = ["--config=configs/demo.py:smoke", "--config.eval.calibration_batches=2"]


def _official_state_dict(workdir):
    """The run's backbone as the official checkpoint's state_dict would hold it: the online
    encoder under module.encoder_q (with a projector under fc.*) and a momentum encoder
    under module.encoder_k, which the import drops."""
    pre = checkpointing.load_pretrained(workdir, abstract_state=build.abstract_state)
    sd = torch_layout.to_torch_state_dict(
        pre.config.model.name, {"params": jax.device_get(pre.params["backbone"])}, 1.0,
        **build.architecture_kwargs(pre.config))
    out = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    out.update({f"module.encoder_k.{k}": v for k, v in sd.items()})
    out["module.encoder_q.fc.0.weight"] = np.ones((32, 128), np.float32)
    out["module.encoder_q.fc.0.bias"] = np.ones((32,), np.float32)
    return out


@pytest.fixture(scope="module")
def state_dict(tiny_run, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("official") / "ckpt.safetensors")
    torch_layout.save_safetensors(path, _official_state_dict(tiny_run))
    return path


@pytest.mark.slow
def test_imported_run_has_the_features_of_the_original(tiny_run, state_dict, tmp_path, capsys):
    workdir = str(tmp_path / "imported")
    assert main([f"--state_dict={state_dict}", f"--workdir={workdir}"] + SMOKE) == 0
    assert "imported cifar_resnet18 from" in capsys.readouterr().out
    with open(os.path.join(workdir, "imported.json")) as f:
        record = json.load(f)
    assert record["state_dict"] == state_dict and len(record["sha256"]) == 64
    original = checkpointing.load_pretrained(tiny_run, abstract_state=build.abstract_state)
    imported = checkpointing.load_pretrained(workdir, abstract_state=build.abstract_state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(imported.params["backbone"]),
                 jax.device_get(original.params["backbone"]))  # bitwise
    x = np.asarray(jax.random.normal(jax.random.key(0), (7, 16, 16, 3)), np.float32)
    want = np.asarray(export.load(tiny_run).at(0.5)(x))
    got = np.asarray(export.load(workdir).at(0.5)(x))  # calibrated the same way, same data
    np.testing.assert_array_equal(got, want)
    card = command.export_run(workdir, str(tmp_path / "w05"), 0.5, formats=["flax"],
                              repeats=1, echo=None)
    assert card["source"]["step"] == 0 and card["channel_config"] == [8, 16, 32, 64]


@pytest.mark.parametrize("case, message", [
    ("missing", "--state_dict {MISSING!r} does not exist"),
    ("garbage", "--state_dict {GARBAGE!r} is not a readable safetensors file"),
    ("wrong_size", "cifar_resnet18 state dict key 'bn1.bias': shape (16,), expected (32,) "
                   "at width 1.0"),
    ("full", "is not empty; give a new or empty directory"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_run, state_dict, tmp_path,
                                                         capsys, case, message):
    paths = {"MISSING": str(tmp_path / "missing.safetensors"),
             "GARBAGE": str(tmp_path / "garbage.safetensors")}
    with open(paths["GARBAGE"], "wb") as f:
        f.write(b"not safetensors")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    sd = {"missing": paths["MISSING"], "garbage": paths["GARBAGE"]}.get(case, state_dict)
    workdir = tmp_path / ("full" if case == "full" else "new")
    # A state dict of the base-width-16 run read as base width 32: every conv misfits.
    extra = ["--config.model.base_width=32"] if case == "wrong_size" else []
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        main([f"--state_dict={sd}", f"--workdir={workdir}"] + SMOKE + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("python -m us3l_jax.import_official: error: "), err
    assert message.format(**paths) in err, err
    assert sorted(os.listdir(tmp_path)) == before
