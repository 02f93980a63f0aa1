"""Paper recipes as config builders, shared by the files in ``configs/``.

Hyper-parameters follow the paper (§4.1, appendix Table 11) where it states them and the
official configs where it does not; each function says which, and where the
two disagree the official value is one override away (see the config files' docstrings).
"""
from __future__ import annotations

import ml_collections

from us3l_jax import config as config_lib
from us3l_jax.methods import us3l

# Paper Table 7 (main text) as flags: case -> (base loss, distill loss, auxiliary distill head,
# momentum target for the base network, for the sub-networks). The main table's rows are
# appendix Table 17 cases 1, 3, 7, 8, 9, 12, 15, 17, 18, 19, 20, 22, 23, 24, 25, 27, 28, where
# the head column distinguishes a shared from a new head.
TABLE7_CASES: dict[int, tuple[str, str, str, bool, bool]] = {
    1: ("mse", "none", "none", False, False),       # SimSiam on every width: collapses
    2: ("mse", "mse", "shared", False, False),      # US+SimSiam (inplace distillation)
    3: ("mse", "mse", "shared", True, True),
    4: ("mse", "mse", "new", True, True),
    5: ("mse", "infonce", "none", False, False),
    6: ("mse", "infonce", "none", False, True),
    7: ("mse", "infonce", "none", True, True),
    8: ("mse", "infonce", "new", True, True),
    9: ("infonce", "none", "none", False, False),
    10: ("infonce", "mse", "none", False, False),
    11: ("infonce", "mse", "none", False, True),
    12: ("infonce", "mse", "none", True, True),
    13: ("infonce", "mse", "new", True, True),      # US3L
    14: ("infonce", "infonce", "none", False, False),
    15: ("infonce", "infonce", "none", False, True),
    16: ("infonce", "infonce", "none", True, True),
    17: ("infonce", "infonce", "new", True, True),
}
TABLE7_FIELDS = ("base_loss", "distill_loss", "aux_head", "momentum_base", "momentum_sub")


def table7_method(case: int, **overrides) -> us3l.Config:
    """The loss design of paper Table 7, case ``case`` (1-17); US3L is case 13."""
    if case not in TABLE7_CASES:
        raise ValueError(f"Table 7 has cases 1-17, got {case}")
    return us3l.Config(**{**dict(zip(TABLE7_FIELDS, TABLE7_CASES[case])), **overrides})


CIFAR_ARCHS = {"resnet18": "cifar_resnet18", "resnet50": "cifar_resnet50",
               "mobilenet_v2": "cifar_mobilenet_v2"}
IMAGENET_ARCHS = {"resnet18": "resnet18", "resnet50": "resnet50"}
CIFAR_SWEEP = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25)
IMAGENET_SWEEP = (1.0, 0.75, 0.5, 0.25)


def _arch(arch: str, table: dict[str, str]) -> str:
    if arch not in table:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(table)}")
    return table[arch]


def us3l_cifar(arch: str = "resnet18", dataset: str = "cifar100",
               epochs: int = 400) -> ml_collections.ConfigDict:
    """US3L on CIFAR (paper Table 2 "Ours"): InfoNCE base loss against the EMA teacher (m 0.99,
    tau 0.5), negative-cosine distillation through a new auxiliary head, sandwich rule with
    s = 3 and dynamic sampling "A" (by epoch), group regularization lambda 5e-5 (= weight decay
    1e-4), alpha 0.05, G 8; SGD momentum 0.9, lr 0.5 cosine per epoch, batch 512, 256/2048
    heads. BN statistics and negatives per 128 examples (the official per-GPU batch; 64 for
    R-50, which ran 8 x 64). Group-reg warm-up as the official configs: 0 epochs (alpha ramps to
    its value by epoch 200) for R-18, 200 for R-50 / MobileNetV2."""
    c = config_lib.get_default()
    official_step(c)
    c.model.name = _arch(arch, CIFAR_ARCHS)
    c.data.dataset = dataset
    c.optim.epochs = epochs
    if arch == "resnet50":
        c.method.group_size = 64
    if arch != "resnet18":
        c.optim.reg_warmup_epochs = epochs // 2
    c.eval.sweep_widths = CIFAR_SWEEP
    c.eval.sweep_protocol = "paper"
    c.eval.calibration = "official_cifar"
    c.eval.online_every_epochs = 20
    return c


