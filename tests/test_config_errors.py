"""Bad config values: refused by ``config.validate`` with the full field path, and through the
command line as one line, exit status 2, with no workdir created."""
import os

import pytest

from us3l_jax import config as config_lib
from tests.helpers import load_config_module, run_main


def smoke(**fields):
    c = load_config_module("configs/demo.py").get_config("smoke")
    for path, value in fields.items():
        section, key = path.split("__")
        c[section][key] = value
    return c


@pytest.mark.parametrize("path", config_lib.NON_NEGATIVE)
def test_negative_values_are_refused(path):
    section, _, key = path.rpartition(".")
    c = smoke()
    target = c[section] if section else c
    target[key] = type(target[key])(-1)
    with pytest.raises(config_lib.ConfigError, match=rf"^config\.{path}=-1(\.0)? must be >= 0$"):
        config_lib.validate(c)
    target[key] = type(target[key])(0)  # zero switches the term off: allowed
    if path != "optim.momentum":
        config_lib.validate(c)


@pytest.mark.parametrize("lo", [0.1, 0.2])
def test_width_range_below_the_model_minimum_is_refused(lo):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(smoke(sampler__width_range=(lo, 1.0)))
    assert str(e.value) == (f"config.sampler.width_range=({lo}, 1.0): width {lo} is outside "
                            f"the allowed range [0.25, 1.0] for "
                            f"config.model.name='cifar_resnet18'")


@pytest.mark.parametrize("fields,message", [
    (dict(data__image_size=0), "config.data.image_size must be > 0, got 0"),
    (dict(optim__reg_groups=0), "config.optim.reg_groups must be > 0, got 0"),
    (dict(optim__momentum=1.0), "config.optim.momentum=1.0 must be below 1"),
    (dict(method__group_size=0), "config.method.group_size must be positive or None, got 0"),
    (dict(sampler__num_samples=0), "config.sampler.num_samples must be an integer >= 1, got 0"),
    (dict(sampler__grid_step=2.0), "config.sampler.grid_step must be in (0, 1], got 2.0"),
    (dict(method__ema_momentum=2.0), "config.method.ema_momentum must be in [0, 1], got 2.0"),
    (dict(train__objective="supervised", supervised__label_smoothing=1.0),
     "config.supervised.label_smoothing must be in [0, 1), got 1.0"),
])
def test_messages_name_the_full_field_path(fields, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(smoke(**fields))
    assert str(e.value) == message


# Through the command line: (overrides, the whole message).
BAD = [
    (["--config.method.distill_weight=-1"], "config.method.distill_weight=-1.0 must be >= 0"),
    (["--config.optim.reg_alpha=-1"], "config.optim.reg_alpha=-1.0 must be >= 0"),
    (["--config.eval.online_every_epochs=-1"], "config.eval.online_every_epochs=-1 must be >= 0"),
    (["--config.sampler.width_range=(0.1,1.0)"],
     "config.sampler.width_range=(0.1, 1.0): width 0.1 is outside the allowed range "
     "[0.25, 1.0] for config.model.name='cifar_resnet18'"),
    (["--config.sampler.width_range=(0.2,1.0)"],
     "config.sampler.width_range=(0.2, 1.0): width 0.2 is outside the allowed range "
     "[0.25, 1.0] for config.model.name='cifar_resnet18'"),
    (["--config.data.image_size=0"], "config.data.image_size must be > 0, got 0"),
    (["--config.optim.reg_groups=0"], "config.optim.reg_groups must be > 0, got 0"),
    (["--config.optim.warmup_epochs=-1"], "config.optim.warmup_epochs=-1 must be >= 0"),
    (["--config.optim.bogus=1"], "--config.optim.bogus: config.optim has no field 'bogus'; the "
                                 "closest valid key is config.optim.reg_groups"),
    (["--config.bogus=1"], "--config.bogus: config has no field 'bogus'; the closest valid key "
                           "is config.seed"),
    (["--config.optim.distill_weight=1"], "--config.optim.distill_weight: config.optim has no "
                                          "field 'distill_weight'; the closest valid key is "
                                          "config.method.distill_weight"),
    (["--config.opt.lr=1"], "--config.opt.lr: config has no field 'opt'; the closest valid key "
                            "is config.optim"),
]


@pytest.mark.parametrize("flags,message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, flags, message):
    workdir = tmp_path / "run"
    out = run_main("configs/demo.py:smoke", str(workdir), *flags)
    assert out.returncode == 2, out.stdout[-2000:]
    assert out.stdout.strip().splitlines() == [f"error: {message}"]
    assert not os.path.exists(workdir)
    assert os.listdir(tmp_path) == []
