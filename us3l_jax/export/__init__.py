"""Compact sub-networks and torch-layout weights.

* ``slice_to_width``: the plain network a slimmable backbone is at one width, with its variables
  (the leading channels of every parameter and BN statistic).
* ``to_torch_state_dict`` / ``from_torch_state_dict``: torchvision key names and layouts (OIHW
  convs, (out, in) linear weights, BN running statistics), so sub-networks go to PyTorch
  detection frameworks and torchvision ImageNet weights load into our ResNets. No torch needed.
* ``save_safetensors`` / ``load_safetensors``: atomic safetensors files of such dicts.

torchvision ImageNet weights (a ``.pth``) need one step in a PyTorch environment first, e.g.
``safetensors.torch.save_file(torchvision.models.resnet50(weights=...).state_dict(), f)``;
then ``from_torch_state_dict("resnet50", load_safetensors(f))``.
"""
from __future__ import annotations

import functools
import math
import os
import re

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util

from us3l_jax import fileio, models
from us3l_jax.models.mobilenet_v2 import MobileNetV2
from us3l_jax.models.plain import PlainMobileNetV2, plain_network
from us3l_jax.models.vit import VisionTransformer
from us3l_jax.slim import slice_leading

COLLECTIONS = ("params", "batch_stats")
# Stem / classifier weights per family: our layer names and torchvision keys.
_STEM = {"resnet": "conv1", "mobilenet_v2": "stem_conv", "vit": "patch_embed"}
_HEAD = {"resnet": "fc", "mobilenet_v2": "classifier", "vit": "head"}
_TORCH_STEM = {"resnet": "conv1.weight", "mobilenet_v2": "features.0.0.weight",
               "vit": "patch_embed.proj.weight"}
_TORCH_HEAD = {"resnet": "fc.weight", "mobilenet_v2": "classifier.1.weight",
               "vit": "head.weight"}
# Shape-only probe input: large enough for every stride pattern (ImageNet ResNet: 32 -> 1).
_PROBE_SIZE = 32

Variables = dict[str, Any]

def _family(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer):
        return "vit"
    return "mobilenet_v2" if isinstance(model, (MobileNetV2, PlainMobileNetV2)) else "resnet"

def _build(name: str, model_kw: Mapping[str, Any],
           head_out: Callable[[str], int | None]) -> nn.Module:
    """``models.create(name, **model_kw)``; ``num_classes`` defaults to ``head_out(family)``,
    the classes found in the weights being converted (None when they have no classifier)."""
    kw = dict(model_kw)
    explicit = "num_classes" in kw
    num_classes = kw.pop("num_classes", None)
    model = models.create(name, **kw)
    return model.clone(num_classes=num_classes if explicit else head_out(_family(model)))

@functools.lru_cache(maxsize=64)
def _abstract(module: nn.Module, in_channels: int, width: float | None = None) -> Variables:
    """Shapes of ``module``'s params and batch_stats (traced, nothing allocated; cached, as
    linen modules compare and hash by their attributes). Do not mutate the result."""
    call_kw = {} if width is None else {"width": width}
    x = jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, in_channels), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False, **call_kw),
                          x)

def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}

def _path(key: tuple[str, ...]) -> str:
    return "/".join(key)

def _check_keys(what: str, got, expected) -> None:
    """Raises ``ValueError`` listing missing and unexpected keys (paths or strings)."""
    def fmt(ks: list) -> str:
        names = [k if isinstance(k, str) else _path(k) for k in ks]
        more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
        return ", ".join(names[:8]) + more

    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    parts = ([f"missing {fmt(missing)}"] if missing else []) + \
            ([f"unexpected {fmt(extra)}"] if extra else [])
    if parts:
        raise ValueError(f"{what}: {'; '.join(parts)}")

def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a leaf in torch layout (see ``_to_torch_leaf``)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)

def slice_to_width(name: str, variables: Mapping[str, Any], width: float,
                   **model_kw: Any) -> tuple[nn.Module, Variables]:
    """The plain network of ``width`` and its variables, sliced from slimmable ``variables``.

    ``variables`` are the full-size variables of ``models.create(name, **model_kw)``: ``params``
    and optionally ``batch_stats`` (calibrated statistics for this width); the result has the
    same collections. ``num_classes`` defaults to the classifier size found in ``variables``.
    ``plain.apply(sliced, x, train=t)`` equals ``model.apply(variables, x, width=width,
    train=t)``. Raises ``ValueError`` for an unknown name, a width outside the model's range,
    unknown collections, or missing/extra/misshaped variables (naming them).
    """
    variables = _check_collections(variables)
    params = _flat(variables["params"])
    model = _build(name, model_kw, lambda fam: (
        int(np.shape(params[(_HEAD[fam], "kernel")])[1]) if (_HEAD[fam], "kernel") in params
        else None))
    return _slice(name, model, variables, width)