def us3l_cifar_resnet50_official(dataset: str = "cifar100",
                                 epochs: int = 400) -> ml_collections.ConfigDict:
    """The official code's ResNet-50 CIFAR recipe, which differs from the paper's text: the
    ``us3l_cifar`` R-50 recipe with lr 0.25 (8 x 64 images), no dynamic sampling (the sandwich
    rule with s = 3 from the first epoch) and intermediate-feature distillation (weight 1.0,
    the last block of stages 2-4; docs/fidelity.md). Group reg lambda 5e-5 with warm-up for
    half the epochs, tau 0.5, m 0.99, 256/2048 heads, one update per width as ``us3l_cifar``."""
    c = us3l_cifar("resnet50", dataset, epochs)
    c.optim.lr = 0.25
    c.sampler.schedule = "none"
    c.method.feature_distill = True
    c.method.feature_distill_weight = 1.0
    return c


def individual_cifar(method: str, width: float, arch: str = "resnet18",
                     dataset: str = "cifar100") -> ml_collections.ConfigDict:
    """An individually trained SSL model at one fixed width (paper Table 2 baselines).

    SimCLR: lr 0.5, weight decay 1e-4, tau 0.5, 256/2048 heads. BYOL (m 0.99) and SimSiam:
    lr 0.05 and weight decay 5e-4 (the official configs; appendix Table 11 says lr 0.1),
    2048/2048 heads (the official SimSiam predictor is 2048 wide, not SimSiam's 512).
    Plain weight decay on every parameter, no sub-networks, 400 epochs, batch 512.
    """
    c = config_lib.get_default()
    official_step(c)
    plain_weight_decay(c)
    c.model.name = _arch(arch, CIFAR_ARCHS)
    c.data.dataset = dataset
    _single_width(c, width)
    if method == "simclr":
        c.method.base_loss = "infonce"
        c.method.momentum_base = False
    elif method in ("byol", "simsiam"):
        _mse_recipe(c, momentum=method == "byol")
    else:
        raise ValueError(f"unknown baseline {method!r}; valid: simclr, byol, simsiam")
    c.eval.sweep_protocol = "paper"
    c.eval.calibration = "official_cifar"
    return c


def official_step(c: ml_collections.ConfigDict) -> None:
    """One optimizer update per width, as the official code that produced the paper's tables
    (paper Algorithm 1 sums the widths' gradients into one update: ``update_mode=accumulate``).
    See docs/fidelity.md, "Update mode"."""
    c.method.update_mode = "per_width"


def plain_weight_decay(c: ml_collections.ConfigDict) -> None:
    """No group regularization: plain weight decay on every parameter that has had a gradient,
    as the official SGD ``weight_decay`` (docs/fidelity.md, "Weight decay")."""
    c.optim.reg_alpha = 0.0
    c.method.decay_rule = "weight_decay"


def _mse_recipe(c: ml_collections.ConfigDict, momentum: bool) -> None:
    """BYOL (momentum) / SimSiam (stop-gradient) hyper-parameters of the official CIFAR configs
    (lr 0.05; appendix Table 11 says 0.1), weight decay 5e-4, 2048/2048 heads."""
    c.method.base_loss = "mse"
    c.method.momentum_base = momentum
    c.optim.lr = 0.05
    c.optim.reg_lambda = 2.5e-4  # weight decay 5e-4
    c.heads.proj_style = "byol" if momentum else "simsiam"
    c.heads.proj_out = 2048
    c.heads.head_hidden = 2048


