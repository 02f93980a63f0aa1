"""Slimmable ViTs pretrained with MoCo v3 on CIFAR-10 (paper Table 3).

    python -m us3l_jax.main --config=configs/vit_cifar10.py:tiny,us3l --workdir=runs/vit_tiny_us3l
    python -m us3l_jax.main --config=configs/vit_cifar10.py:small,us_mocov3 --workdir=runs/vit_s_us
    python -m us3l_jax.main --config=configs/vit_cifar10.py:tiny,mocov3@0.5 --workdir=runs/vit_t_050

Arguments ``<tiny|small>[,us3l|us_mocov3|mocov3@<width>]`` (default ``tiny,us3l``). The recipe
(``us3l_jax.recipes.mocov3_vit``) is the official ViT code's: MoCo v3 (tau 0.2, momentum
0.99 -> 1 cosine, 3-layer projector 2048/256, 2-layer predictor, keys from the whole batch),
official slicing (only the block Linears shrink, on their input side), AdamW lr 3e-4
(1.5e-4 x 512/256), weight decay 0.1, 40 warm-up epochs, 300 epochs, batch 512, 224-px views
of CIFAR-10 (BYOL augmentations, CIFAR mean/std). ``--config.model.slicing=embed`` runs the
paper text's variant (the embedding dimension shrinks in every layer).

Every variant freezes the patch embedding at its random initialisation
(``model.stop_grad_patch``), as both official launch scripts pass ``--stop-grad-conv1``:
``ViT_experiments/run.sh`` (MoCo v3 at one width) and ``run_ofa.sh`` (the slimmable
``main_moco_ofa_ddp.py``, which builds US3L and, with ``--baseline``, US+MoCo v3). The paper
does not mention it; ``--config.model.stop_grad_patch=False`` trains the embedding.

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


def get_config(arg: str | None = None):
    a = recipes.parse_args(arg, ("arch", "variant"), ("tiny", "us3l"))
    return recipes.mocov3_vit(a["arch"], a["variant"])
