"""One run's backbone on one dataset: calibrate a width, cache its features, run a probe.

Shared by the width sweep and the online monitor. Protocols:

* ``fast``: the softmax probe on cached eval-transform features (``probe.py``);
* ``knn``: weighted kNN on the same features (``knn.py``);
* ``paper``: the paper's linear evaluation through the frozen backbone (``linear.py``);
* ``top1``: no probe: the classifier a supervised run trained (``config.train.objective =
  'supervised'``), in eval mode with this width's BN statistics (calibrated; an S-Net's
  private BN per width), on the test split of the run's own dataset;
* ``finetune``: the whole network fine-tuned at the width with a new classifier
  (``finetune.py``, the official transfer recipe).

Accuracies returned here are fractions in [0, 1].
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from us3l_jax import build, calibration as calib, eval_names, fileio, mesh as mesh_lib, slim
from us3l_jax.data import datasets, feeding
from us3l_jax.evaluate import features, finetune, knn, linear, probe, transforms

log = logging.getLogger(__name__)
PROTOCOLS = eval_names.PROTOCOLS
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Features:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


def check_width(config: ml_collections.ConfigDict, width: Any) -> float:
    """``width`` as a float, or ``ValueError`` if it is outside the run's trained range."""
    lo, hi = config.sampler.width_range
    try:
        w = slim.validate_width(width, lo, hi)
    except ValueError:
        raise ValueError(f"width {width!r} is outside the trained range [{lo}, {hi}] "
                         f"(config.sampler.width_range)") from None
    switchable = build.switchable_widths(config)
    if switchable:
        slim.switch_index(switchable, w)  # an S-Net runs only at its own widths
    return w


def calibration_settings(config: ml_collections.ConfigDict, num_batches: int | None = None,
                         dataset: str | None = None,
                         preset: str | None = None) -> calib.CalibrationSettings:
    """How BN statistics are calibrated for ``config`` on ``dataset`` (default: the
    pretraining set): the named procedure ``preset`` (default ``config.eval.calibration``),
    ``custom`` being the config's ``calibration_*`` fields; ``num_batches`` overrides the
    number of batches."""
    e = config.eval
    preset = calib.check_preset(preset or e.calibration)
    if preset == "custom":
        settings = calib.CalibrationSettings(
            num_batches=int(e.calibration_batches),
            batch_size=int(e.calibration_batch_size or e.batch_size),
            mode=e.calibration_mode, augment=e.calibration_augment, seed=int(config.seed))
    else:
        dataset = dataset or config.data.dataset
        size = 0
        if preset == "official_cifar":  # only this one depends on the data's size
            size = datasets.num_examples(dataset, transforms.SPLITS[dataset][0],
                                         data_dir=config.data.data_dir)
        linear_batch = linear.recipe_for(e.linear_recipe, dataset, None,
                                         config.model.name).batch_size
        settings = calib.official_settings(
            preset, train_size=size, linear_batch=linear_batch,
            group_size=config.method.group_size, num_devices=jax.device_count(),
            seed=int(config.seed))
    if num_batches:
        settings = dataclasses.replace(settings, num_batches=int(num_batches))
    return settings