def slice_module(model: nn.Module, variables: Mapping[str, Any],
                 width: float) -> tuple[nn.Module, Variables]:
    """``slice_to_width`` for a slimmable ``model`` already built (e.g. by
    ``build.backbone``), so its exact keywords (dtype, BN group size) carry over."""
    return _slice(type(model).__name__, model, _check_collections(variables), width)


def _check_collections(variables: Mapping[str, Any]) -> Variables:
    variables = dict(variables)
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown or "params" not in variables:
        raise ValueError(f"variables must hold 'params' and optionally 'batch_stats'; got "
                         f"collections {sorted(variables)}")
    return variables


def _slice(name: str, model: nn.Module, variables: Variables,
           width: float) -> tuple[nn.Module, Variables]:
    plain = plain_network(model, width)
    stem = _flat(variables["params"]).get((_STEM[_family(model)], "kernel"))
    in_ch = 3 if stem is None else int(np.shape(stem)[2])
    full = _abstract(model, in_ch, width=1.0)
    target = _abstract(plain, in_ch)
    out = {}
    for col, tree in variables.items():
        got, exp = _flat(tree), _flat(full[col])
        _check_keys(f"{name} {col}", got, exp)
        for k, v in got.items():
            if tuple(np.shape(v)) != exp[k].shape:
                raise ValueError(f"{name} {col} {_path(k)}: shape {tuple(np.shape(v))}, "
                                 f"the model expects {exp[k].shape} (check model_kw)")
        tgt = _flat(target[col])
        out[col] = traverse_util.unflatten_dict(
            {k: slice_leading(v, tgt[k].shape) for k, v in got.items()})
    return plain, out

# ------------------------------------------------------------------------------------------
# torchvision names and layouts
# ------------------------------------------------------------------------------------------

# MobileNetV2 block layers -> torchvision ``features.{i}.conv.*`` (with / without expansion).
_MBV2_EXPAND = {"expand_conv": "0.0", "expand_bn": "0.1", "dw_conv": "1.0", "dw_bn": "1.1",
                "project_conv": "2", "project_bn": "3"}
_MBV2_NO_EXPAND = {"dw_conv": "0.0", "dw_bn": "0.1", "project_conv": "1", "project_bn": "2"}
_RESNET_SUB = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}

def _torch_layer(family: str, layer: tuple[str, ...], params: Mapping[str, Any]) -> str:
    """torchvision module name of our layer path, e.g. ('layer1_0', 'downsample_conv') ->
    'layer1.0.downsample.0', ('block3', 'dw_conv') -> 'features.4.conv.1.0'."""
    if family == "resnet":
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

def _to_torch_leaf(a: np.ndarray) -> np.ndarray:
    """HWIO conv -> OIHW (depthwise (kh,kw,1,C) -> (C,1,kh,kw)); (in,out) dense -> (out,in)."""
    if a.ndim == 4:
        return np.transpose(a, (3, 2, 0, 1))
    return a.T if a.ndim == 2 else a

def _from_torch_leaf(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return np.transpose(a, (2, 3, 1, 0))
    return a.T if a.ndim == 2 else a

_TORCH_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
               "var": "running_var"}

def _torch_entries(family: str, variables: Variables) -> list[tuple[str, tuple[str, ...], str]]:
    """(collection, our leaf path, torchvision key) for every leaf of ``variables``."""
    params = variables["params"]
    return [(col, k, f"{_torch_layer(family, k[:-1], params)}.{_TORCH_LEAF[k[-1]]}")
            for col in COLLECTIONS for k in _flat(variables.get(col, {}))]

def _bn_prefixes(family: str, variables: Variables) -> list[str]:
    """torchvision names of the BN layers (those with a ``scale``)."""
    params = variables["params"]
    return [_torch_layer(family, k[:-1], params) for k in _flat(params) if k[-1] == "scale"]

def to_torch_state_dict(name: str, variables: Mapping[str, Any], width: float = 1.0,
                        **model_kw: Any) -> dict[str, np.ndarray]:
    """torchvision-style state dict of the network at ``width`` (numpy arrays, no torch).

    ResNets use torchvision ``resnet*`` names (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ``layer1.0.downsample.0/1``, ``fc``), also for the CIFAR variants; MobileNetV2 uses
    torchvision ``mobilenet_v2`` names (``features.0.0``, ``features.{i}.conv.*``,
    ``features.18.0/1``, ``classifier.1``). Convs are OIHW (depthwise (C, 1, kh, kw)), linear
    weights (out, in). BN ``running_mean``/``running_var`` come from ``variables['batch_stats']``
    (sliced to the width); **without batch_stats they are written as mean 0 / var 1**, i.e.
    uncalibrated. ``num_batches_tracked`` is written as 0 (PyTorch only reads it when BN
    momentum is None). Everything is sliced to ``width`` as in ``slice_to_width``.
    """
    return plain_to_torch_state_dict(*slice_to_width(name, variables, width, **model_kw))


