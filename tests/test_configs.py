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
    assert c.method.update_mode == "per_width"
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
        assert (m.decay_rule, c.method.update_mode) == ("weight_decay", "per_width")
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
                       "configs/baselines_cifar100.py", "configs/seed_cifar100.py",
                       "configs/mocov2_cifar100.py", "configs/byol_imagenet.py",
                       "configs/vit_cifar10.py", "configs/table15.py")


@pytest.mark.parametrize("path", PAPER_TABLE_CONFIGS)
def test_paper_table_configs_run_the_official_step(path):
    """One optimizer update per width, and plain weight decay wherever group regularization is
    off, as the official code that produced the tables (docs/fidelity.md)."""
    module = load_config_module(path)
    for arg in documented_args(path):
        c = module.get_config(arg or None)
        kind, m = build.method_and_kind(c)
        assert c.method.update_mode == "per_width", (path, arg)
        rule = "weight_decay" if c.optim.reg_alpha == 0 else "group_reg"
        assert c.method.decay_rule == rule, arg
        if kind == "us3l":
            assert m.decay_rule == rule, arg
        else:  # SEED / MoCo v2 decay every parameter group (plain weight decay)
            assert kind in ("seed", "moco") and rule == "weight_decay", (path, arg)


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
def test_seed_configs_cover_table2_and_take_the_teacher_workdir():
    mod = load_config_module("configs/seed_cifar100.py")
    for loss, arch, tag in sorted(mod.ROWS):
        c = mod.get_config(f"{loss},{arch},{tag},0.5,runs/teacher_{tag}")
        config_lib.validate(c)
        assert c.teacher.workdir == "runs/teacher_" + tag
        assert c.eval.paper_row == f"table2/{arch}/{loss}_byol_{tag}"
        kind, m = build.method_and_kind(c)
        assert (kind, c.method.teacher, c.sampler.individual_width, c.heads.proj_out) == (
            "seed", "frozen", 0.5, 2048)
        assert m.loss == ("mse" if loss == "seed_mse" else "seed")
        assert m.uses_predictor == (loss == "seed_mse")
        # Official teacher modes: SEED in train mode, SEED-MSE in eval mode.
        assert c.teacher.bn == ("batch" if loss == "seed" else "calibrated")
    # An official checkpoint converted to safetensors; the tag names its architecture.
    c = mod.get_config("seed_mse,mobilenet_v2,r50,0.25,/ckpt/byol_r50.safetensors")
    config_lib.validate(c)
    assert (c.teacher.state_dict, c.teacher.model, c.teacher.workdir) == (
        "/ckpt/byol_r50.safetensors", "cifar_resnet50", None)
    c = mod.get_config("seed,resnet18,r50,1.0,runs/t")
    m = build.method(c)
    assert (m.queue_size, m.tau, m.teacher_tau, c.optim.epochs, c.optim.lr) == (
        32768, 0.5, 1e-4, 200, 0.05)
    assert 2 * c.optim.reg_lambda == pytest.approx(1e-4)
    c.teacher.workdir = None
    with pytest.raises(config_lib.ConfigError, match="needs exactly one of config.teacher.workdir"):
        config_lib.validate(c)
    c = mod.get_config("seed,resnet18,r50,1.0,runs/t")
    c.method.queue_size = 1000
    with pytest.raises(config_lib.ConfigError, match="queue_size=1000 must be a multiple"):
        config_lib.validate(c)
    c = mod.get_config("seed,resnet18,r50,1.0,runs/t")
    c.sampler.individual_width = None
    with pytest.raises(config_lib.ConfigError, match="trains one width"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match="unknown teacher tag 'r34'"):
        mod.get_config("seed,resnet18,r34,1.0,runs/t")


def test_mocov2_is_the_official_cifar_config():
    c = load_config_module("configs/mocov2_cifar100.py").get_config("0.5")
    config_lib.validate(c)
    kind, m = build.method_and_kind(c)
    assert (kind, c.method.base_loss, m.tau, m.ema_momentum, m.queue_size) == (
        "moco", "moco", 0.2, 0.999, 2048)
    assert (c.heads.proj_style, c.heads.proj_hidden, c.heads.proj_out) == ("mocov2", 2048, 256)
    assert (c.optim.lr, c.optim.batch_size, c.method.group_size) == (0.3, 256, 64)
    assert 2 * c.optim.reg_lambda == pytest.approx(1e-4)


