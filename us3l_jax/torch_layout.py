"""PyTorch layouts: our flax variables as torch state dicts and back, and safetensors files.

One place for every torch-side name and layout (numpy only, no torch needed), shared by the
export CLI, the SEED teacher and anything that reads official or torchvision weights:

* leaves: HWIO convs <-> OIHW (depthwise (kh, kw, 1, C) <-> (C, 1, kh, kw)), (in, out) dense
  kernels <-> (out, in) weights, BN ``scale``/``bias``/``mean``/``var`` <->
  ``weight``/``bias``/``running_mean``/``running_var`` (:func:`to_torch_leaf`,
  :func:`from_torch_leaf`);
* names: torchvision ``resnet*`` / ``mobilenet_v2`` for the CNNs, timm / MoCo v3 for the ViTs
  (:func:`to_torch_state_dict`, :func:`from_torch_state_dict`, and their ``plain_*`` forms
  for a plain network already sliced with ``us3l_jax.models.plain``);
* official checkpoints: the BYOL online encoder (``module.encoder_q.*``: backbone + projector
  ``fc.0``-``fc.6``) that SEED loads as its teacher (:func:`from_official_state_dict`,
  :func:`to_official_state_dict`), MoCo v3's base encoder (:func:`moco_v3_backbone`), the
  backbone alone of any of them (:func:`official_backbone`, ``us3l_jax.import_official``);
* files: atomic safetensors writes, reads (:func:`save_safetensors`, :func:`load_safetensors`).

torchvision ImageNet weights (a ``.pth``) need one step in a PyTorch environment first, e.g.
``safetensors.torch.save_file(torchvision.models.resnet50(weights=...).state_dict(), f)``;
then ``from_torch_state_dict("resnet50", load_safetensors(f))``.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util

from us3l_jax import fileio, models
from us3l_jax.models.plain import (COLLECTIONS, abstract_variables, check_keys,
                                   create_with_head, family, plain_network, slice_to_width)
from us3l_jax.models.vit import sincos_pos_embed

Variables = dict[str, Any]
# Our leaf name -> torch's.
LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
              "var": "running_var"}
_RUNNING = (".running_mean", ".running_var", ".num_batches_tracked")
# Stem / classifier weights per family (torch keys): input channels and classes of a dict.
_TORCH_STEM = {"resnet": "conv1.weight", "mobilenet_v2": "features.0.0.weight",
               "vit": "patch_embed.proj.weight"}
_TORCH_HEAD = {"resnet": "fc.weight", "mobilenet_v2": "classifier.1.weight",
               "vit": "head.weight"}
# MobileNetV2 block layers -> torchvision ``features.{i}.conv.*`` (with / without expansion).
_MBV2_EXPAND = {"expand_conv": "0.0", "expand_bn": "0.1", "dw_conv": "1.0", "dw_bn": "1.1",
                "project_conv": "2", "project_bn": "3"}
_MBV2_NO_EXPAND = {"dw_conv": "0.0", "dw_bn": "0.1", "project_conv": "1", "project_bn": "2"}
_RESNET_SUB = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# The official checkpoints' prefixes of the online encoder (the rest is dropped, as there).
OFFICIAL_PREFIXES = ("module.encoder_q.", "encoder_q.")
# The BYOL projector inside the official encoder's ``fc`` (a Sequential): our layer -> index.
_PROJECTOR = {"fc1": "fc.0", "bn1": "fc.1", "fc2": "fc.3", "bn2": "fc.4", "fc3": "fc.6"}


# ------------------------------------------------------------------------------------------
# Leaves
# ------------------------------------------------------------------------------------------


def to_torch_leaf(a: np.ndarray) -> np.ndarray:
    """HWIO conv -> OIHW (depthwise (kh,kw,1,C) -> (C,1,kh,kw)); (in,out) dense -> (out,in);
    vectors unchanged."""
    if a.ndim == 4:
        return np.transpose(a, (3, 2, 0, 1))
    return a.T if a.ndim == 2 else a


def from_torch_leaf(a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_torch_leaf`."""
    if a.ndim == 4:
        return np.transpose(a, (2, 3, 1, 0))
    return a.T if a.ndim == 2 else a


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape :func:`to_torch_leaf` gives a leaf of ``shape``."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def _host(a: Any) -> np.ndarray:
    return np.asarray(jax.device_get(a))