def plain_to_torch_state_dict(plain: nn.Module, sliced: Mapping[str, Any]
                              ) -> dict[str, np.ndarray]:
    """``to_torch_state_dict`` of a plain network and its (sliced) variables, e.g. from
    ``slice_module``."""
    family = _family(plain)
    if family == "vit":
        return _vit_to_torch(plain, sliced)
    flat = {col: _flat(tree) for col, tree in sliced.items()}
    sd = {tkey: np.ascontiguousarray(_to_torch_leaf(np.asarray(jax.device_get(flat[col][k]))))
          for col, k, tkey in _torch_entries(family, sliced)}
    for prefix in _bn_prefixes(family, sliced):
        c = sd[f"{prefix}.weight"].shape[0]
        sd.setdefault(f"{prefix}.running_mean", np.zeros((c,), np.float32))
        sd.setdefault(f"{prefix}.running_var", np.ones((c,), np.float32))
        sd[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
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
    model = _build(name, model_kw, lambda fam: (
        int(np.shape(sd[_TORCH_HEAD[fam]])[0]) if _TORCH_HEAD[fam] in sd else None))
    return _plain_from_torch(f"{name} state dict", plain_network(model, width), sd,
                             f" at width {width}")


def plain_from_torch_state_dict(plain: nn.Module, state_dict: Mapping[str, Any]) -> Variables:
    """``from_torch_state_dict`` for the plain network ``plain`` (the inverse of
    ``plain_to_torch_state_dict``): its variables, numpy float32."""
    return _plain_from_torch("state dict", plain, dict(state_dict), "")


def _plain_from_torch(what: str, plain: nn.Module, sd: dict[str, Any], at: str) -> Variables:
    family = _family(plain)
    if family == "vit":
        return _vit_from_torch(what + at, plain, sd)
    stem = sd.get(_TORCH_STEM[family])
    in_ch = 3 if stem is None else int(np.shape(stem)[1])
    abstract = _abstract(plain, in_ch)
    entries = _torch_entries(family, abstract)
    optional = {f"{p}.num_batches_tracked" for p in _bn_prefixes(family, abstract)}
    _check_keys(what + at, set(sd) - optional, [tkey for _, _, tkey in entries])
    shapes = {col: _flat(tree) for col, tree in abstract.items()}
    flat: dict[str, dict] = {col: {} for col in abstract}
    for col, k, tkey in entries:
        a = np.asarray(sd[tkey])
        expected = _torch_shape(shapes[col][k].shape)
        if a.shape != expected:
            raise ValueError(f"{what} key {tkey!r}: shape {a.shape}, expected "
                             f"{expected}{at} (was it exported at another "
                             "width or with other model_kw?)")
        flat[col][k] = np.ascontiguousarray(_from_torch_leaf(a).astype(np.float32))
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
    return a if k == ("cls_token",) else _to_torch_leaf(a)


def _vit_pos_embed(plain: nn.Module) -> np.ndarray:
    from us3l_jax.models.vit import sincos_pos_embed
    g = plain.image_size // plain.patch_size
    return sincos_pos_embed(g, g, plain.dim)[None]


def _vit_to_torch(plain: nn.Module, sliced: Mapping[str, Any]) -> dict[str, np.ndarray]:
    sd = {_vit_torch_key(k): np.ascontiguousarray(
        _vit_leaf_to_torch(k, np.asarray(jax.device_get(v))))
        for k, v in _flat(sliced["params"]).items()}
    sd["pos_embed"] = _vit_pos_embed(plain)
    return sd


def _vit_from_torch(what: str, plain: nn.Module, sd: dict[str, Any]) -> Variables:
    abstract = _flat(_abstract(plain, int(np.shape(sd.get(_TORCH_STEM["vit"], [0, 3]))[1]))
                     ["params"])
    keys = {_vit_torch_key(k): k for k in abstract}
    _check_keys(what, set(sd), list(keys) + ["pos_embed"])
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
            a = _from_torch_leaf(a)
        if a.shape != shape:
            raise ValueError(f"{what} key {tkey!r}: shape {np.shape(sd[tkey])} does not fit "
                             f"{shape} (was it exported at another width or size?)")
        flat[k] = np.ascontiguousarray(a)
    return {"params": traverse_util.unflatten_dict(flat)}


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
