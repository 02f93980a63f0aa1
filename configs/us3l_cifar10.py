"""US3L on CIFAR-10 with the CIFAR-100 recipe.

    python -m us3l_jax.main --config=configs/us3l_cifar10.py:resnet18 --workdir=runs/us3l_c10_r18

(``:resnet50`` and ``:mobilenet_v2`` too.) The paper reports CNN pretraining only on
CIFAR-100 and ImageNet (its CIFAR-10 results are ViTs, Table 3, and transfer from ImageNet,
Table 6), so there is no published figure to reach; we have not run it to completion.
Needs CIFAR-10 prepared for TFDS (``python -m us3l_jax.data.prepare cifar10``).
"""
from us3l_jax import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_args(arg, ("arch",), ("resnet18",))
    return recipes.us3l_cifar(a["arch"], "cifar10")
