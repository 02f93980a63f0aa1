"""Online monitoring during pretraining: a kNN or fast probe at a few widths.

``OnlineEvaluator(config)`` is the ``online_eval`` callable of ``pretrain.train``: every
``config.eval.online_every_epochs`` epochs it calibrates BN at each of
``config.eval.online_widths`` with the small budget ``config.eval.online_calibration_batches``
(statistics kept in memory only: the parameters are still changing), extracts features once
and runs ``config.eval.online_protocol``. Metrics are top-1 % keyed ``<protocol>/w<width>``,
e.g. ``knn/w1.0``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from us3l_jax import eval_names
from us3l_jax.evaluate.evaluator import (Evaluator, calibration_settings, check_protocol,
                                         check_width)

ONLINE_PROTOCOLS = eval_names.ONLINE_PROTOCOLS


class OnlineEvaluator:
    """``__call__(params, step) -> {'knn/w1.0': 61.2, ...}``; ``params`` is the TrainState's
    ``{backbone, projector, ...}`` tree. The evaluation data is loaded once, here."""

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

    def __call__(self, params: dict[str, Any], step: int) -> dict[str, float]:
        del step  # the same budget at every step
        ev = self.evaluator
        out = {}
        for w in self.widths:
            stats = ev.calibrate(params["backbone"], w, self.settings)
            acc = ev.run(self.protocol, params["backbone"], stats, w)
            out[f"{self.protocol}/w{w!r}"] = 100.0 * acc
        return out
