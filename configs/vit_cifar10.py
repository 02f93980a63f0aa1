"""Slimmable ViTs pretrained with MoCo v3 on CIFAR-10 (paper Table 3).

    python -m us3l_jax.main --config=configs/vit_cifar10.py:tiny,us3l --workdir=runs/vit_tiny_us3l
    python -m us3l_jax.main --config=configs/vit_cifar10.py:small,us_mocov3 --workdir=runs/vit_s_us
    python -m us3l_jax.main --config=configs/vit_cifar10.py:tiny,mocov3@0.5 --workdir=runs/vit_t_050

Arguments ``<tiny|small>[,us3l|us_mocov3|mocov3@<width>][,group_reg]`` (default
``tiny,us3l``). The recipe (``us3l_jax.recipes.mocov3_vit``) is the official ViT code's: MoCo
v3 (tau 0.2, momentum 0.99 -> 1 cosine, 3-layer projector 2048/256, 2-layer predictor, keys
from the whole batch), official slicing (only the block Linears shrink, on their input
side), AdamW lr 3e-4 (1.5e-4 x 512/256), weight decay 0.1, 40 warm-up epochs, 300 epochs,
batch 512, 224-px views of CIFAR-10 (BYOL augmentations, CIFAR mean/std).
``--config.model.slicing=embed`` runs the paper text's variant (the embedding dimension
shrinks in every layer).

Every variant freezes the patch embedding at its random initialisation
(``model.stop_grad_patch``), as both official launch scripts pass ``--stop-grad-conv1``:
``ViT_experiments/run.sh`` (MoCo v3 at one width) and ``run_ofa.sh`` (the slimmable
``main_moco_ofa_ddp.py``, which builds US3L and, with ``--baseline``, US+MoCo v3). The paper
does not mention it; ``--config.model.stop_grad_patch=False`` trains the embedding.

AdamW counts its steps per parameter, from the parameter's first gradient, as
``torch.optim.AdamW`` does (``optim.adam_count = "per_param"``; it matters for the new
predictor of ``us3l``, first trained when dynamic sampling adds sub-networks at epoch 75;
``--config.optim.adam_count=global`` is optax's single count). ``us_mocov3`` takes one EMA step
of the momentum teacher per width, before that width's update, from the parameters the
earlier widths' updates left, as the official baseline's forward does
(``method.ema_updates = "width"``; ``--config.method.ema_updates=iteration`` takes one per
iteration, as ``us3l`` and ``mocov3@<width>``). docs/fidelity.md, "Vision Transformers and
MoCo v3".

``group_reg`` turns on the official ``--group-regularizer`` (off in the official launch
scripts, so in no Table 3 row): R = sum lambda_i p^2 added to the loss with lambda 0.05,
alpha 0.05, 8 groups along each Linear weight's input features, alpha ramping from epoch 100
to 150, the heads left out at width 1.0, and AdamW's own weight decay off:

    python -m us3l_jax.main --config=configs/vit_cifar10.py:tiny,us3l,group_reg --workdir=runs/vit_t_gr

Table 3 (linear evaluation top-1 %, widths 1.0 / 0.75 / 0.5 / 0.25) to reach:

    ViT-Tiny   MoCo v3 (individual)  82.6 79.5 75.8 68.0
               US+MoCo v3            79.8 79.4 77.6 76.4
               Ours (US3L)           86.0 84.7 83.3 80.2
    ViT-Small  MoCo v3 (individual)  88.0 86.8 83.0 75.5
               US+MoCo v3            88.2 87.5 86.3 84.9
               Ours (US3L)           90.3 89.7 88.7 85.5

Not run to completion here (no accelerator long enough). The final sweep runs the official
ViT linear evaluation (``eval.sweep_protocol = "paper"``, recipe ``linear.VIT``, which
``eval.linear_recipe = "auto"`` picks for ViTs): frozen backbone, head re-initialised
N(0, 0.01) with zero bias, SGD momentum 0.9, lr 0.1 (0.1 x 256/256), weight decay 0, batch
256, 90 epochs, cosine per epoch; RandomResizedCrop(224) + flip, test Resize(256) +
CenterCrop(224), CIFAR mean/std; no BN, so no calibration. Needs CIFAR-10
prepared for TFDS (``python -m us3l_jax.data.prepare cifar10``); the training images are
stored upsampled to 224 px (``data.image_size``; 7.5 GB of uint8 for 50k images, sharded over
the devices) and the views are cropped from them on device.
"""
from us3l_jax import recipes


REGULARIZERS = ("none", "group_reg")


def get_config(arg: str | None = None):
    a = recipes.parse_args(arg, ("arch", "variant", "regularizer"), ("tiny", "us3l", "none"))
    if a["regularizer"] not in REGULARIZERS:
        raise ValueError(f"unknown ViT regularizer {a['regularizer']!r}; valid: "
                         f"{', '.join(REGULARIZERS)}")
    if a["regularizer"] == "group_reg" and a["variant"].startswith("mocov3@"):
        raise ValueError("group_reg is the slimmable script's --group-regularizer; the "
                         "one-width MoCo v3 script (main_moco_ddp.py) has none")
    c = recipes.mocov3_vit(a["arch"], a["variant"])
    c.optim.adam_count = "per_param"  # torch.optim.AdamW's per-parameter step counts
    if a["variant"] == "us_mocov3":
        c.method.ema_updates = "width"  # MoCo_USBaselineViT: an EMA step in every forward
    if a["regularizer"] == "group_reg":  # main_moco_ofa_ddp.py --group-regularizer defaults
        c.optim.weight_decay = 0.0
        c.optim.reg_lambda = 0.05
        c.optim.reg_alpha = 0.05
        c.optim.reg_groups = 8
        c.optim.reg_warmup_epochs = 100
        c.method.decay_rule = "group_reg"
    return c
