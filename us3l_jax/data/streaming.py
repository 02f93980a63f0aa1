"""Streaming input for datasets too large for device memory (ImageNet).

A grain pipeline over a random-access source (``datasets.open_source``: ``tfds.data_source``
on ArrayRecord, no TensorFlow). Host threads read and decode each image and apply a host
transform that makes it fixed-size (:class:`HostCrops`: torchvision RandomResizedCrop views
for training; :class:`HostEval`: Resize + CenterCrop); colour ops, blur, flip and
normalisation then run on device (``augment.ssl_views`` / ``augment.view`` with
``crop=False``, or ``augment.normalize``).

Determinism and resumption. Training batch ``k`` holds the examples
``feeding.global_batch_indices(seed, k, N, B)`` (the same order rule as the in-memory feeder),
and the crop of the example in global slot ``j`` of step ``k`` uses a numpy generator seeded
with ``(seed, k, j)``. So the batch at step ``k`` is a pure function of ``(seed, k)`` whatever
the thread, process or device count, and an iterator started at step ``k`` (or restored with
``set_state``) continues exactly where an uninterrupted one would be.

Multi-host: process ``p`` reads only slots ``feeding.local_batch_slice(B, p, P)`` of each
global batch and ``jax.make_array_from_process_local_data`` assembles the global array.

Measured throughput (``experiments/bench_input.py``, 2026-11-21, this 2-core CPU shared with
other jobs (load ~4), 2 grain threads, a synthetic source of 500x375 JPEGs decoded with PIL as
``tfds.data_source`` does): 260-450 images/s for two 224 RandomResizedCrop views and 300-470
images/s for Resize(256)+CenterCrop(224). On one idle core an image costs 1.2 ms to decode and
1.5 ms for its two crops (~370 images/s per core), so a host feeding an accelerator at 2,500
images/s needs ~7 cores; decoding, not the pipeline, is the bound.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from us3l_jax import mesh as mesh_lib
from us3l_jax.data import feeding, host_transforms
from us3l_jax.data.augment import ViewConfig
from us3l_jax.data.feeding import Batch

HostTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_INFINITE_STEPS = 2 ** 40


@dataclasses.dataclass(frozen=True)
class HostCrops:
    """``num_views`` independent RandomResizedCrops (torchvision ``get_params`` + PIL resize).

    Output uint8[size, size, 3] for one view, uint8[num_views, size, size, 3] otherwise.
    """
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    num_views: int = 2

    def __post_init__(self):
        host_transforms.check_interpolation(self.interpolation)
        if self.size <= 0 or self.num_views <= 0:
            raise ValueError(f"size and num_views must be positive, got {self.size}, "
                             f"{self.num_views}")

    @classmethod
    def from_views(cls, cfg1: ViewConfig, cfg2: ViewConfig | None = None) -> HostCrops:
        """The host crops of an SSL recipe; run the rest on device with
        ``augment.ssl_views(key, crops, replace(cfg1, crop=False), replace(cfg2, crop=False))``.
        """
        cfg2 = cfg1 if cfg2 is None else cfg2
        geometry = [(c.size, c.scale, c.ratio, c.interpolation) for c in (cfg1, cfg2)]
        if geometry[0] != geometry[1]:
            raise ValueError(f"both views must share size/scale/ratio/interpolation to be "
                             f"cropped by one HostCrops, got {geometry[0]} and {geometry[1]}")
        return cls(*geometry[0], num_views=2)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        views = [host_transforms.resized_crop(
            image, host_transforms.rrc_box(rng, h, w, self.scale, self.ratio), self.size,
            self.interpolation) for _ in range(self.num_views)]
        return views[0] if self.num_views == 1 else np.stack(views)


@dataclasses.dataclass(frozen=True)
class HostEval:
    """``Resize(resize)`` + ``CenterCrop(crop)`` (torchvision on PIL)."""
    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"

    def __post_init__(self):
        host_transforms.check_interpolation(self.interpolation)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        del rng
        return host_transforms.resize_center_crop(image, self.resize, self.crop,
                                                  self.interpolation)


class StreamingDataset:
    """Batches of ``source`` transformed on the host.

    ``train=True``: infinite, shuffled per epoch, last partial batch of an epoch dropped.
    ``train=False``: one pass in index order, last batch padded, ``mask`` False on padding.
    ``process_index``/``process_count`` default to JAX's; other values simulate a process of a
    multi-host job (host batches only).
    """

    def __init__(self, source: Sequence[dict[str, Any]], *, global_batch_size: int,
                 transform: HostTransform, seed: int = 0, train: bool = True, mesh: Mesh | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_threads: int = 16, prefetch_batches: int = 2):
        self.source = source
        self.num_examples = len(source)
        self.global_batch_size = global_batch_size
        self.transform = transform
        self.seed = seed
        self.train = train
        self.mesh = mesh
        if mesh is not None:
            mesh_lib.check_batch_size(global_batch_size, mesh)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.local_slice = feeding.local_batch_slice(global_batch_size, self.process_index,
                                                     self.process_count)
        self.local_batch_size = self.local_slice.stop - self.local_slice.start
        self.num_threads = num_threads
        self.prefetch_batches = prefetch_batches
        if train:
            self.steps_per_epoch = feeding.steps_per_epoch(self.num_examples, global_batch_size)
            self.num_steps = _INFINITE_STEPS
        else:
            self.num_steps = feeding.num_eval_batches(self.num_examples, global_batch_size)

    def example_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's example indices and validity mask at ``step``."""
        if self.train:
            idx = feeding.global_batch_indices(self.seed, step, self.num_examples,
                                               self.global_batch_size)
            mask = np.ones_like(idx, dtype=bool)
        else:
            idx, mask = feeding.eval_indices(step, self.global_batch_size, self.num_examples)
        return idx[self.local_slice], mask[self.local_slice]

    def host_iterator(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Host batches from ``start_step``: dicts of ``image``, ``label``, ``mask``."""
        if not 0 <= start_step <= self.num_steps:
            raise ValueError(f"start_step {start_step} not in [0, {self.num_steps}]")
        b = self.local_batch_size
        ds = grain.MapDataset.range(start_step * b, self.num_steps * b).map(self._example)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                  prefetch_buffer_size=2 * b))
        return iter(ds.batch(b, drop_remainder=True))

    def iterator(self, start_step: int = 0) -> StreamIterator:
        """Device batches (:class:`feeding.Batch`) from ``start_step``, prefetched."""
        if self.mesh is None:
            raise ValueError("StreamingDataset needs a mesh for device batches")
        if (self.process_index, self.process_count) != (jax.process_index(), jax.process_count()):
            raise ValueError("simulated processes give host batches only (host_iterator)")
        return StreamIterator(self, start_step)

    def _example(self, position: int) -> dict[str, np.ndarray]:
        step, slot = divmod(position, self.local_batch_size)
        idx, mask = self.example_indices(step)
        ex = self.source[int(idx[slot])]
        rng = np.random.default_rng([self.seed, step, self.local_slice.start + slot])
        image = self.transform(host_transforms.as_rgb(ex["image"]), rng)
        return {"image": image, "label": np.int32(ex["label"]), "mask": mask[slot]}


class StreamIterator:
    """Device-prefetching iterator with a resumable position (``get_state``/``set_state``)."""

    def __init__(self, stream: StreamingDataset, start_step: int = 0):
        self._stream = stream
        self.set_state({"step": start_step})

    def get_state(self) -> dict[str, int]:
        """The step the next ``__next__`` returns; store it with the checkpoint."""
        return {"step": self._step}

    def set_state(self, state: dict[str, int]) -> None:
        self._step = int(state["step"])
        self._host = self._stream.host_iterator(self._step)
        self._queue: collections.deque[Batch] = collections.deque()

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> Batch:
        while len(self._queue) <= self._stream.prefetch_batches:
            try:
                self._queue.append(self._to_device(next(self._host)))
            except StopIteration:
                break
        if not self._queue:
            raise StopIteration
        self._step += 1
        return self._queue.popleft()

    def _to_device(self, host: dict[str, np.ndarray]) -> Batch:
        sharding = mesh_lib.batch_sharding(self._stream.mesh)
        big = self._stream.global_batch_size

        def put(x):
            return jax.make_array_from_process_local_data(sharding, x, (big,) + x.shape[1:])

        return Batch(put(host["image"]), put(host["label"]),
                     None if self._stream.train else put(host["mask"]))