def us_baseline_cifar(method: str, arch: str = "resnet18",
                      dataset: str = "cifar100") -> ml_collections.ConfigDict:
    """US-Net [31] adapted to SSL (paper Table 2 "US+SimCLR" / "US+SimSiam"): sandwich rule
    with s = 3 widths per iteration from the start, no dynamic sampling, plain weight decay,
    inplace distillation from the base network's detached outputs (no momentum teacher).

    s = 3, not the s = 4 that the paper's cost column (4T) states: both rows of Table 2 are
    identical at every width to Table 7 cases (14 and 2), and Table 7 ran with s = 3 (its case
    13 equals Table 8's baseline, which is s = 3 without dynamic sampling); the official
    ``us_resnet18_simclr`` / ``us_resnet18_simsiam`` configs also sample 3. US-Net's s = 4:
    ``--config.sampler.num_samples=4``.

    US+SimCLR: Table 7 case 14, i.e. SimCLR base loss and InfoNCE distillation of each
    sub-network's projection against the base network's detached projections, no auxiliary
    head. The paper's US+SimCLR row in Table 2 equals case 14 at every width, so case 14 is the
    design that produced it; the official ``SimCLR`` wrapper's default (negative cosine
    through a new head g, a design Table 7 does not list) is one override away
    (``--config.method.distill_loss=mse --config.method.aux_head=new``).
    US+SimSiam: SimSiam with the predictor shared for distillation (Table 7 case 2)."""
    c = config_lib.get_default()
    official_step(c)
    plain_weight_decay(c)
    c.model.name = _arch(arch, CIFAR_ARCHS)
    c.data.dataset = dataset
    c.sampler.num_samples = 3
    c.sampler.schedule = "none"
    c.method.momentum_base = False
    c.method.momentum_sub = False
    if method == "us_simclr":
        c.method.base_loss = "infonce"
        c.method.distill_loss = "infonce"
        c.method.aux_head = "none"
    elif method == "us_simsiam":
        _mse_recipe(c, momentum=False)
        c.method.distill_loss = "mse"
        c.method.aux_head = "shared"
    else:
        raise ValueError(f"unknown US baseline {method!r}; valid: us_simclr, us_simsiam")
    c.eval.sweep_widths = CIFAR_SWEEP
    c.eval.sweep_protocol = "paper"
    c.eval.calibration = "official_cifar"
    return c


S_NET_WIDTHS = (1.0, 0.75, 0.5, 0.25)  # the official S-Net layers' hard-coded list


def supervised_cifar(kind: str, arch: str = "resnet18", dataset: str = "cifar100",
                     width: float = 1.0) -> ml_collections.ConfigDict:
    """Supervised slimmable training on CIFAR (paper Table 1, supervised rows).

    The official S-Net config: cross-entropy, SGD momentum 0.9, lr 1.0 cosine per epoch,
    weight decay 1e-4, 200 epochs, batch 128 per GPU (x 4 = 512, BN statistics per 128),
    the linear-evaluation crops (RandomResizedCrop(32, (0.8, 1), bicubic) + flip), one
    update per width in the order 1.0, 0.75, 0.5, 0.25. ``kind``:

    * ``individual``: one network at ``width`` (US layers, one width every step);
    * ``s_net``: S-Net, private BN per width of ``S_NET_WIDTHS``, cross-entropy at every width;
    * ``s_net_distill``: S-Net with inplace distillation (sub-widths learn the 1.0 width's
      detached soft predictions; the official config's ``DISTILL: True``);
    * ``us_net``: US-Net, the sandwich rule with 4 widths from [0.25, 1] and inplace
      distillation, gradients of all widths summed into one update (US-Net's own recipe;
      not a Table 1 row).
    """
    c = config_lib.get_default()
    c.model.name = _arch(arch, CIFAR_ARCHS)
    c.data.dataset = dataset
    c.train.objective = "supervised"
    c.optim.epochs = 200
    c.optim.lr = 1.0
    plain_weight_decay(c)  # 2 * reg_lambda = 1e-4
    c.sampler.schedule = "none"
    official_step(c)
    c.eval.sweep_protocol = "top1"
    c.eval.sweep_widths = S_NET_WIDTHS
    if kind == "individual":
        c.sampler.individual_width = float(width)
        c.sampler.num_samples = 1
        c.sampler.sandwich = False
        c.eval.sweep_widths = (float(width),)
    elif kind in ("s_net", "s_net_distill"):
        c.model.switchable_widths = S_NET_WIDTHS
        c.supervised.distill = kind == "s_net_distill"
    elif kind == "us_net":
        c.sampler.num_samples = 4
        c.method.update_mode = "accumulate"
    else:
        raise ValueError(f"unknown supervised recipe {kind!r}; valid: individual, s_net, "
                         "s_net_distill, us_net")
    return c