def test_byol_imagenet_table4():
    mod = load_config_module("configs/byol_imagenet.py")
    for arch in ("resnet18", "resnet50"):
        for w in (1.0, 0.75, 0.5, 0.25):
            c = mod.get_config(f"byol,{arch},{w}")
            config_lib.validate(c)
            assert build.sampler(c).individual_width == w and c.eval.sweep_widths == (w,)
        c = mod.get_config(f"us_byol,{arch}")
        config_lib.validate(c)
        assert build.method(c) == recipes.table7_method(
            4, group_size=c.method.group_size, tau=0.5, decay_rule="weight_decay")
        assert c.method.update_mode == "per_width"
        s = build.sampler(c)
        assert (s.num_samples, s.sandwich, s.schedule) == (3, True, None)
        assert c.eval.paper_row == f"table4/{arch}/us_byol" and c.optim.lr == 0.05
    assert mod.get_config("byol,resnet50,1.0").optim.batch_size == 480


def test_imagenet_configs_match_the_official_files():
    """Table 4 rows against the official ImageNet yaml files (8 GPUs): US3L = the
    ``us_resnet{18,50}_simclr_featdistill_imagenet`` configs, US+BYOL = the
    ``*_byol_imagenet_baseline`` ones. Every evaluation batch is made of whole BN groups that
    8 devices share, as calibration and the evaluator require."""
    us3l = load_config_module("configs/us3l_imagenet.py")
    byol = load_config_module("configs/byol_imagenet.py")
    # (arg, batch, BN group, lr, feature distillation, group-reg warm-up, sampling schedule)
    expected = {
        (us3l, "resnet50"): (480, 60, 0.5, True, 50, "A"),
        (us3l, "resnet18"): (1024, 128, 0.5, False, 50, "A"),
        (us3l, "resnet50,paper"): (512, 64, 0.5, False, 50, "A"),
        (us3l, "resnet18,paper"): (512, 128, 0.5, False, 50, "A"),
        (byol, "us_byol,resnet50"): (480, 60, 0.05, False, 0, "none"),
        (byol, "us_byol,resnet18"): (1024, 128, 0.05, False, 0, "none"),
        (byol, "byol,resnet50,0.5"): (480, 60, 0.05, False, 0, "none"),
    }
    for (mod, arg), want in expected.items():
        c = mod.get_config(arg)
        config_lib.validate(c)
        got = (c.optim.batch_size, c.method.group_size, c.optim.lr, c.method.feature_distill,
               c.optim.reg_warmup_epochs, c.sampler.schedule)
        assert got == want, arg
        assert (c.optim.epochs, c.optim.schedule_unit, c.optim.momentum) == (100, "epoch", 0.9)
        assert c.eval.batch_size % c.method.group_size == 0 and c.eval.batch_size % 8 == 0
        assert c.data.augment == "imagenet" and c.eval.calibration == "official_imagenet"
    c = us3l.get_config("resnet50")
    assert (c.optim.reg_lambda, c.optim.reg_alpha, c.optim.reg_groups, c.method.tau,
            c.method.ema_momentum, c.heads.proj_out, c.heads.proj_hidden) == \
        (5e-5, 0.05, 8, 0.5, 0.99, 256, 2048)
    with pytest.raises(ValueError, match="unknown ImageNet US3L variant 'foo'; valid: "
                                         "official, paper"):
        us3l.get_config("resnet50,foo")
    c.optim.batch_size = 500
    with pytest.raises(config_lib.ConfigError, match="batch_size=500 is not a multiple of "
                                                     "config.method.group_size=60; use e.g. 480"):
        config_lib.validate(c)


