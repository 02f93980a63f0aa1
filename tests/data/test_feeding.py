"""Device-resident feeding: step-indexed determinism, resume, sharding, evaluation coverage."""
import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from us3l_jax import mesh as mesh_lib
from us3l_jax.data import datasets, feeding

from tests.helpers import REPO as ROOT, xla_flags


# ---------------------------------------------------------------- index logic (pure numpy)


def test_steps_per_epoch_drops_the_last_partial_batch():
    assert feeding.steps_per_epoch(50_000, 512) == 97
    assert feeding.steps_per_epoch(1438, 64) == 22
    with pytest.raises(ValueError, match="larger than the dataset"):
        feeding.steps_per_epoch(10, 16)
    with pytest.raises(ValueError, match="must be positive"):
        feeding.steps_per_epoch(10, 0)


def test_batches_are_a_pure_function_of_seed_and_step():
    n, b = 103, 16
    a = feeding.global_batch_indices(5, 17, n, b)
    np.testing.assert_array_equal(a, feeding.global_batch_indices(5, 17, n, b))
    assert not np.array_equal(a, feeding.global_batch_indices(5, 18, n, b))
    assert not np.array_equal(a, feeding.global_batch_indices(6, 17, n, b))
    spe = feeding.steps_per_epoch(n, b)
    for epoch in range(3):
        idx = np.concatenate([feeding.global_batch_indices(5, epoch * spe + k, n, b)
                              for k in range(spe)])
        assert len(np.unique(idx)) == spe * b  # no duplicates within an epoch
        np.testing.assert_array_equal(idx, feeding.epoch_permutation(5, epoch, n)[:spe * b])
    e0 = feeding.global_batch_indices(5, 0, n, b)
    e1 = feeding.global_batch_indices(5, spe, n, b)
    assert not np.array_equal(e0, e1)  # each epoch is reshuffled


@pytest.mark.parametrize("process_count", [2, 3, 4])
def test_per_process_shares_cover_each_example_once_per_epoch(process_count):
    n, b, seed = 101, 24, 3
    spe = feeding.steps_per_epoch(n, b)
    shares = []
    for p in range(process_count):
        sl = feeding.local_batch_slice(b, p, process_count)
        shares.append(np.concatenate([feeding.global_batch_indices(seed, k, n, b)[sl]
                                      for k in range(spe)]))
    every = np.concatenate(shares)
    assert len(every) == len(np.unique(every)) == spe * b  # disjoint, no duplicates
    dropped = set(range(n)) - set(every.tolist())
    assert len(dropped) == n - spe * b  # the dropped partial batch, nothing else
    # stored rows: each process holds a disjoint block; together all examples
    rows = [feeding.process_rows(n, 8 if process_count != 3 else 6, p, process_count)
            for p in range(process_count)]
    assert sorted(itertools.chain.from_iterable(rows)) == list(range(n))


def test_bad_process_and_batch_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of the process count 4"):
        feeding.local_batch_slice(30, 0, 4)
    with pytest.raises(ValueError, match=r"process_index 4 not in \[0, 4\)"):
        feeding.local_batch_slice(32, 4, 4)
    with pytest.raises(ValueError, match="do not split evenly"):
        feeding.process_rows(100, 6, 0, 4)


def test_eval_indices_pad_the_last_batch():
    idx, mask = feeding.eval_indices(2, 8, 20)
    np.testing.assert_array_equal(idx, [16, 17, 18, 19, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0, 0, 0])
    assert feeding.num_eval_batches(20, 8) == 3


# ---------------------------------------------------------------- on device (1 CPU device)


@pytest.fixture(scope="module")
def digits_on_device():
    ds = datasets.load("digits", "test", image_size=16)
    return ds, feeding.DeviceDataset(ds, mesh_lib.make_mesh())


def test_batch_is_an_on_device_gather_of_the_step_indices(digits_on_device):
    ds, data = digits_on_device
    feeder = feeding.TrainFeeder(data, 32, seed=1)
    assert feeder.steps_per_epoch == 359 // 32
    for step in (0, 5, feeder.steps_per_epoch + 2):
        batch = feeder.batch(step)
        idx = feeder.indices(step)
        assert batch.images.shape == (32, 16, 16, 3) and batch.images.dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(batch.images), ds.images[idx])
        np.testing.assert_array_equal(np.asarray(batch.labels), ds.labels[idx])
    assert not np.array_equal(np.asarray(feeder.batch(0).images),
                              np.asarray(feeder.batch(1).images))


def test_resume_reproduces_the_uninterrupted_stream(digits_on_device):
    _, data = digits_on_device
    straight = feeding.TrainFeeder(data, 32, seed=9).iterate(0)
    first = [np.asarray(next(straight).images) for _ in range(14)]  # crosses an epoch
    resumed = feeding.TrainFeeder(data, 32, seed=9).iterate(start_step=9)  # "after restart"
    for k in range(9, 14):
        np.testing.assert_array_equal(np.asarray(next(resumed).images), first[k])


