"""The frozen pretrained teacher of SEED / SEED-MSE.

The teacher is the online network ``{backbone, projector}`` of a finished run (any model and
width, e.g. an individually trained BYOL ResNet-50), as the official code loads ``encoder_q``
of a BYOL checkpoint. It comes from one of two places (``config.teacher``):

* ``workdir``: another run of this project (its latest checkpoint, or ``step``);
* ``state_dict``: a torch-layout state dict in a ``.safetensors`` file, e.g. the ``state_dict``
  of an official BYOL checkpoint (keys ``module.encoder_q.*``, the backbone under torchvision
  names and the BYOL projector as ``fc.0``-``fc.6``; read by
  ``us3l_jax.torch_layout.from_official_state_dict``), with its architecture in
  ``teacher.model``.

Its embedding is the projector output, which must have the student's ``heads.proj_out``
dimensions. Its BatchNorms (``teacher.bn``) use

* ``batch``: batch statistics per group of the student's ``method.group_size`` examples (the
  official SEED teacher runs in train mode);
* ``calibrated``: eval mode with running statistics of backbone and projector estimated when
  the teacher is loaded: PyTorch's running average (momentum 0.1) over
  ``teacher.calibration_batches`` batches of the teacher's own SSL views of the student's
  training set, one BN group per batch. That is how the statistics the official SEED-MSE
  teacher uses in eval mode came about (its BYOL run tracked them while it trained);
* ``stored``: eval mode with the running statistics stored in the state dict (official
  SEED-MSE with an official checkpoint).

The teacher is an input of the step, never part of the optimised state, so it cannot change.
The student's workdir records which teacher it learned from in ``teacher.json`` (source, step,
config identity or file hash, BN mode, and a SHA-256 fingerprint of the parameters); a
resumed run refuses a teacher that differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from us3l_jax import build, calibration as calib, checkpointing, config as config_lib
from us3l_jax import mesh as mesh_lib, paths, torch_layout
from us3l_jax.data import datasets, feeding
from us3l_jax.fileio import atomic_write_text
from us3l_jax.methods.ema import teacher_subset
from us3l_jax.models.heads import SSLModel

TEACHER_FILE = "teacher.json"
BN_MODES = config_lib.TEACHER_BN

Variables = dict[str, Any]
log = logging.getLogger("us3l")


@dataclasses.dataclass
class FrozenTeacher:
    """A teacher network, its (host) variables, the width it runs at and its record.

    ``variables``: ``{'params': {backbone, projector}}``, plus ``'batch_stats'`` (backbone
    and projector) when it runs in eval mode (``record['bn']`` 'calibrated' or 'stored')."""
    model: SSLModel
    variables: Variables
    width: float
    record: dict[str, Any]

    @property
    def params(self) -> dict[str, Any]:
        return self.variables["params"]


def fingerprint(params: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (in sorted path order)."""
    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def _student_sized(tc: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """The teacher runs inside the student's step: the student's BN groups and dtype."""
    tc.method.group_size = config.method.group_size
    tc.model.dtype = config.model.dtype


def _from_workdir(config: ml_collections.ConfigDict):
    t = config.teacher
    workdir = paths.absolute(t.workdir)
    if not paths.isdir(workdir):
        raise checkpointing.CheckpointError(f"teacher workdir {workdir!r} does not exist")
    pre = checkpointing.load_pretrained(workdir, step=t.step,
                                       abstract_state=build.abstract_state)
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
    _student_sized(tc, config)
    params = jax.device_get(teacher_subset(pre.params))
    record = {"source": "workdir", "workdir": workdir, "step": pre.step,
              "identity": checkpointing.identity(pre.config)}
    return tc, params, None, width, record


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _from_state_dict(config: ml_collections.ConfigDict):
    t = config.teacher
    path = os.path.abspath(t.state_dict)
    if not os.path.isfile(path):
        raise checkpointing.CheckpointError(f"teacher state dict {path!r} does not exist")
    try:
        sd = torch_layout.load_safetensors(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        raise checkpointing.CheckpointError(
            f"teacher state dict {path!r} is not a readable safetensors file ({e}); convert a "
            f"torch checkpoint with safetensors.torch.save_file(torch.load(f)['state_dict'], "
            f"out)") from None
    width = 1.0 if t.width is None else float(t.width)
    tc = config.copy_and_resolve_references()
    tc.model.name = t.model
    tc.model.switchable_widths = ()
    tc.sampler.individual_width = None
    tc.sampler.width_range = (width, 1.0)
    _student_sized(tc, config)
    kw = build.architecture_kwargs(tc)
    try:
        params, stats, (hidden, out) = torch_layout.from_official_state_dict(t.model, sd, **kw)
    except ValueError as e:
        raise checkpointing.CheckpointError(f"teacher state dict {path!r}: {e}") from None
    if out != config.heads.proj_out:
        raise checkpointing.CheckpointError(
            f"teacher state dict {path!r} embeds in {out} dimensions but the student's "
            f"config.heads.proj_out is {config.heads.proj_out}; they must be equal")
    tc.heads.proj_hidden, tc.heads.proj_out, tc.heads.proj_style = hidden, out, "byol"
    _check_shapes(f"teacher state dict {path!r}", build.model(tc), params,
                  build.views(tc)[0].size)
    record = {"source": "state_dict", "state_dict": path, "sha256": _file_sha256(path),
              "model": t.model, "step": None}
    return tc, params, stats, width, record


def _check_shapes(what: str, model: SSLModel, params: dict[str, Any], size: int) -> None:
    """Every parameter the teacher network has, with its shape (e.g. a projector input that
    is not the backbone's feature size)."""
    x = jax.ShapeDtypeStruct((2, size, size, 3), np.float32)
    want = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, 1.0, False,
                                               method=SSLModel.encode)["params"], x)
    want_flat = {jax.tree_util.keystr(k): v.shape
                 for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    got_flat = {jax.tree_util.keystr(k): np.shape(v)
                for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    bad = sorted(k for k in set(want_flat) | set(got_flat)
                 if want_flat.get(k) != got_flat.get(k))
    if bad:
        k = bad[0]
        raise checkpointing.CheckpointError(
            f"{what}: {len(bad)} parameter(s) do not fit the teacher network, e.g. {k}: "
            f"{got_flat.get(k, 'missing')} in the file, {want_flat.get(k, 'absent')} expected "
            f"(check config.teacher.model and the student's model fields)")


def calibration_settings(config: ml_collections.ConfigDict) -> calib.CalibrationSettings:
    """``teacher.bn='calibrated'``: PyTorch running averages (momentum 0.1) over
    ``teacher.calibration_batches`` batches of one BN group (``method.group_size`` images, else
    the whole batch) with the SSL view augmentation."""
    return calib.CalibrationSettings(
        num_batches=int(config.teacher.calibration_batches),
        batch_size=int(config.method.group_size or config.optim.batch_size), mode="ema",
        augment="ssl", seed=int(config.seed))


def _calibrate(model: SSLModel, params, width: float, tc: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, mesh, settings) -> dict[str, Any]:
    # The student's training split, stored as pretraining reads it (``build.data``).
    train = datasets.load(config.data.dataset, "train", data_dir=config.data.data_dir,
                          image_size=config.data.image_size)
    batches = calib.input_batches(feeding.DeviceDataset(train, mesh), settings,
                                  ssl_view=build.view_recipe(tc)[0])
    return calib.calibrate(model, params, width, batches, settings.mode, settings.momentum,
                           method=SSLModel.encode)


def load(config: ml_collections.ConfigDict, mesh=None) -> FrozenTeacher:
    """The teacher named by ``config.teacher``, checked against the student's config, with
    the BN statistics ``teacher.bn`` asks for (calibrated here on the student's training
    set, on ``mesh``). Raises ``CheckpointError`` for a missing or unusable teacher, with
    one line naming the problem."""
    t = config.teacher
    config_lib.validate_teacher(t)  # load() may be called without config.validate
    if t.state_dict:
        tc, params, stored, width, record = _from_state_dict(config)
    else:
        tc, params, stored, width, record = _from_workdir(config)
    model = build.model(tc)
    variables: Variables = {"params": params}
    record.update(width=width, bn=t.bn, fingerprint=fingerprint(params))
    how = {"batch": "batch statistics", "stored": "the state dict's running statistics"}
    if t.bn == "stored":
        if stored is None:
            raise checkpointing.CheckpointError(
                f"config.teacher.bn='stored' needs BN running statistics and the state dict "
                f"{t.state_dict!r} has none; use teacher.bn='calibrated' or 'batch'")
        variables["batch_stats"] = stored
    elif t.bn == "calibrated":
        settings = calibration_settings(config)
        t0 = time.time()
        variables["batch_stats"] = _calibrate(model, params, width, tc, config,
                                              mesh or mesh_lib.make_mesh(), settings)
        record["calibration"] = dataclasses.asdict(settings)
        how["calibrated"] = (f"running statistics calibrated over {settings.num_batches} "
                             f"batches of {settings.batch_size} in {time.time() - t0:.1f}s")
    step = "" if record["step"] is None else f" step {record['step']}"
    log.info("frozen teacher %s%s at width %g; BN: %s",
             record.get("workdir") or record["state_dict"], step, width, how[t.bn])
    return FrozenTeacher(model=model, variables=variables, width=width, record=record)


# What must be equal for a resumed student to continue with the same teacher.
_SAME_TEACHER = ("fingerprint", "width", "bn", "calibration")


def record(workdir: str, teacher: FrozenTeacher) -> None:
    """Writes ``<workdir>/teacher.json`` for a new run; for an existing one, checks that the
    teacher is the one recorded (same parameters, width and BN statistics), so a resumed run
    continues exactly."""
    path = os.path.join(workdir, TEACHER_FILE)
    if paths.exists(path):
        old = json.loads(paths.read_text(path))
        old.setdefault("bn", "batch")  # records written before teacher.bn existed
        new = json.loads(json.dumps(teacher.record))
        diff = [k for k in _SAME_TEACHER if old.get(k) != new.get(k)]
        if diff:
            src = lambda r: r.get("workdir") or r.get("state_dict")
            raise checkpointing.CheckpointError(
                f"{workdir!r} was trained with the teacher recorded in {path} "
                f"({src(old)!r}, step {old.get('step')}), which differs from "
                f"{src(new)!r} step {new.get('step')} in {', '.join(diff)}; resume with the "
                f"same teacher or use a new --workdir")
        return
    if jax.process_index() == 0:
        atomic_write_text(path, json.dumps(teacher.record, indent=2, sort_keys=True))


def read_record(workdir: str) -> dict[str, Any]:
    """The teacher a student run learned from (``teacher.json``)."""
    return json.loads(paths.read_text(os.path.join(workdir, TEACHER_FILE)))
