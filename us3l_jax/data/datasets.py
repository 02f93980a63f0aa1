"""Dataset loading: one interface over TFDS (read without TensorFlow), sklearn's digits and
a folder of your own images.

``load(name, split)`` returns an in-memory :class:`ArrayDataset` (uint8 NHWC images, int32
labels). TFDS datasets are read through ``tfds.data_source`` (ArrayRecord, random access, no
TensorFlow), which also works under ``tfds.testing.mock_data``. ``folder`` is an image folder
at ``data_dir`` (``folder.py``: train/<class>/ and val/<class>/, or unlabelled images), splits
``train`` and ``test``. ``open_source`` gives the raw random-access source for streaming
(ImageNet, see ``streaming.py``).

Nothing here downloads: a dataset that is not prepared in ``data_dir`` raises
:class:`DatasetNotFoundError` at once, naming the dataset, the directory searched and the
command that prepares it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from us3l_jax.data import folder, host_transforms

TFDS_NAMES = ("cifar10", "cifar100", "imagenet2012", "oxford_flowers102", "oxford_iiit_pet",
              "dtd")
FOLDER = "folder"  # your own images at config.data.data_dir (us3l_jax.data.folder)
NAMES = TFDS_NAMES + ("digits", FOLDER)
# Classes per dataset: the size of a supervised classifier, known before any data is read
# (a folder's: ``num_classes``).
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000, "oxford_flowers102": 102,
               "oxford_iiit_pet": 37, "dtd": 47, "digits": 10}

# Datasets whose images vary in size: ``load`` stores them at ``image_size`` (shorter side
# resized, then center-cropped to a square), the official eval resize.
_VARIABLE_SIZE = ("imagenet2012", "oxford_flowers102", "oxford_iiit_pet", "dtd", FOLDER)
DEFAULT_VARIABLE_SIZE = 256
DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # fixed: the digits split never changes
_READ_THREADS = 8  # PIL decoding/resizing releases the GIL


class DatasetNotFoundError(ValueError):
    """A dataset is unknown, its directory is missing, or it is not prepared offline."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """An in-memory labelled image set: ``images`` uint8[N, H, W, 3], ``labels`` int32[N]."""
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    split: str

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8[N, H, W, 3], got {self.images.dtype}"
                             f"{list(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match "
                             f"{self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load(name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None,
         image_size: int | None = None,
         index_range: tuple[int, int] | None = None) -> ArrayDataset:
    """Loads ``split`` of dataset ``name`` into host memory.

    Args:
      name: one of ``NAMES``.
      split: a split of that dataset (TFDS slicing such as ``"train[:10%]"`` works for TFDS
        datasets); ``digits`` and ``folder`` have ``"train"`` and ``"test"``.
      data_dir: the TFDS data directory (default: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``); for ``folder`` the image folder (required). Ignored for
        ``digits``.
      image_size: output side length. ``None`` keeps CIFAR at 32, makes digits 32 and stores
        variable-size datasets at 256 (shorter side resized to 256, bilinear, then
        center-cropped to 256x256, so the eval transform Resize(256)+CenterCrop(224) is a
        center crop on device). For CIFAR/digits a different size resizes (bilinear).
      index_range: ``(start, stop)`` reads only those examples (per-process loading; see
        ``feeding.process_rows``).
    """
    check_name(name)
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if name == "digits":
        images, labels = _digits(split, image_size or 32)
        num_classes = 10
        if index_range is not None:
            images, labels = images[slice(*index_range)], labels[slice(*index_range)]
    else:
        source = open_source(name, split, data_dir=data_dir)
        num_classes = (source.num_classes if name == FOLDER
                       else int(source.dataset_info.features["label"].num_classes))
        start, stop = index_range if index_range is not None else (0, len(source))
        if not 0 <= start <= stop <= len(source):
            raise ValueError(f"index_range {index_range} is outside {name}[{split}] "
                             f"({len(source)} examples)")
        size = image_size or (DEFAULT_VARIABLE_SIZE if name in _VARIABLE_SIZE else None)
        images, labels = _read_all(source, range(start, stop), _fixed_size_fn(size))
    return ArrayDataset(images, labels, num_classes, name, split)


def num_examples(name: str, split: str = "train", *,
                 data_dir: str | os.PathLike | None = None) -> int:
    """The number of examples in ``split`` (without reading the images)."""
    check_name(name)
    if name == "digits":
        return len(_digits_indices(split))
    return len(open_source(name, split, data_dir=data_dir))


def num_classes(name: str, data_dir: str | os.PathLike | None = None) -> int:
    """Classes of dataset ``name``: ``NUM_CLASSES``, or the class folders of an image folder's
    train split."""
    check_name(name)
    if name == FOLDER:
        return open_source(name, "train", data_dir=data_dir).num_classes
    return NUM_CLASSES[name]


def open_source(name: str, split: str = "train", *,
                data_dir: str | os.PathLike | None = None) -> Sequence[dict[str, Any]]:
    """The random-access source of ``name``/``split``: ``tfds.data_source``, or a
    ``folder.FolderSource`` for ``folder``.

    Elements are dicts with ``"image"`` (decoded uint8 HWC) and ``"label"``. Raises
    :class:`DatasetNotFoundError` (never downloads) if the data is not prepared, and
    ``folder.FolderError`` for an image folder that is missing or lacks the split.
    """
    check_name(name)
    if name == FOLDER:
        if data_dir is None:
            raise DatasetNotFoundError("dataset 'folder' needs the image folder: "
                                       "--config.data.data_dir=DIR (configs/custom.py:path=DIR)")
        return folder.open_split(data_dir, split)
    if name not in TFDS_NAMES:
        raise ValueError(f"{name!r} is not a TFDS dataset; TFDS datasets: {', '.join(TFDS_NAMES)}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DatasetNotFoundError(_not_found_message(name, data_dir, "the directory does not exist"))
    import tensorflow_datasets as tfds  # deferred: importing tfds costs ~0.3 s

    with _quiet_tfds():
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises AssertionError/NotImplementedError/ValueError/...
            reason = _diagnose(tfds, name, data_dir, e)
        raise DatasetNotFoundError(_not_found_message(name, data_dir, reason, split)) from None


@contextlib.contextmanager
def _quiet_tfds():
    """Drops tfds's absl warnings while it looks for a dataset (e.g. "Variant folder ... has
    no dataset_info.json", twice): the error raised then says the same in one line."""
    def keep(record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.ERROR
                or "tensorflow_datasets" not in record.pathname)

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(keep)
    try:
        yield
    finally:
        absl_logger.removeFilter(keep)


