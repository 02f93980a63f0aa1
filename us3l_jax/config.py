"""The run configuration: its schema (``get_default``) and validation.

Config files in ``configs/`` start from ``get_default()`` and override fields. The config is
locked, typed ``ml_collections.ConfigDict``: an override of a key that does not exist, or of
the wrong type, fails in ``config_flags`` before anything runs; ``validate`` then checks every
value (by building the objects it describes with ``us3l_jax.build``) and the constraints
between fields, and raises ``ConfigError`` naming the field. The method's and the sampler's
fields and defaults are stated once, by ``methods.SCHEMA`` and ``SamplerConfig``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from us3l_jax import build, eval_names, methods, metrics, models, paper, sampling, slim
from us3l_jax.build import DTYPES
from us3l_jax.data import datasets
from us3l_jax.models import vit as vit_lib
from us3l_jax.models.heads import PROJECTOR_STYLES, hooked_layers
AUGMENT_PRESETS = ("cifar", "imagenet", "byol", "byol_cifar", "none")
OBJECTIVES = ("ssl", "supervised")


class ConfigError(ValueError):
    """A config value or combination of values that cannot run."""


def _from_dataclass(obj, exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """A config section with a dataclass's fields and defaults (Optional fields become typed
    placeholders, so overrides are still type-checked)."""
    return _section({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                     if f.name not in exclude},
                    {f.name: f.type for f in dataclasses.fields(obj)})


def _section(defaults: dict[str, Any], types: dict[str, Any]) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict()
    for name, value in defaults.items():
        if value is None:
            kind = {"int | None": int, "float | None": float, "str | None": str}[types[name]]
            value = config_dict.placeholder(kind)
        section[name] = value
    return section


def get_default() -> ml_collections.ConfigDict:
    """US3L on CIFAR-100 with ResNet-18 (paper Table 2 recipe, as the official CIFAR ResNet-18 config)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "cifar_resnet18"
    c.model.dtype = "float32"  # compute dtype; parameters are always float32
    c.model.base_width = config_dict.placeholder(int)  # ResNet only: stage planes base*(1,2,4,8)
    c.model.stage_sizes = config_dict.placeholder(tuple)  # ResNet only: blocks per stage
    # ViT only (None: the named model's value): sizes, patch, "official"/"embed" slicing and
    # the frozen patch embedding (MoCo v3's --stop-grad-conv1).
    c.model.dim = config_dict.placeholder(int)
    c.model.depth = config_dict.placeholder(int)
    c.model.heads = config_dict.placeholder(int)
    c.model.patch_size = config_dict.placeholder(int)
    c.model.slicing = config_dict.placeholder(str)
    c.model.stop_grad_patch = config_dict.placeholder(bool)
    # S-Net (switchable networks): a fixed width list, each width with private BatchNorm, all
    # of them trained every step; sampler.width_range must be (min, max) of it. Empty: US-Net.
    c.model.switchable_widths = ()

    c.heads = ml_collections.ConfigDict()
    c.heads.proj_hidden = 2048
    c.heads.proj_out = 256
    c.heads.proj_style = "simclr"
    c.heads.head_hidden = 2048

    # Supervised slimmable training (paper Table 1; us3l_jax.methods.supervised). The objective
    # lives in train.objective; the update mode and BN groups are method.update_mode and
    # method.group_size, the widths come from the sampler as in SSL.
    c.supervised = ml_collections.ConfigDict()
    c.supervised.distill = True  # sub-networks learn the largest width's soft predictions
    c.supervised.label_smoothing = 0.0

    c.method = _section(methods.SCHEMA, {"group_size": "int | None"})
    # The official per-GPU batch on CIFAR (the schema's default None is the whole batch).
    c.method.group_size = 128

    c.sampler = _from_dataclass(sampling.SamplerConfig(), exclude=("grid", "seed", "fixed"))
    c.sampler.schedule = c.sampler.schedule or "none"  # "A", ..., or "none"
    # Random widths from a grid of this step (deduplicated by channel configuration), which
    # bounds the number of compiled programs; None draws continuously as the paper.
    c.sampler.grid_step = config_dict.placeholder(float)

    # The frozen teacher of SEED / SEED-MSE (method.teacher='frozen', us3l_jax.teacher): a
    # pretrained run's workdir and checkpoint step (None: the latest), or a torch-layout
    # state dict (.safetensors, e.g. an official BYOL checkpoint's) with its architecture
    # (a model name); the width it runs at (None: the width it was trained at, or its
    # range's maximum; 1.0 for a state dict); and its BatchNorm statistics: "batch" (train
    # mode, official SEED), "calibrated" (eval mode, running averages over
    # calibration_batches batches of its SSL views, official SEED-MSE) or "stored" (eval
    # mode, the state dict's running statistics).
    c.teacher = ml_collections.ConfigDict()
    c.teacher.workdir = config_dict.placeholder(str)
    c.teacher.step = config_dict.placeholder(int)
    c.teacher.state_dict = config_dict.placeholder(str)
    c.teacher.model = config_dict.placeholder(str)
    c.teacher.width = config_dict.placeholder(float)
    c.teacher.bn = "batch"
    c.teacher.calibration_batches = 200

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "cifar100"
    c.data.data_dir = config_dict.placeholder(str)
    # Training view size (default: the augment preset's, 32 or 224); digits are also stored
    # at this size (upsampled from 8x8).
    c.data.image_size = config_dict.placeholder(int)
    c.data.augment = "cifar"
    # Streaming input (host decode + crops, for data that does not fit in device memory);
    # None: only for imagenet2012. Otherwise the uint8 images are held on device.
    c.data.streaming = config_dict.placeholder(bool)
    c.data.num_threads = 16  # host threads decoding/cropping (streaming only)

    c.optim = ml_collections.ConfigDict()
    c.optim.batch_size = 512
    c.optim.epochs = 400
    c.optim.lr = 0.5
    c.optim.schedule_unit = "epoch"  # official: lr and alpha change once per epoch; or "step"
    c.optim.warmup_epochs = 0
    c.optim.momentum = 0.9
    # Group regularization (paper Eq. 4-5): lambda of sum(lambda_i p^2), i.e. weight decay
    # 2*lambda; alpha = 0 is plain L2 weight decay.
    c.optim.reg_lambda = 5e-5
    c.optim.reg_alpha = 0.05
    c.optim.reg_groups = 8
    c.optim.reg_warmup_epochs = 0
    c.optim.reg_rule = "official"
    c.optim.lars = False
    # "sgd" (the CNN recipes above) or "adamw" (MoCo v3 ViTs: per-iteration warm-up + cosine,
    # decoupled weight_decay; or, with weight_decay 0, reg_lambda as the official ViT group
    # regularizer).
    c.optim.optimizer = "sgd"
    c.optim.weight_decay = 0.0
    # AdamW's step count: "global" (optax: one count, advanced by every update) or "per_param"
    # (torch.optim.AdamW: each parameter counts from its first gradient; the ViT configs).
    c.optim.adam_count = "global"

    c.train = ml_collections.ConfigDict()
    c.train.objective = "ssl"  # or "supervised": cross-entropy on the labels (Table 1)
    c.train.log_every_steps = 20
    c.train.checkpoint_every_steps = config_dict.placeholder(int)  # default: once per epoch
    c.train.keep_checkpoints = 3
    c.train.max_steps = config_dict.placeholder(int)  # stop early (smoke runs); None: full run
    c.train.compile_ahead = True
    c.train.compilation_cache_dir = config_dict.placeholder(str)
    # jax.transfer_guard level for each step's batch, programs and metric fetch: "disallow"
    # (or "log") reports any implicit host<->device copy, which would stall the pipeline.
    c.train.transfer_guard = "allow"
    # Weights & Biases (the [wandb] extra): a project name logs the metrics there too, beside
    # metrics.jsonl and TensorBoard; '' logs nowhere else. Entity and run name: W&B's defaults.
    c.train.wandb_project = ""
    c.train.wandb_entity = config_dict.placeholder(str)
    c.train.wandb_name = config_dict.placeholder(str)

    c.eval = ml_collections.ConfigDict()
    c.eval.online_every_epochs = 0  # 0 disables the online probe during pretraining
    c.eval.online_protocol = "knn"
    c.eval.online_widths = (1.0, 0.5, 0.25)
    c.eval.final_sweep = False
    c.eval.sweep_protocol = "fast"
    c.eval.sweep_widths = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25)
    c.eval.calibration_batches = 100
    c.eval.batch_size = 512
    c.eval.paper_row = config_dict.placeholder(str)  # e.g. "table2/resnet18/ours"
    # BN calibration (us3l_jax.calibration): a named procedure, "official_cifar" or
    # "official_imagenet" (what the paper's numbers used), or "custom": the fields below.
    c.eval.calibration = "custom"
    # "cumulative" = exact statistics over all calibration batches (US-Net); "ema" = the
    # official momentum-0.1 running averages.
    c.eval.calibration_mode = "cumulative"
    c.eval.calibration_batch_size = config_dict.placeholder(int)  # None: eval.batch_size
    # Calibration inputs: "linear_train" (the linear-eval training crops, as the official CIFAR
    # path), "ssl" (the pretraining views, as the official ImageNet calibration run) or "none"
    # (the deterministic eval transform).
    c.eval.calibration_augment = "linear_train"
    c.eval.online_calibration_batches = 10  # smaller budget for the online probe
    c.eval.knn_k = 200
    c.eval.knn_temperature = 0.1
    # Online linear probe (solo-learn's online classifier, us3l_jax.engine.online_probe): a
    # linear classifier trained every step on the base network's detached features of the
    # training batch; logs probe/loss, probe/acc1 and, at online evals, probe/val_acc1. SGD
    # momentum 0.9, no weight decay, online_linear_lr cosine-decayed over the run.
    c.eval.online_linear = False
    c.eval.online_linear_lr = 0.1
    # Paper-protocol recipe: "auto" (ViT backbones: SGD lr 0.1, cosine, 90 ep, head N(0, 0.01);
    # ImageNet: LARS/cosine/60 ep; transfer sets: batch 256, 9.4; otherwise CIFAR: SGD lr 30,
    # 100 ep, x0.1 at 60/80, 9.2), or "cifar", "transfer", "imagenet", "vit". linear_epochs
    # overrides the epochs (milestones scale with it).
    c.eval.linear_recipe = "auto"
    c.eval.linear_epochs = config_dict.placeholder(int)
    # Fine-tuning recipe (protocol "finetune", us3l_jax.evaluate.finetune.RECIPES); its epochs
    # are eval.linear_epochs when set.
    c.eval.finetune_recipe = "us"
    return c


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def _choice(path: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config.{path}={value!r} is not one of {tuple(allowed)}")


def _positive(path: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"config.{path} must be > 0, got {value!r}")


# Fields where a negative value has no meaning (0 switches the term off or means none).
NON_NEGATIVE = ("seed", "method.distill_weight", "method.feature_distill_weight",
                "method.queue_size", "optim.reg_alpha", "optim.reg_lambda",
                "optim.weight_decay", "optim.momentum", "optim.warmup_epochs",
                "optim.reg_warmup_epochs", "eval.online_every_epochs",
                "supervised.label_smoothing")


def _field_error(config: ml_collections.ConfigDict, e: Exception,
                 *sections: str) -> ConfigError:
    """A builder's ``ValueError`` about ``config.<section>`` (the first of ``sections``,
    or a later one holding the field) as a ``ConfigError`` that names the full field path
    where the message starts with a field's name (``group_size must be positive`` ->
    ``config.method.group_size must be positive``). Fields whose builders call them
    otherwise (``size``, ``groups``, ``warmup``) are checked by ``validate`` itself."""
    message = str(e)
    word = re.match(r"[A-Za-z_]\w*", message)
    name = word.group(0) if word else ""
    if any(message.startswith(s + ".") for s in sections):  # the full path is named
        return ConfigError(f"config.{message}")
    for section in sections:
        if name in config[section]:
            return ConfigError(f"config.{section}.{message}")
    return ConfigError(f"config.{sections[0]}: {message}")


def _non_finite(node, prefix: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in the config, if any."""
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            found = _non_finite(v, path + ".")
            if found:
                return found
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, float) and not math.isfinite(x):
                return path
    return None


def _nearest_multiple(value: int, of: int) -> int:
    return max(of, round(value / of) * of)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field; raises ``ConfigError`` naming the first bad one."""
    bad = _non_finite(config)
    if bad:
        section, _, key = bad.rpartition(".")
        value = config[section][key] if section else config[key]
        raise ConfigError(f"config.{bad}={value!r} is not a finite number")
    _choice("model.name", config.model.name, models.NAMES)
    _choice("model.dtype", config.model.dtype, DTYPES)
    _choice("heads.proj_style", config.heads.proj_style, PROJECTOR_STYLES)
    _choice("data.dataset", config.data.dataset, datasets.NAMES)
    _choice("data.augment", config.data.augment, AUGMENT_PRESETS)
    _choice("train.objective", config.train.objective, OBJECTIVES)
    _choice("optim.schedule_unit", config.optim.schedule_unit, ("epoch", "step"))
    _choice("train.transfer_guard", config.train.transfer_guard,
            ("allow", "log", "disallow", "log_explicit", "disallow_explicit"))
    _choice("eval.online_protocol", config.eval.online_protocol, eval_names.ONLINE_PROTOCOLS)
    _choice("eval.sweep_protocol", config.eval.sweep_protocol, eval_names.PROTOCOLS)
    _choice("eval.calibration", config.eval.calibration, eval_names.CALIBRATION_PRESETS)
    _choice("eval.calibration_mode", config.eval.calibration_mode, eval_names.CALIBRATION_MODES)
    _choice("eval.calibration_augment", config.eval.calibration_augment,
            eval_names.CALIBRATION_AUGMENTS)
    _choice("eval.linear_recipe", config.eval.linear_recipe,
            ("auto",) + eval_names.LINEAR_RECIPES)
    _choice("eval.finetune_recipe", config.eval.finetune_recipe, eval_names.FINETUNE_RECIPES)
    if config.eval.linear_epochs is not None:
        _positive("eval.linear_epochs", config.eval.linear_epochs)
    if config.eval.paper_row is not None:
        try:
            paper.get(config.eval.paper_row)
        except ValueError as e:
            raise ConfigError(f"config.eval.paper_row: {e}") from None
    for path in ("optim.batch_size", "optim.epochs", "optim.lr", "train.log_every_steps",
                 "train.keep_checkpoints", "eval.batch_size", "heads.proj_hidden",
                 "heads.proj_out", "heads.head_hidden", "eval.calibration_batches",
                 "eval.online_calibration_batches", "eval.knn_k", "eval.knn_temperature",
                 "eval.online_linear_lr",
                 "optim.reg_groups", "data.num_threads"):
        section, key = path.split(".")
        _positive(path, config[section][key])
    for path in NON_NEGATIVE:
        section, _, key = path.rpartition(".")
        value = config[section][key] if section else config[key]
        if value < 0:
            raise ConfigError(f"config.{path}={value!r} must be >= 0")
    if config.optim.momentum >= 1:
        raise ConfigError(f"config.optim.momentum={config.optim.momentum!r} must be below 1")
    if config.data.image_size is not None:
        _positive("data.image_size", config.data.image_size)
    if config.model.name not in ("cifar_resnet18", "cifar_resnet50", "resnet18", "resnet50"):
        for key in ("base_width", "stage_sizes"):
            if config.model[key] is not None:
                raise ConfigError(f"config.model.{key} only applies to ResNets, not "
                                  f"{config.model.name!r}")
    sizes = config.model.stage_sizes
    if sizes is not None and not (len(sizes) == 4 and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)):
        raise ConfigError(f"config.model.stage_sizes={tuple(sizes)!r} must be 4 positive "
                          f"integers (blocks in each of the ResNet's 4 stages), e.g. "
                          f"(2, 2, 2, 2)")
    if config.model.base_width is not None:
        _positive("model.base_width", config.model.base_width)
    if config.data.dataset == "digits" and config.data.data_dir is not None:
        raise ConfigError(f"config.data.data_dir={config.data.data_dir!r} does not apply to "
                          f"dataset 'digits' (it ships with scikit-learn); leave it unset")
    if config.train.checkpoint_every_steps is not None:
        _positive("train.checkpoint_every_steps", config.train.checkpoint_every_steps)
    for path, needed in (("eval.sweep_widths", True),
                         ("eval.online_widths", bool(config.eval.online_every_epochs))):
        section, key = path.split(".")
        if needed and not config[section][key]:
            raise ConfigError(f"config.{path} is empty; give at least one width, e.g. "
                              f"(1.0, 0.5, 0.25)")
    _choice("optim.optimizer", config.optim.optimizer, ("sgd", "adamw"))
    _choice("optim.adam_count", config.optim.adam_count, ("global", "per_param"))
    if config.model.name not in models.VIT_NAMES:
        for key in ("dim", "depth", "heads", "patch_size", "slicing", "stop_grad_patch"):
            if config.model[key] is not None:
                raise ConfigError(f"config.model.{key} only applies to ViTs "
                                  f"{models.VIT_NAMES}, not {config.model.name!r}")
    elif config.model.slicing is not None:
        _choice("model.slicing", config.model.slicing, vit_lib.SLICINGS)
    _validate_supervised(config)
    try:
        kind, method = build.method_and_kind(config)
    except ValueError as e:
        raise _field_error(config, e, "method") from None
    try:
        sampler = build.sampler(config)
    except ValueError as e:
        raise _field_error(config, e, "sampler") from None
    try:
        backbone = build.backbone(config)
    except ValueError as e:
        raise _field_error(config, e, "model") from None
    # The model family's smallest width (0.25 for the CNNs): pretraining profiles the
    # range's ends at the family's own range, so a range reaching below it would fail only
    # once the run had set up and written its workdir.
    floor = {f.name: f.default for f in dataclasses.fields(backbone)}.get("min_width", 0.0)
    for w in config.sampler.width_range:
        try:
            slim.validate_width(w, floor)
            backbone.feature_dim(w)
        except ValueError as e:
            raise ConfigError(f"config.sampler.width_range={tuple(config.sampler.width_range)}"
                              f": {e} for config.model.name={config.model.name!r}") from None
    lo = min(config.sampler.width_range)
    for c, ratio in backbone.slim_dims():
        if slim.channels(c, lo, ratio) > c:
            raise ConfigError(
                f"config.model: a layer of {c} channels at width {lo} needs "
                f"{slim.channels(c, lo, ratio)} under the official rounding (multiples of 8, "
                f"never 10% below), more than it has; use a larger model.base_width (16 or more "
                f"for width 0.25) or a larger sampler.width_range[0]")
    if getattr(method, "feature_distill", False):
        try:
            hooked_layers(backbone, method.feature_layers)
        except ValueError as e:
            field = "feature_layers" if method.feature_layers else "feature_distill"
            raise ConfigError(f"config.method.{field}: {e}") from None
    if sampler.individual_width is not None:
        try:
            slim.validate_width(sampler.individual_width, sampler.width_range[0])
        except ValueError as e:
            raise ConfigError(f"config.sampler.individual_width: {e}") from None
    switchable = build.switchable_widths(config)
    for path in ("eval.online_widths", "eval.sweep_widths"):
        section, key = path.split(".")
        for w in config[section][key]:
            try:
                slim.validate_width(w, config.sampler.width_range[0])
                if switchable:
                    slim.switch_index(switchable, w)
            except ValueError as e:
                raise ConfigError(f"config.{path}: {e} (the trained range is "
                                  f"{tuple(config.sampler.width_range)})") from None
    if config.method.decay_rule == "weight_decay" and config.optim.reg_alpha != 0:
        raise ConfigError(
            f"config.method.decay_rule='weight_decay' is plain weight decay, but "
            f"config.optim.reg_alpha={config.optim.reg_alpha}: set reg_alpha=0, or use "
            f"decay_rule='group_reg' for group regularization")
    _validate_baseline(config, kind, sampler)
    g = config.method.group_size
    if g is not None and config.optim.batch_size % g:
        raise ConfigError(f"config.optim.batch_size={config.optim.batch_size} is not a "
                          f"multiple of config.method.group_size={g}; use e.g. "
                          f"{_nearest_multiple(config.optim.batch_size, g)}")
    cal_batch = config.eval.calibration_batch_size
    if cal_batch is not None:
        _positive("eval.calibration_batch_size", cal_batch)
        if g is not None and cal_batch % g:
            raise ConfigError(f"config.eval.calibration_batch_size={cal_batch} is not a "
                              f"multiple of config.method.group_size={g} (calibration "
                              f"normalises per group, as pretraining)")
    if config.optim.warmup_epochs >= config.optim.epochs:
        raise ConfigError(f"config.optim.warmup_epochs={config.optim.warmup_epochs} must be "
                          f"below config.optim.epochs={config.optim.epochs}")
    _validate_wandb(config.train)
    if config.train.max_steps is not None and config.train.max_steps <= 0:
        raise ConfigError(f"config.train.max_steps must be > 0 or None, got "
                          f"{config.train.max_steps}")
    try:
        build.views(config)
    except ValueError as e:
        raise _field_error(config, e, "data") from None
    try:
        build.optimizer(config, steps_per_epoch=1)
    except ValueError as e:
        raise _field_error(config, e, "optim") from None


def _validate_baseline(config: ml_collections.ConfigDict, kind: str, sampler) -> None:
    """SEED / SEED-MSE / MoCo v2: one width per run, a teacher run, whole batches per queue."""
    if kind not in methods.SINGLE_WIDTH:
        return
    method = config.method
    if sampler.individual_width is None:
        raise ConfigError(f"config.method.base_loss={method.base_loss!r} with teacher="
                          f"{method.teacher!r} trains one width: set "
                          f"config.sampler.individual_width")
    if method.teacher == "frozen":
        validate_teacher(config.teacher)
    if method.queue_size and method.queue_size % config.optim.batch_size:
        raise ConfigError(f"config.method.queue_size={method.queue_size} must be a multiple "
                          f"of config.optim.batch_size={config.optim.batch_size}")


def _validate_wandb(train: ml_collections.ConfigDict) -> None:
    """A W&B project only where wandb is installed; entity and name only with a project."""
    if not train.wandb_project:
        for key in ("wandb_entity", "wandb_name"):
            if train[key]:
                raise ConfigError(f"config.train.{key}={train[key]!r} needs "
                                  f"config.train.wandb_project (empty: W&B is off)")
        return
    problem = metrics.wandb_problem()
    if problem:
        raise ConfigError(f"config.train.wandb_project={train.wandb_project!r} logs to "
                          f"Weights & Biases, but {problem}")


TEACHER_BN = ("batch", "calibrated", "stored")  # how a frozen teacher's BNs run


def validate_teacher(t: ml_collections.ConfigDict) -> None:
    """Where the frozen teacher comes from and how its BatchNorms run."""
    if bool(t.workdir) == bool(t.state_dict):
        raise ConfigError(
            "method.teacher='frozen' needs exactly one of config.teacher.workdir (a "
            "pretrained teacher run) and config.teacher.state_dict (a torch-layout "
            f".safetensors file); got workdir={t.workdir!r}, state_dict={t.state_dict!r}")
    if t.state_dict:
        if t.model not in models.NAMES or t.model in models.VIT_NAMES:
            cnns = [n for n in models.NAMES if n not in models.VIT_NAMES]
            raise ConfigError(f"config.teacher.model={t.model!r} must name the state dict's "
                              f"architecture, one of {', '.join(cnns)}")
        if t.step is not None:
            raise ConfigError("config.teacher.step selects a checkpoint of a teacher workdir; "
                              "a state dict has none")
    elif t.model is not None:
        raise ConfigError("config.teacher.model is only for a teacher.state_dict (a workdir "
                          "records its own model)")
    if t.bn not in TEACHER_BN:
        raise ConfigError(f"config.teacher.bn={t.bn!r} is not one of {', '.join(TEACHER_BN)}")
    if t.bn == "stored" and not t.state_dict:
        raise ConfigError("config.teacher.bn='stored' uses a state dict's running statistics; "
                          "a teacher workdir stores none: use 'calibrated' or 'batch'")
    if t.calibration_batches < 1:
        raise ConfigError(f"config.teacher.calibration_batches="
                          f"{t.calibration_batches} must be at least 1")
    if t.width is not None and not 0 < t.width <= 1:
        raise ConfigError(f"config.teacher.width={t.width} must be in (0, 1]")


def _validate_supervised(config: ml_collections.ConfigDict) -> None:
    """The S-Net width list, the supervised loss design and what supervised runs support."""
    widths = build.switchable_widths(config)
    if widths:
        for w in widths:
            try:
                slim.validate_width(w)
            except ValueError as e:
                raise ConfigError(f"config.model.switchable_widths: {e}") from None
        if len(set(widths)) != len(widths):
            raise ConfigError(f"config.model.switchable_widths={widths} repeats a width")
        if widths[0] != 1.0:
            raise ConfigError(f"config.model.switchable_widths={widths} must include 1.0 (the "
                              "width the parameters are initialised at)")
        if tuple(config.sampler.width_range) != (widths[-1], widths[0]):
            raise ConfigError(
                f"config.sampler.width_range={tuple(config.sampler.width_range)} must be "
                f"({widths[-1]}, {widths[0]}), the range of config.model.switchable_widths")
        if config.sampler.individual_width is not None:
            raise ConfigError("config.model.switchable_widths trains its whole width list; "
                              "an individual width (config.sampler.individual_width) needs "
                              "switchable_widths=()")
    protocols = {config.eval.sweep_protocol}
    if config.train.objective == "supervised" and config.eval.online_linear:
        raise ConfigError("config.eval.online_linear probes a self-supervised run; a "
                          "supervised run trains its own classifier (its loss and the top1 "
                          "sweep): set online_linear=False")
    if config.train.objective != "supervised":
        if "top1" in protocols:
            raise ConfigError("config.eval.sweep_protocol='top1' reads the classifier of a "
                              "supervised run (config.train.objective='supervised'); SSL runs "
                              "use fast, knn or paper")
        return
    try:
        build.method(config)
    except ValueError as e:
        raise _field_error(config, e, "supervised", "method") from None
    if build.is_streaming(config):
        raise ConfigError("config.train.objective='supervised' runs on in-memory datasets "
                          f"only; {config.data.dataset} streams (config.data.streaming)")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"section.field": value}`` with the values as ``to_json`` writes them (tuples as
    lists), for comparing configs and for reporting one as a flat table."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(json.loads(to_json(config)), "")
    return out


def from_json(text: str) -> ml_collections.ConfigDict:
    """The inverse of ``to_json``, typed like ``get_default()`` (tuples restored)."""
    loaded = json.loads(text)
    c = get_default()

    def merge(dst, src, path=""):
        for k, v in src.items():
            if k not in dst:
                raise ConfigError(f"saved config has unknown key {path + k!r}")
            if isinstance(dst[k], ml_collections.ConfigDict):
                merge(dst[k], v, f"{path}{k}.")
            else:
                dst[k] = tuple(v) if isinstance(v, list) else v

    merge(c, loaded)
    return c
