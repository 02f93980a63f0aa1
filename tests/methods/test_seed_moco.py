"""SEED, SEED-MSE and MoCo v2 (``us3l_jax.methods.seed`` / ``moco``) end to end on a tiny
digits run: a BYOL teacher made here, the teacher frozen and recorded, the queue checkpointed
(exact resume), bad teachers refused; the method combinations ``methods.select`` refuses."""
import json
import os
import shutil

import numpy as np
import pytest

from us3l_jax import build, checkpointing, methods, pretrain, teacher as teacher_lib
from tests.helpers import leaves_equal, tiny_baseline

@pytest.mark.slow
def test_seed_teacher_frozen_recorded_and_resume_exact(teacher_dir, tmp_path):
    cfg = lambda steps: tiny_baseline(f"seed,0.5,{teacher_dir}", train__max_steps=steps,
                             train__checkpoint_every_steps=2)
    before = checkpointing.load_pretrained(teacher_dir, abstract_state=build.abstract_state).params
    straight = pretrain.train(cfg(4), str(tmp_path / "a"))
    # The same run stopped at step 2: its workdir without the last checkpoint, resumed.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    resumed = pretrain.train(cfg(4), str(tmp_path / "b"))
    # Exact resume, queue included; the queue advanced by one batch per step (4 x 32 mod 64).
    assert leaves_equal(straight.params, resumed.params)
    assert leaves_equal(straight.queue, resumed.queue)
    assert int(straight.queue["ptr"]) == 0 and int(straight.step) == 4
    assert straight.ema_params is None
    # The queue holds unit-norm teacher embeddings, not the random initial keys any more.
    np.testing.assert_allclose(np.linalg.norm(straight.queue["keys"], axis=1), 1, rtol=1e-5)
    # The teacher is unchanged (bitwise) and recorded in the student's workdir.
    after = checkpointing.load_pretrained(teacher_dir, abstract_state=build.abstract_state).params
    assert leaves_equal(before, after)
    rec = teacher_lib.read_record(str(tmp_path / "a"))
    teacher_cfg = checkpointing.read_config(teacher_dir)
    assert rec["workdir"] == os.path.abspath(teacher_dir) and rec["step"] == 3
    assert rec["identity"] == json.loads(json.dumps(checkpointing.identity(teacher_cfg)))
    assert rec["fingerprint"] == teacher_lib.fingerprint(
        {k: after[k] for k in ("backbone", "projector")})
    log = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(np.isfinite(r["loss/total"]) for r in log)


@pytest.mark.slow
def test_seed_mse_and_mocov2_train(teacher_dir, tmp_path):
    s = pretrain.train(tiny_baseline(f"seed_mse,0.25,{teacher_dir}", train__max_steps=1),
                       str(tmp_path / "mse"))
    assert s.queue is None and s.ema_params is None and "predictor" in s.params
    m = pretrain.train(tiny_baseline("mocov2,0.5", train__max_steps=1), str(tmp_path / "moco"))
    assert int(m.queue["ptr"]) == 32  # one batch of 32 keys into a 64-key queue
    assert set(m.ema_params) == {"backbone", "projector"}
    # MoCo's key encoder moved towards the query encoder, by (1 - m) per step.
    assert not leaves_equal(m.ema_params["projector"], m.params["projector"])


@pytest.mark.slow
def test_bad_teachers_give_one_clear_error(teacher_dir, tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="teacher workdir .* does not exist"):
        pretrain.setup(tiny_baseline(f"seed,0.5,{tmp_path}/missing"))
    with pytest.raises(checkpointing.CheckpointError, match="trained on 8px views but the "
                                                            "student uses 16px"):
        pretrain.setup(tiny_baseline(f"seed,0.5,{teacher_dir}", data__image_size=16))
    with pytest.raises(checkpointing.CheckpointError, match="embeds in 16 dimensions"):
        pretrain.setup(tiny_baseline(f"seed,0.5,{teacher_dir}", heads__proj_out=32))


def test_method_combinations_of_the_baselines():
    select = methods.select
    with pytest.raises(ValueError, match="base_loss='seed' needs a queue"):
        select(dict(base_loss="seed", teacher="frozen"))
    with pytest.raises(ValueError, match="base_loss='seed' distills a frozen pretrained"):
        select(dict(base_loss="seed", queue_size=64))
    with pytest.raises(ValueError, match="queue_size=64 is only used by base_loss"):
        select(dict(queue_size=64))
    with pytest.raises(ValueError, match="teacher='frozen' needs base_loss 'seed'"):
        select(dict(teacher="frozen"))
    with pytest.raises(ValueError, match="teacher='bn' is not one of"):
        select(dict(teacher="bn"))
    kind, m = select(dict(base_loss="mse", teacher="frozen", distill_loss="none",
                          aux_head="none", momentum_sub=False))
    # SEED-MSE: one width per run, a predictor, the frozen teacher (no EMA teacher).
    assert kind == "seed" and kind in methods.SINGLE_WIDTH
    assert m == methods.seed.Config(loss="mse", queue_size=0) and m.uses_predictor
    kind, m = select({})
    assert kind == "us3l" and kind not in methods.SINGLE_WIDTH and m.uses_teacher
    assert m == methods.us3l.Config()
