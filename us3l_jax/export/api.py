"""Using a width in code: load a run once, get a callable network at any width.

    from us3l_jax import export
    run = export.load("/tmp/us3l_demo")        # config and the latest checkpoint
    net = run.at(0.5)                          # the compact 0.5x network, BN calibrated
    features = net(images)                     # float32 (batch, C) from normalised NHWC

``run.at(w)`` uses the BN statistics stored for ``w`` next to the checkpoint, or calibrates
them now exactly as ``python -m us3l_jax.evaluate`` does (and stores them); each calibration
procedure has its own statistics, ``run.at(w, calibration="official_cifar")`` picks one (default:
the run's ``eval.calibration``) and ``net.calibration_procedure`` names it. The network is
the plain (compact) network of that width, so it costs what the width costs; ``net.module``
and ``net.variables`` are ordinary Flax, and ``net.folded()`` gives the BN-folded form that
the export files compute. ``run.widths()`` lists one width per distinct sub-network.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from us3l_jax import build, checkpointing
from us3l_jax.export import command, widths as widths_lib
from us3l_jax.export.fold import fold_batchnorm


@dataclasses.dataclass(frozen=True)
class Width:
    """One width of a run: ``self(images)`` -> features. ``images``: float32 NHWC
    ``(batch, size, size, 3)``, normalised as the run's evaluation does (see
    ``python -m us3l_jax.export``'s model card); any batch size."""
    width: float
    module: nn.Module
    variables: dict[str, Any]
    step: int
    calibration: dict[str, Any] | None  # the calibration settings (None: no BatchNorm)
    # The procedure those statistics came from: name (calibration.PRESETS) and key.
    calibration_procedure: dict[str, Any] | None = None

    @functools.cached_property
    def _apply(self):
        return jax.jit(functools.partial(self.module.apply, train=False))

    def __call__(self, images: Any) -> jax.Array:
        return self._apply(self.variables, images)

    @property
    def num_params(self) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(self.variables.get("params", {}))))

    def folded(self) -> tuple[nn.Module, dict[str, Any]]:
        """``(module, variables)`` with BN folded into the convs (what the files compute)."""
        return fold_batchnorm(self.module, self.variables)


class Run:
    """A pretraining run's config and one checkpoint's parameters (loaded once)."""

    def __init__(self, workdir: str, step: int | None = None, trust_unverified: bool = False):
        self.workdir = workdir
        self._pre = checkpointing.load_pretrained(workdir, step,
                                                  abstract_state=build.abstract_state,
                                                  trust_unverified=trust_unverified)
        self.config = self._pre.config
        self.step = self._pre.step

    def widths(self) -> list[float]:
        """One width per distinct sub-network in the trained range, ascending."""
        return widths_lib.candidates(build.backbone(self.config),
                                     self.config.sampler.width_range[0],
                                     self.config.sampler.width_range[1])

    def at(self, width: float, calibration_batches: int | None = None,
           calibration: str | None = None) -> Width:
        """The network of ``width`` with the BN statistics of the calibration procedure
        ``calibration`` (``custom``, ``official_cifar``, ``official_imagenet``; default the
        run's ``eval.calibration``). ``ValueError`` for a width outside the trained range or
        an unknown procedure."""
        module, variables, info = command.load_width(
            self.workdir, width, calibration_batches=calibration_batches, pre=self._pre,
            calibration=calibration)
        procedure = info["calibration_procedure"]
        return Width(info["width"], module, variables, self.step, info["calibration"],
                     procedure and {k: procedure[k] for k in ("name", "key")})


def load(workdir: str, step: int | None = None, trust_unverified: bool = False) -> Run:
    """The run in ``workdir`` (its latest checkpoint, or ``step``); ``run.at(width)`` gives a
    callable network. Raises ``CheckpointError`` when there is no run or checkpoint.
    ``trust_unverified``: use checkpoints that lack their checksum file (else skipped)."""
    return Run(workdir, step, trust_unverified)
