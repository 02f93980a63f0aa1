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
    assert build.method(c) == recipes.table7_method(13, group_size=128, update_mode="per_width")
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
        assert (m.decay_rule, m.update_mode) == ("weight_decay", "per_width")
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
    assert c.optim.lr == 0.05 and 2 * c.optim.reg_lambda == pytest.approx(5e-4)  # official
    assert m.decay_rule == "weight_decay"  # SGD weight decay reaches the predictor too
    with pytest.raises(ValueError, match="unknown baseline 'moco'"):
        mod.get_config("moco")


PAPER_TABLE_CONFIGS = ("configs/us3l_cifar100.py", "configs/us3l_imagenet.py",
                       "configs/table7.py", "configs/strategies.py",
                       "configs/baselines_cifar100.py")


@pytest.mark.parametrize("path", PAPER_TABLE_CONFIGS)
def test_paper_table_configs_run_the_official_step(path):
    """One optimizer update per width, and plain weight decay wherever group regularization is
    off, as the official code that produced the tables (docs/fidelity.md)."""
    module = load_config_module(path)
    for arg in documented_args(path):
        c = module.get_config(arg or None)
        m = build.method(c)
        assert m.update_mode == "per_width", (path, arg)
        assert m.decay_rule == ("weight_decay" if c.optim.reg_alpha == 0 else "group_reg"), arg


def test_plain_weight_decay_refuses_group_alpha():
    c = load_config_module("configs/demo.py").get_config("smoke")
    c.method.decay_rule = "weight_decay"
    with pytest.raises(config_lib.ConfigError,
                       match=r"decay_rule='weight_decay' is plain weight decay, but "
                             r"config.optim.reg_alpha=0.05: set reg_alpha=0"):
        config_lib.validate(c)


def test_config_json_round_trip():
    c = load_config_module("configs/demo.py").get_config("smoke")
    back = config_lib.from_json(config_lib.to_json(c))
    assert back.to_dict() == c.to_dict()
    with pytest.raises(config_lib.ConfigError, match="unknown key 'optim.lrr'"):
        config_lib.from_json('{"optim": {"lrr": 1}}')


def test_too_small_model_for_the_width_range_is_named():
    """8 channels at 0.25x round up to 9 under the official rule: refused before any run."""
    c = load_config_module("configs/demo.py").get_config("smoke")
    c.model.base_width = 8
    with pytest.raises(config_lib.ConfigError,
                       match=r"a layer of 8 channels at width 0.25 needs 9 under the official "
                             r"rounding .* model.base_width"):
        config_lib.validate(c)
    c.sampler.width_range = (0.5, 1.0)
    c.eval.sweep_widths = c.eval.online_widths = (1.0, 0.5)
    config_lib.validate(c)


def test_us3l_cifar100_resnet50_official_is_the_official_code_recipe():
    mod = load_config_module("configs/us3l_cifar100.py")
    c = mod.get_config("resnet50,official")
    config_lib.validate(c)
    assert (c.model.name, c.optim.batch_size, c.optim.lr, c.optim.epochs) == (
        "cifar_resnet50", 512, 0.25, 400)
    assert (c.optim.reg_lambda, c.optim.reg_alpha, c.optim.reg_warmup_epochs) == (5e-5, 0.05, 200)
    s = build.sampler(c)
    assert (s.num_samples, s.sandwich, s.schedule) == (3, True, None)
    m = build.method(c)
    assert m == recipes.table7_method(13, group_size=64, update_mode="per_width",
                                      feature_distill=True, feature_distill_weight=1.0)
    assert (m.tau, m.ema_momentum, c.heads.proj_out, c.heads.proj_hidden) == (0.5, 0.99, 256,
                                                                               2048)
    model = build.model(c)
    assert model.feature_layers == ("layer2_3", "layer3_5", "layer4_2")
    assert m.param_groups() == {"backbone", "projector", "distill_head", "proj_conv"}
    assert c.eval.paper_row == "table2/resnet50/ours"
    # The default R-50 config keeps the paper's description.
    d = mod.get_config("resnet50")
    assert (d.method.feature_distill, d.sampler.schedule, d.optim.lr) == (False, "A", 0.5)
    with pytest.raises(ValueError, match="use resnet50,official, not resnet18,official"):
        mod.get_config("resnet18,official")
    with pytest.raises(ValueError, match="number of epochs or 'official', got 'fast'"):
        mod.get_config("resnet50,fast")


def test_feature_distillation_config_errors_name_the_field():
    c = config_lib.get_default()
    c.method.feature_distill = True
    c.model.name = "cifar_mobilenet_v2"
    with pytest.raises(config_lib.ConfigError,
                       match="config.method.feature_distill: .*MobileNetV2 has none"):
        config_lib.validate(c)
    c.model.name = "cifar_resnet18"
    c.method.feature_layers = ("layer2_1", "layer5_0")
    with pytest.raises(config_lib.ConfigError,
                       match="config.method.feature_layers: unknown ResNet block 'layer5_0'"):
        config_lib.validate(c)
    c.method.feature_layers = ("layer2_1",)
    config_lib.validate(c)
    assert build.model(c).feature_layers == ("layer2_1",)
