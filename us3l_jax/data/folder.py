"""Your own images: a folder of image files, read with PIL.

Layout (torchvision's ``ImageFolder``, what the official code and solo-learn read)::

    ROOT/train/<class>/.../<image>   labelled training images, one subfolder per class
    ROOT/val/<class>/.../<image>     held-out images for evaluation (or ROOT/test/), with
                                     class names that occur in train/
    ROOT/.../<image>                 no train/ folder: every image under ROOT is training data

Classes are a split's first-level subfolders in sorted order; images below them count at any
depth. A split with images directly inside it is unlabelled: all its images (at any depth)
are one class, which is enough for self-supervised pretraining; evaluation needs labels
(at least two classes in train/ and a val/ or test/ folder). Files are found by their
extension (``IMAGE_EXTENSIONS``, any case); folders and files whose name starts with a dot are
skipped. Grey, palette and RGBA images are converted to RGB.

TFDS's ``ImageFolder`` builder would read the same layout, but only through TensorFlow
(``tf.data``), which training here never needs; this reader has the random access of
``tfds.data_source`` (``source[i]`` -> ``{"image", "label"}``), so the in-memory loader and
the streaming pipeline use it unchanged.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from us3l_jax.errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
TRAIN_DIR = "train"
TEST_DIRS = ("val", "test")  # the first one present is the test split
SPLITS = ("train", "test")


class FolderError(UsageError):
    """The folder is missing, holds no images or an unreadable one, or lacks what a split
    needs (a one-line error with exit status 2 in the command lines)."""


class FolderSource(Sequence):
    """Random access to one split of an image folder: ``source[i]`` is ``{"image": uint8[H, W,
    3], "label": int}``; ``classes`` the class names (``[""]`` for an unlabelled split)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str],
                 directory: str):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.classes = list(classes)
        self.directory = directory

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
        return {"image": read_image(self.paths[index]), "label": int(self.labels[index])}


def read_image(path: str) -> np.ndarray:
    """The image file at ``path`` as uint8 RGB; ``FolderError`` naming the file if PIL cannot
    read it."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise FolderError(f"cannot read image {path}: {e}") from None


def open_split(root: str | os.PathLike, split: str) -> FolderSource:
    """The ``split`` (``train`` or ``test``) of the image folder ``root``.

    Raises ``FolderError`` (one line) for a missing folder, a split without images, a test
    split without class folders or with classes that train/ lacks, or a labelled split asked
    of a folder with fewer than two classes."""
    root = os.fspath(root)
    if split not in SPLITS:
        raise FolderError(f"an image folder has no split {split!r}; splits: {', '.join(SPLITS)}")
    if not os.path.isdir(root):
        raise FolderError(f"image folder {root} does not exist (or is not a directory)")
    train_dir = _train_dir(root)
    train = _scan(train_dir)
    if split == "train":
        return train
    test_dir = next((os.path.join(root, d) for d in TEST_DIRS
                     if os.path.isdir(os.path.join(root, d))), None)
    if test_dir is None:
        raise FolderError(f"evaluation needs held-out labelled images in {root}/val/<class>/ "
                          f"(or test/); {root} has neither")
    if train.num_classes < 2:
        raise FolderError(f"evaluation needs at least 2 classes (subfolders of {train_dir}), "
                          f"found 1: {train.classes[0] or 'images not in class folders'}")
    test = _scan(test_dir)
    if test.classes == [""]:
        raise FolderError(f"{test_dir} holds images outside class folders; put each image in "
                          f"{test_dir}/<class>/ with the class names of {train_dir}")
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise FolderError(f"{test_dir} has classes that {train_dir} lacks: "
                          f"{', '.join(unknown[:5])}; classes: {', '.join(train.classes[:5])}"
                          + (", ..." if train.num_classes > 5 else ""))
    index = {c: i for i, c in enumerate(train.classes)}
    labels = [index[test.classes[lab]] for lab in test.labels]
    return FolderSource(test.paths, labels, train.classes, test_dir)


def _train_dir(root: str) -> str:
    train_dir = os.path.join(root, TRAIN_DIR)
    if os.path.isdir(train_dir):
        return train_dir
    held_out = [d for d in TEST_DIRS if os.path.isdir(os.path.join(root, d))]
    if held_out:
        raise FolderError(f"{root} has {held_out[0]}/ but no train/: put the training images "
                          f"in {train_dir}/<class>/ (or leave out {held_out[0]}/ to pretrain "
                          f"on every image under {root})")
    return root


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _images_below(directory: str) -> list[str]:
    """Image files under ``directory`` at any depth, in a fixed (sorted) order."""
    found = []
    for d, subdirs, files in os.walk(directory, followlinks=True):
        subdirs[:] = sorted(s for s in subdirs if _visible(s))
        found += [os.path.join(d, f) for f in sorted(files)
                  if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _scan(directory: str) -> FolderSource:
    entries = sorted(e for e in os.listdir(directory) if _visible(e))
    loose = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(directory, e))]
    if loose:  # unlabelled: one class of every image below
        paths = _images_below(directory)
        return FolderSource(paths, [0] * len(paths), [""], directory)
    paths, labels, classes = [], [], []
    for name in entries:
        sub = os.path.join(directory, name)
        if not os.path.isdir(sub):
            continue
        found = _images_below(sub)
        if found:
            paths += found
            labels += [len(classes)] * len(found)
            classes.append(name)
    if not paths:
        raise FolderError(f"no images in {directory} (looked for "
                          f"{', '.join(IMAGE_EXTENSIONS)} files at any depth)")
    return FolderSource(paths, labels, classes, directory)
