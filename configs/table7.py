"""Paper Table 7: the loss-design ablation (ResNet-18, CIFAR-100), case number as argument.

    python -m us3l_jax.main --config=configs/table7.py:13 --workdir=runs/table7_case13

Each case sets (base loss, distill loss, auxiliary distill head, momentum target for the base
network / for the sub-networks) through ``us3l_jax.recipes.TABLE7_CASES``; everything else is
the setting Table 8 calls the baseline: sandwich rule with s = 3, no dynamic sampling, no
group regularization (plain weight decay), one optimizer update per width as the official
code. InfoNCE-base cases use the SimCLR/US3L hyper-parameters (lr 0.5, weight decay 1e-4,
256/2048 heads); MSE-base cases the official BYOL/SimSiam CIFAR ones (lr 0.05, weight decay
5e-4, 2048/2048 heads) -- the paper does not list per-case hyper-parameters, so this split is
our reading. Expected linear accuracy (%),
1.0x ... 0.25x ('collapse': the paper's '-'):

     1  collapse            10  65.0 ... 56.6
     2  57.5 ... 52.4       11  65.8 ... 57.6
     3  64.7 ... 59.3       12  66.9 ... 59.1
     4  65.4 ... 58.9       13  67.7 67.2 66.5 66.0 65.1 64.3 62.5 60.5 59.6 (US3L loss)
     5  62.3 ... 57.2       14  65.5 ... 57.4
     6  63.7 ... 58.2       15  64.7 ... 57.9
     7  65.0 ... 59.2       16  66.0 ... 58.7
     8  65.5 ... 59.7       17  67.4 ... 59.5
     9  64.8 ... 54.2
"""
from us3l_jax import recipes


def get_config(arg: str | None = "13"):
    try:
        case = int(arg or 13)
    except ValueError:
        raise ValueError(f"Table 7 case must be a number 1-17, got {arg!r}") from None
    method = recipes.table7_method(case)
    c = recipes.us3l_cifar("resnet18")
    if method.base_loss == "mse":
        recipes._mse_recipe(c, momentum=method.momentum_base)
    for field in recipes.TABLE7_FIELDS:
        c.method[field] = getattr(method, field)
    c.sampler.schedule = "none"
    recipes.plain_weight_decay(c)
    c.eval.paper_row = f"table7/case{case}"
    return c
