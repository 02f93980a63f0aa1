"""The frozen pretrained teacher of SEED / SEED-MSE.

The teacher is the online network ``{backbone, projector}`` of a finished run (any model and
width, e.g. an individually trained BYOL ResNet-50), as the official code loads ``encoder_q``
of a BYOL checkpoint. It comes from one of two places (``config.teacher``):

* ``workdir``: another run of this project (its latest checkpoint, or ``step``);
* ``state_dict``: a torch-layout state dict in a ``.safetensors`` file, e.g. the ``state_dict``
  of an official BYOL checkpoint (keys ``module.encoder_q.*``, the backbone under torchvision
  names and the BYOL projector as ``fc.0``-``fc.6``; see :func:`from_official_state_dict`),
  with its architecture in ``teacher.model``.

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
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from us3l_jax import build, checkpointing, config as config_lib, export, mesh as mesh_lib, models
from us3l_jax.data import datasets, feeding
from us3l_jax.evaluate import calibrate as calib, transforms
from us3l_jax.fileio import atomic_write_text
from us3l_jax.method import teacher_subset
from us3l_jax.models.heads import SSLModel

TEACHER_FILE = "teacher.json"
BN_MODES = config_lib.TEACHER_BN
# The official checkpoint's prefixes of the online encoder (the rest is dropped, as there).
OFFICIAL_PREFIXES = ("module.encoder_q.", "encoder_q.")
# The BYOL projector inside the official encoder's ``fc`` (a Sequential): our layer -> index.
_PROJECTOR = {"fc1": "fc.0", "bn1": "fc.1", "fc2": "fc.3", "bn2": "fc.4", "fc3": "fc.6"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
         "var": "running_var"}

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
# The official layout: torchvision backbone names + the BYOL projector under ``fc``
# ------------------------------------------------------------------------------------------


def _family(name: str) -> str:
    if name in models.VIT_NAMES:
        raise ValueError(f"a torch-layout teacher must be a CNN (ResNet or MobileNetV2); "
                         f"{name!r} is a ViT")
    return "mobilenet_v2" if "mobilenet" in name else "resnet"


def _projector_key(family: str, layer: str, leaf: str) -> str:
    # The encoder's own classifier becomes the projector's first layer; MobileNetV2's is
    # Sequential(Dropout, Linear), hence one more index.
    base = "fc.0.1" if (layer == "fc1" and family == "mobilenet_v2") else _PROJECTOR[layer]
    return f"{base}.{_LEAF[leaf]}"


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The online encoder's entries: those under an official prefix (stripped) if any key
    has one, else the whole dict (a bare encoder state dict)."""
    for prefix in OFFICIAL_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _bn_layers(sd: Mapping[str, Any]) -> list[str]:
    """Names of BN layers in a torch state dict: 1-D ``weight`` with a ``bias`` sibling."""
    return [k[:-len(".weight")] for k, v in sd.items()
            if k.endswith(".weight") and np.ndim(v) == 1 and k[:-len(".weight")] + ".bias" in sd]


