"""Your own images: the folder layout, its one-line errors, and configs/custom.py end to end
(pretrain a few steps, then evaluate) on a tiny folder of PNGs written here."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from us3l_jax.data import datasets, folder
from tests.helpers import load_config_module, override, run_main

# Three classes told apart by colour, images of different sizes (the loader resizes).
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "emu": (40, 40, 200)}


def write_png(path, colour, seed, shape=(20, 24)):
    rng = np.random.default_rng(seed)
    noise = rng.integers(-30, 31, size=shape + (3,))
    img = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path)


def write_folder(root, per_class=(16, 8), classes=COLOURS):
    """root/train/<class>/ and root/val/<class>/ with ``per_class`` images each."""
    for split, n in zip(("train", "val"), per_class):
        for c, (name, colour) in enumerate(classes.items()):
            for i in range(n):
                shape = (20, 24) if i % 2 else (28, 18)
                sub = "sub/" if i % 3 == 0 else ""  # images below a class at any depth
                write_png(f"{root}/{split}/{name}/{sub}{i:03d}.png", colour,
                          seed=[c, i, split == "val"], shape=shape)
    return str(root)


def test_labelled_folder_loads_train_and_val(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "cat" / "notes.txt").write_text("not an image")
    train = datasets.load("folder", "train", data_dir=root, image_size=16)
    test = datasets.load("folder", "test", data_dir=root, image_size=16)
    assert train.images.shape == (48, 16, 16, 3) and test.images.shape == (24, 16, 16, 3)
    assert train.num_classes == test.num_classes == 3
    assert datasets.num_classes("folder", root) == 3
    assert datasets.num_examples("folder", "train", data_dir=root) == 48
    np.testing.assert_array_equal(np.bincount(train.labels), [16, 16, 16])
    np.testing.assert_array_equal(np.bincount(test.labels), [8, 8, 8])
    # labels follow the sorted class names: each class's mean colour is its own
    for label, colour in enumerate(COLOURS.values()):
        mean = train.images[train.labels == label].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(mean, colour, atol=6)
    src = datasets.open_source("folder", "train", data_dir=root)
    # a class's own files first, then its subfolders; images at their native size
    assert src.paths[0].endswith("train/cat/001.png") and src.paths[-1].endswith("emu/sub/015.png")
    assert src[0]["image"].shape == (20, 24, 3) and src[0]["label"] == 0


def test_test_split_is_val_else_test_and_uses_train_class_order(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a", "b", "c"):
        write_png(f"{root}/train/{name}/0.png", (0, 0, 0), seed=0)
    write_png(f"{root}/test/c/0.png", (9, 9, 9), seed=0)  # only class c, index 2 of train's
    test = folder.open_split(root, "test")
    assert test.classes == ["a", "b", "c"] and list(test.labels) == [2]
    assert test.directory == str(root / "test")


def test_unlabelled_flat_and_nested_folders_pretrain(tmp_path):
    for i in range(3):
        write_png(f"{tmp_path}/flat/{i}.jpg", (100, 100, 100), seed=i)
        write_png(f"{tmp_path}/flat/more/deep/{i}.JPG", (100, 100, 100), seed=i)
    write_png(f"{tmp_path}/flat/.hidden/x.png", (0, 0, 0), seed=0)  # skipped
    flat = datasets.load("folder", "train", data_dir=tmp_path / "flat", image_size=8)
    assert flat.images.shape == (6, 8, 8, 3) and flat.num_classes == 1
    assert set(flat.labels) == {0}
    with pytest.raises(folder.FolderError, match=r"evaluation needs held-out labelled images "
                                                 r"in .*flat/val/<class>/ \(or test/\)"):
        datasets.load("folder", "test", data_dir=tmp_path / "flat")


@pytest.mark.parametrize("make,message", [
    (lambda d: None, r"image folder .*/imgs does not exist"),
    (lambda d: (d / "train" / "a").mkdir(parents=True), r"no images in .*/imgs/train \(looked"),
    (lambda d: write_png(f"{d}/train/a/0.png", (0, 0, 0), 0) or
     write_png(f"{d}/val/a/0.png", (0, 0, 0), 0),
     r"evaluation needs at least 2 classes \(subfolders of .*/imgs/train\), found 1: a"),
    (lambda d: write_png(f"{d}/val/a/0.png", (0, 0, 0), 0),
     r"has val/ but no train/: put the training images in .*/imgs/train/<class>/"),
    (lambda d: [write_png(f"{d}/train/{c}/0.png", (0, 0, 0), 0) for c in "ab"] and
     write_png(f"{d}/val/z/0.png", (0, 0, 0), 0), r"val has classes that .*train lacks: z"),
    (lambda d: [write_png(f"{d}/train/{c}/0.png", (0, 0, 0), 0) for c in "ab"] and
     write_png(f"{d}/val/0.png", (0, 0, 0), 0), r"val holds images outside class folders"),
    (lambda d: [write_png(f"{d}/train/{c}/0.png", (0, 0, 0), 0) for c in "ab"] and
     (d / "val" / "a").mkdir(parents=True) or (d / "val" / "a" / "bad.png").write_bytes(b"x"),
     r"cannot read image .*/val/a/bad.png"),
])
def test_folder_errors_are_one_line(tmp_path, make, message):
    make(tmp_path / "imgs")
    with pytest.raises(folder.FolderError, match=message) as e:
        datasets.load("folder", "test", data_dir=tmp_path / "imgs")
    assert "\n" not in str(e.value)


def test_folder_needs_a_data_dir():
    with pytest.raises(datasets.DatasetNotFoundError, match=r"--config.data.data_dir=DIR"):
        datasets.load("folder", "train")


def test_custom_config_arguments(tmp_path):
    mod = load_config_module("configs/custom.py")
    write_folder(tmp_path / "imgs", per_class=(1, 1))
    c = mod.get_config(f"path={tmp_path}/imgs,size=96")
    assert (c.data.dataset, c.data.data_dir, c.data.image_size) == ("folder", f"{tmp_path}/imgs",
                                                                    96)
    assert c.model.name == "resnet18" and c.data.augment == "cifar" and c.optim.lr == 0.25
    assert c.eval.final_sweep and c.eval.online_every_epochs == 20  # val/ present: labelled
    small = mod.get_config(f"path={tmp_path}/nothing,size=32,arch=resnet50,batch=512")
    assert small.model.name == "cifar_resnet50" and small.optim.lr == 0.5
    assert not small.eval.final_sweep and small.eval.online_every_epochs == 0
    big = mod.get_config(f"path={tmp_path},size=160")
    assert big.data.augment == "imagenet" and big.model.name == "resnet18"
    for bad, message in [(None, "needs the image folder"), ("path=/x,sz=3", "key one of path"),
                         ("path=/x,size=0", "size='0' must be a positive integer"),
                         ("path=/x,arch=vgg", "arch='vgg'; valid: resnet18")]:
        with pytest.raises(ValueError, match=message):
            mod.get_config(bad)


# A test-size version of configs/custom.py (what the tests of configs/demo.py use).
TINY = dict(model__name="cifar_resnet18", model__base_width=16, model__stage_sizes=(1, 1, 1, 1),
            heads__proj_hidden=32, heads__proj_out=16, heads__head_hidden=32,
            method__group_size=8, optim__batch_size=16, train__log_every_steps=2,
            train__compile_ahead=False, train__max_steps=4, sampler__grid_step=0.25,
            eval__online_every_epochs=0, eval__final_sweep=False, eval__batch_size=16,
            eval__calibration_batches=2, eval__sweep_widths=(1.0, 0.25))


@pytest.mark.slow
def test_custom_config_pretrains_and_evaluates_a_folder(tmp_path):
    """configs/custom.py on a folder of PNGs: 4 pretraining steps, then the fast probe at two
    widths. The classes differ by colour, so even these features separate them."""
    from us3l_jax import evaluate, pretrain

    root = write_folder(tmp_path / "imgs")
    c = override(load_config_module("configs/custom.py").get_config(f"path={root},size=16"),
                 **TINY)
    workdir = str(tmp_path / "run")
    pretrain.train(c, workdir)
    records = evaluate.run_sweep(workdir, widths=(1.0, 0.25), protocol="fast")
    acc = {r["width"]: r["accuracy"] for r in records}
    assert set(acc) == {1.0, 0.25}
    assert all(a >= 90.0 for a in acc.values()), acc  # top-1 %; chance is 33%
    assert {r["num_train"] for r in records} == {48} and {r["num_test"] for r in records} == {24}
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["data_dir"] == root


def test_a_batch_larger_than_the_folder_is_a_usage_error(tmp_path):
    from us3l_jax import pretrain
    from us3l_jax.errors import UsageError

    root = write_folder(tmp_path / "imgs", per_class=(4, 1))  # 12 training images
    c = override(load_config_module("configs/custom.py").get_config(f"path={root},size=16"),
                 **{**TINY, "optim__batch_size": 16})
    with pytest.raises(UsageError, match=r"global batch size 16 is larger than the dataset "
                                          r"\(12 examples\); lower config.optim.batch_size"):
        pretrain.train(c, str(tmp_path / "run"))


def test_missing_folder_is_one_line_exit_2(tmp_path):
    out = run_main(f"configs/custom.py:path={tmp_path}/nowhere,size=16", str(tmp_path / "w"))
    assert out.returncode == 2, out.stdout[-2000:]
    assert f"error: image folder {tmp_path}/nowhere does not exist" in out.stdout
    assert "Traceback" not in out.stdout and not (tmp_path / "w" / "checkpoints").exists()