def simsiam_s_net_cifar(distill: bool, arch: str = "resnet18",
                        dataset: str = "cifar100") -> ml_collections.ConfigDict:
    """SimSiam under S-Net (paper Table 1): private BN per width of ``S_NET_WIDTHS``, every
    width trained every step with one update each (the official SSL loop). Without
    ``distill`` every width has its own SimSiam loss (collapses in the paper); with it the
    sub-widths match the 1.0 width's detached projections through the shared predictor.
    The official S-Net SimSiam config: lr 0.05, weight decay 5e-4, 400 epochs, batch 128 per
    GPU, 2048/2048 heads."""
    c = us_baseline_cifar("us_simsiam", arch, dataset)
    c.model.switchable_widths = S_NET_WIDTHS
    c.optim.lr = 0.05
    c.method.update_mode = "per_width"
    if not distill:
        c.method.distill_loss = "none"
        c.method.aux_head = "none"
    c.eval.sweep_widths = S_NET_WIDTHS
    return c


def _imagenet(arch: str) -> ml_collections.ConfigDict:
    """What every ImageNet recipe shares: the CIFAR US3L recipe with 100 epochs, 224 px views
    with blur, group-reg warm-up 50 epochs, bfloat16 compute, the official ImageNet BN
    calibration and linear evaluation. Data streams from TFDS ``imagenet2012`` prepared as
    ArrayRecord (``config.data.data_dir``)."""
    c = config_lib.get_default()
    official_step(c)
    c.model.name = _arch(arch, IMAGENET_ARCHS)
    c.model.dtype = "bfloat16"
    c.data.dataset = "imagenet2012"
    c.data.augment = "imagenet"
    c.optim.epochs = 100
    c.optim.reg_warmup_epochs = 50
    c.train.log_every_steps = 100
    c.eval.sweep_widths = IMAGENET_SWEEP
    c.eval.sweep_protocol = "paper"
    c.eval.calibration = "official_imagenet"
    c.eval.online_every_epochs = 10
    return c


# The official ImageNet runs: 8 GPUs, BN statistics and negatives per GPU batch (128 for
# ResNet-18, 60 for ResNet-50).
IMAGENET_DEVICES = 8
IMAGENET_GROUP = {"resnet18": 128, "resnet50": 60}
IMAGENET_VARIANTS = ("official", "paper")


def imagenet_batches(c: ml_collections.ConfigDict, group_size: int, batch_size: int) -> None:
    """Sets the BN/negative group and the batch, and an evaluation batch made of whole groups
    (calibration normalises per group) that 8 devices share."""
    if batch_size % group_size:
        raise ValueError(f"batch {batch_size} is not a multiple of the BN group {group_size}")
    c.method.group_size = group_size
    c.optim.batch_size = batch_size
    c.eval.batch_size = 960 if group_size == 60 else 1024


def us3l_imagenet(arch: str = "resnet50", variant: str = "official") -> ml_collections.ConfigDict:
    """US3L on ImageNet (paper Table 4 "Ours"), group regularization from epoch 50.

    ``official``: the official ``us_resnet{18,50}_simclr_featdistill_imagenet`` configs (the
    InfoNCE base loss the paper describes; the official linear-evaluation and transfer configs
    load checkpoints of these runs): 8 GPUs x 60 images (ResNet-50, batch 480) / x 128
    (ResNet-18, batch 1024) with BN and negatives per GPU batch, lr 0.5, and for ResNet-50
    intermediate-feature distillation of the last block of stages 2-4. ``paper``: the paper's
    text, batch 512 (BN per 64 images for ResNet-50, 8 x 64; per 128 for ResNet-18), no
    feature distillation."""
    c = _imagenet(arch)
    if variant == "official":
        group = IMAGENET_GROUP[arch]
        imagenet_batches(c, group, IMAGENET_DEVICES * group)
        c.method.feature_distill = arch == "resnet50"
    elif variant == "paper":
        imagenet_batches(c, 128 if arch == "resnet18" else 64, 512)
    else:
        raise ValueError(f"unknown ImageNet US3L variant {variant!r}; valid: "
                         f"{', '.join(IMAGENET_VARIANTS)}")
    return c


