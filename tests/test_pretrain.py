"""The pretraining loop on the real (offline) digits data: exact resume after an interruption
(clean stop, kill -9, SIGTERM), corrupt-checkpoint fallback, config mismatch, NaN stop.

Every run is ``configs/demo.py:smoke`` cut to ``STEPS`` iterations (stage 1 plus a few steps
with sub-networks); one uninterrupted reference run is shared by the module.
"""
import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from us3l_jax import build, checkpointing, pretrain
from tests.helpers import demo_config, run_main

STEPS = 30  # stage 1 ends at step 22 (one epoch); 8 more steps train sub-networks


def smoke(transfer_guard="allow", **overrides):
    c = demo_config("smoke", **overrides)
    c.train.transfer_guard = transfer_guard
    c.train.max_steps = STEPS
    c.train.checkpoint_every_steps = 5
    c.train.log_every_steps = 5
    c.train.compile_ahead = False
    return c


def final_params(workdir):
    return checkpointing.load_pretrained(workdir, abstract_state=build.abstract_state).params


def assert_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    state = pretrain.train(smoke(), workdir)
    return workdir, state


def test_reference_run_writes_checkpoints_and_logs(reference):
    workdir, state = reference
    assert int(state.step) == STEPS
    steps = checkpointing.Checkpointer(workdir, smoke()).all_steps()
    assert steps == [20, 25, 30]  # every 5 steps, keep 3
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(r["loss/total"]) for r in records)
    # Sub-networks train after stage 1 (step 22): two distillation terms appear.
    assert "loss/sub1" not in records[4] and "loss/sub1" in records[6]
    last = records[-1]
    assert last["num_widths"] == 3 and last["width/base"] == 1.0
    assert 0.75 <= last["width/sub1"] <= last["width/sub0"] <= 1.0  # stage 2: [0.75, 1]
    for key in ("lr", "grad_norm", "embed_std", "images_per_s_per_device", "programs"):
        assert np.isfinite(last[key]), key
    assert os.path.isdir(os.path.join(workdir, "tb"))
    assert checkpointing.read_config(workdir).model.base_width == 16


@pytest.mark.slow
def test_resume_after_stop_at_random_step_is_exact(reference, tmp_path):
    ref_dir, ref_state = reference
    k = int(np.random.default_rng().integers(1, STEPS))
    print(f"interrupting at step {k}")
    first = smoke()
    first.train.max_steps = k
    pretrain.train(first, str(tmp_path))
    state = pretrain.train(smoke(), str(tmp_path))  # same command: resumes from step k
    assert int(state.step) == STEPS
    assert_bitwise_equal(state.params, ref_state.params)
    assert_bitwise_equal(state.ema_params, ref_state.ema_params)
    assert_bitwise_equal(state.opt_state, ref_state.opt_state)


def _wait_for_step(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()[-2000:]}")
        if os.path.exists(path):
            steps = [json.loads(line)["step"] for line in open(path) if line.strip()]
            if steps and steps[-1] >= step:
                return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run")


SMOKE_FLAGS = [f"--config.train.max_steps={STEPS}", "--config.train.checkpoint_every_steps=5",
               "--config.train.log_every_steps=5", "--config.train.compile_ahead=False",
               "--config.eval.final_sweep=False"]


def _start_and_signal(workdir, step, sig):
    """Starts the smoke run as a user would and sends ``sig`` once it has logged ``step``."""
    proc = run_main("configs/demo.py:smoke", workdir, *SMOKE_FLAGS, wait=False)
    _wait_for_step(workdir, step, proc)
    proc.send_signal(sig)
    return proc


