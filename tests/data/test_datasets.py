"""Dataset loading: every TFDS name through tfds.testing.mock_data, digits for real, errors."""
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from us3l_jax.data import datasets

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000, "oxford_flowers102": 102,
               "oxford_iiit_pet": 37, "dtd": 47}


def test_registry_names_match_the_issue():
    assert set(datasets.TFDS_NAMES) == set(NUM_CLASSES)
    assert datasets.NAMES == datasets.TFDS_NAMES + ("digits", "folder")


@pytest.mark.parametrize("name", datasets.TFDS_NAMES)
def test_tfds_dataset_loads_through_mock_data(name):
    with tfds.testing.mock_data(num_examples=6):
        ds = datasets.load(name, "train")
        sliced = datasets.load(name, "train", index_range=(2, 5))
        small = datasets.load(name, "train", image_size=20)
        n = datasets.num_examples(name, "train")
    # CIFAR keeps its native 32x32; variable-size sets are stored at 256 (resize + crop).
    side = 32 if name.startswith("cifar") else datasets.DEFAULT_VARIABLE_SIZE
    assert ds.images.shape == (6, side, side, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (6,) and ds.labels.dtype == np.int32
    assert ds.num_classes == NUM_CLASSES[name]
    assert 0 <= ds.labels.min() and ds.labels.max() < ds.num_classes
    assert (ds.name, ds.split, len(ds), n) == (name, "train", 6, 6)
    # mock examples are deterministic per index, so a range reads the same rows
    np.testing.assert_array_equal(sliced.images, ds.images[2:5])
    np.testing.assert_array_equal(sliced.labels, ds.labels[2:5])
    assert small.images.shape == (6, 20, 20, 3)
    assert ds.images.std() > 10  # real pixel content, not zeros


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits", "train"), datasets.load("digits", "test")


def test_digits_loads_for_real(digits):
    train, test = digits
    assert train.images.shape == (1438, 32, 32, 3) and test.images.shape == (359, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    assert train.num_classes == 10
    assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))
    # grey digits: three equal channels, full 0..255 range, strokes on a dark background
    np.testing.assert_array_equal(train.images[..., 0], train.images[..., 2])
    assert train.images.max() == 255 and np.median(train.images) < 64
    assert 0.08 < np.mean(test.labels == 3) < 0.12  # roughly balanced


def test_digits_split_is_fixed_and_disjoint(digits):
    train, test = digits
    from sklearn.datasets import load_digits

    raw = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    native_train = datasets.load("digits", "train", image_size=8)
    native_test = datasets.load("digits", "test", image_size=8)
    # at 8x8 the images are sklearn's exactly; together the splits are the whole set
    both = np.concatenate([native_train.images[..., 0], native_test.images[..., 0]])
    assert len(both) == len(raw) == 1797
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(both) == key(raw)
    again = datasets.load("digits", "train")
    np.testing.assert_array_equal(again.images, train.images)
    np.testing.assert_array_equal(again.labels, train.labels)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(datasets.DatasetNotFoundError, match=r"unknown dataset 'cifar11'.*cifar100"):
        datasets.load("cifar11")
    with pytest.raises(datasets.DatasetNotFoundError, match="digits has no split 'val'"):
        datasets.load("digits", "val")
    with pytest.raises(ValueError, match="image_size must be positive"):
        datasets.load("digits", image_size=0)


def test_missing_data_dir_fails_fast(tmp_path):
    missing = tmp_path / "nowhere"
    t = time.perf_counter()
    with pytest.raises(datasets.DatasetNotFoundError) as e:
        datasets.load("cifar100", "train", data_dir=missing)
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    assert "'cifar100'" in msg and str(missing) in msg and "does not exist" in msg
    assert f"python -m us3l_jax.data.prepare cifar100 --data_dir={missing}" in msg


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_unprepared_dataset_fails_fast_without_download(tmp_path, name):
    t = time.perf_counter()
    with pytest.raises(datasets.DatasetNotFoundError) as e:
        datasets.load(name, "train", data_dir=tmp_path)
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    assert f"'{name}'" in msg and str(tmp_path) in msg and "not prepared" in msg
    assert ("--manual_dir" in msg) == (name == "imagenet2012")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback
    assert not list(tmp_path.rglob("*.array_record*"))  # nothing was fetched or written


def test_unprepared_dataset_error_comes_alone_and_names_the_flag(tmp_path, caplog):
    """tfds warns twice ("Variant folder ... has no dataset_info.json") while it looks; the
    error says the same, so those warnings are not shown, and its hint is the config flag."""
    (tmp_path / "cifar100" / "3.0.2").mkdir(parents=True)  # a variant folder without info
    with caplog.at_level("INFO"), pytest.raises(datasets.DatasetNotFoundError) as e:
        datasets.load("cifar100", "train", data_dir=tmp_path)
    assert "no dataset_info.json" in str(e.value)
    assert str(e.value).endswith("Or pass --config.data.data_dir= the directory that holds it.")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