def parse_args(arg: str | None, names: tuple[str, ...], defaults: tuple) -> dict[str, str]:
    """``"a,b"`` -> {names[0]: "a", names[1]: "b"} with ``defaults`` for missing trailing
    values; a clear error for too many."""
    parts = [] if not arg else [p.strip() for p in arg.split(",")]
    if len(parts) > len(names):
        raise ValueError(f"config argument {arg!r} has {len(parts)} values; expected at most "
                         f"{len(names)}: {','.join(names)}")
    values = parts + [str(d) for d in defaults[len(parts):]]
    return dict(zip(names, values))


# ------------------------------------------------------------------ SEED, MoCo v2, BYOL baselines


def _single_width(c: ml_collections.ConfigDict, width: float) -> None:
    """One fixed width, no sub-networks, plain weight decay (no group reg)."""
    c.sampler.individual_width = float(width)
    c.sampler.num_samples = 1
    c.sampler.sandwich = False
    c.sampler.schedule = "none"
    plain_weight_decay(c)
    c.method.distill_loss = "none"
    c.method.aux_head = "none"
    c.method.momentum_sub = False
    c.eval.sweep_widths = (float(width),)


SEED_LOSSES = ("seed", "seed_mse")


def seed_method(c: ml_collections.ConfigDict, loss: str, teacher: str | None,
                teacher_model: str | None = None) -> None:
    """SEED / SEED-MSE hyper-parameters of the official CIFAR configs: lr 0.05 (cosine per
    epoch), 2048/2048 BYOL-style student projector (the teacher's embedding size). SEED: queue
    K 32768, student/teacher temperatures 0.5 / 1e-4, weight decay 1e-4, 200 epochs.
    SEED-MSE: the student's predictor (hidden 2048) against the teacher's other view (negative
    cosine), weight decay 5e-4, 400 epochs. The teacher's BNs: batch statistics for SEED
    (official: train mode), calibrated running statistics for SEED-MSE (official: eval mode
    with the running statistics of the teacher's training). ``teacher``: a teacher run's
    workdir, or a ``.safetensors`` torch-layout state dict (then ``teacher_model`` names its
    architecture)."""
    if loss not in SEED_LOSSES:
        raise ValueError(f"unknown SEED variant {loss!r}; valid: {', '.join(SEED_LOSSES)}")
    c.method.teacher = "frozen"
    c.method.momentum_base = True
    c.heads.proj_style = "byol"
    c.heads.proj_out = 2048
    c.heads.head_hidden = 2048
    c.optim.lr = 0.05
    if loss == "seed":
        c.method.base_loss = "seed"
        c.method.queue_size = 32768
        c.method.tau = 0.5
        c.method.teacher_tau = 1e-4
        c.optim.reg_lambda = 5e-5  # weight decay 1e-4
        c.optim.epochs = 200
    else:
        c.method.base_loss = "mse"
        c.optim.reg_lambda = 2.5e-4  # weight decay 5e-4
        c.optim.epochs = 400
        c.teacher.bn = "calibrated"
    if teacher and teacher.endswith(".safetensors"):
        c.teacher.state_dict = teacher
        c.teacher.model = teacher_model
    else:
        c.teacher.workdir = teacher


def seed_cifar(loss: str, arch: str, width: float, teacher: str | None,
               dataset: str = "cifar100",
               teacher_arch: str | None = None) -> ml_collections.ConfigDict:
    """A SEED / SEED-MSE student at one width (paper Table 2), distilled from a frozen BYOL
    teacher at width 1.0: ``teacher`` is the workdir of a run of
    ``configs/baselines_cifar100.py:byol,1.0,<arch>``, or a ``.safetensors`` state dict of
    an official BYOL checkpoint, whose architecture ``teacher_arch`` names (resnet18,
    resnet50, mobilenet_v2). Batch 512 (4 x 128), BN per 128."""
    c = config_lib.get_default()
    c.model.name = _arch(arch, CIFAR_ARCHS)
    c.data.dataset = dataset
    official_step(c)
    _single_width(c, width)
    seed_method(c, loss, teacher, teacher_arch and _arch(teacher_arch, CIFAR_ARCHS))
    c.eval.sweep_protocol = "paper"
    c.eval.calibration = "official_cifar"
    return c