class Evaluator:
    """Evaluation of ``config``'s backbone on ``dataset`` (default: the pretraining set).

    Loads the train/test splits onto the mesh once. ``fast``/``knn`` settings and the paper
    recipe come from ``config.eval`` unless given.
    """

    def __init__(self, config: ml_collections.ConfigDict, dataset: str | None = None, *,
                 mesh=None, fast: probe.FastProbeConfig = probe.FastProbeConfig(),
                 recipe: linear.LinearRecipe | None = None):
        self.config = config
        self.mesh = mesh or mesh_lib.make_mesh()
        self.backbone = build.backbone(config)
        self.data = transforms.for_run(config, dataset)
        self.fast = fast
        self.recipe = recipe or linear.recipe_for(config.eval.linear_recipe, self.data.dataset,
                                                  config.eval.linear_epochs, config.model.name)
        self.batch_size = int(config.eval.batch_size)
        mesh_lib.check_batch_size(self.batch_size, self.mesh)
        g = config.method.group_size
        if g is not None and self.batch_size % g:
            raise ValueError(f"config.eval.batch_size={self.batch_size} must be a multiple of "
                             f"config.method.group_size={g}: calibration runs BN in train mode "
                             f"with statistics per group, as in pretraining")
        train, test = transforms.load(self.data, config.data.data_dir)
        self.num_classes = train.num_classes
        self.train = feeding.DeviceDataset(train, self.mesh)
        self.test = feeding.DeviceDataset(test, self.mesh)

    @property
    def dataset(self) -> str:
        return self.data.dataset

    def calibrate(self, params: PyTree, width: float,
                  settings: calib.CalibrationSettings) -> PyTree:
        """Calibrated full-size ``batch_stats`` of the backbone ``params`` at ``width``."""
        batches = calib.input_batches(self.train, settings, self.data.train_view,
                                      self.data.eval_view, self.data.ssl_view)
        return calib.calibrate(self.backbone, params, width, batches, settings.mode,
                               settings.momentum)

    def calibrated(self, params: PyTree, width: float, settings: calib.CalibrationSettings,
                   workdir: str, step: int, recalibrate: bool = False, *,
                   store_in: str | None = None, preset: str | None = None
                   ) -> tuple[PyTree, bool]:
        """Statistics stored next to checkpoint ``step`` (in ``workdir``, else in
        ``store_in``) if they were made with the same settings (and not ``recalibrate``),
        else calibrated now and stored: in ``workdir``, or in ``store_in`` (e.g. the report
        folder) when the workdir cannot be written (a read-only copy of a run). Each
        procedure (``preset``, default ``config.eval.calibration``, with these ``settings``)
        has its own file (``calibration.stats_path``); a file of the layout before that is
        used when its settings are these. Returns ``(batch_stats, reused)``; a
        ``ValueError`` before any work when neither can hold new statistics."""
        own = self.dataset == self.config.data.dataset
        dataset = None if own else self.dataset
        key = calib.procedure_key(preset or self.config.eval.calibration, settings)
        dirs = [d for d in (workdir, store_in) if d is not None]
        meta = calib.settings_meta(settings, width, step, self.dataset)
        if not recalibrate:
            def unreadable(path: str, e: Exception) -> None:
                log.warning("ignoring unreadable BN statistics %s (%s)", path, e)

            found = calib.find_stats(
                [p for d in dirs for p in calib.stored_paths(d, step, width, key, dataset)],
                meta, unreadable)
            if found is not None:
                log.info("width %g: BN statistics %s reused from %s", width, key, found[1])
                return found[0], True
        paths = [calib.stats_path(d, step, width, key, dataset) for d in dirs]
        problems = {p: fileio.unusable_dir(os.path.dirname(p)) for p in paths}
        writable = [p for p in paths if problems[p] is None]
        if not writable:
            raise ValueError(f"cannot store calibrated BN statistics: {paths[0]}: "
                             f"{problems[paths[0]]}; give --out=DIR (they go there)")
        stats = self.calibrate(params, width, settings)
        if jax.process_index() == 0:  # every process computed the same statistics
            calib.save_stats(writable[0], stats, meta)
        log.info("width %g: BN statistics %s calibrated, stored in %s", width, key,
                 writable[0])
        return stats, False

    def features(self, params: PyTree, batch_stats: PyTree, width: float) -> Features:
        """Eval-mode features of the train and test splits at ``width``."""
        tr = features.extract(self.backbone, params, batch_stats, self.train, width,
                              self.data.eval_view, self.batch_size)
        te = features.extract(self.backbone, params, batch_stats, self.test, width,
                              self.data.eval_view, self.batch_size)
        return Features(*tr, *te)

    def run(self, protocol: str, params: PyTree, batch_stats: PyTree, width: float,
            feats: Features | None = None) -> float:
        """Top-1 test accuracy (a fraction) of ``protocol`` at ``width``. ``feats``: cached
        features (computed here when a feature protocol needs them and none are given)."""
        check_protocol(protocol)
        if protocol == "top1":
            return self.top1(params, batch_stats, width)
        if protocol == "finetune":
            return self.finetune(params, batch_stats, width)
        if protocol == "paper":
            clf, losses = linear.train(self.backbone, params, batch_stats, self.train, width,
                                       self.data.train_view, self.recipe, int(self.config.seed))
            log.info("paper protocol w=%g: %d epochs, loss %.4f -> %.4f", width,
                     self.recipe.epochs, losses[0], losses[-1])
            if feats is None:
                te_x, te_y = features.extract(self.backbone, params, batch_stats, self.test,
                                              width, self.data.eval_view, self.batch_size)
            else:
                te_x, te_y = feats.test_x, feats.test_y
            return linear.accuracy(clf, te_x, te_y)
        feats = feats or self.features(params, batch_stats, width)
        if protocol == "fast":
            return probe.fast_probe(feats.train_x, feats.train_y, feats.test_x, feats.test_y,
                                    self.num_classes, self.fast)
        e = self.config.eval
        return knn.knn_accuracy(feats.train_x, feats.train_y, feats.test_x, feats.test_y,
                                self.num_classes, int(e.knn_k), float(e.knn_temperature))


    def finetune(self, params: PyTree, batch_stats: PyTree, width: float) -> float:
        """Top-1 test accuracy (a fraction) after fine-tuning the whole network at ``width``
        from these statistics (``finetune.py``; recipe ``config.eval.finetune_recipe``, its
        epochs ``config.eval.linear_epochs`` when set)."""
        recipe = finetune.recipe_for(self.config.eval.finetune_recipe,
                                     self.config.eval.linear_epochs)
        model = build.backbone(self.config, num_classes=self.num_classes,
                               bn_group_size=recipe.bn_group_size)
        tuned, stats, losses = finetune.train(model, params, batch_stats, self.train, width,
                                              self.data.train_view, recipe,
                                              int(self.config.seed))
        log.info("finetune protocol w=%g: %d epochs, loss %.4f -> %.4f", width, recipe.epochs,
                 losses[0], losses[-1])
        logits, labels = features.extract(model, tuned, stats, self.test, width,
                                          self.data.eval_view, self.batch_size)
        return top1_accuracy(logits, labels)

    def top1(self, params: PyTree, batch_stats: PyTree, width: float) -> float:
        """Top-1 test accuracy (a fraction) of a supervised run's own classifier at
        ``width``: the backbone with its ``fc`` in eval mode, this width's BN statistics."""
        if not build.is_supervised(self.config):
            raise ValueError("protocol 'top1' reads the classifier of a supervised run "
                             "(config.train.objective='supervised'); use fast, knn or paper")
        if self.dataset != self.config.data.dataset:
            raise ValueError(f"protocol 'top1' evaluates the run's classifier on its own "
                             f"dataset {self.config.data.dataset!r}, not {self.dataset!r}")
        logits, labels = features.extract(build.classifier(self.config), params, batch_stats,
                                          self.test, width, self.data.eval_view,
                                          self.batch_size)
        return top1_accuracy(logits, labels)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows of ``logits`` [N, C] whose largest entry is at ``labels`` [N]
    (ties go to the lowest class index)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or not len(labels):
        raise ValueError(f"need logits [N, C] and labels [N], got {logits.shape} and "
                         f"{labels.shape}")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def timed(fn, *args, **kw) -> tuple[Any, float]:
    """``(fn(*args, **kw), seconds)``."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t

