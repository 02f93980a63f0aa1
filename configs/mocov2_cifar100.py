"""MoCo v2 on CIFAR-100 at one width (the official ``resnet18_moco_cifar`` baseline config).

    python -m us3l_jax.main --config=configs/mocov2_cifar100.py:1.0 --workdir=runs/mocov2_1.0
    python -m us3l_jax.main --config=configs/mocov2_cifar100.py:0.25,resnet50 --workdir=runs/mocov2_r50_0.25

Arguments: ``<width>[,<resnet18|resnet50|mobilenet_v2>]``. Recipe
(``us3l_jax.recipes.mocov2_cifar``): InfoNCE of view 1's query against view 2's key from a
momentum encoder (m 0.999) and a queue of 2048 keys, T 0.2, MLP head 2048 -> 256 without BN,
SGD lr 0.3 (cosine per epoch), weight decay 1e-4, batch 256 (4 x 64), 400 epochs. Shuffle-BN
is replaced by batch-statistic BN per 64 examples (docs/fidelity.md). The paper reports no
MoCo v2 numbers on CIFAR (its Table 2 has no MoCo row), so there is no expected accuracy to
reach; compare with the individually trained SimCLR row (66.5 at 1.0, 53.6 at 0.25 for R-18).
"""
from us3l_jax import recipes


def get_config(arg: str | None = "1.0"):
    a = recipes.parse_args(arg, ("width", "arch"), (1.0, "resnet18"))
    return recipes.mocov2_cifar(float(a["width"]), a["arch"])