def _fill_running_stats(sd: dict[str, Any], bn_prefixes, tracked: bool) -> None:
    """BN running statistics absent from ``sd`` become mean 0 / var 1 (uncalibrated);
    ``tracked``: ``num_batches_tracked`` is written as 0 (PyTorch only reads it when BN
    momentum is None)."""
    for prefix in bn_prefixes:
        c = np.shape(sd[f"{prefix}.weight"])[0]
        sd.setdefault(f"{prefix}.running_mean", np.zeros((c,), np.float32))
        sd.setdefault(f"{prefix}.running_var", np.ones((c,), np.float32))
        if tracked:
            sd[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)


# ------------------------------------------------------------------------------------------
# torchvision names (ResNets, MobileNetV2)
# ------------------------------------------------------------------------------------------


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _torch_layer(fam: str, layer: tuple[str, ...], params: Mapping[str, Any]) -> str:
    """torchvision module name of our layer path, e.g. ('layer1_0', 'downsample_conv') ->
    'layer1.0.downsample.0', ('block3', 'dw_conv') -> 'features.4.conv.1.0'."""
    if fam == "resnet":
        if len(layer) == 1:
            return layer[0]
        stage, block = re.fullmatch(r"layer(\d+)_(\d+)", layer[0]).groups()
        return f"layer{stage}.{block}.{_RESNET_SUB.get(layer[1], layer[1])}"
    n_blocks = sum(1 for k in params if k.startswith("block"))
    top = {"stem_conv": "features.0.0", "stem_bn": "features.0.1",
           "head_conv": f"features.{n_blocks + 1}.0", "head_bn": f"features.{n_blocks + 1}.1",
           "classifier": "classifier.1"}
    if len(layer) == 1:
        return top[layer[0]]
    i = int(layer[0][len("block"):])
    sub = _MBV2_EXPAND if "expand_conv" in params[layer[0]] else _MBV2_NO_EXPAND
    return f"features.{i + 1}.conv.{sub[layer[1]]}"


def _torch_entries(fam: str, variables: Variables) -> list[tuple[str, tuple[str, ...], str]]:
    """(collection, our leaf path, torchvision key) for every leaf of ``variables``."""
    params = variables["params"]
    return [(col, k, f"{_torch_layer(fam, k[:-1], params)}.{LEAF_NAMES[k[-1]]}")
            for col in COLLECTIONS for k in _flat(variables.get(col, {}))]


def _bn_prefixes(fam: str, variables: Variables) -> list[str]:
    """torchvision names of the BN layers (those with a ``scale``)."""
    params = variables["params"]
    return [_torch_layer(fam, k[:-1], params) for k in _flat(params) if k[-1] == "scale"]


def to_torch_state_dict(name: str, variables: Mapping[str, Any], width: float = 1.0,
                        **model_kw: Any) -> dict[str, np.ndarray]:
    """torchvision-style state dict of the network at ``width`` (numpy arrays, no torch).

    ResNets use torchvision ``resnet*`` names (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ``layer1.0.downsample.0/1``, ``fc``), also for the CIFAR variants; MobileNetV2 uses
    torchvision ``mobilenet_v2`` names (``features.0.0``, ``features.{i}.conv.*``,
    ``features.18.0/1``, ``classifier.1``); ViTs timm's. Convs are OIHW (depthwise (C, 1, kh,
    kw)), linear weights (out, in). BN ``running_mean``/``running_var`` come from
    ``variables['batch_stats']`` (sliced to the width); **without batch_stats they are written
    as mean 0 / var 1**, i.e. uncalibrated. ``num_batches_tracked`` is written as 0.
    Everything is sliced to ``width`` as ``us3l_jax.models.plain.slice_to_width`` does.
    """
    return plain_to_torch_state_dict(*slice_to_width(name, variables, width, **model_kw))


def plain_to_torch_state_dict(plain: nn.Module, sliced: Mapping[str, Any]
                              ) -> dict[str, np.ndarray]:
    """``to_torch_state_dict`` of a plain network and its (sliced) variables, e.g. from
    ``us3l_jax.models.plain.slice_module``."""
    fam = family(plain)
    if fam == "vit":
        return _vit_to_torch(plain, sliced)
    flat = {col: _flat(tree) for col, tree in sliced.items()}
    sd = {tkey: np.ascontiguousarray(to_torch_leaf(_host(flat[col][k])))
          for col, k, tkey in _torch_entries(fam, sliced)}
    _fill_running_stats(sd, _bn_prefixes(fam, sliced), tracked=True)
    return sd


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any], width: float = 1.0,
                          **model_kw: Any) -> Variables:
    """Variables (numpy float32 ``params`` and ``batch_stats``) from a torchvision-style dict.

    The inverse of ``to_torch_state_dict``. A dict of width 1.0 (e.g. torchvision ImageNet
    weights for ``resnet18``/``resnet50``) gives the full-size variables of the slimmable model
    ``models.create(name, **model_kw)``. A dict exported at a smaller ``width`` must be loaded
    with that ``width`` and gives the variables of the plain network of that width
    (``us3l_jax.models.plain.plain_network(models.create(name, ...), width)``): the channels
    beyond the slice are not in the file, so it is not turned into a slimmable model.
    ``num_classes`` defaults to the classifier size in the dict (no classifier keys: a feature
    extractor). ``num_batches_tracked`` entries are optional and ignored. Raises
    ``ValueError`` naming missing, unexpected or misshaped keys.
    """
    sd = dict(state_dict)
    model = create_with_head(name, model_kw, lambda fam: (
        int(np.shape(sd[_TORCH_HEAD[fam]])[0]) if _TORCH_HEAD[fam] in sd else None))
    return _plain_from_torch(f"{name} state dict", plain_network(model, width), sd,
                             f" at width {width}")


