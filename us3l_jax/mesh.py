"""The device mesh: one ``data`` axis; batches sharded over it, parameters replicated."""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from us3l_jax.errors import UsageError

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all global devices, every process's), ordered by
    ``jax.make_mesh`` to follow the interconnect topology. Axis type Auto: the default
    Explicit types reject ops such as ``z @ z.T`` on batch-sharded arrays."""
    devs = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devs),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, group_size: int | None = None) -> None:
    """Raises ``UsageError`` (a ``ValueError``) unless ``batch_size`` splits evenly over the
    mesh's devices; the suggested size is also a multiple of ``group_size`` (the loss's sample
    groups)."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        step = math.lcm(n, group_size or 1)
        raise UsageError(
            f"batch size {batch_size} must be a positive multiple of the number of devices "
            f"({n}); use a batch size such as {max(step, round(batch_size / step) * step)}")
