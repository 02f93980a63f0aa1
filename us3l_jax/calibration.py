"""BN calibration: the BatchNorm statistics of one width of a pretrained slimmable backbone.

Pretraining stores no BN statistics: every width normalises with batch statistics, as in the
official code. Before a width can run in eval mode its statistics are estimated (how the
official code does it, and how the options compare: docs/fidelity.md, "BN calibration"): the
backbone runs in train mode at that width (so each BN sees the inputs it saw in training, normalised per group
as in training) over N training batches, and the moments of every BN's input over the used
channels are accumulated. Two modes:

* ``cumulative`` (default): the exact mean and (biased, population) variance over all
  calibration data, merged batch by batch from each batch's mean/variance and element count
  (law of total variance, Chan et al.'s pairwise update). This is what US-Net's cumulative
  averaging intends; the result does not depend on the batch order.
* ``ema``: the official code's PyTorch running averages: starting from mean 0
  / var 1, ``run = (1 - m)·run + m·batch`` with momentum m = 0.1 and the running variance
  updated with the **unbiased** batch variance n/(n-1)·var.

Named procedures (``PRESETS``, ``config.eval.calibration``): ``custom`` uses the fields
``config.eval.calibration_{mode,augment,batches,batch_size}`` (default: exact cumulative
statistics of 100 batches with the linear-eval training crops); ``official_cifar`` is the
official CIFAR linear evaluation's (EMA over 3 epochs of the linear-evaluation loader, 98
forwards of 128 images per epoch on CIFAR, linear-eval training crops, whatever the
pretraining batch); ``official_imagenet`` the official ImageNet calibration run's (EMA over
501 batches of one BN group, 60 images for ResNet-50 and 128 for ResNet-18, with the SSL
pretraining augmentation). docs/fidelity.md, "BN calibration", compares them.

The result is a full-size ``batch_stats`` tree (the layout ``SlimBatchNorm`` reads in eval
mode): calibrated values in the leading used channels, mean 0 / var 1 beyond. Each width and
procedure gets its own tree and its own file (:func:`stats_path`, keyed by
:func:`procedure_key`), so calibrating one width, or with one procedure, never changes
another's. The per-batch step (forward + merge) is compiled once per width and runs on device
without host round trips.

Evaluation (``us3l_jax.evaluate``), export and the SEED teacher (``teacher.bn='calibrated'``)
all calibrate through this module.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from us3l_jax import eval_names, fileio, paths
from us3l_jax.data import augment, feeding

MODES = eval_names.CALIBRATION_MODES
AUGMENTS = eval_names.CALIBRATION_AUGMENTS
PRESETS = eval_names.CALIBRATION_PRESETS
EMA_MOMENTUM = 0.1  # PyTorch's BatchNorm default, used by the official calibration
STATS_DIR = "bn_stats"

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """How statistics are calibrated; stored with them so that stale files are detected."""
    num_batches: int = 100
    batch_size: int = 512
    mode: str = "cumulative"
    augment: str = "linear_train"
    seed: int = 0
    momentum: float = EMA_MOMENTUM

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown calibration mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"unknown calibration augment {self.augment!r}; valid: "
                             f"{', '.join(AUGMENTS)}")
        for name in ("num_batches", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"calibration {name} must be a positive integer, got {v!r}")
        if not 0 < self.momentum <= 1:
            raise ValueError(f"calibration momentum must be in (0, 1], got {self.momentum!r}")


# The official linear evaluation ran on 4 GPUs (CIFAR: 128 per GPU, batch 512; transfer sets:
# 64 per GPU, batch 256); its BN calibration is one GPU's chain of per-GPU batches.
OFFICIAL_LINEAR_DEVICES = 4


def _whole_groups(batch: int, group_size: int | None, num_devices: int) -> int:
    """The smallest batch >= ``batch`` made of whole BN groups (calibration normalises per
    group) that the devices share evenly."""
    step = math.lcm(int(group_size or 1), int(num_devices))
    return step * -(-int(batch) // step)


def official_settings(preset: str, *, train_size: int, linear_batch: int,
                      group_size: int | None, num_devices: int = 1,
                      seed: int = 0) -> CalibrationSettings:
    """The official code's calibration procedures as settings (see the module docstring).

    ``official_cifar``: PyTorch running averages (momentum 0.1) over 3 epochs of the
    linear-evaluation training loader: ``ceil(train_size / linear_batch)`` forwards per epoch
    (``linear_batch``: the linear recipe's whole batch, 512 on CIFAR), each of one GPU's share
    of it (``linear_batch / 4``, 128 images on CIFAR), since the official chain is one
    device's. The pretraining batch plays no part. ``official_imagenet``: 501 batches of one
    BN group (``group_size``, else 128: the per-GPU pretraining batch, 128 for ResNet-18 and
    60 for ResNet-50) with the SSL augmentation. The official calibration config's comment
    says 64 for ResNet-50; calibration normalises per pretraining BN group, so a batch must be
    a whole number of groups, and one group of 60 is the closest.

    Both batches are rounded up to whole BN groups that ``num_devices`` devices share evenly
    (ResNet-50's 60 becomes 120 on 8 devices, two groups per batch).
    """
    if preset == "official_cifar":
        linear_batch = int(linear_batch)
        if linear_batch < OFFICIAL_LINEAR_DEVICES or linear_batch % OFFICIAL_LINEAR_DEVICES:
            raise ValueError(f"official_cifar calibration needs a linear-evaluation batch that "
                             f"{OFFICIAL_LINEAR_DEVICES} devices share evenly, got "
                             f"{linear_batch}")
        per_device = _whole_groups(linear_batch // OFFICIAL_LINEAR_DEVICES, group_size,
                                   num_devices)
        return CalibrationSettings(num_batches=3 * -(-int(train_size) // linear_batch),
                                   batch_size=per_device,
                                   mode="ema", augment="linear_train", seed=seed)
    if preset == "official_imagenet":
        return CalibrationSettings(num_batches=501,
                                   batch_size=_whole_groups(group_size or 128, group_size,
                                                            num_devices),
                                   mode="ema", augment="ssl", seed=seed)
    raise ValueError(f"unknown calibration preset {preset!r}; the official ones are "
                     f"official_cifar, official_imagenet")


# ------------------------------------------------------------------------------------------
# Accumulation (pure functions of per-layer moments)
# ------------------------------------------------------------------------------------------


def _layer_moments(bn_moments: PyTree) -> dict[str, list[dict[str, Array]]]:
    """``{'layer1_0/bn1': [{'mean', 'var', 'count'}, ...]}`` from a sown ``bn_moments``
    collection (one entry per call of that BN in the forward)."""
    flat = traverse_util.flatten_dict(bn_moments, sep="/")
    out: dict[str, list[dict[str, Array]]] = {}
    for key, values in flat.items():
        layer, stat = key.rsplit("/", 1)
        calls = out.setdefault(layer, [{} for _ in values])
        for call, v in zip(calls, values):
            call[stat] = v
    return out


def _merge_cumulative(acc: dict[str, Array], m: dict[str, Array]) -> dict[str, Array]:
    """Pairwise merge of (count, mean, sum of squared deviations) with a batch's moments."""
    n_a, n_b = acc["count"], m["count"]
    n = n_a + n_b
    delta = m["mean"] - acc["mean"]
    mean = acc["mean"] + delta * (n_b / n)
    m2 = acc["m2"] + m["var"] * n_b + jnp.square(delta) * (n_a * n_b / n)
    return {"count": n, "mean": mean, "m2": m2}


def _merge_ema(acc: dict[str, Array], m: dict[str, Array], momentum: float) -> dict[str, Array]:
    n = m["count"]
    unbiased = m["var"] * n / jnp.maximum(n - 1.0, 1.0)
    return {"mean": (1.0 - momentum) * acc["mean"] + momentum * m["mean"],
            "var": (1.0 - momentum) * acc["var"] + momentum * unbiased}


def _init_acc(c: int, mode: str) -> dict[str, Array]:
    if mode == "cumulative":
        return {"count": jnp.zeros((), jnp.float32), "mean": jnp.zeros((c,), jnp.float32),
                "m2": jnp.zeros((c,), jnp.float32)}
    return {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}


def _finalize(acc: dict[str, Array], mode: str) -> tuple[Array, Array]:
    if mode == "cumulative":
        return acc["mean"], acc["m2"] / jnp.maximum(acc["count"], 1.0)
    return acc["mean"], acc["var"]


def ema_update(batch_stats: PyTree, bn_moments: PyTree,
               momentum: float = EMA_MOMENTUM) -> PyTree:
    """PyTorch's running-statistics update after a training forward (``track_running_stats``
    with momentum ``momentum``): every BN that ran moves the leading ``c`` entries of its
    full-size ``mean``/``var`` towards the batch's mean and unbiased variance (the
    ``bn_moments`` a train-mode forward sowed); the other entries and BNs stay. Traceable."""
    flat = dict(traverse_util.flatten_dict(batch_stats, sep="/"))
    for layer, calls in _layer_moments(bn_moments).items():
        mean, var = flat[layer + "/mean"], flat[layer + "/var"]
        for m in calls:
            c = m["mean"].shape[-1]
            new = _merge_ema({"mean": mean[:c], "var": var[:c]}, m, momentum)
            mean, var = mean.at[:c].set(new["mean"]), var.at[:c].set(new["var"])
        flat[layer + "/mean"], flat[layer + "/var"] = mean, var
    return traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------------------------------
# Device step (compiled once per backbone, width and mode)
# ------------------------------------------------------------------------------------------


def _moments(backbone: nn.Module, params: PyTree, images: Array, width: float,
             method: Callable | None = None):
    _, state = backbone.apply({"params": params}, images, width=width, train=True,
                              mutable=["bn_moments"], method=method)
    return _layer_moments(state["bn_moments"])


@functools.lru_cache(maxsize=64)
def _step_fn(backbone: nn.Module, width: float, mode: str, momentum: float,
             method: Callable | None):
    def step(acc, params, images):
        layers = _moments(backbone, params, images, width, method)
        new = {}
        for name, calls in layers.items():
            a = acc[name]
            for m in calls:
                a = _merge_cumulative(a, m) if mode == "cumulative" else \
                    _merge_ema(a, m, momentum)
            new[name] = a
        return new

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _full_size_template(backbone: nn.Module, image_shape: tuple[int, ...],
                        method: Callable | None = None) -> PyTree:
    """Shapes of the full-size ``batch_stats`` tree (eval-mode init, nothing computed)."""
    def init(x):
        return backbone.init(jax.random.key(0), x, width=1.0, train=False,
                             method=method)["batch_stats"]

    return jax.eval_shape(init, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))


def calibrate(backbone: nn.Module, params: PyTree, width: float, batches: Iterable[Array],
              mode: str = "cumulative", momentum: float = EMA_MOMENTUM,
              method: Callable | None = None) -> PyTree:
    """Calibrated full-size ``batch_stats`` of ``backbone`` at ``width``.

    Args:
      backbone: a slimmable backbone (``SlimBatchNorm`` layers), or any module whose
        ``method`` takes ``(x, width=, train=)``, e.g. ``SSLModel`` with ``SSLModel.encode``
        (backbone and projector: a frozen teacher's statistics).
      params: its parameters (``{'bn1': ..., 'layer1_0': ...}``, no ``params`` wrapper).
      width: the width to calibrate (a static Python float).
      batches: float32 NHWC image batches, already transformed (see :func:`input_batches`).
      mode: ``cumulative`` (exact statistics over all batches) or ``ema`` (official, momentum
        ``momentum``, unbiased running variance).
    Returns:
      ``{'bn1': {'mean', 'var'}, 'layer1_0': {'bn1': {...}}, ...}`` with full-size float32
      arrays: the calibrated statistics in the leading used channels, 0 / 1 beyond.
    """
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; valid: {', '.join(MODES)}")
    if not getattr(backbone, "has_batch_norm", True):
        return {}  # e.g. a ViT: LayerNorm only, nothing to calibrate
    step = _step_fn(backbone, float(width), mode, float(momentum), method)
    acc = None
    image_shape = None
    for images in batches:
        if acc is None:
            image_shape = tuple(images.shape[1:])
            shapes = jax.eval_shape(functools.partial(_moments, backbone, width=float(width),
                                                      method=method), params, images)
            acc = {name: _init_acc(calls[0]["mean"].shape[-1], mode)
                   for name, calls in shapes.items()}
        acc = step(acc, params, images)
    if acc is None:
        raise ValueError("calibration needs at least one batch")
    template = _full_size_template(backbone, image_shape, method)
    flat = traverse_util.flatten_dict(template, sep="/")
    stats = {}
    for key, spec in flat.items():
        layer, stat = key.rsplit("/", 1)
        full = np.zeros(spec.shape, np.float32) if stat == "mean" else \
            np.ones(spec.shape, np.float32)
        if layer in acc:
            mean, var = _finalize(acc[layer], mode)
            value = np.asarray(jax.device_get(mean if stat == "mean" else var))
            full[:value.shape[0]] = value
        stats[key] = full
    return traverse_util.unflatten_dict(stats, sep="/")


def input_batches(data: feeding.DeviceDataset, settings: CalibrationSettings,
                  train_view: augment.ViewConfig | None = None,
                  eval_view: augment.EvalConfig | None = None,
                  ssl_view: augment.ViewConfig | None = None) -> Iterator[Array]:
    """The calibration inputs: ``settings.num_batches`` training batches (the pretraining
    feeder's order for ``settings.seed``, cycling over epochs), with the linear-eval training
    augmentation (``augment='linear_train'``: ``train_view``), the SSL pretraining view
    (``'ssl'``: ``ssl_view``) or the eval transform (``'none'``: ``eval_view``)."""
    needed = {"linear_train": (train_view, "the linear-eval training view"),
              "ssl": (ssl_view, "the pretraining view recipe"),
              "none": (eval_view, "the eval transform")}[settings.augment]
    if needed[0] is None:
        raise ValueError(f"calibration augment {settings.augment!r} needs {needed[1]}")
    feeder = feeding.TrainFeeder(data, settings.batch_size, settings.seed)
    key = jax.random.key(settings.seed)
    for k in range(settings.num_batches):
        images = feeder.batch(k).images
        if settings.augment in ("linear_train", "ssl"):
            view = train_view if settings.augment == "linear_train" else ssl_view
            yield augment.view(jax.random.fold_in(key, k), images, view)
        else:
            yield augment.eval_view(images, eval_view)


# ------------------------------------------------------------------------------------------
# Storage next to the checkpoint
# ------------------------------------------------------------------------------------------


def check_preset(name: str) -> str:
    """``name`` if it is a calibration procedure (``PRESETS``), else a one-line ``ValueError``
    listing them."""
    if name not in PRESETS:
        raise ValueError(f"unknown calibration {name!r}; valid: {', '.join(PRESETS)}")
    return name


def procedure_key(preset: str, settings: CalibrationSettings) -> str:
    """The folder name of one calibration procedure's statistics: the preset, then every
    setting, so that different procedures never share a file:
    ``<preset>-<mode>-<augment>-<batches>x<batch size>-s<seed>`` (``-m<momentum>`` when not
    0.1), e.g. ``custom-cumulative-linear_train-100x512-s0``."""
    s = settings
    key = f"{check_preset(preset)}-{s.mode}-{s.augment}-{s.num_batches}x{s.batch_size}-s{s.seed}"
    return key if s.momentum == EMA_MOMENTUM else f"{key}-m{s.momentum!r}"


def stats_path(workdir: str, step: int, width: float, procedure: str,
               dataset: str | None = None) -> str:
    """``<workdir>/bn_stats/step_<N>/[<dataset>/]<procedure>/width_<w>.msgpack``;
    ``procedure``: a :func:`procedure_key`; ``dataset`` names a calibration set other than the
    pretraining one (transfer evaluation)."""
    return os.path.join(_step_dir(workdir, step, dataset), procedure,
                        f"width_{float(width)!r}.msgpack")


def legacy_stats_path(workdir: str, step: int, width: float,
                      dataset: str | None = None) -> str:
    """Where statistics were stored before they were keyed by procedure (one file per width,
    whichever procedure ran last): ``<workdir>/bn_stats/step_<N>/[<dataset>/]width_<w>.msgpack``.
    Only read, and only used when its meta is the requested procedure's."""
    return os.path.join(_step_dir(workdir, step, dataset), f"width_{float(width)!r}.msgpack")


def _step_dir(workdir: str, step: int, dataset: str | None) -> str:
    return os.path.join(workdir, STATS_DIR, f"step_{int(step)}", *([dataset] if dataset else []))


def stored_paths(workdir: str, step: int, width: float, procedure: str,
                 dataset: str | None = None) -> tuple[str, str]:
    """Where a procedure's statistics may be found, in the order to try: the keyed file, then
    the old layout's."""
    return (stats_path(workdir, step, width, procedure, dataset),
            legacy_stats_path(workdir, step, width, dataset))


def find_stats(candidates: Iterable[str], meta: dict[str, Any],
               unreadable: Callable[[str, Exception], None]) -> tuple[PyTree, str] | None:
    """``(batch_stats, path)`` of the first of ``candidates`` whose stored meta is ``meta``
    (the meta is the authority: a file made otherwise is not used), None if none is.
    ``unreadable(path, error)`` is called for a file that cannot be read, which is skipped."""
    for path in candidates:
        try:
            stored = load_stats(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the caller's to report
            unreadable(path, e)
            continue
        if stored is not None and stored[1] == meta:
            return stored[0], path
    return None


def save_stats(path: str, batch_stats: PyTree, meta: dict[str, Any]) -> None:
    """Writes statistics and their ``meta`` atomically (temporary file + rename)."""
    payload = {"batch_stats": jax.tree.map(np.asarray, batch_stats), "meta": dict(meta)}
    fileio.atomic_write_bytes(path, flax.serialization.msgpack_serialize(payload))


def load_stats(path: str) -> tuple[PyTree, dict[str, Any]] | None:
    """``(batch_stats, meta)`` stored at ``path``, or None if there is no file."""
    if not paths.exists(path):
        return None
    with paths.open_read(path) as f:
        payload = flax.serialization.msgpack_restore(f.read())
    return payload["batch_stats"], payload["meta"]


def settings_meta(settings: CalibrationSettings, width: float, step: int,
                  dataset: str) -> dict[str, Any]:
    """What identifies a calibration: reused only when all of it matches."""
    return {**dataclasses.asdict(settings), "width": float(width), "step": int(step),
            "dataset": dataset}
