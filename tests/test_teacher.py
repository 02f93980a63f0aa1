"""The frozen SEED teacher (``us3l_jax.teacher``): from a torch-layout state dict (the official
checkpoint's layout) as well as from a workdir, with batch, calibrated or stored BatchNorm
statistics; bad teachers refused with one clear line."""
import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import build, checkpointing, pretrain, teacher as teacher_lib, torch_layout
from us3l_jax.config import ConfigError
from us3l_jax.models.heads import SSLModel
from tests.helpers import REPO, leaves_equal, override, tiny_baseline


@pytest.fixture(scope="module")
def teacher_file(teacher_dir, tmp_path_factory):
    """The ``teacher_dir`` run's online encoder as an official checkpoint's state dict, no
    statistics."""
    params = checkpointing.load_pretrained(teacher_dir, abstract_state=build.abstract_state).params
    cfg = checkpointing.read_config(teacher_dir)
    sd = torch_layout.to_official_state_dict(
        cfg.model.name, {"params": {k: params[k] for k in ("backbone", "projector")}},
        **build.architecture_kwargs(cfg))
    path = str(tmp_path_factory.mktemp("sd") / "byol.safetensors")
    torch_layout.save_safetensors(path, sd)
    return path


def from_file(path, variant="seed,0.5", **kw):
    """A tiny student whose teacher is the state dict at ``path`` (``kw`` applied last)."""
    c = tiny_baseline(variant)
    c.teacher.workdir = None
    c.teacher.state_dict = path
    c.teacher.model = c.model.name
    return override(c, **kw)


@pytest.mark.slow
def test_official_layout_keys(teacher_file):
    sd = torch_layout.load_safetensors(teacher_file)
    assert all(k.startswith("module.encoder_q.") for k in sd)
    keys = {k[len("module.encoder_q."):] for k in sd}
    # The BYOL projector of the official encoder: Linear+bias, BN, -, Linear (no bias), BN, -,
    # Linear+bias, torch (out, in) layout; the backbone under torchvision names, OIHW.
    assert {"fc.0.weight", "fc.0.bias", "fc.1.weight", "fc.1.bias", "fc.3.weight",
            "fc.4.weight", "fc.4.bias", "fc.6.weight", "fc.6.bias"} <= keys
    assert "fc.3.bias" not in keys and not any("running" in k for k in keys)
    assert sd["module.encoder_q.fc.0.weight"].shape == (32, 128)  # (hidden, feature 8*16)
    assert sd["module.encoder_q.fc.6.weight"].shape == (16, 32)
    assert sd["module.encoder_q.conv1.weight"].shape == (16, 3, 3, 3)