def plain_from_torch_state_dict(plain: nn.Module, state_dict: Mapping[str, Any]) -> Variables:
    """``from_torch_state_dict`` for the plain network ``plain`` (the inverse of
    ``plain_to_torch_state_dict``): its variables, numpy float32."""
    return _plain_from_torch("state dict", plain, dict(state_dict), "")


def _plain_from_torch(what: str, plain: nn.Module, sd: dict[str, Any], at: str) -> Variables:
    fam = family(plain)
    if fam == "vit":
        return _vit_from_torch(what + at, plain, sd)
    stem = sd.get(_TORCH_STEM[fam])
    in_ch = 3 if stem is None else int(np.shape(stem)[1])
    abstract = abstract_variables(plain, in_ch)
    entries = _torch_entries(fam, abstract)
    optional = {f"{p}.num_batches_tracked" for p in _bn_prefixes(fam, abstract)}
    check_keys(what + at, set(sd) - optional, [tkey for _, _, tkey in entries])
    shapes = {col: _flat(tree) for col, tree in abstract.items()}
    flat: dict[str, dict] = {col: {} for col in abstract}
    for col, k, tkey in entries:
        a = np.asarray(sd[tkey])
        expected = torch_shape(shapes[col][k].shape)
        if a.shape != expected:
            raise ValueError(f"{what} key {tkey!r}: shape {a.shape}, expected "
                             f"{expected}{at} (was it exported at another "
                             "width or with other model_kw?)")
        flat[col][k] = np.ascontiguousarray(from_torch_leaf(a).astype(np.float32))
    return {col: traverse_util.unflatten_dict(v) for col, v in flat.items()}


# ------------------------------------------------------------------------------------------
# ViTs: timm ``VisionTransformer`` / MoCo v3 names
# ------------------------------------------------------------------------------------------
# cls_token (1,1,d); pos_embed (1,1+N,d) (the fixed sin-cos table, written for
# ``image_size``); patch_embed.proj.{weight (d,3,p,p), bias}; blocks.{i}.norm1/norm2.{weight,
# bias}; blocks.{i}.attn.qkv.{weight (3d,d), bias (3d)}; blocks.{i}.attn.proj/mlp.fc1/mlp.fc2
# .{weight (out,in), bias}; norm.{weight,bias}; head.{weight,bias} with a classifier.


