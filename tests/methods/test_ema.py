"""The momentum teacher (``us3l_jax.methods.ema``)."""
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax.methods import ema, us3l


def test_ema_momentum_schedules():
    const = us3l.Config()
    cos = us3l.Config(ema_schedule="cosine", ema_momentum=0.99)
    mom = lambda c, t, total: float(ema.momentum(c.ema_momentum, c.ema_schedule, t, total))
    assert mom(const, 500, 1000) == pytest.approx(0.99)
    # BYOL / MoCo v3: m_t = 1 - (1 - m)(1 + cos(pi t / T)) / 2, from m to 1.
    assert mom(cos, 0, 1000) == pytest.approx(0.99)
    assert mom(cos, 500, 1000) == pytest.approx(0.995)
    assert mom(cos, 1000, 1000) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ema_schedule='linear' is not one of"):
        ema.momentum(0.99, "linear", 0, 10)


def test_update_is_one_ema_step_of_backbone_and_projector():
    params = {"backbone": {"w": jnp.full(3, 2.0)}, "projector": {"w": jnp.full(2, 4.0)},
              "distill_head": {"w": jnp.ones(2)}}
    teacher = ema.init(params)
    assert set(teacher) == {"backbone", "projector"}
    moved = {**params, "backbone": {"w": jnp.full(3, 3.0)}}
    new = ema.update(teacher, moved, jnp.float32(0.99))
    np.testing.assert_allclose(new["backbone"]["w"], 0.99 * 2.0 + 0.01 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(new["projector"]["w"], 4.0, rtol=1e-6)
    step = ema.teacher_step(0.99, "cosine", 100)
    new, metrics = step(moved, teacher, jnp.int32(50))
    np.testing.assert_allclose(float(metrics["ema_momentum"]), 0.995, rtol=1e-6)
    np.testing.assert_allclose(new["backbone"]["w"], 0.995 * 2.0 + 0.005 * 3.0, rtol=1e-6)