@pytest.mark.slow
def test_kill_9_then_rerun_ends_with_identical_params(reference, tmp_path):
    ref_dir, ref_state = reference
    workdir = str(tmp_path / "run")
    _start_and_signal(workdir, 12, signal.SIGKILL).wait()
    done = checkpointing.Checkpointer(workdir, smoke()).all_steps()
    assert done and done[-1] < STEPS
    out = run_main("configs/demo.py:smoke", workdir, *SMOKE_FLAGS)
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"resuming {workdir} from step {done[-1]}" in out.stdout
    assert_bitwise_equal(final_params(workdir), ref_state.params)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(reference, tmp_path):
    ref_dir, ref_state = reference
    workdir = str(tmp_path / "run")
    proc = _start_and_signal(workdir, 6, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == pretrain.PREEMPTED_EXIT_CODE, out[-3000:]
    assert "Traceback" not in out
    stopped = int(out.split("preempted at step ")[1].split(";")[0])
    assert checkpointing.Checkpointer(workdir, smoke()).all_steps()[-1] == stopped
    out = run_main("configs/demo.py:smoke", workdir, *SMOKE_FLAGS)
    assert out.returncode == 0
    assert_bitwise_equal(final_params(workdir), ref_state.params)


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path, caplog):
    ref_dir, _ = reference
    workdir = str(tmp_path / "copy")
    shutil.copytree(ref_dir, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "30", "state")
    for root, _, files in os.walk(state_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    ckpt = checkpointing.Checkpointer(workdir, smoke())
    with caplog.at_level("WARNING"):
        step, state = ckpt.restore_latest(build.abstract_state(smoke()))
    ckpt.close()
    assert step == 25
    assert "checkpoint 30" in caplog.text and "is corrupt" in caplog.text
    assert int(state.step) == 25


def test_restoring_into_a_different_model_is_refused(reference):
    ref_dir, _ = reference
    other = smoke()
    other.model.base_width = 32
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"different config \(model.base_width: checkpoint 16 vs config 32"):
        pretrain.train(other, ref_dir)
    other = smoke()
    other.sampler.width_range = (0.5, 1.0)
    other.eval.sweep_widths = (1.0, 0.5)
    other.eval.online_widths = (1.0, 0.5)
    with pytest.raises(checkpointing.CheckpointError, match="sampler.width_range"):
        pretrain.train(other, ref_dir)


def test_identity_covers_the_state_structure_and_accepts_older_records(reference):
    """Fields that change the saved state's shapes (here intermediate-feature distillation,
    which adds ``proj_conv``) are named when they differ; a checkpoint written before a field
    joined the identity (its record lacks it) is not refused for it."""
    ref_dir, _ = reference
    other = smoke()
    other.method.feature_distill = True
    ckpt = checkpointing.Checkpointer(ref_dir, other)
    try:
        with pytest.raises(checkpointing.CheckpointError,
                           match=r"method.feature_distill: checkpoint False vs config True"):
            ckpt.restore_latest(build.abstract_state(smoke()))
        older = {k: v for k, v in checkpointing.identity(smoke()).items()
                 if k != "method.feature_distill"}
        ckpt.check_identity({"identity": older}, 30)  # no error
        with pytest.raises(checkpointing.CheckpointError, match="model.base_width"):
            ckpt.check_identity({"identity": dict(older, **{"model.base_width": 8})}, 30)
    finally:
        ckpt.close()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = smoke()
    c.optim.lr = 1e12
    c.train.log_every_steps = 1
    with pytest.raises(pretrain.NonFiniteLossError, match="non-finite loss at step") as e:
        pretrain.train(c, str(tmp_path))
    steps = checkpointing.Checkpointer(str(tmp_path), c).all_steps()
    # Whatever was saved before the blow-up is finite.
    for s in steps:
        assert s < int(str(e.value).split("at step ")[1].split(":")[0]) + 1
    if steps:
        params = final_params(str(tmp_path))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_streaming_imagenet_path_trains_and_resumes_exactly(tmp_path):
    """ImageNet goes through the streaming pipeline (host decode + crops, device colour ops);
    checked on tfds mock data at 16 px: steps run, and a resumed run equals an uninterrupted
    one bitwise."""
    import tensorflow_datasets as tfds

    def config(max_steps):
        c = demo_config(None)
        c.data.dataset = "imagenet2012"
        c.data.augment = "imagenet"
        c.data.image_size = 16
        c.data.num_threads = 2
        c.model.name = "resnet18"
        c.optim.batch_size = 32
        c.method.group_size = 16
        c.optim.epochs = 4
        c.sampler.stage_by = "iteration"
        c.train.max_steps = max_steps
        c.train.checkpoint_every_steps = 2
        c.train.log_every_steps = 2
        c.train.compile_ahead = False
        c.eval.final_sweep = False
        return c

    from us3l_jax import mesh as mesh_lib
    assert build.image_spec(config(None), mesh_lib.make_mesh()).shape == (32, 2, 16, 16, 3)
    with tfds.testing.mock_data(num_examples=64):
        ref = pretrain.train(config(4), str(tmp_path / "ref"))
        pretrain.train(config(2), str(tmp_path / "resumed"))
        resumed = pretrain.train(config(4), str(tmp_path / "resumed"))
    assert int(ref.step) == int(resumed.step) == 4
    assert_bitwise_equal(resumed.params, ref.params)


