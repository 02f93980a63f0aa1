"""US3L on your own images: a folder of image files, one set of weights for every width.

    python -m us3l_jax.main --config=configs/custom.py:path=/data/imgs,size=96 --workdir=runs/imgs
    python -m us3l_jax.main --config=configs/custom.py:path=/data/imgs,size=160,arch=resnet50,epochs=100,batch=512 --workdir=runs/imgs_r50

then ``python -m us3l_jax.evaluate --workdir=runs/imgs --protocol=fast`` (or ``knn``,
``paper``) and ``python -m us3l_jax.export --workdir=runs/imgs --table``.

Layout of ``path`` (``us3l_jax.data.folder``; torchvision's ImageFolder, as the official
code reads train/val folders):

    /data/imgs/train/<class>/*.png|jpg|...   training images, one subfolder per class
    /data/imgs/val/<class>/*.png|jpg|...     held-out images (or test/) for evaluation

or, to pretrain only, a flat or nested folder of unlabelled images (no train/ subfolder:
every image under ``path`` is training data). Images of any size are resized (shorter side)
and center-cropped to ``size`` once, then held in device memory; for a folder too large for
that, add ``--config.data.streaming=True`` (decoded and cropped on the host every step).

Arguments (``key=value``, comma-separated; ``path`` is required and may hold neither ``,``
nor ``:``): ``size`` (default 96) the side of the training views; ``arch`` resnet18
(default), resnet50 or mobilenet_v2, with the CIFAR stem (3x3 stride 1, no max-pool) below
64 px and the ImageNet stem from 64 px; ``epochs`` (default 200); ``batch`` (default 256; a
multiple of 128, 64 for resnet50, or smaller: BatchNorm statistics and negatives are per that
many images, the official per-GPU batch, or per batch when it is smaller).

Recipe: the paper's CIFAR US3L recipe (``us3l_jax.recipes.us3l_cifar``: InfoNCE against an
EMA teacher, distillation through an auxiliary head, sandwich rule with dynamic sampling "A",
group regularization), lr 0.5 per 512 images scaled linearly to ``batch``, CIFAR
augmentation (no blur) below 128 px and ImageNet's (blur) from 128 px. With a val/ or
test/ folder the run monitors kNN accuracy every 20 epochs and ends with a fast-probe sweep
of widths 1.0 ... 0.25; without one it only pretrains (a kNN or probe needs labels).

Expected: what a run reaches depends on your images. Measured (2026-12-05, 2-core CPU):
scikit-learn's digits written out as PNG folders (the demo's split: 1,438 train/<digit>/ and
359 val/<digit>/ 8x8 images) with the digits demo's model, heads and 12 epochs,

    python -m us3l_jax.main --config=configs/custom.py:path=/tmp/digits_png,size=16,epochs=12,batch=64 --workdir=/tmp/digits_folder --config.model.base_width=16 --config.model.stage_sizes=(1,1,1,1) --config.heads.proj_hidden=128 --config.heads.proj_out=64 --config.heads.head_hidden=128 --config.method.group_size=32 --config.sampler.grid_step=0.125 --config.eval.batch_size=64 --config.eval.calibration_batches=20 --config.eval.online_every_epochs=0 --config.eval.sweep_widths=(1.0,0.75,0.5,0.25)

ends with fast-probe top-1 95.3 / 95.3 / 94.4 / 90.8 % at widths 1.0 / 0.75 / 0.5 / 0.25
(264 steps; ``configs/demo.py`` on the same images reaches 92-97 %). Errors are one line with
exit 2: a missing folder, a folder without images, evaluation with fewer than 2 classes or
no val/ folder, an unreadable image, a batch larger than the folder.
"""
import os

from us3l_jax import recipes
from us3l_jax.data import datasets, folder

ARGS = {"path": None, "size": "96", "arch": "resnet18", "epochs": "200", "batch": "256"}
IMAGENET_STEM_FROM = 64  # px: smaller images keep the CIFAR stem's resolution
IMAGENET_VIEWS_FROM = 128  # px: the augmentation and evaluation recipes switch to ImageNet's
ARCHS = ("resnet18", "resnet50", "mobilenet_v2")  # us3l_jax.models names with the ImageNet stem


def parse(arg: str | None) -> dict[str, str]:
    """``"path=/x,size=96"`` -> ``ARGS`` with those values; a clear error for anything else."""
    values = dict(ARGS)
    for part in (arg or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ARGS:
            raise ValueError(f"config argument {part!r}: expected key=value with key one of "
                             f"{', '.join(ARGS)}, e.g. configs/custom.py:path=/data/imgs,size=96")
        values[key] = value.strip()
    if not values["path"]:
        raise ValueError("configs/custom.py needs the image folder: "
                         "configs/custom.py:path=/data/imgs[,size=96]")
    for key in ("size", "epochs", "batch"):
        if not values[key].isdigit() or int(values[key]) <= 0:
            raise ValueError(f"config argument {key}={values[key]!r} must be a positive integer")
    if values["arch"] not in ARCHS:
        raise ValueError(f"config argument arch={values['arch']!r}; valid: {', '.join(ARCHS)}")
    return values


def get_config(arg: str | None = None):
    a = parse(arg)
    size, batch = int(a["size"]), int(a["batch"])
    path = os.path.abspath(os.path.expanduser(a["path"]))
    c = recipes.us3l_cifar(a["arch"], datasets.FOLDER, epochs=int(a["epochs"]))
    if size >= IMAGENET_STEM_FROM:
        c.model.name = a["arch"]  # the CIFAR recipe's model has the CIFAR stem
    c.data.data_dir = path
    c.data.image_size = size
    c.data.augment = "imagenet" if size >= IMAGENET_VIEWS_FROM else "cifar"
    c.optim.batch_size = batch
    c.method.group_size = min(c.method.group_size, batch)
    c.eval.batch_size = batch  # BN calibration batches: no larger than the folder's batches
    c.optim.lr = 0.5 * batch / 512
    c.eval.calibration = "custom"
    c.eval.sweep_protocol = "fast"
    # Accuracy needs labels: with held-out class folders, monitor and sweep; else pretrain only.
    labelled = any(os.path.isdir(os.path.join(path, d)) for d in folder.TEST_DIRS)
    c.eval.final_sweep = labelled
    c.eval.online_every_epochs = 20 if labelled else 0
    return c

