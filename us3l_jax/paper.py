"""The paper's published linear-evaluation accuracies (%), to draw beside ours.

Keys are ``table<N>/<backbone>/<method>`` (Tables 2, 3, 4, 6, 8, 16), ``table1/<row>``,
``table15/<method>/<none|gr>`` or ``table<N>/case<k>``
(Tables 7, 13, 14, 9 rows as ``table9/<sandwich>_<dynamic>``); ``None`` marks a collapsed
model ('-' in the paper). All are ResNet-18 on CIFAR-100 unless the key or ``dataset`` says
otherwise. Transcribed from the paper (main text and appendix); Table 6 rows carry the
transfer dataset in the key.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

W9 = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25)  # Tables 2, 7, 13, 14
W6 = (1.0, 0.8, 0.6, 0.5, 0.3, 0.25)  # Tables 8, 9
W4 = (1.0, 0.75, 0.5, 0.25)  # Tables 4, 6
W17 = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3,
       0.275, 0.25)  # Table 16


@dataclasses.dataclass(frozen=True)
class PaperRow:
    key: str
    label: str  # short legend text
    model: str  # our model name
    dataset: str
    accuracy: dict[float, float | None]  # width -> top-1 %, None: collapsed

    def at(self, width: float) -> float | None:
        """The published accuracy at ``width`` (None if not published or collapsed)."""
        for w, a in self.accuracy.items():
            if abs(w - width) < 1e-9:
                return a
        return None


ROWS: dict[str, PaperRow] = {}


def _add(key: str, label: str, model: str, widths: Sequence[float], values: str,
         dataset: str = "cifar100") -> None:
    vals = [None if v == "-" else float(v) for v in values.split()]
    if len(vals) != len(widths):
        raise AssertionError(f"{key}: {len(vals)} values for {len(widths)} widths")
    ROWS[key] = PaperRow(key, label, model, dataset, dict(zip(widths, vals)))


_MODELS = {"resnet18": ("cifar_resnet18", "R-18"), "resnet50": ("cifar_resnet50", "R-50"),
           "mobilenet_v2": ("cifar_mobilenet_v2", "MBv2")}

# Table 2: main results on CIFAR-100 (linear evaluation).
_TABLE2 = {
    "resnet18": {
        "simclr": ("SimCLR", "66.5 65.4 64.7 63.7 62.6 61.0 59.0 56.1 53.6"),
        "simsiam": ("SimSiam", "66.5 65.4 64.6 63.5 62.6 60.0 58.3 54.9 52.4"),
        "byol": ("BYOL", "66.8 66.0 65.6 65.3 63.0 62.1 59.5 56.0 54.3"),
        "seed_byol_r50": ("SEED (BYOL R-50)", "67.3 66.6 65.8 65.2 64.8 63.5 62.2 60.1 58.5"),
        "seed_mse_byol_r18": ("SEED-MSE (BYOL R-18)",
                              "67.5 67.2 66.5 66.0 65.9 64.8 64.0 62.4 60.1"),
        "seed_mse_byol_r50": ("SEED-MSE (BYOL R-50)",
                              "67.5 66.8 66.7 66.0 65.4 64.9 63.6 61.3 60.1"),
        "us_simclr": ("US+SimCLR", "65.5 64.9 63.8 63.6 62.7 61.8 60.2 58.2 57.4"),
        "us_simsiam": ("US+SimSiam", "57.5 57.4 57.3 57.0 56.3 55.4 54.5 53.1 52.4"),
        "ours": ("Ours", "69.0 68.2 68.0 66.9 66.1 64.7 62.6 60.9 60.4"),
        "ours_800ep": ("Ours (800ep)", "70.1 69.3 69.0 68.7 67.3 66.4 64.2 63.1 62.3"),
    },
    "resnet50": {
        "byol": ("BYOL", "67.0 66.7 66.5 66.3 66.0 64.9 63.8 62.1 61.2"),
        "seed_byol_r50": ("SEED (BYOL R-50)", "70.3 69.8 69.6 69.4 69.0 68.2 67.2 65.6 65.1"),
        "seed_mse_byol_r50": ("SEED-MSE (BYOL R-50)",
                              "69.4 69.0 68.5 69.1 68.4 68.1 67.3 66.9 66.4"),
        "us_simclr": ("US+SimCLR", "70.1 69.9 69.7 69.3 68.7 68.2 67.3 66.0 65.5"),
        "us_simsiam": ("US+SimSiam", "54.7 54.6 54.7 54.7 54.7 54.8 54.6 54.3 54.0"),
        "ours": ("Ours", "72.6 72.0 71.5 71.2 70.6 70.2 68.6 67.7 67.4"),
        "ours_800ep": ("Ours (800ep)", "73.0 72.5 71.9 71.6 71.1 70.8 69.1 68.0 67.6"),
    },
    "mobilenet_v2": {
        "byol": ("BYOL", "61.2 60.7 60.5 60.2 59.9 58.7 57.3 54.6 51.9"),
        "seed_mse_byol_r50": ("SEED-MSE (BYOL R-50)",
                              "68.6 68.9 67.6 67.3 67.4 66.3 65.5 64.0 62.6"),
        "seed_mse_byol_mbv2": ("SEED-MSE (BYOL MBv2)",
                               "63.8 63.5 63.8 63.6 63.6 63.3 62.7 62.1 59.8"),
        "us_simclr": ("US+SimCLR", "56.2 56.0 55.3 55.0 54.8 54.3 54.0 53.2 52.2"),
        "us_simsiam": ("US+SimSiam", "- - - - - - - - -"),
        "ours": ("Ours", "65.7 65.1 64.2 63.6 63.4 62.2 61.5 60.7 59.3"),
    },
}
for _bb, _rows in _TABLE2.items():
    for _m, (_label, _vals) in _rows.items():
        _add(f"table2/{_bb}/{_m}", f"Table 2 {_MODELS[_bb][1]} {_label}", _MODELS[_bb][0], W9,
             _vals)

# Table 4: linear evaluation on ImageNet (100-epoch pretraining).
for _bb, _model, _rows in (
        ("resnet18", "resnet18", {"byol": ("BYOL", "54.0 53.7 47.4 34.9"),
                                  "us_byol": ("US+BYOL", "55.9 53.1 48.0 40.6"),
                                  "ours": ("Ours", "56.9 54.5 48.7 40.7")}),
        ("resnet50", "resnet50", {"byol": ("BYOL", "68.1 66.3 61.2 50.9"),
                                  "us_byol": ("US+BYOL", "64.7 64.3 62.6 57.1"),
                                  "ours": ("Ours", "68.4 66.7 63.4 57.7")})):
    for _m, (_label, _vals) in _rows.items():
        _add(f"table4/{_bb}/{_m}", f"Table 4 {_MODELS[_bb][1]} {_label}", _model, W4, _vals,
             dataset="imagenet2012")

# Table 6: ImageNet R-50 transferred to recognition benchmarks (linear evaluation).
_TABLE6 = {  # dataset -> method -> accuracies at 1.0/0.75/0.5/0.25
    "cifar10": {"byol": "87.1 83.6 80.6 75.9", "ours": "87.1 84.4 81.6 78.9"},
    "cifar100": {"byol": "60.6 52.8 52.0 46.2", "ours": "61.5 56.9 52.8 49.9"},
    "oxford_flowers102": {"byol": "81.0 82.9 74.8 75.4", "ours": "90.6 89.7 88.1 84.4"},
    "oxford_iiit_pet": {"byol": "80.9 74.2 75.0 64.7", "ours": "80.9 78.0 76.8 74.0"},
    "dtd": {"byol": "70.7 66.3 65.9 61.4", "ours": "72.6 71.1 68.8 64.9"},
}
for _ds, _rows in _TABLE6.items():
    for _m, _vals in _rows.items():
        _add(f"table6/resnet50/{_m}/{_ds}", f"Table 6 R-50 {'BYOL' if _m == 'byol' else 'Ours'}"
             f" ({_ds})", "resnet50", W4, _vals, dataset=_ds)

# Table 7: loss-design ablation (R-18, CIFAR-100); cases 1-8 base loss MSE, 9-17 InfoNCE.
_TABLE7 = """
- - - - - - - - -
57.5 57.4 57.3 57.0 56.3 55.4 54.5 53.1 52.4
64.7 64.7 64.5 64.3 63.9 62.6 61.3 59.7 59.3
65.4 65.0 64.8 64.5 63.8 62.7 61.1 59.8 58.9
62.3 62.3 62.3 62.2 61.8 60.6 58.9 57.6 57.2
63.7 63.8 63.7 63.6 63.1 62.0 60.6 59.3 58.2
65.0 65.0 65.1 65.0 64.5 62.7 61.3 59.8 59.2
65.5 65.5 65.6 65.0 64.6 63.2 61.6 60.2 59.7
64.8 64.0 63.2 62.0 60.8 59.8 57.4 55.1 54.2
65.0 64.4 63.1 62.3 61.9 60.3 58.3 57.1 56.6
65.8 65.0 64.4 63.4 62.7 61.8 59.8 58.5 57.6
66.9 66.3 65.7 64.9 63.8 62.9 61.6 59.5 59.1
67.7 67.2 66.5 66.0 65.1 64.3 62.5 60.5 59.6
65.5 64.9 63.8 63.6 62.7 61.8 60.2 58.2 57.4
64.7 64.5 64.0 63.6 62.3 61.4 59.8 58.4 57.9
66.0 65.4 64.8 64.3 63.8 62.4 61.1 59.8 58.7
67.4 66.0 66.1 65.6 64.7 64.0 62.2 60.2 59.5
"""


def _add_cases(table: int, rows: Sequence[str]) -> None:
    """Numbered ablation cases of an R-18 CIFAR-100 table at the 9 widths of Table 2."""
    for i, vals in enumerate(rows, start=1):
        _add(f"table{table}/case{i}", f"Table {table} case {i}", "cifar_resnet18", W9, vals)


_add_cases(7, _TABLE7.strip().splitlines())

# Table 8: dynamic sampling (DS) and group regularization (GR) on CIFAR-100.
_TABLE8 = {
    "resnet18": ("67.7 66.5 65.1 64.3 60.5 59.6", "68.6 67.2 65.5 64.6 60.7 59.9",
                 "68.6 67.3 65.5 64.4 60.9 60.1", "69.0 68.0 66.1 64.7 60.9 60.4"),
    "resnet50": ("71.0 70.6 70.0 69.1 67.2 66.8", "71.8 71.1 70.2 69.3 67.3 67.2",
                 "71.9 71.1 70.0 69.6 67.7 67.5", "72.6 71.5 70.6 70.2 67.7 67.4"),
    "mobilenet_v2": ("62.9 62.0 61.5 60.4 59.6 58.7", "64.7 63.3 62.3 61.7 60.7 59.2",
                     "64.0 63.2 62.1 61.4 60.2 59.0", "65.7 64.2 63.4 62.2 60.7 59.3"),
}
for _bb, _rows in _TABLE8.items():
    for _m, _vals in zip(("baseline", "ds", "gr", "ds_gr"), _rows):
        _add(f"table8/{_bb}/{_m}", f"Table 8 {_MODELS[_bb][1]} {_m}", _MODELS[_bb][0], W6, _vals)

# Table 9: sandwich rule x dynamic sampling.
for _m, _vals in (("none", "65.1 65.0 64.7 63.2 59.4 56.4"),
                  ("dynamic", "67.4 67.3 65.9 64.7 59.9 58.7"),
                  ("sandwich", "67.7 66.5 65.1 64.3 60.5 59.6"),
                  ("sandwich_dynamic", "68.6 67.3 65.5 64.4 60.9 60.1")):
    _add(f"table9/{_m}", f"Table 9 {_m}", "cifar_resnet18", W6, _vals)

# Table 13: sampling strategy.
_add_cases(13, (
        "68.1 67.4 67.0 66.3 65.3 64.4 62.7 60.8 59.9",
        "67.7 67.2 66.5 66.0 65.1 64.3 62.5 60.5 59.6",
        "68.5 67.9 67.2 66.4 65.3 64.5 62.6 61.0 60.2",
        "67.8 67.6 66.8 66.2 65.3 64.5 63.0 60.6 59.8",
        "68.6 68.1 67.2 66.6 65.5 64.6 62.8 60.7 59.9"))

# Table 14: group-regularization G and alpha.
_add_cases(14, (
        "67.7 67.2 66.5 66.0 65.1 64.3 62.5 60.5 59.6",
        "68.0 67.4 66.3 66.0 65.2 64.0 62.6 61.0 60.3",
        "68.6 67.8 67.3 66.4 65.5 64.4 63.1 60.9 60.1",
        "68.2 67.6 66.9 66.1 65.3 64.2 62.7 61.0 60.2",
        "67.7 67.0 66.7 66.4 65.8 64.2 62.8 61.3 60.5",
        "68.0 67.4 66.6 66.1 65.1 63.8 63.0 61.6 60.6",
        "68.7 67.6 67.3 66.5 65.5 64.7 62.8 61.3 60.1",
        "67.9 67.3 66.7 66.3 65.5 64.2 63.1 61.1 60.5",
        "67.4 67.0 66.3 65.9 64.7 64.0 62.8 61.2 60.1"))

# Table 15: group regularization (GR) on individually trained BYOL / SimCLR and on US3L without
# dynamic sampling (R-18). The rows without GR repeat Table 2's BYOL / SimCLR and Table 14
# case 1; "ours/gr" is Table 14 case 3.
for _m, _label, _vals in (
        ("byol/none", "BYOL individual", "66.8 66.0 65.6 65.3 63.0 62.1 59.5 56.0 54.3"),
        ("byol/gr", "BYOL individual + GR", "66.0 66.2 65.6 64.4 63.4 61.8 59.3 56.1 54.0"),
        ("simclr/none", "SimCLR individual", "66.5 65.4 64.7 63.7 62.6 61.0 59.0 56.1 53.6"),
        ("simclr/gr", "SimCLR individual + GR", "65.7 65.0 65.0 63.3 62.6 61.0 58.8 56.0 53.4"),
        ("ours/none", "Ours (US-Net)", "67.7 67.2 66.5 66.0 65.1 64.3 62.5 60.5 59.6"),
        ("ours/gr", "Ours (US-Net) + GR", "68.6 67.8 67.3 66.4 65.5 64.4 63.1 60.9 60.1")):
    _add(f"table15/{_m}", f"Table 15 {_label}", "cifar_resnet18", W9, _vals)

# Table 16: US3L (800 epochs) at 17 widths.
_add("table16/resnet18", "Table 16 R-18 Ours (800ep)", "cifar_resnet18", W17,
     "70.1 69.6 69.3 69.2 69.0 68.4 68.7 68.0 67.3 66.7 66.4 65.4 64.2 63.6 63.1 63.1 62.3")
_add("table16/resnet50", "Table 16 R-50 Ours (800ep)", "cifar_resnet50", W17,
     "73.0 72.9 72.5 72.1 71.9 71.6 71.6 71.2 71.1 71.0 70.8 69.9 69.1 68.3 68.0 67.8 67.6")

# Table 1: supervised top-1 / SimSiam linear accuracy under S-Net (R-18, CIFAR-100).
for _m, _label, _vals in (
        ("supervised_individual", "Supervised individual", "73.8 72.8 71.4 67.3"),
        ("supervised_s_net", "Supervised S-Net", "71.9 71.7 70.8 66.2"),
        ("supervised_s_net_distill", "Supervised S-Net+Distill", "73.1 71.9 70.5 67.2"),
        ("simsiam_individual", "SimSiam individual", "65.2 64.0 60.6 51.2"),
        ("simsiam_s_net", "SimSiam S-Net", "- - - -"),
        ("simsiam_s_net_distill", "SimSiam S-Net+Distill", "46.9 46.9 46.7 45.3"),
        ("ours", "Table 1 Ours", "65.5 65.3 63.2 59.7")):
    _add(f"table1/{_m}", _label, "cifar_resnet18", W4, _vals)


# Table 3: ViTs on CIFAR-10 (MoCo v3 recipe), linear evaluation.
_TABLE3 = {
    "vit_tiny": (("mocov3", "MoCo v3", "82.6 79.5 75.8 68.0"),
                 ("us_mocov3", "US+MoCo v3", "79.8 79.4 77.6 76.4"),
                 ("ours", "Ours", "86.0 84.7 83.3 80.2")),
    "vit_small": (("mocov3", "MoCo v3", "88.0 86.8 83.0 75.5"),
                  ("us_mocov3", "US+MoCo v3", "88.2 87.5 86.3 84.9"),
                  ("ours", "Ours", "90.3 89.7 88.7 85.5")),
}
for _bb, _rows in _TABLE3.items():
    for _m, _label, _vals in _rows:
        _add(f"table3/{_bb}/{_m}", f"Table 3 {_bb.replace('vit_', 'ViT-').title()} {_label}",
             _bb, W4, _vals, dataset="cifar10")


def get(key: str) -> PaperRow:
    """The row ``key``; ``ValueError`` listing the valid keys of that table otherwise."""
    if key in ROWS:
        return ROWS[key]
    table = key.split("/", 1)[0]
    near = [k for k in ROWS if k.startswith(table + "/")] or sorted({k.split("/")[0]
                                                                    for k in ROWS})
    raise ValueError(f"unknown paper row {key!r}; valid: {', '.join(near)}")