@pytest.mark.slow
def test_training_loop_makes_no_implicit_transfers(tmp_path, monkeypatch):
    """Under ``train.transfer_guard='disallow'`` every step (batch, programs, the metric fetch
    at log steps) runs without an implicit host<->device copy, through stage 1 and into the
    steps with sub-networks; an implicit copy in the loop is caught (negative control)."""
    c = smoke(transfer_guard="disallow")
    c.train.max_steps = 25  # stage 1 ends at step 22
    state = pretrain.train(c, str(tmp_path / "guarded"))
    assert int(state.step) == 25
    # The pre-redesign loop's bug: a host number (there: jnp.int32(step)) sent every step.
    fetch = pretrain.fetch
    monkeypatch.setattr(pretrain, "fetch", lambda tree: fetch(
        jax.tree.map(lambda a: a * np.float32(1), tree)))
    c.train.max_steps = 3
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        pretrain.train(c, str(tmp_path / "implicit"))


@pytest.mark.slow
def test_bfloat16_digits_run_trains_like_float32(reference, tmp_path):
    """``model.dtype=bfloat16`` end to end on digits: the run trains (the loss falls from its
    first value) and its logged losses stay within 5% of the float32 reference run's."""
    ref_dir, _ = reference
    pretrain.train(smoke(model__dtype="bfloat16"), str(tmp_path))
    read = lambda w: {r["step"]: r["loss/total"] for r in map(
        json.loads, open(os.path.join(w, "metrics.jsonl")))}
    bf16, f32 = read(str(tmp_path)), read(ref_dir)
    assert sorted(bf16) == sorted(f32)
    assert bf16[STEPS] < bf16[1]
    for step in bf16:
        assert bf16[step] == pytest.approx(f32[step], rel=0.05), step


@pytest.mark.slow
def test_eta_knows_the_schedule_and_program_counts_print_when_they_change(tmp_path, caplog):
    """Stage 1 (base width only) costs one unit per step; the steps with two sub-networks
    cost more, but less than 2.5 units (teacher + 3 x base when every width were 1.0). The
    progress line names the programs only when their number changes."""
    run = pretrain.setup(smoke())
    cost = pretrain.ScheduleCost(run, STEPS)
    assert cost.between(0, 22) == pytest.approx(22.0)
    assert 8 < cost.between(22, STEPS) < 8 * 2.5
    assert cost.between(0, STEPS) == pytest.approx(22.0 + cost.between(22, STEPS))
    c = smoke()
    c.train.max_steps, c.train.log_every_steps = 4, 1
    with caplog.at_level("INFO", logger="us3l"):
        pretrain.train(c, str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 4
    assert "programs 3 (0 compiled ahead" in lines[0]
    assert all("programs" not in line for line in lines[1:])
    assert "ETA ?" in lines[0] and "ETA ?" not in lines[1]


@pytest.mark.slow
def test_eta_waits_for_background_compilation(tmp_path, monkeypatch, caplog):
    """While programs compile in the background the progress line shows "compiling" (the
    steps beside the compiler are slow); the ETA then counts from the first line after it."""
    from concurrent import futures
    pending = futures.Future()
    monkeypatch.setattr(pretrain.Engine, "compile_ahead", lambda self, *a, **k: [pending])
    sample, calls = pretrain.sampling.sample_widths, []

    def finish_at_step_3(s, step, *args):
        calls.append(step)
        if step == 2 and calls.count(2) == 2:  # in the loop (the ETA's table draws it first)
            pending.set_result(None)
        return sample(s, step, *args)
    monkeypatch.setattr(pretrain.sampling, "sample_widths", finish_at_step_3)
    c = smoke()
    c.train.max_steps, c.train.log_every_steps, c.train.compile_ahead = 5, 1, True
    with caplog.at_level("INFO", logger="us3l"):
        pretrain.train(c, str(tmp_path))
    etas = [r.getMessage().rsplit("ETA ", 1)[1] for r in caplog.records
            if r.getMessage().startswith("step ")]
    assert etas[:3] == ["compiling", "compiling", "?"]
    assert all(":" in eta for eta in etas[3:]) and len(etas) == 5
