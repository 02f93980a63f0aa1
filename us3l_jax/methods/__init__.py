"""Training methods, one module each, as ``Method`` objects of pure functions for the engine.

* ``us3l``: US3L with Table 7's loss-design switches; SimCLR, BYOL, SimSiam and MoCo v3, on
  their own or as US+X, are named settings of them (``simclr``, ``byol``, ``simsiam``,
  ``mocov3``);
* ``moco``: MoCo v2; ``seed``: SEED and SEED-MSE; ``supervised``: US-Net and S-Net;
* ``vicreg``: VICReg made slimmable with the paper's guidelines.

A run's config keeps one flat ``config.method`` section (``SCHEMA``: every method's fields
with their defaults); ``select`` picks the method it describes and builds that method's own
config, naming the field when a value does not fit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from us3l_jax.methods import moco, seed, supervised, us3l, vicreg
from us3l_jax.methods.base import Context, Method

UPDATE_MODES = ("accumulate", "per_width")
TEACHERS = ("ema", "frozen")
BASE_LOSSES = ("infonce", "mse", "mocov3", "seed", "moco", "vicreg")
SINGLE_WIDTH = ("moco", "seed")  # methods that train one width per run

# The config section: US3L's fields, then the others' (first default wins).
SCHEMA: dict[str, Any] = {
    **{f.name: f.default for f in dataclasses.fields(us3l.Config)},
    "update_mode": "accumulate", "teacher": "ema", "queue_size": 0,
    "teacher_tau": seed.Config.teacher_tau,
}


def _pick(cls, fields: Mapping[str, Any], **renamed) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: fields[k] for k in names if k in fields and k not in renamed}, **renamed)


def select(fields: Mapping[str, Any], objective: str = "ssl",
           supervised_fields: Mapping[str, Any] | None = None) -> tuple[str, Any]:
    """The method a flat ``config.method`` section describes: (name, its config).
    Raises ValueError naming the field that does not fit."""
    f = {**SCHEMA, **fields}
    for name, allowed in (("update_mode", UPDATE_MODES), ("teacher", TEACHERS),
                          ("base_loss", BASE_LOSSES)):
        if f[name] not in allowed:
            raise ValueError(f"{name}={f[name]!r} is not one of {allowed}")
    if f["queue_size"] < 0:
        raise ValueError(f"queue_size must be >= 0, got {f['queue_size']}")
    if objective == "supervised":
        return "supervised", supervised.Config(group_size=f["group_size"],
                                               **(supervised_fields or {}))
    loss, queue = f["base_loss"], f["queue_size"]
    if (loss in ("seed", "moco") or f["teacher"] == "frozen") and not f["momentum_base"]:
        raise ValueError(f"base_loss={loss!r} with teacher={f['teacher']!r} learns from the "
                         f"teacher: set momentum_base=True")
    if f["teacher"] == "frozen":
        return "seed", _pick(seed.Config, f, loss=loss)
    if loss == "seed":
        raise ValueError("base_loss='seed' distills a frozen pretrained teacher: set "
                         "teacher='frozen'")
    if loss == "moco":
        return "moco", _pick(moco.Config, f)
    if queue:
        raise ValueError(f"queue_size={queue} is only used by base_loss 'seed' or 'moco', "
                         f"not {loss!r}; set it to 0")
    if loss == "vicreg":
        # The US3L switches for everything but the base loss, which VICReg replaces.
        return "vicreg", vicreg.Config(us3l=_pick(us3l.Config, f, base_loss="infonce"))
    return "us3l", _pick(us3l.Config, f)


__all__ = ["Context", "Method", "SCHEMA", "SINGLE_WIDTH", "select", "moco", "seed",
           "supervised", "us3l", "vicreg"]