def mocov2_method(c: ml_collections.ConfigDict) -> None:
    """MoCo v2 as the official CIFAR config: T 0.2, key encoder m 0.999 (constant), queue K
    2048, MLP head Linear(feat, 2048) -> ReLU -> Linear(2048, 256), SGD lr 0.3, weight decay
    1e-4. Shuffle-BN is replaced by batch-statistic BN per group of ``method.group_size``."""
    c.method.base_loss = "moco"
    c.method.teacher = "ema"
    c.method.momentum_base = True
    c.method.tau = 0.2
    c.method.ema_momentum = 0.999
    c.method.queue_size = 2048
    c.heads.proj_style = "mocov2"
    c.heads.proj_hidden = 2048
    c.heads.proj_out = 256
    c.optim.lr = 0.3
    c.optim.reg_lambda = 5e-5  # weight decay 1e-4


def mocov2_cifar(width: float, arch: str = "resnet18",
                 dataset: str = "cifar100") -> ml_collections.ConfigDict:
    """MoCo v2 at one width on CIFAR (official ``resnet18_moco_cifar``): 400 epochs, batch 256
    (4 GPUs x 64, BN per 64)."""
    c = config_lib.get_default()
    c.model.name = _arch(arch, CIFAR_ARCHS)
    c.data.dataset = dataset
    _single_width(c, width)
    mocov2_method(c)
    c.optim.batch_size = 256
    c.method.group_size = 64
    official_step(c)
    c.eval.sweep_protocol = "paper"
    c.eval.calibration = "official_cifar"
    return c


def byol_method(c: ml_collections.ConfigDict, us: bool) -> None:
    """BYOL with the official ImageNet hyper-parameters: lr 0.05, weight decay 1e-4, m 0.99,
    2048/2048 heads. ``us`` (US+BYOL, official ``*_byol_imagenet_baseline``): US-Net's sandwich
    rule with s = 3 from the start, no dynamic sampling, no group reg; sub-networks distill the
    momentum teacher's projection through a new head (negative cosine; Table 7 case 4's
    flags)."""
    _mse_recipe(c, momentum=True)
    c.optim.lr = 0.05
    c.optim.reg_lambda = 5e-5  # weight decay 1e-4
    plain_weight_decay(c)
    if us:
        for field, value in zip(TABLE7_FIELDS, TABLE7_CASES[4]):
            c.method[field] = value
        c.sampler.num_samples = 3
        c.sampler.sandwich = True
        c.sampler.schedule = "none"


def byol_imagenet(arch: str, width: float | None) -> ml_collections.ConfigDict:
    """Paper Table 4 baselines on ImageNet, 100 epochs: BYOL trained individually at ``width``,
    or US+BYOL (``width`` None) trained once for all widths. Batch 1024 (8 x 128, R-18) /
    480 (8 x 60, R-50) with BN per GPU batch, bfloat16, ImageNet views (blur 0.5)."""
    c = _imagenet(arch)
    c.optim.reg_warmup_epochs = 0
    group = IMAGENET_GROUP[_arch(arch, IMAGENET_ARCHS)]
    imagenet_batches(c, group, IMAGENET_DEVICES * group)
    byol_method(c, us=width is None)
    if width is not None:
        _single_width(c, width)
    return c


VIT_ARCHS = {"tiny": "vit_tiny", "small": "vit_small"}
VIT_VARIANTS = ("us3l", "us_mocov3", "mocov3@<width>")


