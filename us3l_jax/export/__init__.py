"""Using one width of a run outside it: compact sub-networks, BN folding and files.

* ``command``: the export CLI's work (``python -m us3l_jax.export``): the width table, budget
  search, calibration, and the files (ONNX, StableHLO, torch safetensors, Flax msgpack);
* ``widths``: distinct sub-networks, params / MACs / latency; ``fold``: BN folded into convs;
  ``artifacts``: ONNX and StableHLO serialisation; ``torch_model``: the plain-PyTorch
  builder written beside ``model.safetensors`` as ``model.py``;
* ``api``: using a width in code, ``export.load(workdir).at(width)(images)`` (``load``, ``Run``
  and ``Width`` are importable from here; they load on first use, so that importing this
  package stays light).

The functions it is built on live in the layers below and are re-exported here as the
export API: ``slice_to_width`` / ``slice_module`` (the plain network of a width and its
variables, ``us3l_jax.models.plain``) and the torch layouts (``to_torch_state_dict``,
``from_torch_state_dict``, safetensors files; ``us3l_jax.torch_layout``).
"""
from us3l_jax.models.plain import COLLECTIONS, slice_module, slice_to_width
from us3l_jax.torch_layout import (from_torch_state_dict, load_safetensors, moco_v3_backbone,
                                   plain_from_torch_state_dict, plain_to_torch_state_dict,
                                   safetensors_bytes, save_safetensors, to_torch_state_dict)

_API = ("load", "Run", "Width")


def __getattr__(name: str):
    if name in _API:  # deferred: the API imports checkpointing and evaluation
        from us3l_jax.export import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["COLLECTIONS", "Run", "Width", "from_torch_state_dict", "load", "load_safetensors",
           "moco_v3_backbone", "plain_from_torch_state_dict", "plain_to_torch_state_dict",
           "safetensors_bytes", "save_safetensors", "slice_module", "slice_to_width",
           "to_torch_state_dict"]