def test_eval_batches_cover_every_example_exactly_once(digits_on_device):
    ds, data = digits_on_device
    batches = list(feeding.eval_batches(data, 64))
    assert len(batches) == 6  # ceil(359 / 64)
    masks = [np.asarray(b.mask) for b in batches]
    assert sum(m.sum() for m in masks) == 359 and not masks[-1][-1]
    images = np.concatenate([np.asarray(b.images)[m] for b, m in zip(batches, masks)])
    labels = np.concatenate([np.asarray(b.labels)[m] for b, m in zip(batches, masks)])
    np.testing.assert_array_equal(images, ds.images)
    np.testing.assert_array_equal(labels, ds.labels)


def test_process_local_rows_are_accepted(digits_on_device):
    ds, _ = digits_on_device
    n = len(ds)
    rows = feeding.process_rows(n, 1, 0, 1)
    local = datasets.load("digits", "test", image_size=16,
                          index_range=(rows.start, rows.stop))
    data = feeding.DeviceDataset(local, mesh_lib.make_mesh(), num_examples=n)
    np.testing.assert_array_equal(np.asarray(data.images)[:n], ds.images)
    with pytest.raises(ValueError, match="expected the whole split"):
        feeding.DeviceDataset(local, mesh_lib.make_mesh(), num_examples=n + 5)


def test_oversized_or_bad_batches_are_clear_errors(digits_on_device):
    _, data = digits_on_device
    with pytest.raises(ValueError, match="larger than the dataset"):
        feeding.TrainFeeder(data, 512, seed=0)
    with pytest.raises(ValueError, match="positive multiple"):
        feeding.TrainFeeder(data, 0, seed=0)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 359\)"):
        data.gather(np.array([0, 359]))


# ---------------------------------------------------------------- 8 devices (subprocess)

_EIGHT_DEVICES = textwrap.dedent("""
    import json, os
    import jax, numpy as np
    from us3l_jax import mesh as mesh_lib
    from us3l_jax.data import augment, datasets, feeding
    ds = datasets.load("digits", "test", image_size=16)
    mesh = mesh_lib.make_mesh()
    data = feeding.DeviceDataset(ds, mesh)
    feeder = feeding.TrainFeeder(data, 64, seed=1)
    batch = feeder.batch(3)
    idx = feeder.indices(3)
    shards = sorted((s.index[0].start, s.data.shape[0]) for s in batch.images.addressable_shards)
    cfg = augment.ViewConfig(size=16)
    key = jax.random.key(4)
    sharded_view = np.asarray(augment.view(key, batch.images, cfg))
    single = jax.device_put(np.asarray(batch.images), jax.devices()[0])
    single_view = np.asarray(augment.view(key, single, cfg))
    seen = np.concatenate([np.asarray(b.labels)[np.asarray(b.mask)]
                           for b in feeding.eval_batches(data, 64)])
    # As with several CPU processes (gloo): an all-reduce, after a barrier of the peers.
    barriers = []
    feeding.uses_gloo = lambda mesh: True
    feeding.wait_for_peers = barriers.append
    gloo = feeder.batch(3)
    gloo_ok = (np.array_equal(np.asarray(gloo.images), np.asarray(batch.images))
               and np.array_equal(np.asarray(gloo.labels), ds.labels[idx])
               and gloo.images.sharding == batch.images.sharding)
    try:
        feeding.TrainFeeder(data, 60, seed=1)
        err = ""
    except ValueError as e:
        err = str(e)
    print(json.dumps(dict(
        devices=jax.device_count(),
        data_shards=len(data.images.addressable_shards),
        rows_per_device=data.images.addressable_shards[0].data.shape[0],
        shards=shards,
        gather_ok=bool(np.array_equal(np.asarray(batch.images), ds.images[idx])),
        views_match=float(np.abs(sharded_view - single_view).max()),
        view_sharded=len(augment.view(key, batch.images, cfg).sharding.device_set),
        eval_ok=bool(np.array_equal(seen, ds.labels)),
        gloo_ok=bool(gloo_ok), barriers=barriers,
        batch_error=err)))
""")


@pytest.mark.slow
def test_eight_devices_shard_data_and_batches():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8 and r["data_shards"] == 8
    assert r["rows_per_device"] == 45  # ceil(359 / 8): each device holds 1/8 of the data
    assert r["shards"] == [[8 * d, 8] for d in range(8)]  # batch 64 -> 8 rows per device
    assert r["gather_ok"] and r["eval_ok"]
    assert r["gloo_ok"] and r["barriers"] == ["first_batch"]
    assert r["views_match"] < 1e-5  # augmentation does not depend on the sharding
    assert r["view_sharded"] == 8
    assert "batch size 60 must be a positive multiple of the number of devices (8)" in \
        r["batch_error"]
