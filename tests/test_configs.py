"""Every config file: its docstring's launch commands parse and validate; recipes match the
paper (§4.1, appendix Table 11) and the Table 7/8/9/13/14 switches do what they say."""
import glob
import os
import re

import pytest

from us3l_jax import build, config as config_lib, recipes
from tests.helpers import REPO, load_config_module

CONFIG_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs",
                                                                               "*.py")))


def documented_args(path):
    doc = load_config_module(path).__doc__
    return re.findall(rf"--config={re.escape(path)}(?::(\S+))?", doc)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_docstring_commands_validate(path):
    module = load_config_module(path)
    assert module.__doc__ and "python -m us3l_jax.main" in module.__doc__, path
    args = documented_args(path)
    assert args, f"{path} documents no launch command"
    for arg in args:
        config = module.get_config(arg or None)
        config_lib.validate(config)


def test_us3l_cifar100_is_the_paper_recipe():
    c = load_config_module("configs/us3l_cifar100.py").get_config("resnet18")
    assert (c.optim.batch_size, c.optim.lr, c.optim.epochs) == (512, 0.5, 400)
    assert 2 * c.optim.reg_lambda == pytest.approx(1e-4)  # weight decay 1e-4
    assert (c.optim.reg_alpha, c.optim.reg_groups) == (0.05, 8)
    assert (c.method.tau, c.method.ema_momentum) == (0.5, 0.99)
    assert (c.heads.proj_out, c.heads.proj_hidden) == (256, 2048)
    assert build.method(c) == recipes.table7_method(13, group_size=128)
    s = build.sampler(c)
    assert (s.num_samples, s.sandwich, s.schedule, s.width_range) == (3, True, "A", (0.25, 1.0))
    assert load_config_module("configs/us3l_cifar100.py").get_config(
        "mobilenet_v2").model.name == "cifar_mobilenet_v2"


def test_table7_cases_set_the_flags():
    mod = load_config_module("configs/table7.py")
    for case, flags in recipes.TABLE7_CASES.items():
        c = mod.get_config(str(case))
        m = build.method(c)
        assert (m.base_loss, m.distill_loss, m.aux_head, m.momentum_base,
                m.momentum_sub) == flags
        assert c.sampler.schedule == "none" and c.optim.reg_alpha == 0.0
    with pytest.raises(ValueError, match="Table 7 has cases 1-17, got 0"):
        mod.get_config("0")


def test_strategy_switches():
    mod = load_config_module("configs/strategies.py")
    c = mod.get_config("table8,resnet50,0,1")
    assert (c.model.name, c.sampler.schedule, c.optim.reg_alpha) == ("cifar_resnet50", "none",
                                                                      0.05)
    c = mod.get_config("table9,0,1")
    assert (c.sampler.sandwich, c.sampler.schedule, c.optim.reg_alpha) == (False, "A", 0.0)
    assert (mod.get_config("table13,1").sampler.num_samples,
            mod.get_config("table13,4").sampler.schedule) == (4, "max_first")
    c = mod.get_config("table14,6")
    assert (c.optim.reg_groups, c.optim.reg_alpha, c.sampler.schedule) == (4, 0.1, "none")
    with pytest.raises(ValueError, match=r"table13 case must be one of \[1, 2, 3, 4, 5\]"):
        mod.get_config("table13,6")
    with pytest.raises(ValueError, match="dynamic sampling must be 0 or 1"):
        mod.get_config("table8,resnet18,yes,1")


def test_individual_baseline_trains_one_width():
    mod = load_config_module("configs/baselines_cifar100.py")
    c = mod.get_config("byol,0.5")
    s = build.sampler(c)
    assert s.individual_width == 0.5 and s.num_samples == 1
    m = build.method(c)
    assert (m.base_loss, m.momentum_base, m.uses_predictor) == ("mse", True, True)
    assert c.optim.lr == 0.1 and 2 * c.optim.reg_lambda == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="unknown baseline 'moco'"):
        mod.get_config("moco")


def test_config_json_round_trip():
    c = load_config_module("configs/demo.py").get_config("smoke")
    back = config_lib.from_json(config_lib.to_json(c))
    assert back.to_dict() == c.to_dict()
    with pytest.raises(config_lib.ConfigError, match="unknown key 'optim.lrr'"):
        config_lib.from_json('{"optim": {"lrr": 1}}')


def test_vit_cifar10_variants():
    module = load_config_module("configs/vit_cifar10.py")
    us3l = module.get_config("small")
    config_lib.validate(us3l)
    assert (us3l.model.name, us3l.optim.optimizer, us3l.optim.lr, us3l.optim.weight_decay,
            us3l.optim.warmup_epochs, us3l.optim.epochs) == ("vit_small", "adamw", 3e-4, 0.1,
                                                             40, 300)
    m = build.method(us3l)
    assert (m.base_loss, m.distill_loss, m.aux_head, m.aux_head_init, m.tau, m.group_size,
            m.ema_schedule) == ("mocov3", "mocov3", "new", "copy", 0.2, None, "cosine")
    assert build.sampler(us3l).schedule == "A"
    assert build.backbone(us3l).image_size == 224
    baseline = module.get_config("tiny,us_mocov3")
    assert (baseline.method.aux_head, baseline.sampler.schedule) == ("shared", "none")
    single = module.get_config("tiny,mocov3@0.25")
    config_lib.validate(single)
    assert build.teacher_width(single) == 0.25 and build.sampler(single).num_samples == 1
    for bad in ("huge", "tiny,mocov2", "tiny,mocov3@x"):
        with pytest.raises(ValueError, match="tiny|variant|number"):
            module.get_config(bad)
    with pytest.raises(config_lib.ConfigError, match="model.dim only applies to ViTs"):
        c = config_lib.get_default()
        c.model.dim = 64
        config_lib.validate(c)
    with pytest.raises(config_lib.ConfigError, match="model.slicing"):
        us3l.model.slicing = "narrow"
        config_lib.validate(us3l)
    with pytest.raises(config_lib.ConfigError, match="reg_lambda=0"):
        c = module.get_config("tiny")
        c.optim.reg_lambda = 5e-5
        config_lib.validate(c)
