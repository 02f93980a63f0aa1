"""The frozen pretrained teacher of SEED / SEED-MSE: loaded from another run's workdir.

The teacher is the online network ``{backbone, projector}`` of a finished run (any model and
width, e.g. an individually trained BYOL ResNet-50), as the official code loads ``encoder_q``
of a BYOL checkpoint. Its embedding is the projector output, which must have the student's
``heads.proj_out`` dimensions. It runs in train mode, i.e. with batch statistics per group of
the student's ``method.group_size`` examples (the official SEED teacher runs in train mode; see
``docs/fidelity.md`` for SEED-MSE, whose official teacher used running statistics).

The teacher is an input of the step, never part of the optimised state, so it cannot change.
The student's workdir records which teacher it learned from in ``teacher.json`` (the
teacher's workdir, step, config identity and a SHA-256 fingerprint of its parameters); a
resumed run refuses a teacher whose fingerprint differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from us3l_jax import build, checkpointing
from us3l_jax.fileio import atomic_write_text
from us3l_jax.method import teacher_subset
from us3l_jax.models.heads import SSLModel

TEACHER_FILE = "teacher.json"


@dataclasses.dataclass
class FrozenTeacher:
    """A teacher network, its (host) parameters, the width it runs at and its record."""
    model: SSLModel
    params: dict[str, Any]  # {backbone, projector}
    width: float
    record: dict[str, Any]


def fingerprint(params: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (in sorted path order)."""
    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load(config: ml_collections.ConfigDict) -> FrozenTeacher:
    """The teacher named by ``config.teacher`` (``workdir``, optional ``step`` and ``width``),
    checked against the student's config. Raises ``CheckpointError`` for a missing or unusable
    teacher run, with one line naming the problem."""
    t = config.teacher
    if not t.workdir:
        raise checkpointing.CheckpointError(
            "config.teacher.workdir is not set: SEED / SEED-MSE need the workdir of a "
            "pretrained teacher run (e.g. an individually trained BYOL run)")
    workdir = os.path.abspath(t.workdir)
    if not os.path.isdir(workdir):
        raise checkpointing.CheckpointError(f"teacher workdir {workdir!r} does not exist")
    pre = checkpointing.load_pretrained(workdir, step=t.step)
    tc = pre.config
    if tc.heads.proj_out != config.heads.proj_out:
        raise checkpointing.CheckpointError(
            f"teacher {workdir!r} embeds in {tc.heads.proj_out} dimensions but the student's "
            f"config.heads.proj_out is {config.heads.proj_out}; they must be equal")
    size, student_size = build.views(tc)[0].size, build.views(config)[0].size
    if size != student_size:
        raise checkpointing.CheckpointError(
            f"teacher {workdir!r} was trained on {size}px views but the student uses "
            f"{student_size}px; use a teacher trained at the student's input size")
    width = float(t.width) if t.width is not None else build.teacher_width(tc)
    lo, hi = tc.sampler.width_range
    trained = (tc.sampler.individual_width,) if tc.sampler.individual_width else None
    if (trained and abs(width - trained[0]) > 1e-9) or not lo - 1e-9 <= width <= hi + 1e-9:
        raise checkpointing.CheckpointError(
            f"config.teacher.width={width} is not a width the teacher {workdir!r} was trained "
            f"at ({trained[0] if trained else f'range {lo}-{hi}'})")
    # The teacher runs inside the student's step: the student's BN groups and compute dtype.
    tc.method.group_size = config.method.group_size
    tc.model.dtype = config.model.dtype
    params = teacher_subset(pre.params)
    record = {"workdir": workdir, "step": pre.step, "width": width,
              "identity": checkpointing.identity(pre.config),
              "fingerprint": fingerprint(params)}
    return FrozenTeacher(model=build.model(tc), params=params, width=width, record=record)


def record(workdir: str, teacher: FrozenTeacher) -> None:
    """Writes ``<workdir>/teacher.json`` for a new run; for an existing one, checks that the
    teacher is the one recorded (same parameters), so a resumed run continues exactly."""
    path = os.path.join(workdir, TEACHER_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("fingerprint") != teacher.record["fingerprint"]:
            raise checkpointing.CheckpointError(
                f"{workdir!r} was trained with the teacher recorded in {path} (workdir "
                f"{old.get('workdir')!r}, step {old.get('step')}), whose parameters differ "
                f"from {teacher.record['workdir']!r} step {teacher.record['step']}; resume "
                f"with the same teacher or use a new --workdir")
        return
    if jax.process_index() == 0:
        atomic_write_text(path, json.dumps(teacher.record, indent=2, sort_keys=True))


def read_record(workdir: str) -> dict[str, Any]:
    """The teacher a student run learned from (``teacher.json``)."""
    with open(os.path.join(workdir, TEACHER_FILE)) as f:
        return json.load(f)
