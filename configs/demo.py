"""Demo: a tiny slimmable ResNet pretrained with the full US3L recipe on the offline digits set.

    python -m us3l_jax.main --config=configs/demo.py --workdir=/tmp/us3l_demo
    python -m us3l_jax.main --config=configs/demo.py:smoke --workdir=/tmp/us3l_smoke
    python -m us3l_jax.main --config=configs/demo.py:vit --workdir=/tmp/us3l_vit_demo

Full US3L (paper Table 7 case 13: InfoNCE base loss against an EMA teacher, negative-cosine
distillation through an auxiliary head, sandwich rule with dynamic sampling "A", group
regularization) on scikit-learn's bundled 8x8 digits upsampled to 16x16, with a ResNet-18
layout of one block per stage and base width 16, widths [0.25, 1.0]. Needs no download.

Expected: ``demo`` runs 12 epochs (264 steps) in a few minutes on 2 CPU cores and ends with a
fast linear-probe sweep over widths 1.0/0.75/0.5/0.25 whose accuracies are all far above the
10% chance level (the digits are easy; see README for the figures we measured).
``smoke`` is the same run cut to 4 epochs (88 steps through all four sampling stages, on a
coarser width grid): well under a minute after compilation, for tests and quick checks.

The paper's baselines at the same scale (same backbone, data, batch and 264 steps), each
ending with a fast-probe sweep of the width(s) it trained:

    python -m us3l_jax.main --config=configs/demo.py:byol --workdir=/tmp/us3l_demo_byol
    python -m us3l_jax.main --config=configs/demo.py:byol,0.25 --workdir=/tmp/us3l_demo_byol_0.25
    python -m us3l_jax.main --config=configs/demo.py:us_byol --workdir=/tmp/us3l_demo_us_byol
    python -m us3l_jax.main --config=configs/demo.py:mocov2,1.0 --workdir=/tmp/us3l_demo_moco
    python -m us3l_jax.main --config=configs/demo.py:seed,0.25,/tmp/us3l_demo_byol --workdir=/tmp/us3l_demo_seed
    python -m us3l_jax.main --config=configs/demo.py:seed_mse,0.25,/tmp/us3l_demo_byol --workdir=/tmp/us3l_demo_seed_mse

Arguments: ``byol[,width]`` / ``mocov2[,width]`` (individual runs, width default 1.0),
``us_byol`` (US-Net with BYOL, all widths at once), ``seed[,width[,teacher_workdir]]`` and
``seed_mse[,...]`` (width default 0.25; the teacher is the frozen ``:byol`` run, default
``/tmp/us3l_demo_byol``, so run that first, or a ``.safetensors`` torch-layout state dict of
such a teacher, see ``us3l_jax.teacher``). Their recipes are the official ones
(``us3l_jax.recipes``) scaled to digits: 64/128 heads, queues of 512 keys, 12 epochs; MoCo v2's
key encoder uses m 0.99 instead of 0.999, whose teacher would still be 77% its random
initialisation after 264 steps.

``vit`` is US3L for ViTs (the Table 3 recipe of ``configs/vit_cifar10.py`` scaled down): a
slimmable ViT of dim 64, depth 4, 4 heads, patch 4 on the 16-px digits (16 patches), official
slicing, MoCo v3 loss (tau 0.2) with InfoNCE distillation through a copy of the predictor,
AdamW, per-width updates, sandwich rule with dynamic sampling "A", then the same sweep.

``vicreg`` is a method neither the paper nor the official code has, VICReg made slimmable
with the paper's guidelines (``us3l_jax.methods.vicreg``: VICReg's loss against the momentum
teacher for the base network, US3L's distillation through the auxiliary head for the
sub-networks), with the same sweep:

    python -m us3l_jax.main --config=configs/demo.py:vicreg --workdir=/tmp/us3l_demo_vicreg

Supervised slimmable training (paper Table 1) on the same data, model and number of steps
(12 epochs, 264 steps), ending with a top-1 sweep of the trained classifier per width:

    python -m us3l_jax.main --config=configs/demo.py:supervised_us --workdir=/tmp/us3l_sup_us
    python -m us3l_jax.main --config=configs/demo.py:s_net --workdir=/tmp/us3l_s_net

``supervised_us`` is US-Net (sandwich rule with 4 widths from the 0.125 grid, inplace
distillation from the largest width's soft predictions, one accumulated update per
iteration); ``s_net`` is S-Net (widths 1.0/0.75/0.5/0.25 every step, private BatchNorm per
width, cross-entropy at every width, one update per width as the official worker). Both use
SGD lr 0.1, weight decay 1e-4 and the linear-evaluation crops as augmentation.
"""
from us3l_jax import config as config_lib, recipes

