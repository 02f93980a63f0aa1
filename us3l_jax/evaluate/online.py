"""Online monitoring during pretraining: a kNN or fast probe at a few widths.

``OnlineEvaluator(config)`` is the ``online_eval`` callable of ``pretrain.train``: every
``config.eval.online_every_epochs`` epochs it calibrates BN at each of
``config.eval.online_widths`` with the small budget ``config.eval.online_calibration_batches``
(statistics kept in memory only: the parameters are still changing), extracts features once
and runs ``config.eval.online_protocol``. Metrics are top-1 % keyed ``<protocol>/w<width>``,
e.g. ``knn/w1.0``. With the online linear probe (``config.eval.online_linear``), also its
top-1 % on the test split at the base width, ``probe/val_acc1``: on the same eval-mode
features (BN statistics calibrated as above; calibrated once more if the base width is not
among the online widths).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from us3l_jax import build, eval_names
from us3l_jax.engine import online_probe
from us3l_jax.evaluate.evaluator import (Evaluator, calibration_settings, check_protocol,
                                         check_width)

ONLINE_PROTOCOLS = eval_names.ONLINE_PROTOCOLS


class OnlineEvaluator:
    """``__call__(params, step, probe=None) -> {'knn/w1.0': 61.2, ...}``; ``params`` is the
    TrainState's ``{backbone, projector, ...}`` tree, ``probe`` its online probe state. The
    evaluation data is loaded once, here."""

    def __init__(self, config: ml_collections.ConfigDict, mesh=None, *,
                 widths: Sequence[float] | None = None, protocol: str | None = None):
        self.protocol = check_protocol(protocol or config.eval.online_protocol)
        if self.protocol not in ONLINE_PROTOCOLS:
            raise ValueError(f"online protocol {self.protocol!r} is too costly to run during "
                             f"pretraining; use one of {', '.join(ONLINE_PROTOCOLS)} "
                             f"(config.eval.online_protocol)")
        self.widths = [check_width(config, w) for w in (widths or config.eval.online_widths)]
        self.settings = calibration_settings(config, config.eval.online_calibration_batches)
        self.evaluator = Evaluator(config, mesh=mesh)
        self.probe_width = build.teacher_width(config)

    def __call__(self, params: dict[str, Any], step: int, probe: Any = None
                 ) -> dict[str, float]:
        del step  # the same budget at every step
        ev = self.evaluator
        out = {}
        widths = self.widths + ([self.probe_width] if probe is not None and
                                self.probe_width not in self.widths else [])
        for w in widths:
            stats = ev.calibrate(params["backbone"], w, self.settings)
            feats = ev.features(params["backbone"], stats, w)
            if w in self.widths:
                acc = ev.run(self.protocol, params["backbone"], stats, w, feats=feats)
                out[f"{self.protocol}/w{w!r}"] = 100.0 * acc
            if probe is not None and w == self.probe_width:
                out["probe/val_acc1"] = online_probe.accuracy(probe, feats.test_x, feats.test_y)
        return out
