"""SEED and SEED-MSE on CIFAR-100 (paper Table 2): a student at one fixed width distilled from
a frozen, individually trained BYOL teacher (one run per width, training cost n*T plus the
teacher's).

First train the teacher (width 1.0), then one student per width:

    python -m us3l_jax.main --config=configs/baselines_cifar100.py:byol,1.0,resnet50 --workdir=runs/byol_r50
    python -m us3l_jax.main --config=configs/seed_cifar100.py:seed,resnet18,r50,1.0,runs/byol_r50 --workdir=runs/seed_r18_1.0
    python -m us3l_jax.main --config=configs/seed_cifar100.py:seed_mse,resnet18,r18,0.25,runs/byol_r18 --workdir=runs/seed_mse_r18_0.25
    python -m us3l_jax.main --config=configs/seed_cifar100.py:seed_mse,resnet18,r50,0.5,runs/byol_r50 --workdir=runs/seed_mse_r18_r50_0.5
    python -m us3l_jax.main --config=configs/seed_cifar100.py:seed,resnet50,r50,0.25,runs/byol_r50 --workdir=runs/seed_r50_0.25
    python -m us3l_jax.main --config=configs/seed_cifar100.py:seed_mse,resnet50,r50,1.0,runs/byol_r50 --workdir=runs/seed_mse_r50_1.0
    python -m us3l_jax.main --config=configs/seed_cifar100.py:seed_mse,mobilenet_v2,r50,0.25,runs/byol_r50 --workdir=runs/seed_mse_mbv2_r50_0.25
    python -m us3l_jax.main --config=configs/seed_cifar100.py:seed_mse,mobilenet_v2,mbv2,0.25,runs/byol_mbv2 --workdir=runs/seed_mse_mbv2_0.25

Arguments: ``<seed|seed_mse>,<student arch>,<teacher r18|r50|mbv2>,<width>,<teacher>``
(the teacher tag picks the paper row and the teacher's architecture). ``<teacher>`` is the
teacher run's workdir (also ``--config.teacher.workdir``) or a ``.safetensors`` file holding
an official BYOL checkpoint's ``state_dict`` (also ``--config.teacher.state_dict``), made
where torch is installed with
``safetensors.torch.save_file(torch.load(ckpt, map_location="cpu")["state_dict"], out)``:

    python -m us3l_jax.main --config=configs/seed_cifar100.py:seed_mse,resnet18,r50,0.25,byol_r50.safetensors --config.teacher.bn=stored --workdir=runs/seed_mse_r18_r50_0.25

The student's workdir records the teacher in ``teacher.json``. Expected linear accuracy (paper
Table 2, %) at 1.0 0.9 0.8 0.7 0.6 0.5 0.4 0.3 0.25:

    R-18 SEED (BYOL R-50)       67.3 66.6 65.8 65.2 64.8 63.5 62.2 60.1 58.5
    R-18 SEED-MSE (BYOL R-18)   67.5 67.2 66.5 66.0 65.9 64.8 64.0 62.4 60.1
    R-18 SEED-MSE (BYOL R-50)   67.5 66.8 66.7 66.0 65.4 64.9 63.6 61.3 60.1
    R-50 SEED (BYOL R-50)       70.3 69.8 69.6 69.4 69.0 68.2 67.2 65.6 65.1
    R-50 SEED-MSE (BYOL R-50)   69.4 69.0 68.5 69.1 68.4 68.1 67.3 66.9 66.4
    MBv2 SEED-MSE (BYOL R-50)   68.6 68.9 67.6 67.3 67.4 66.3 65.5 64.0 62.6
    MBv2 SEED-MSE (BYOL MBv2)   63.8 63.5 63.8 63.6 63.6 63.3 62.7 62.1 59.8

Recipe (``us3l_jax.recipes.seed_cifar``, the official CIFAR SEED configs): SEED queue 32768,
temperatures 0.5 (student) / 1e-4 (teacher), weight decay 1e-4, 200 epochs; SEED-MSE
predictor + negative cosine, weight decay 5e-4, 400 epochs; both lr 0.05, batch 512, BN per
128. The teacher's BNs: batch statistics for SEED (the official teacher runs in train mode),
running statistics for SEED-MSE (eval mode): ``teacher.bn=calibrated`` (default) estimates
them when the student starts, ``teacher.bn=stored`` uses those of an official checkpoint,
as the official code (docs/fidelity.md, "SEED teacher BN statistics").
"""
from us3l_jax import recipes

TEACHERS = {"r18": "resnet18", "r50": "resnet50", "mbv2": "mobilenet_v2"}
ROWS = {  # Table 2's SEED rows: (loss, student arch, teacher tag)
    ("seed", "resnet18", "r50"), ("seed_mse", "resnet18", "r18"),
    ("seed_mse", "resnet18", "r50"), ("seed", "resnet50", "r50"),
    ("seed_mse", "resnet50", "r50"), ("seed_mse", "mobilenet_v2", "r50"),
    ("seed_mse", "mobilenet_v2", "mbv2")}


def get_config(arg: str | None = "seed"):
    a = recipes.parse_args(arg, ("loss", "arch", "teacher", "width", "teacher_workdir"),
                           ("seed", "resnet18", "r50", 1.0, ""))
    if a["teacher"] not in TEACHERS:
        raise ValueError(f"unknown teacher tag {a['teacher']!r}; valid: {', '.join(TEACHERS)}")
    c = recipes.seed_cifar(a["loss"], a["arch"], float(a["width"]), a["teacher_workdir"] or None,
                           teacher_arch=TEACHERS[a["teacher"]])
    if (a["loss"], a["arch"], a["teacher"]) in ROWS:
        c.eval.paper_row = f"table2/{a['arch']}/{a['loss']}_byol_{a['teacher']}"
    return c