BASELINES = ("byol", "us_byol", "mocov2", "seed", "seed_mse")


def get_config(arg: str | None = None):
    c = config_lib.get_default()
    c.model.name = "cifar_resnet18"
    c.model.base_width = 16
    c.model.stage_sizes = (1, 1, 1, 1)
    c.heads.proj_hidden = 128
    c.heads.proj_out = 64
    c.heads.head_hidden = 128
    c.data.dataset = "digits"
    c.data.image_size = 16
    c.data.augment = "cifar"
    c.method.group_size = 32
    c.optim.batch_size = 64
    c.optim.epochs = 12
    c.optim.lr = 0.5
    c.sampler.grid_step = 0.125  # 7 distinct widths: few programs to compile on a CPU
    c.train.log_every_steps = 22
    c.eval.final_sweep = True
    c.eval.sweep_protocol = "fast"
    c.eval.sweep_widths = (1.0, 0.75, 0.5, 0.25)
    c.eval.batch_size = 64
    c.eval.calibration_batches = 20
    variant = (arg or "").split(",")[0]
    if variant in BASELINES:
        return _baseline(c, arg)
    if arg == "smoke":
        # 4 epochs = 88 steps: every stage of schedule "A" (1.0 only; then min width 0.75,
        # 0.5, 0.25) runs; a coarse grid keeps the programs to compile few.
        c.optim.epochs = 4
        c.sampler.grid_step = 0.25
        c.train.log_every_steps = 11
        c.train.checkpoint_every_steps = 22
        c.eval.sweep_widths = (1.0, 0.25)
    elif arg == "vit":
        _vit_demo(c)
    elif arg == "vicreg":
        # VICReg's loss (us3l_jax.methods.vicreg) for the base network, US3L's distillation
        # for the sub-networks; its loss is ~25x InfoNCE's scale, hence the smaller lr.
        c.method.base_loss = "vicreg"
        c.optim.lr = 0.05
    elif arg in ("supervised_us", "s_net"):
        _supervised(c, s_net=arg == "s_net")
    elif arg:
        raise ValueError(f"unknown demo variant {arg!r}; valid: 'smoke', 'vit', 'vicreg', "
                         f"'supervised_us', 's_net', "
                         f"{', '.join(repr(b) for b in BASELINES)} or none")
    return c


def _baseline(c, arg: str):
    """A paper baseline on the demo's backbone, data and schedule."""
    variant = arg.split(",")[0]
    if variant == "us_byol":
        recipes.parse_args(arg, ("variant",), ("us_byol",))
        recipes.byol_method(c, us=True)
    else:
        names = ("variant", "width") + (("teacher",) if variant.startswith("seed") else ())
        default_width = 0.25 if variant.startswith("seed") else 1.0
        a = recipes.parse_args(arg, names, (variant, default_width, "/tmp/us3l_demo_byol"))
        recipes._single_width(c, float(a["width"]))
        if variant == "byol":
            recipes.byol_method(c, us=False)
        elif variant == "mocov2":
            recipes.mocov2_method(c)
            c.method.ema_momentum = 0.99
        else:
            recipes.seed_method(c, variant, a["teacher"], c.model.name)
            c.optim.epochs = 12
        c.method.queue_size = 512 if c.method.queue_size else 0
    c.heads.proj_hidden = 128
    c.heads.proj_out = 64
    c.heads.head_hidden = 128
    return c


def _vit_demo(c):
    v = recipes.mocov3_vit("tiny", "us3l")
    for section in ("heads", "method", "optim"):
        c[section] = v[section]
    c.model = v.model
    c.model.dtype = "float32"
    c.model.stop_grad_patch = False  # as when docs/results.md's demo figures were measured
    c.model.dim, c.model.depth, c.model.heads, c.model.patch_size = 64, 4, 4, 4
    c.heads.proj_hidden, c.heads.proj_out, c.heads.head_hidden = 128, 64, 128
    c.sampler.schedule = "A"
    c.optim.batch_size = 64
    c.optim.epochs = 12
    c.optim.warmup_epochs = 2
    c.optim.lr = 1e-3
    c.eval.paper_row = None


def _supervised(c, s_net: bool) -> None:
    c.train.objective = "supervised"
    c.optim.lr = 0.1
    recipes.plain_weight_decay(c)  # 1e-4 (reg_lambda 5e-5)
    c.sampler.schedule = "none"
    c.eval.sweep_protocol = "top1"
    if s_net:
        c.model.switchable_widths = (1.0, 0.75, 0.5, 0.25)
        c.supervised.distill = False
        c.method.update_mode = "per_width"
    else:
        c.sampler.num_samples = 4