def test_table15_adds_group_reg_to_the_table2_baselines():
    """Table 15: the individual BYOL / SimCLR runs of Table 2 with their plain weight decay
    replaced by group regularization of the same strength (lambda = decay / 2, alpha 0.05,
    G 8, no warm-up); without it they are the Table 2 runs, and the US3L rows are Table 14
    cases 3 / 1 (no dynamic sampling)."""
    t15 = load_config_module("configs/table15.py")
    base = load_config_module("configs/baselines_cifar100.py")
    strategies = load_config_module("configs/strategies.py")
    for method, lam in (("byol", 2.5e-4), ("simclr", 5e-5)):
        c = t15.get_config(f"{method},0.5")
        config_lib.validate(c)
        assert (c.method.decay_rule, c.optim.reg_lambda, c.optim.reg_alpha, c.optim.reg_groups,
                c.optim.reg_warmup_epochs) == ("group_reg", lam, 0.05, 8, 0)
        assert build.sampler(c).individual_width == 0.5
        assert c.eval.paper_row == f"table15/{method}/gr"
        plain, table2 = t15.get_config(f"{method},0.5,none"), base.get_config(f"{method},0.5")
        assert plain.eval.paper_row == f"table15/{method}/none"
        plain.eval.paper_row = table2.eval.paper_row
        assert plain.to_dict() == table2.to_dict()
        gr = c.to_dict()
        for section in ("model", "data", "heads", "sampler"):
            assert gr[section] == table2.to_dict()[section], (method, section)
    for reg, case in (("gr", 3), ("none", 1)):
        ours, ref = t15.get_config(f"ours,{reg}"), strategies.get_config(f"table14,{case}")
        ours.eval.paper_row = ref.eval.paper_row
        assert ours.to_dict() == ref.to_dict(), reg
    with pytest.raises(ValueError, match="group regularization must be one of gr, none, "
                                         "got 'yes'"):
        t15.get_config("byol,0.5,yes")
    with pytest.raises(ValueError, match="unknown Table 15 method 'simsiam'"):
        t15.get_config("simsiam,0.5")


def test_us_simclr_is_table7_case14():
    c = load_config_module("configs/baselines_cifar100.py").get_config("us_simclr")
    m = build.method(c)
    assert (m.base_loss, m.distill_loss, m.aux_head, m.momentum_base, m.momentum_sub) == \
        recipes.TABLE7_CASES[14]
    assert c.sampler.num_samples == 3


def test_demo_baseline_variants():
    mod = load_config_module("configs/demo.py")
    base = mod.get_config(None)
    for arg in ("byol", "byol,0.25", "us_byol", "mocov2,0.5", "seed,0.25", "seed_mse,1.0,/x"):
        c = mod.get_config(arg)
        config_lib.validate(c)
        # Same backbone, data, batch and number of steps as the US3L demo.
        for key in ("model", "data"):
            assert c[key].to_dict() == base[key].to_dict(), (arg, key)
        assert (c.optim.batch_size, c.optim.epochs) == (base.optim.batch_size,
                                                         base.optim.epochs)
    assert mod.get_config("seed,0.5").teacher.workdir == "/tmp/us3l_demo_byol"


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


@pytest.mark.parametrize("arg", [f"{arch},{variant}" for arch in ("tiny", "small")
                                 for variant in ("us3l", "us_mocov3", "mocov3@1.0",
                                                 "mocov3@0.75", "mocov3@0.5", "mocov3@0.25")])
def test_vit_paper_rows_freeze_the_patch_embedding(arg):
    """Both official ViT launch scripts pass --stop-grad-conv1: every Table 3 row freezes the
    patch embedding; the paper's description (a trained one) stays an override."""
    module = load_config_module("configs/vit_cifar10.py")
    c = module.get_config(arg)
    assert c.eval.paper_row.startswith("table3/")
    config_lib.validate(c)
    assert c.model.stop_grad_patch is True
    assert build.backbone(c).frozen_params() == (("patch_embed",),)
    c.model.stop_grad_patch = False
    config_lib.validate(c)
    assert build.backbone(c).frozen_params() == ()


def test_vit_demo_keeps_a_trained_patch_embedding():
    # docs/results.md's demo figures were measured with it trained.
    c = load_config_module("configs/demo.py").get_config("vit")
    assert c.model.stop_grad_patch is False


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
    assert m == recipes.table7_method(13, group_size=64, feature_distill=True,
                                      feature_distill_weight=1.0)
    assert c.method.update_mode == "per_width"
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