def check_name(name: str) -> None:
    """Raises :class:`DatasetNotFoundError` unless ``name`` is one of ``NAMES``."""
    if name not in NAMES:
        raise DatasetNotFoundError(f"unknown dataset {name!r}; known datasets: {', '.join(NAMES)}")


def _not_found_message(name: str, data_dir, reason: str, split: str | None = None) -> str:
    searched = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    target = f"{name!r}" + (f" split {split!r}" if split else "")
    prepare = f"python -m us3l_jax.data.prepare {name} --data_dir={searched}"
    if name == "imagenet2012":
        prepare += (" --manual_dir=DIR, where DIR holds ILSVRC2012_img_train.tar and "
                    "ILSVRC2012_img_val.tar (ImageNet cannot be downloaded automatically; "
                    "register at https://image-net.org)")
    return (f"dataset {target} is not available in {searched} ({reason}). Nothing is "
            f"downloaded here. Prepare it once with:\n  {prepare}\n(building needs "
            f"TensorFlow: pip install -e \".[prepare]\" -c requirements.lock; reading the "
            f"prepared ArrayRecord data does not). Or pass --config.data.data_dir= the "
            f"directory that holds it.")


def _diagnose(tfds, name: str, data_dir, error: Exception) -> str:
    """A one-line reason for a failed ``tfds.data_source`` (tfds's own can mislead)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            return f"not prepared: no dataset_info.json in {builder.data_dir}"
        fmt = builder.info.file_format
        if fmt is not None and "array_record" not in str(fmt).lower():
            return (f"prepared as {fmt}, but reading without TensorFlow needs ArrayRecord; "
                    "rebuild with --file_format=array_record")
    except Exception:  # noqa: BLE001 - the original error is the better message then
        pass
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                            "tensorflow_datasets")


def _fixed_size_fn(size: int | None) -> Callable[[np.ndarray], np.ndarray]:
    if size is None:
        return host_transforms.as_rgb
    return lambda img: host_transforms.resize_center_crop(img, size, size, "bilinear")


def _read_all(source, indices: range, transform) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``source[i]`` for ``i`` in ``indices`` in a thread pool; stacks fixed-size images."""
    def read(i):
        ex = source[i]
        return transform(ex["image"]), int(ex["label"])

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        items = list(pool.map(read, indices))
    if not items:
        raise DatasetNotFoundError("the requested split or index range is empty")
    shapes = {img.shape for img, _ in items}
    if len(shapes) != 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:4]}...; pass image_size")
    images = np.stack([img for img, _ in items])
    return images, np.asarray([lab for _, lab in items], dtype=np.int32)


def _digits_indices(split: str) -> np.ndarray:
    n = 1797  # sklearn's digits: 1797 8x8 images (asserted in _digits)
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(n * DIGITS_TEST_FRACTION))
    splits = {"train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}
    if split not in splits:
        raise DatasetNotFoundError(f"digits has no split {split!r}; splits: train, test")
    return splits[split]


def _digits(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits (values 0..16) as uint8 RGB at ``size`` (bilinear)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: works offline

    idx = _digits_indices(split)
    digits = load_digits()
    assert digits.images.shape == (1797, 8, 8)
    grey = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if size != 8:
        rgb = np.stack([host_transforms.resize_shorter(img, size) for img in rgb])
    return rgb, digits.target[idx].astype(np.int32)