def from_official_state_dict(name: str, state_dict: Mapping[str, Any], **model_kw: Any
                             ) -> tuple[dict[str, Any], dict[str, Any] | None, tuple[int, int]]:
    """A BYOL-style encoder from a torch-layout state dict.

    ``state_dict``: the official checkpoint's ``state_dict`` (``module.encoder_q.*`` or
    ``encoder_q.*`` entries are used, the rest dropped, as the official teacher loader), or a
    bare encoder dict: the backbone ``name`` under torchvision names (``conv1``,
    ``layer1.0.conv1``, ``features.0.0``, ...) and the BYOL projector ``fc.0`` Linear(feat,
    hidden, bias) (MobileNetV2: ``fc.0.1``), ``fc.1`` BN, ``fc.3`` Linear(hidden, hidden, no
    bias), ``fc.4`` BN, ``fc.6`` Linear(hidden, out, bias). ``num_batches_tracked`` is ignored.

    Returns ``(params, batch_stats, (hidden, out))``: params ``{backbone, projector}`` of the
    slimmable model ``name`` at width 1.0 (``model_kw`` as ``models.create``), and the
    running statistics of every BN, or None when the dict has none (a run that normalised
    with batch statistics only). Raises ``ValueError`` naming missing, unexpected or
    misshaped entries.
    """
    family = _family(name)
    sd = {k: np.asarray(v) for k, v in _strip_prefix(state_dict).items()
          if not k.endswith(".num_batches_tracked")}
    head = {k: v for k, v in sd.items() if k.startswith("fc.")}
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    wanted = {_projector_key(family, layer, leaf): (layer, leaf) for layer, leaves in (
        ("fc1", ("kernel", "bias")), ("bn1", ("scale", "bias")), ("fc2", ("kernel",)),
        ("bn2", ("scale", "bias")), ("fc3", ("kernel", "bias"))) for leaf in leaves}
    stat_keys = {_projector_key(family, bn, leaf): (bn, leaf) for bn in ("bn1", "bn2")
                 for leaf in ("mean", "var")}
    missing = sorted(set(wanted) - set(head))
    extra = sorted(set(head) - set(wanted) - set(stat_keys))
    if missing or extra:
        raise ValueError(
            f"the state dict's projector is not the official BYOL projector (Linear+bias, BN, "
            f"ReLU, Linear without bias, BN, ReLU, Linear+bias under 'fc'): missing "
            f"{missing or 'nothing'}, unexpected {extra or 'nothing'}")
    has_stats = all(k in head for k in stat_keys) and all(
        f"{p}.running_mean" in body and f"{p}.running_var" in body for p in _bn_layers(body))
    if not has_stats:  # fill so that the backbone loads; the statistics are reported absent
        for p in _bn_layers(body):
            c = body[f"{p}.weight"].shape[0]
            body.setdefault(f"{p}.running_mean", np.zeros((c,), np.float32))
            body.setdefault(f"{p}.running_var", np.ones((c,), np.float32))
    backbone = export.from_torch_state_dict(name, body, 1.0, **model_kw)
    projector: dict[str, dict[str, np.ndarray]] = {}
    for key, (layer, leaf) in wanted.items():
        a = head[key].astype(np.float32)
        projector.setdefault(layer, {})[leaf] = np.ascontiguousarray(a.T if a.ndim == 2 else a)
    params = {"backbone": backbone["params"], "projector": projector}
    stats = None
    if has_stats:
        stats = {"backbone": backbone["batch_stats"],
                 "projector": {bn: {leaf: head[key].astype(np.float32)
                                    for key, (b, leaf) in stat_keys.items() if b == bn}
                               for bn in ("bn1", "bn2")}}
    hidden, out = head[_projector_key(family, "fc1", "kernel")].shape[0], \
        head[_projector_key(family, "fc3", "kernel")].shape[0]
    return params, stats, (int(hidden), int(out))


def to_official_state_dict(name: str, variables: Mapping[str, Any], **model_kw: Any
                           ) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_official_state_dict`: ``{'params': {backbone, projector
    (BYOL style)}}`` and optionally ``'batch_stats'`` of both, as an official checkpoint's
    ``state_dict`` (``module.encoder_q.*`` keys; without statistics no running-statistics
    entries are written). E.g. to run the official SEED code on this project's teacher."""
    family = _family(name)
    params, stats = variables["params"], variables.get("batch_stats")
    bb = {"params": params["backbone"]}
    if stats is not None:
        bb["batch_stats"] = stats["backbone"]
    sd = export.to_torch_state_dict(name, bb, 1.0, **model_kw)
    if stats is None:
        sd = {k: v for k, v in sd.items()
              if not k.endswith((".running_mean", ".running_var", ".num_batches_tracked"))}
    for layer, leaves in params["projector"].items():
        for leaf, a in leaves.items():
            a = np.asarray(jax.device_get(a), np.float32)
            sd[_projector_key(family, layer, leaf)] = np.ascontiguousarray(
                a.T if a.ndim == 2 else a)
    if stats is not None:
        for bn, leaves in stats["projector"].items():
            for leaf, a in leaves.items():
                sd[_projector_key(family, bn, leaf)] = np.asarray(jax.device_get(a), np.float32)
            sd[f"{_PROJECTOR[bn]}.num_batches_tracked"] = np.zeros((), np.int64)
    return {f"module.encoder_q.{k}": v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def _student_sized(tc: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """The teacher runs inside the student's step: the student's BN groups and dtype."""
    tc.method.group_size = config.method.group_size
    tc.model.dtype = config.model.dtype


def _from_workdir(config: ml_collections.ConfigDict):
    t = config.teacher
    workdir = os.path.abspath(t.workdir)
    if not os.path.isdir(workdir):
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
        sd = export.load_safetensors(path)
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
        params, stats, (hidden, out) = from_official_state_dict(t.model, sd, **kw)
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
    data = transforms.for_run(config)
    train = datasets.load(data.dataset, data.train_split, data_dir=config.data.data_dir,
                          image_size=data.load_size)  # the training split only
    batches = calib.input_batches(feeding.DeviceDataset(train, mesh), settings,
                                  data.train_view, data.eval_view,
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
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
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
    with open(os.path.join(workdir, TEACHER_FILE)) as f:
        return json.load(f)
