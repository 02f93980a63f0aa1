"""Paper Table 1: supervised classification and SimSiam under S-Net, ResNet-18 on CIFAR-100.

    python -m us3l_jax.main --config=configs/table1.py:supervised_s_net --workdir=runs/t1_s_net
    python -m us3l_jax.main --config=configs/table1.py:supervised_s_net_distill --workdir=runs/t1_s_net_distill
    python -m us3l_jax.main --config=configs/table1.py:supervised_individual,0.5 --workdir=runs/t1_sup_0.5
    python -m us3l_jax.main --config=configs/table1.py:simsiam_s_net --workdir=runs/t1_simsiam_s_net
    python -m us3l_jax.main --config=configs/table1.py:simsiam_s_net_distill --workdir=runs/t1_simsiam_s_net_distill
    python -m us3l_jax.main --config=configs/table1.py:simsiam_individual,0.5 --workdir=runs/t1_simsiam_0.5
    python -m us3l_jax.main --config=configs/table1.py:supervised_us_net --workdir=runs/sup_us_net

Expected accuracy (paper Table 1, %) at widths 1.0 0.75 0.5 0.25; supervised rows are the
classifier's top-1 (sweep protocol ``top1``), SimSiam rows linear evaluation (``paper``):

    supervised_individual     73.8 72.8 71.4 67.3   (each width a separate run)
    supervised_s_net          71.9 71.7 70.8 66.2
    supervised_s_net_distill  73.1 71.9 70.5 67.2
    simsiam_individual        65.2 64.0 60.6 51.2   (each width a separate run)
    simsiam_s_net             -    -    -    -      (collapses)
    simsiam_s_net_distill     46.9 46.9 46.7 45.3

Table 1's "Ours" row (65.5 65.3 63.2 59.7) is US3L (``configs/us3l_cifar100.py``; paper row
``table1/ours``). ``supervised_us_net`` is supervised US-Net (sandwich rule, 4 widths,
inplace distillation, one summed update), which Table 1 does not report.

Recipes: ``us3l_jax.recipes.supervised_cifar`` (the official S-Net config: lr 1.0, 200 epochs,
weight decay 1e-4, batch 512, per-width updates; the official worker crashes as released,
so which values produced the table is not certain, see docs/fidelity.md) and
``simsiam_s_net_cifar`` / ``individual_cifar`` (SimSiam). Arguments: ``row[,width]`` (width
for the individual rows, default 1.0).
"""
from us3l_jax import recipes

SUPERVISED = ("supervised_individual", "supervised_s_net", "supervised_s_net_distill",
              "supervised_us_net")
SIMSIAM = ("simsiam_individual", "simsiam_s_net", "simsiam_s_net_distill")


def get_config(arg: str | None = "supervised_s_net"):
    a = recipes.parse_args(arg, ("row", "width"), ("supervised_s_net", 1.0))
    row, width = a["row"], float(a["width"])
    if row in SUPERVISED:
        c = recipes.supervised_cifar(row[len("supervised_"):], width=width)
    elif row == "simsiam_individual":
        c = recipes.individual_cifar("simsiam", width)
        c.optim.lr = 0.05  # the official SimSiam CIFAR config
    elif row in SIMSIAM:
        c = recipes.simsiam_s_net_cifar(distill=row.endswith("distill"))
    else:
        raise ValueError(f"unknown Table 1 row {row!r}; valid: {', '.join(SUPERVISED + SIMSIAM)}")
    if row != "supervised_us_net":
        c.eval.paper_row = f"table1/{row}"
    return c
