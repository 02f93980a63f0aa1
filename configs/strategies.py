"""Paper Tables 8, 9, 13 and 14 (appendix): US3L's sampling and regularization strategies
switched on and off, on CIFAR-100 (ResNet-18 unless a backbone is given).

    python -m us3l_jax.main --config=configs/strategies.py:table8,resnet50,1,0 --workdir=runs/t8_r50_ds
    python -m us3l_jax.main --config=configs/strategies.py:table9,0,1 --workdir=runs/t9_noswich_ds
    python -m us3l_jax.main --config=configs/strategies.py:table13,4 --workdir=runs/t13_case4
    python -m us3l_jax.main --config=configs/strategies.py:table14,7 --workdir=runs/t14_case7

Arguments and expected linear accuracy at 1.0x / 0.25x (%):

* ``table8,<resnet18|resnet50|mobilenet_v2>,<dynamic sampling 0|1>,<group reg 0|1>``:
  R-18 67.7/59.6, 68.6/59.9 (DS), 68.6/60.1 (GR), 69.0/60.4 (both);
  R-50 71.0/66.8, 71.8/67.2, 71.9/67.5, 72.6/67.4; MBv2 62.9/58.7, 64.7/59.2, 64.0/59.0,
  65.7/59.3.
* ``table9,<sandwich 0|1>,<dynamic sampling 0|1>`` (no group reg): 65.1/56.4, 67.4/58.7,
  67.7/59.6, 68.6/60.1. Without the sandwich rule all 3 widths are random.
* ``table13,<case 1-5>`` (sampling, no group reg): 1 US-Net s=4 68.1/59.9; 2 s=3 67.7/59.6;
  3 "gradually reduce" only 68.5/60.2; 4 "max first" only 67.8/59.8; 5 both (= "A")
  68.6/59.9.
* ``table14,<case 1-9>`` (group reg G, alpha; no dynamic sampling): 1 alpha 0 67.7/59.6;
  2 G8 0.025 68.0/60.3; 3 G8 0.05 68.6/60.1; 4 G8 0.075 68.2/60.2; 5 G8 0.1 67.7/60.5;
  6 G4 0.1 68.0/60.6; 7 G16 0.025 68.7/60.1; 8 G16 0.05 67.9/60.5; 9 G8 -0.05 67.4/60.1.

All other settings are ``us3l_jax.recipes.us3l_cifar``; full rows in
``us3l_jax/paper.py``.
"""
from us3l_jax import recipes

TABLE13 = {1: (4, "none"), 2: (3, "none"), 3: (3, "gradual"), 4: (3, "max_first"), 5: (3, "A")}
TABLE14 = {1: (8, 0.0), 2: (8, 0.025), 3: (8, 0.05), 4: (8, 0.075), 5: (8, 0.1), 6: (4, 0.1),
           7: (16, 0.025), 8: (16, 0.05), 9: (8, -0.05)}


def _flag(value: str, name: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _case(value: str, table: dict, name: str) -> int:
    if not value.isdigit() or int(value) not in table:
        raise ValueError(f"{name} case must be one of {sorted(table)}, got {value!r}")
    return int(value)


def get_config(arg: str | None = "table8"):
    table = (arg or "table8").split(",")[0]
    if table == "table8":
        a = recipes.parse_args(arg, ("table", "arch", "ds", "gr"), ("table8", "resnet18", 1, 1))
        c = recipes.us3l_cifar(a["arch"])
        ds, gr = _flag(a["ds"], "dynamic sampling"), _flag(a["gr"], "group reg")
        row = f"table8/{a['arch']}/" + ({(0, 0): "baseline", (1, 0): "ds", (0, 1): "gr",
                                          (1, 1): "ds_gr"}[int(ds), int(gr)])
    elif table == "table9":
        a = recipes.parse_args(arg, ("table", "sandwich", "ds"), ("table9", 1, 1))
        c = recipes.us3l_cifar("resnet18")
        c.sampler.sandwich = _flag(a["sandwich"], "sandwich")
        ds, gr = _flag(a["ds"], "dynamic sampling"), False
        row = "table9/" + {(0, 0): "none", (0, 1): "dynamic", (1, 0): "sandwich",
                           (1, 1): "sandwich_dynamic"}[int(c.sampler.sandwich), int(ds)]
    elif table == "table13":
        a = recipes.parse_args(arg, ("table", "case"), ("table13", 5))
        case = _case(a["case"], TABLE13, "table13")
        c = recipes.us3l_cifar("resnet18")
        c.sampler.num_samples, c.sampler.schedule = TABLE13[case]
        ds, gr = c.sampler.schedule != "none", False
        row = f"table13/case{case}"
    elif table == "table14":
        a = recipes.parse_args(arg, ("table", "case"), ("table14", 3))
        case = _case(a["case"], TABLE14, "table14")
        c = recipes.us3l_cifar("resnet18")
        c.optim.reg_groups, c.optim.reg_alpha = TABLE14[case]
        ds, gr = False, True
        row = f"table14/case{case}"
    else:
        raise ValueError(f"unknown table {table!r}; valid: table8, table9, table13, table14")
    if table != "table13" and not ds:
        c.sampler.schedule = "none"
    # Table 14 case 1 (alpha 0) reports the Table 8 baseline's numbers: that run, plain decay.
    if not gr or c.optim.reg_alpha == 0.0:
        recipes.plain_weight_decay(c)
    c.eval.paper_row = row
    return c
