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


@pytest.mark.parametrize("overrides,message", [
    ({"optim__lr": float("inf")}, "config.optim.lr=inf is not a finite number"),
    ({"method__distill_weight": float("nan")},
     "config.method.distill_weight=nan is not a finite number"),
    ({"train__checkpoint_every_steps": -5},
     "config.train.checkpoint_every_steps must be > 0, got -5"),
    ({"model__stage_sizes": (1, 1)}, "config.model.stage_sizes=(1, 1) must be 4 positive "
                                     "integers"),
    ({"data__data_dir": "/data"}, "config.data.data_dir='/data' does not apply to dataset "
                                  "'digits'"),
    ({"eval__sweep_widths": ()}, "config.eval.sweep_widths is empty"),
    ({"eval__online_every_epochs": 1, "eval__online_widths": ()},
     "config.eval.online_widths is empty"),
    ({"optim__batch_size": 63}, "config.optim.batch_size=63 is not a multiple of "
                                "config.method.group_size=32; use e.g. 64"),
])
def test_validation_names_the_bad_field(overrides, message):
    from tests.helpers import demo_config
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(demo_config("smoke", **overrides))
    assert str(e.value).startswith(message), str(e.value)


def test_batch_size_hint_is_a_multiple_of_devices_and_group():
    import jax
    from us3l_jax import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="use a batch size such as 64$"):
        mesh_lib.check_batch_size(0, mesh, group_size=64)
    mesh_lib.check_batch_size(63, mesh, group_size=None)  # 1 device: any size splits
