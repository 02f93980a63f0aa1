"""Paper appendix Table 15: group regularization on individually trained BYOL and SimCLR
(ResNet-18, CIFAR-100), against US3L without dynamic sampling.

    python -m us3l_jax.main --config=configs/table15.py:byol,0.5 --workdir=runs/t15_byol_gr_0.5
    python -m us3l_jax.main --config=configs/table15.py:simclr,1.0 --workdir=runs/t15_simclr_gr_1.0
    python -m us3l_jax.main --config=configs/table15.py:byol,0.5,none --workdir=runs/t15_byol_0.5
    python -m us3l_jax.main --config=configs/table15.py:ours --workdir=runs/t15_ours_gr

Arguments: ``<byol|simclr>,<width>[,<gr|none>]`` (one run per width, as Table 2's
individual baselines; ``gr``, the default, adds group regularization) or
``ours[,<gr|none>]`` (US3L trained once, the sandwich rule without dynamic sampling: the
same runs as ``configs/strategies.py:table14,3`` and ``table14,1``). Expected linear
accuracy (paper Table 15, %) at 1.0 0.9 0.8 0.7 0.6 0.5 0.4 0.3 0.25:

    byol    gr    66.0 66.2 65.6 64.4 63.4 61.8 59.3 56.1 54.0
    byol    none  66.8 66.0 65.6 65.3 63.0 62.1 59.5 56.0 54.3
    simclr  gr    65.7 65.0 65.0 63.3 62.6 61.0 58.8 56.0 53.4
    simclr  none  66.5 65.4 64.7 63.7 62.6 61.0 59.0 56.1 53.6
    ours    none  67.7 67.2 66.5 66.0 65.1 64.3 62.5 60.5 59.6
    ours    gr    68.6 67.8 67.3 66.4 65.5 64.4 63.1 60.9 60.1

The paper's point: group regularization does not help individually trained models (within
about +-1 point of the plain runs), but helps US3L.

Recipe: ``us3l_jax.recipes.individual_cifar`` (the Table 2 baselines: BYOL lr 0.05, weight
decay 5e-4, m 0.99, 2048/2048 heads; SimCLR lr 0.5, weight decay 1e-4, tau 0.5, 256/2048;
400 epochs, batch 512). ``gr`` replaces the plain weight decay by US3L's group
regularization at the same strength (lambda = weight decay / 2: 2.5e-4 for BYOL, 5e-5 for
SimCLR), alpha 0.05, G 8, no warm-up (alpha ramps to its value by epoch 200), as the R-18
US3L recipe. No official config exists for these runs; the paper gives no other setting.
Like the official group regularizer, groups are taken over the full-size tensors, so a model
trained at width w uses groups 0 ... ceil(8 w) - 1 and its channels get factors 1.00 down to
1 - 0.05 (ceil(8 w) - 1): 0.65 at width 1.0, 0.95 at 0.25 (docs/fidelity.md, "Group
regularization"). The BYOL predictor is never decayed here (our group regularizer leaves
the heads out of every base-network update); the official regularizer leaves it out only at
width 1.0, so at smaller widths it would decay it (docs/fidelity.md, "Table 15").
"""
from us3l_jax import recipes

METHODS = ("byol", "simclr", "ours")
REGS = ("gr", "none")


def _reg(value: str) -> bool:
    if value not in REGS:
        raise ValueError(f"group regularization must be one of {', '.join(REGS)}, got "
                         f"{value!r}")
    return value == "gr"


def get_config(arg: str | None = "byol"):
    method = (arg or "byol").split(",")[0]
    if method in ("byol", "simclr"):
        a = recipes.parse_args(arg, ("method", "width", "reg"), ("byol", 1.0, "gr"))
        gr = _reg(a["reg"])
        c = recipes.individual_cifar(method, float(a["width"]), "resnet18")
        if gr:  # same strength as the plain decay (reg_lambda = weight decay / 2)
            c.method.decay_rule = "group_reg"
            c.optim.reg_alpha = 0.05
            c.optim.reg_groups = 8
            c.optim.reg_warmup_epochs = 0
    elif method == "ours":
        a = recipes.parse_args(arg, ("method", "reg"), ("ours", "gr"))
        gr = _reg(a["reg"])
        c = recipes.us3l_cifar("resnet18")
        c.sampler.schedule = "none"  # Table 15's US3L rows are Table 14 cases 1 and 3
        if not gr:
            recipes.plain_weight_decay(c)
    else:
        raise ValueError(f"unknown Table 15 method {method!r}; valid: {', '.join(METHODS)}")
    c.eval.paper_row = f"table15/{method}/{'gr' if gr else 'none'}"
    return c
