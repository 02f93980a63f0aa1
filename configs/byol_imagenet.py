"""The BYOL baselines of paper Table 4 on ImageNet, 100 epochs: BYOL trained individually at
each width, and US+BYOL (US-Net with BYOL) trained once for all widths.

    python -m us3l_jax.main --config=configs/byol_imagenet.py:byol,resnet50,1.0 --workdir=runs/byol_in_r50_1.0 \
        --config.data.data_dir=/path/to/tensorflow_datasets
    python -m us3l_jax.main --config=configs/byol_imagenet.py:byol,resnet18,0.25 --workdir=runs/byol_in_r18_0.25
    python -m us3l_jax.main --config=configs/byol_imagenet.py:us_byol,resnet50 --workdir=runs/us_byol_in_r50

Arguments: ``byol,<resnet18|resnet50>,<width>`` (one run per width: 1.0, 0.75, 0.5, 0.25) or
``us_byol,<resnet18|resnet50>``. Expected ImageNet linear accuracy (paper Table 4, %) at
1.0 0.75 0.5 0.25:

    R-18 BYOL      54.0 53.7 47.4 34.9   (each width a separate run)
    R-18 US+BYOL   55.9 53.1 48.0 40.6
    R-50 BYOL      68.1 66.3 61.2 50.9
    R-50 US+BYOL   64.7 64.3 62.6 57.1

Recipe (``us3l_jax.recipes.byol_imagenet``, the official ``us_resnet*_byol_imagenet_baseline``
configs): BYOL loss (negative cosine of the predictor against the momentum teacher, m 0.99),
SGD lr 0.05 cosine, weight decay 1e-4, batch 1024 (8 x 128, R-18) / 480 (8 x 60, R-50) with BN
per GPU batch, 2048/2048 heads, no group reg, bfloat16. US+BYOL: sandwich rule with 3 widths
from the start, sub-networks distill the teacher's projection through a new head.
"""
from us3l_jax import recipes

METHODS = ("byol", "us_byol")


def get_config(arg: str | None = "byol"):
    method = (arg or "byol").split(",")[0]
    if method == "byol":
        a = recipes.parse_args(arg, ("method", "arch", "width"), ("byol", "resnet50", 1.0))
        c = recipes.byol_imagenet(a["arch"], float(a["width"]))
    elif method == "us_byol":
        a = recipes.parse_args(arg, ("method", "arch"), ("us_byol", "resnet50"))
        c = recipes.byol_imagenet(a["arch"], None)
    else:
        raise ValueError(f"unknown Table 4 baseline {method!r}; valid: {', '.join(METHODS)}")
    c.eval.paper_row = f"table4/{a['arch']}/{method}"
    return c