def mocov3_vit(arch: str = "tiny", variant: str = "us3l") -> ml_collections.ConfigDict:
    """Slimmable ViTs with MoCo v3 on CIFAR-10 (paper Table 3), as the official ViT code ran:

    * MoCo v3: ViT with the fixed sin-cos position embedding, official slicing (block Linears
      slimmed on their input side), a frozen patch embedding (``--stop-grad-conv1`` in both
      official launch scripts, ViT_experiments/run.sh and run_ofa.sh; the paper does not
      mention it, and ``model.stop_grad_patch=False`` trains it); 3-layer projector (hidden
      2048, out 256, last BN without affine), 2-layer predictor; momentum encoder at width
      1.0 with the cosine ramp from 0.99; contrastive loss with tau 0.2 (x 2 tau) against
      keys from the whole batch (all-gathered in the official code; BN statistics over the
      whole batch too, SyncBN).
    * AdamW, lr 1.5e-4 x 512/256 = 3e-4, weight decay 0.1, 40 warm-up epochs then cosine to
      300 epochs, per iteration; batch 512; one update per width (``per_width``); 224-px views
      of CIFAR-10 with the asymmetric BYOL augmentations and CIFAR mean/std; bfloat16 compute
      (the official runs use AMP).
    * ``us3l``: sandwich rule [1.0, min, U(min, 1)] with dynamic sampling "A" (by epoch);
      sub-networks through a new predictor that starts as a copy of the predictor, with the
      same MoCo v3 loss against the teacher's keys (InfoNCE distillation).
    * ``us_mocov3``: the same sandwich rule without dynamic sampling; sub-networks through the
      shared predictor against the momentum keys.
    * ``mocov3@<w>``: one model trained at the fixed width w (teacher at w too).
    """
    if variant not in ("us3l", "us_mocov3") and not variant.startswith("mocov3@"):
        raise ValueError(f"unknown ViT variant {variant!r}; valid: {', '.join(VIT_VARIANTS)}")
    c = config_lib.get_default()
    c.model.name = _arch(arch, VIT_ARCHS)
    c.model.dtype = "bfloat16"
    c.model.slicing = "official"
    c.model.stop_grad_patch = True
    c.heads.proj_style = "mocov3"
    c.heads.proj_hidden = 2048
    c.heads.proj_out = 256
    c.heads.head_hidden = 2048
    c.method.base_loss = "mocov3"
    c.method.tau = 0.2
    c.method.ema_momentum = 0.99
    c.method.ema_schedule = "cosine"
    c.method.group_size = None  # SyncBN and all-gathered keys: the whole batch
    c.method.update_mode = "per_width"
    c.data.dataset = "cifar10"
    c.data.augment = "byol_cifar"
    c.data.image_size = 224
    c.optim.optimizer = "adamw"
    c.optim.batch_size = 512
    c.optim.lr = 1.5e-4 * c.optim.batch_size / 256
    c.optim.weight_decay = 0.1
    c.optim.reg_lambda = 0.0
    plain_weight_decay(c)  # AdamW decays every parameter that has had a gradient
    c.optim.epochs = 300
    c.optim.warmup_epochs = 40
    c.optim.schedule_unit = "step"
    c.sampler.num_samples = 3
    c.sampler.sandwich = True
    c.eval.sweep_widths = IMAGENET_SWEEP
    c.eval.sweep_protocol = "paper"  # linear.VIT (auto for ViTs): main_lincls
    if variant == "us3l":
        c.method.distill_loss = "mocov3"
        c.method.aux_head = "new"
        c.method.aux_head_init = "copy"
        c.sampler.schedule = "A"
        c.eval.paper_row = f"table3/{c.model.name}/ours"
    elif variant == "us_mocov3":
        c.method.distill_loss = "mocov3"
        c.method.aux_head = "shared"
        c.sampler.schedule = "none"
        c.eval.paper_row = f"table3/{c.model.name}/us_mocov3"
    else:
        try:
            width = float(variant.split("@", 1)[1])
        except ValueError:
            raise ValueError(f"mocov3@<width> needs a number, got {variant!r}") from None
        c.method.distill_loss = "none"
        c.method.aux_head = "none"
        c.method.momentum_sub = False
        c.sampler.individual_width = width
        c.sampler.num_samples = 1
        c.sampler.sandwich = False
        c.sampler.schedule = "none"
        c.eval.sweep_widths = (width,)
        c.eval.paper_row = f"table3/{c.model.name}/mocov3"
    return c