@pytest.mark.slow
def test_state_dict_teacher_equals_workdir_teacher(teacher_dir, teacher_file, tmp_path):
    """The same network loaded from either source: equal parameters and embeddings (so a
    student learns the same from either); a student trains from the file, whose record names
    it."""
    a = teacher_lib.load(tiny_baseline(f"seed,0.5,{teacher_dir}"))
    b = teacher_lib.load(from_file(teacher_file))
    assert leaves_equal(a.params, b.params) and "batch_stats" not in b.variables
    assert a.record["fingerprint"] == b.record["fingerprint"]
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    za = a.model.apply(a.variables, x, 1.0, method=SSLModel.encode)
    zb = b.model.apply(b.variables, x, 1.0, method=SSLModel.encode)
    np.testing.assert_array_equal(np.asarray(za), np.asarray(zb))

    s = pretrain.train(from_file(teacher_file, train__max_steps=2), str(tmp_path / "s"))
    assert int(s.step) == 2 and int(s.queue["ptr"]) == 0  # 2 x 32 keys into 64
    rec = teacher_lib.read_record(str(tmp_path / "s"))
    assert rec["source"] == "state_dict" and rec["state_dict"] == teacher_file
    assert rec["bn"] == "batch" and rec["width"] == 1.0
    with open(teacher_file, "rb") as f:
        assert rec["sha256"] == hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_stored_statistics_run_the_teacher_in_eval_mode(teacher_dir, tmp_path):
    """``teacher.bn='stored'``: the state dict's running statistics, eval mode: an example's
    embedding no longer depends on the rest of its batch (it does with batch statistics),
    and it equals the forward computed by hand from those statistics at the projector's
    first BN."""
    params = jax.device_get(teacher_lib.teacher_subset(
        checkpointing.load_pretrained(teacher_dir, abstract_state=build.abstract_state).params))
    cfg = checkpointing.read_config(teacher_dir)
    model = build.model(cfg)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, 1.0, False,
                                                 method=SSLModel.encode)["batch_stats"],
                            jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
    rng = np.random.default_rng(1)
    stats = jax.tree.map(lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32), shapes)
    path = str(tmp_path / "with_stats.safetensors")
    torch_layout.save_safetensors(path, torch_layout.to_official_state_dict(
        cfg.model.name, {"params": params, "batch_stats": stats},
        **build.architecture_kwargs(cfg)))

    t = teacher_lib.load(from_file(path, "seed_mse,0.25", teacher__bn="stored"))
    assert leaves_equal(t.variables["batch_stats"], stats)
    x = jax.random.normal(jax.random.key(3), (16, 8, 8, 3))
    # The same first 4 examples in another batch of 16 (one BN group).
    other = x.at[4:].set(jax.random.normal(jax.random.key(4), (12, 8, 8, 3)) * 2.0 + 1.0)
    run = lambda v, inputs, train: np.asarray(t.model.apply(
        v, inputs, 1.0, train, method=SSLModel.encode))[:4]
    np.testing.assert_allclose(run(t.variables, x, False), run(t.variables, other, False),
                               rtol=1e-5, atol=1e-6)
    no_stats = {"params": t.params}
    assert np.abs(run(no_stats, x, True) - run(no_stats, other, True)).max() > 1e-3

    # By hand: the projector's first Linear on the eval-mode backbone feature, then BN with
    # the stored mean/var of fc.1.
    h = t.model.backbone.apply({"params": t.params["backbone"],
                                "batch_stats": stats["backbone"]}, x, width=1.0, train=False)
    p, s = t.params["projector"], stats["projector"]["bn1"]
    y = np.asarray(h) @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
    y = (y - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"]
    _, inter = t.model.apply(t.variables, x, 1.0, False, method=SSLModel.encode,
                             capture_intermediates=lambda m, _: m.name == "bn1"
                             and "projector" in m.path)
    got = jax.tree.leaves(inter["intermediates"]["projector"]["bn1"])[0]
    np.testing.assert_allclose(np.asarray(got), y, rtol=1e-4, atol=1e-5)

    # A SEED-MSE student learns from it; the record says which statistics.
    pretrain.train(from_file(path, "seed_mse,0.25", teacher__bn="stored",
                             train__max_steps=1), str(tmp_path / "student"))
    assert teacher_lib.read_record(str(tmp_path / "student"))["bn"] == "stored"


@pytest.mark.slow
def test_calibrated_teacher_statistics(teacher_dir, tmp_path):
    """``teacher.bn='calibrated'`` (the SEED-MSE default): every BN of backbone and projector
    gets running averages (momentum 0.1 from mean 0 / var 1) over the configured number of
    batches of the teacher's SSL views; the record keeps the settings, and a resumed student
    with another calibration is refused."""
    cfg = tiny_baseline(f"seed_mse,0.25,{teacher_dir}", teacher__calibration_batches=1)
    assert cfg.teacher.bn == "calibrated"
    t = teacher_lib.load(cfg)
    stats = t.variables["batch_stats"]
    assert set(stats) == {"backbone", "projector"} and set(stats["projector"]) == {"bn1", "bn2"}
    # One batch of EMA from 0/1: mean = 0.1 * batch mean, var = 0.9 + 0.1 * unbiased var.
    var = np.concatenate([np.ravel(v) for path, v in jax.tree_util.tree_flatten_with_path(
        stats)[0] if jax.tree_util.keystr(path).endswith("['var']")])
    assert var.min() >= 0.9 - 1e-6 and var.max() > 0.9 + 1e-3
    assert np.abs(stats["projector"]["bn1"]["mean"]).max() > 0
    assert t.record["calibration"]["num_batches"] == 1
    assert t.record["calibration"]["mode"] == "ema"
    assert t.record["calibration"]["batch_size"] == 16  # one BN group of the student
    more = teacher_lib.load(tiny_baseline(f"seed_mse,0.25,{teacher_dir}",
                                 teacher__calibration_batches=3))
    assert not leaves_equal(stats, more.variables["batch_stats"])
    assert leaves_equal(t.params, more.params)

    d = str(tmp_path / "student")
    os.makedirs(d)
    teacher_lib.record(d, t)
    teacher_lib.record(d, t)  # the same teacher: accepted
    with pytest.raises(checkpointing.CheckpointError, match="differs .* in calibration"):
        teacher_lib.record(d, more)


@pytest.mark.slow
def test_bad_state_dict_teachers_give_one_clear_error(teacher_dir, teacher_file, tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="state dict .* does not exist"):
        pretrain.setup(from_file(str(tmp_path / "missing.safetensors")))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(checkpointing.CheckpointError, match="not a readable safetensors"):
        pretrain.setup(from_file(str(junk)))
    sd = torch_layout.load_safetensors(teacher_file)
    simclr = dict(sd, **{"module.encoder_q.fc.3.bias": np.zeros(32, np.float32)})
    path = str(tmp_path / "simclr.safetensors")
    torch_layout.save_safetensors(path, simclr)
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"not the official BYOL projector.*unexpected \['fc.3.bias'\]"):
        pretrain.setup(from_file(path))
    with pytest.raises(checkpointing.CheckpointError, match="bn='stored' needs BN running "
                                                            "statistics"):
        pretrain.setup(from_file(teacher_file, teacher__bn="stored"))
    with pytest.raises(checkpointing.CheckpointError, match="embeds in 16 dimensions"):
        pretrain.setup(from_file(teacher_file, heads__proj_out=32))
    with pytest.raises(checkpointing.CheckpointError, match=r"'bn1.bias': shape \(16,\), "
                                                            r"expected \(24,\)"):
        pretrain.setup(from_file(teacher_file, model__base_width=24))  # another architecture
    narrow = dict(sd, **{"module.encoder_q.fc.0.weight": np.zeros((32, 64), np.float32)})
    path = str(tmp_path / "narrow.safetensors")
    torch_layout.save_safetensors(path, narrow)
    with pytest.raises(checkpointing.CheckpointError, match=r"1 parameter\(s\) do not fit the "
                                                            r"teacher network.*fc1.*kernel"):
        pretrain.setup(from_file(path))
    with pytest.raises(ConfigError, match="exactly one of config.teacher.workdir"):
        pretrain.setup(from_file(teacher_file, teacher__workdir=teacher_dir))
    with pytest.raises(ConfigError, match="teacher.model=None must name"):
        pretrain.setup(from_file(teacher_file, teacher__model=None))
    with pytest.raises(ConfigError, match="teacher.model='vit_tiny' must name"):
        pretrain.setup(from_file(teacher_file, teacher__model="vit_tiny"))
    with pytest.raises(ConfigError, match="a teacher workdir stores none"):
        pretrain.setup(tiny_baseline(f"seed_mse,0.25,{teacher_dir}", teacher__bn="stored"))
    with pytest.raises(ConfigError, match="teacher.bn='eval' is not one of batch, "
                                          "calibrated, stored"):
        pretrain.setup(tiny_baseline(f"seed,0.5,{teacher_dir}", teacher__bn="eval"))


def test_cli_missing_state_dict_one_line_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "us3l_jax.main", "--config=configs/demo.py:seed",
         f"--config.teacher.state_dict={tmp_path}/nope.safetensors",
         "--config.teacher.workdir=", "--config.teacher.model=cifar_resnet18",
         f"--workdir={tmp_path}/w"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "nope.safetensors" in lines[0] and "does not exist" in lines[0]
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
