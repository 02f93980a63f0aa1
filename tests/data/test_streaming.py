"""Streaming (ImageNet) pipeline on tfds.testing.mock_data: determinism, resume, sharding."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from us3l_jax import mesh as mesh_lib
from us3l_jax.data import augment, datasets, feeding, streaming

N = 40
CROPS = streaming.HostCrops(size=16)


@pytest.fixture(scope="module")
def source():
    with tfds.testing.mock_data(num_examples=N):
        return datasets.open_source("imagenet2012", "train")


def _stream(source, **kw):
    kw = dict(global_batch_size=8, transform=CROPS, seed=1, num_threads=2) | kw
    return streaming.StreamingDataset(source, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_host_batches_hold_two_crops_of_the_step_examples(source):
    ds = _stream(source)
    assert ds.steps_per_epoch == 5
    batches = _take(ds.host_iterator(0), 7)  # crosses an epoch boundary
    for step, b in enumerate(batches):
        assert b["image"].shape == (8, 2, 16, 16, 3) and b["image"].dtype == np.uint8
        idx, _ = ds.example_indices(step)
        expected = [int(source[int(i)]["label"]) for i in idx]
        np.testing.assert_array_equal(b["label"], expected)
        assert not np.array_equal(b["image"][:, 0], b["image"][:, 1])  # independent views
    again = _take(ds.host_iterator(0), 2)
    np.testing.assert_array_equal(again[1]["image"], batches[1]["image"])
    assert not np.array_equal(batches[1]["image"], batches[2]["image"])


def test_resume_from_a_step_and_from_state(source):
    ds = _stream(source, mesh=mesh_lib.make_mesh())
    it = ds.iterator(0)
    straight = [np.asarray(b.images) for b in _take(it, 9)]
    assert it.get_state() == {"step": 9}
    resumed = ds.iterator(start_step=6)  # e.g. after a restart from a step-6 checkpoint
    for k in range(6, 9):
        np.testing.assert_array_equal(np.asarray(next(resumed).images), straight[k])
    restored = ds.iterator(0)
    restored.set_state({"step": 4})
    np.testing.assert_array_equal(np.asarray(next(restored).images), straight[4])
    fresh = _stream(source, mesh=mesh_lib.make_mesh()).iterator(7)  # a new process
    np.testing.assert_array_equal(np.asarray(next(fresh).images), straight[7])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_shares_of_the_same_global_batch(source, process_count):
    whole = _take(_stream(source, process_index=0, process_count=1).host_iterator(3), 2)
    parts = [_take(_stream(source, process_index=p, process_count=process_count)
                   .host_iterator(3), 2) for p in range(process_count)]
    for k in range(2):
        local = [parts[p][k] for p in range(process_count)]
        assert all(len(b["label"]) == 8 // process_count for b in local)
        np.testing.assert_array_equal(np.concatenate([b["image"] for b in local]),
                                      whole[k]["image"])
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in local]),
                                      whole[k]["label"])
    # over an epoch the process shares never overlap
    ds = [_stream(source, process_index=p, process_count=process_count)
          for p in range(process_count)]
    read = np.concatenate([d.example_indices(k)[0] for d in ds for k in range(5)])
    assert len(read) == len(np.unique(read)) == N


def test_eval_stream_covers_every_example_once(source):
    ds = _stream(source, global_batch_size=16, transform=streaming.HostEval(20, 16),
                 train=False, mesh=mesh_lib.make_mesh())
    batches = list(ds.iterator())
    assert len(batches) == 3  # ceil(40 / 16)
    masks = [np.asarray(b.mask) for b in batches]
    assert [m.sum() for m in masks] == [16, 16, 8]
    labels = np.concatenate([np.asarray(b.labels)[m] for b, m in zip(batches, masks)])
    np.testing.assert_array_equal(labels, [int(source[i]["label"]) for i in range(N)])
    assert batches[0].images.shape == (16, 16, 16, 3)


def test_stream_errors_are_clear(source):
    with pytest.raises(ValueError, match="host batches only"):
        _stream(source, process_index=1, process_count=2,
                mesh=mesh_lib.make_mesh()).iterator()
    with pytest.raises(ValueError, match="needs a mesh"):
        _stream(source).iterator()
    with pytest.raises(ValueError, match="larger than the dataset"):
        _stream(source, global_batch_size=64)
    with pytest.raises(ValueError, match="unknown interpolation"):
        streaming.HostCrops(interpolation="area")
    assert feeding.steps_per_epoch(N, 8) == 5


def test_host_crops_follow_the_view_config():
    crops = streaming.HostCrops.from_views(augment.BYOL_VIEW1, augment.BYOL_VIEW2)
    assert crops == streaming.HostCrops(224, (0.08, 1.0), (3 / 4, 4 / 3), "bilinear", 2)
    with pytest.raises(ValueError, match="share size/scale"):
        streaming.HostCrops.from_views(augment.IMAGENET_SSL, augment.BYOL_VIEW2)
