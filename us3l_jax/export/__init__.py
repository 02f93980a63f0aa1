"""Using one width of a run outside it: compact sub-networks, BN folding and files.

* ``command``: the export CLI's work (``python -m us3l_jax.export``): the width table, budget
  search, calibration, and the files (ONNX, StableHLO, torch safetensors, Flax msgpack);
* ``widths``: distinct sub-networks, params / MACs / latency; ``fold``: BN folded into convs;
  ``artifacts``: ONNX and StableHLO serialisation.

The functions it is built on live in the layers below and are re-exported here as the
export API: ``slice_to_width`` / ``slice_module`` (the plain network of a width and its
variables, ``us3l_jax.models.plain``) and the torch layouts (``to_torch_state_dict``,
``from_torch_state_dict``, safetensors files; ``us3l_jax.torch_layout``).
"""
from us3l_jax.models.plain import COLLECTIONS, slice_module, slice_to_width
from us3l_jax.torch_layout import (from_torch_state_dict, load_safetensors, moco_v3_backbone,
                                   plain_from_torch_state_dict, plain_to_torch_state_dict,
                                   safetensors_bytes, save_safetensors, to_torch_state_dict)

__all__ = ["COLLECTIONS", "from_torch_state_dict", "load_safetensors", "moco_v3_backbone",
           "plain_from_torch_state_dict", "plain_to_torch_state_dict", "safetensors_bytes",
           "save_safetensors", "slice_module", "slice_to_width", "to_torch_state_dict"]
