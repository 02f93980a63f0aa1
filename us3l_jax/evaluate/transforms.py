"""Evaluation data: the train/test splits of a dataset and the transforms of linear evaluation.

The transforms follow the run's pretraining views, so evaluation sees images at the size and
normalisation the backbone was trained on:

* CIFAR-sized views (side S < 128): linear-eval training crops RandomResizedCrop(S, scale
  (0.8, 1), bicubic) + flip; test transform Resize(round(S·36/32), bicubic) + CenterCrop(S)
  (S = 32 gives exactly the official CIFAR pipeline, the 16 px digits demo
  Resize(18) + CenterCrop(16)).
* ImageNet-sized views: RandomResizedCrop(S, scale (0.08, 1)) + flip; Resize(round(S·256/224))
  + CenterCrop(S), bilinear.

Mean/std are the pretraining views' (CIFAR's for the ``cifar``/``none`` presets).
Variable-size datasets (Flowers, Pets, DTD, ImageNet) are stored at the resize size, so the
test transform is a center crop on device; CIFAR and digits keep their stored size (the
pretraining ``image_size`` when the dataset is the pretraining one) and are resized on device.
"""
from __future__ import annotations

import dataclasses

from us3l_jax import build
from us3l_jax.data import augment, datasets

# Train / test splits per dataset (TFDS split strings). Flowers and DTD train on
# train+validation, as the paper's Table 10 counts (2,040 and 3,760 training images).
SPLITS: dict[str, tuple[str, str]] = {
    "digits": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "oxford_flowers102": ("train+validation", "test"),
    "oxford_iiit_pet": ("train", "test"),
    "dtd": ("train+validation", "test"),
    "imagenet2012": ("train", "validation"),
    "folder": ("train", "test"),  # an image folder's train/ and val/ (or test/)
}
_IMAGENET_SIZED = build.IMAGENET_SIZED  # views at least this large use the ImageNet recipes


@dataclasses.dataclass(frozen=True)
class EvalData:
    """How one dataset is evaluated for one run."""
    dataset: str
    train_split: str
    test_split: str
    load_size: int | None  # side ``datasets.load`` stores images at (None: native)
    train_view: augment.ViewConfig  # linear-eval training augmentation
    eval_view: augment.EvalConfig  # deterministic test transform
    ssl_view: augment.ViewConfig  # the pretraining view (official ImageNet BN calibration)

    @property
    def size(self) -> int:
        """The side of the images the backbone sees."""
        return self.eval_view.crop


def for_run(config, dataset: str | None = None) -> EvalData:
    """The evaluation splits and transforms of ``dataset`` (default: the pretraining dataset)
    for a run's ``config``. Raises ``DatasetNotFoundError`` for an unknown name."""
    dataset = dataset or config.data.dataset
    datasets.check_name(dataset)
    view = build.views(config)[0]
    s = view.size
    if s >= _IMAGENET_SIZED:
        resize = round(s * 256 / 224)
        test = augment.EvalConfig(resize=resize, crop=s, interpolation="bilinear",
                                  mean=view.mean, std=view.std)
    else:
        resize = round(s * 36 / 32)
        test = augment.EvalConfig(resize=resize, crop=s, interpolation="bicubic",
                                  mean=view.mean, std=view.std)
    if dataset in ("digits", "cifar10", "cifar100"):
        load_size = config.data.image_size if dataset == config.data.dataset else None
    else:
        load_size = resize
    train_split, test_split = SPLITS[dataset]
    return EvalData(dataset, train_split, test_split, load_size, build.linear_train_view(config),
                    test, dataclasses.replace(build.view_recipe(config)[0], size=s))


def load(data: EvalData, data_dir: str | None = None
         ) -> tuple[datasets.ArrayDataset, datasets.ArrayDataset]:
    """The (train, test) splits of ``data`` in host memory."""
    kw = dict(data_dir=data_dir, image_size=data.load_size)
    return (datasets.load(data.dataset, data.train_split, **kw),
            datasets.load(data.dataset, data.test_split, **kw))
