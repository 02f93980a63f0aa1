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
64 px and the ImageNet stem from 64 px; ``epochs`` (default 200); ``batch`` (default 256,
a multiple of 128: BatchNorm statistics and negatives are per 128 images, 64 for resnet50).

Recipe: the paper's CIFAR US3L recipe (``us3l_jax.recipes.us3l_cifar``: InfoNCE against an
EMA teacher, distillation through an auxiliary head, sandwich rule with dynamic sampling "A",
group regularization), lr 0.5 per 512 images scaled linearly to ``batch``, CIFAR
augmentation (no blur) below 128 px and ImageNet's (blur) from 128 px. With a val/ or
test/ folder the run monitors kNN accuracy every 20 epochs and ends with a fast-probe sweep
of widths 1.0 ... 0.25; without one it only pretrains (a kNN or probe needs labels).

Expected: what a run reaches depends on your images. As a check of the path end to end,
scikit-learn's digits written as 16 px PNG folders (``tests/data/test_folder.py`` writes a
tiny one) learn like ``configs/demo.py``. Errors are one line with exit 2: a missing folder,
a folder without images, evaluation with fewer than 2 classes or no val/ folder, a batch
larger than the folder.
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
    c.optim.lr = 0.5 * batch / 512
    c.eval.calibration = "custom"
    c.eval.sweep_protocol = "fast"
    # Accuracy needs labels: with held-out class folders, monitor and sweep; else pretrain only.
    labelled = any(os.path.isdir(os.path.join(path, d)) for d in folder.TEST_DIRS)
    c.eval.final_sweep = labelled
    c.eval.online_every_epochs = 20 if labelled else 0
    return c