def _vit_torch_key(k: tuple[str, ...]) -> str:
    parts = [p.replace("blocks_", "blocks.") for p in k[:-1]]
    if parts == ["patch_embed"]:
        parts.append("proj")
    leaf = k[-1]
    return ".".join(parts + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _vit_leaf_to_torch(k: tuple[str, ...], a: np.ndarray) -> np.ndarray:
    if k[-2:] == ("qkv", "kernel"):  # (d, 3, h, hd) -> torch (3*h*hd, d)
        return a.reshape(a.shape[0], -1).T
    if k[-2:] == ("qkv", "bias"):
        return a.reshape(-1)
    return a if k == ("cls_token",) else to_torch_leaf(a)


def _vit_pos_embed(plain: nn.Module) -> np.ndarray:
    g = plain.image_size // plain.patch_size
    return sincos_pos_embed(g, g, plain.dim)[None]


def _vit_to_torch(plain: nn.Module, sliced: Mapping[str, Any]) -> dict[str, np.ndarray]:
    sd = {_vit_torch_key(k): np.ascontiguousarray(_vit_leaf_to_torch(k, _host(v)))
          for k, v in _flat(sliced["params"]).items()}
    sd["pos_embed"] = _vit_pos_embed(plain)
    return sd


def _vit_from_torch(what: str, plain: nn.Module, sd: dict[str, Any]) -> Variables:
    abstract = _flat(abstract_variables(
        plain, int(np.shape(sd.get(_TORCH_STEM["vit"], [0, 3]))[1]))["params"])
    keys = {_vit_torch_key(k): k for k in abstract}
    check_keys(what, set(sd), list(keys) + ["pos_embed"])
    pos = _vit_pos_embed(plain)
    if np.shape(sd["pos_embed"]) != pos.shape or not np.allclose(sd["pos_embed"], pos,
                                                                 atol=1e-5):
        raise ValueError(f"{what} key 'pos_embed': not the fixed sin-cos table of a "
                         f"{plain.image_size}-px input (shape {pos.shape}); this ViT has no "
                         "learned position embedding")
    flat = {}
    for tkey, k in keys.items():
        shape = abstract[k].shape
        a = np.asarray(sd[tkey], np.float32)
        if k[-2:] == ("qkv", "kernel"):
            a = a.T.reshape(shape) if a.shape == (shape[1] * shape[2] * shape[3], shape[0]) \
                else a
        elif k[-2:] == ("qkv", "bias"):
            a = a.reshape(shape) if a.size == math.prod(shape) else a
        elif k != ("cls_token",):
            a = from_torch_leaf(a)
        if a.shape != shape:
            raise ValueError(f"{what} key {tkey!r}: shape {np.shape(sd[tkey])} does not fit "
                             f"{shape} (was it exported at another width or size?)")
        flat[k] = np.ascontiguousarray(a)
    return {"params": traverse_util.unflatten_dict(flat)}


# ------------------------------------------------------------------------------------------
# Official checkpoints: MoCo v3's base encoder, the BYOL online encoder SEED loads
# ------------------------------------------------------------------------------------------


def moco_v3_backbone(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT backbone of a MoCo v3 pretraining checkpoint's ``state_dict``, as the official
    linear evaluation reads it: ``module.base_encoder.*`` keys without the prefix, the
    projector (``head.*``) dropped."""
    prefix = "module.base_encoder."
    out = {k[len(prefix):]: v for k, v in state_dict.items()
           if k.startswith(prefix) and not k.startswith(prefix + "head")}
    if not out:
        raise ValueError(f"no '{prefix}*' keys in the state dict; is it a MoCo v3 checkpoint?")
    return out


def _cnn_family(name: str) -> str:
    if name in models.VIT_NAMES:
        raise ValueError(f"a torch-layout teacher must be a CNN (ResNet or MobileNetV2); "
                         f"{name!r} is a ViT")
    return "mobilenet_v2" if "mobilenet" in name else "resnet"


def _projector_key(fam: str, layer: str, leaf: str) -> str:
    # The encoder's own classifier becomes the projector's first layer; MobileNetV2's is
    # Sequential(Dropout, Linear), hence one more index.
    base = "fc.0.1" if (layer == "fc1" and fam == "mobilenet_v2") else _PROJECTOR[layer]
    return f"{base}.{LEAF_NAMES[leaf]}"


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The online encoder's entries: those under an official prefix (stripped) if any key
    has one, else the whole dict (a bare encoder state dict)."""
    for prefix in OFFICIAL_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _torch_bn_layers(sd: Mapping[str, Any]) -> list[str]:
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
    fam = _cnn_family(name)
    sd = {k: np.asarray(v) for k, v in _strip_prefix(state_dict).items()
          if not k.endswith(".num_batches_tracked")}
    head = {k: v for k, v in sd.items() if k.startswith("fc.")}
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    wanted = {_projector_key(fam, layer, leaf): (layer, leaf) for layer, leaves in (
        ("fc1", ("kernel", "bias")), ("bn1", ("scale", "bias")), ("fc2", ("kernel",)),
        ("bn2", ("scale", "bias")), ("fc3", ("kernel", "bias"))) for leaf in leaves}
    stat_keys = {_projector_key(fam, bn, leaf): (bn, leaf) for bn in ("bn1", "bn2")
                 for leaf in ("mean", "var")}
    missing = sorted(set(wanted) - set(head))
    extra = sorted(set(head) - set(wanted) - set(stat_keys))
    if missing or extra:
        raise ValueError(
            f"the state dict's projector is not the official BYOL projector (Linear+bias, BN, "
            f"ReLU, Linear without bias, BN, ReLU, Linear+bias under 'fc'): missing "
            f"{missing or 'nothing'}, unexpected {extra or 'nothing'}")
    bns = _torch_bn_layers(body)
    has_stats = all(k in head for k in stat_keys) and all(
        f"{p}.running_mean" in body and f"{p}.running_var" in body for p in bns)
    if not has_stats:  # fill so that the backbone loads; the statistics are reported absent
        _fill_running_stats(body, bns, tracked=False)
    backbone = from_torch_state_dict(name, body, 1.0, **model_kw)
    projector: dict[str, dict[str, np.ndarray]] = {}
    for key, (layer, leaf) in wanted.items():
        projector.setdefault(layer, {})[leaf] = np.ascontiguousarray(
            from_torch_leaf(head[key].astype(np.float32)))
    params = {"backbone": backbone["params"], "projector": projector}
    stats = None
    if has_stats:
        stats = {"backbone": backbone["batch_stats"],
                 "projector": {bn: {leaf: head[key].astype(np.float32)
                                    for key, (b, leaf) in stat_keys.items() if b == bn}
                               for bn in ("bn1", "bn2")}}
    hidden, out = head[_projector_key(fam, "fc1", "kernel")].shape[0], \
        head[_projector_key(fam, "fc3", "kernel")].shape[0]
    return params, stats, (int(hidden), int(out))


def official_backbone(name: str, state_dict: Mapping[str, Any], **model_kw: Any
                      ) -> Variables:
    """The backbone of a run of the official code, as full-size variables of the slimmable
    model ``name`` (``params`` and the BN running statistics as ``batch_stats``).

    ``state_dict``: the official checkpoint's ``state_dict`` (the online encoder
    ``module.encoder_q.*`` / ``encoder_q.*`` of the CNN methods, MoCo v3's
    ``module.base_encoder.*`` for ViTs; the rest is dropped) or a bare backbone dict in
    torchvision / timm names. What sits on top of the backbone there (the projector under
    ``fc.*``, a torchvision classifier ``fc`` / ``classifier``, a ViT ``head``) is dropped.
    Raises ``ValueError`` naming missing, unexpected or misshaped keys."""
    if any(k.startswith("module.base_encoder.") for k in state_dict):
        sd = moco_v3_backbone(state_dict)
    else:
        sd = _strip_prefix(state_dict)
    tops = ("fc.", "classifier.", "head.")
    sd = {k: np.asarray(v) for k, v in sd.items() if not k.startswith(tops)}
    return from_torch_state_dict(name, sd, 1.0, **model_kw)


def to_official_state_dict(name: str, variables: Mapping[str, Any], **model_kw: Any
                           ) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_official_state_dict`: ``{'params': {backbone, projector
    (BYOL style)}}`` and optionally ``'batch_stats'`` of both, as an official checkpoint's
    ``state_dict`` (``module.encoder_q.*`` keys; without statistics no running-statistics
    entries are written). E.g. to run the official SEED code on this project's teacher."""
    fam = _cnn_family(name)
    params, stats = variables["params"], variables.get("batch_stats")
    bb = {"params": params["backbone"]}
    if stats is not None:
        bb["batch_stats"] = stats["backbone"]
    sd = to_torch_state_dict(name, bb, 1.0, **model_kw)
    if stats is None:
        sd = {k: v for k, v in sd.items() if not k.endswith(_RUNNING)}
    for layer, leaves in params["projector"].items():
        for leaf, a in leaves.items():
            sd[_projector_key(fam, layer, leaf)] = np.ascontiguousarray(
                to_torch_leaf(_host(a).astype(np.float32)))
    if stats is not None:
        for bn, leaves in stats["projector"].items():
            for leaf, a in leaves.items():
                sd[_projector_key(fam, bn, leaf)] = _host(a).astype(np.float32)
            sd[f"{_PROJECTOR[bn]}.num_batches_tracked"] = np.zeros((), np.int64)
    return {f"{OFFICIAL_PREFIXES[0]}{k}": v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------
# safetensors files
# ------------------------------------------------------------------------------------------


def save_safetensors(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``state_dict`` to ``path`` atomically: the bytes go to a temporary file in the
    same directory, are fsynced, and the file is renamed over ``path``; a failure leaves any
    previous file untouched and no partial file behind."""
    fileio.atomic_write_bytes(os.fspath(path), safetensors_bytes(state_dict, metadata))


def safetensors_bytes(state_dict: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors file of ``state_dict`` (string keys; metadata: strings) as bytes."""
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise ValueError(f"state dict keys must be strings, got {k!r}")
        tensors[k] = np.asarray(jax.device_get(v), order="C")  # keeps 0-d arrays 0-d
    return safetensors.numpy.save(tensors, metadata=dict(metadata) if metadata else None)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The dict of numpy arrays stored in safetensors file ``path``."""
    return safetensors.numpy.load_file(os.fspath(path))


def safetensors_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """The dict of numpy arrays in the safetensors file ``data`` (bytes)."""
    return safetensors.numpy.load(data)
