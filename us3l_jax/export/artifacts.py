"""Files a sub-network is shipped as, and how each is read back (to verify it).

Every exported model computes the BN-folded plain network of one width (``fold.py``):

* input ``images``: float32, NHWC ``(batch, size, size, 3)``, **already normalised** as in the
  run's evaluation (``(pixel / 255 - mean) / std`` after resize + center crop; the values are
  in ``model_card.json``): normalisation is not part of the model.
* output ``features``: float32 ``(batch, C)``, the globally average-pooled backbone features
  (no classifier: a self-supervised backbone has none), C = the width's last channel count.

Formats: ``onnx`` (jax2onnx; run with onnxruntime), ``stablehlo`` (a serialized
``jax.export.Exported``: ``jax.export.deserialize(data).call(x)`` with plain JAX, lowered for
CPU, CUDA and TPU), ``torch`` (safetensors with torchvision keys, *unfolded*: torchvision
layers have BN, so the calibrated running statistics are stored instead), ``flax`` (msgpack
of the compact, unfolded ``params`` and ``batch_stats`` of the plain network; ``load_flax``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("onnx", "stablehlo", "torch", "flax")
FILES = {"onnx": "model.onnx", "stablehlo": "model.stablehlo", "torch": "model.safetensors",
         "flax": "model.msgpack"}
INPUT_NAME, OUTPUT_NAME = "images", "features"
# StableHLO is lowered for every platform so the file runs wherever JAX does.
PLATFORMS = ("cpu", "cuda", "tpu")

Fn = Callable[[jax.Array], jax.Array]


def check_formats(text: str) -> list[str]:
    """``'onnx,torch'`` -> ``['onnx', 'torch']``; ``ValueError`` naming an unknown format."""
    items = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in items if f not in FORMATS]
    if unknown or not items:
        raise ValueError(f"unknown format {(unknown or [text])[0]!r}; valid: "
                         f"{', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(items))


def onnx_bytes(fn: Fn, input_shape: tuple[int, ...], name: str = "us3l") -> bytes:
    """The ONNX model (opset 23) of ``fn`` on a float32 input of ``input_shape``."""
    # jax2onnx imports every plugin; its dm_pix ones (unused by our networks) fail under this
    # JAX and log tracebacks that would read as an export failure.
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.CRITICAL)
    from jax2onnx import to_onnx

    proto = to_onnx(fn, [jax.ShapeDtypeStruct(input_shape, jnp.float32)], model_name=name,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    return proto.SerializeToString()


def run_onnx(data: bytes, x: np.ndarray) -> np.ndarray:
    """``data``'s output on ``x`` with onnxruntime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(x, np.float32)})[0]


def stablehlo_bytes(fn: Fn, input_shape: tuple[int, ...]) -> bytes:
    """Serialized ``jax.export`` artifact of ``fn`` (weights embedded as constants)."""
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(
        jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return bytes(exported.serialize())


def run_stablehlo(data: bytes, x: np.ndarray) -> np.ndarray:
    """``data``'s output on ``x``, deserialized and called with plain JAX."""
    return np.asarray(jax.export.deserialize(bytearray(data)).call(jnp.asarray(x, jnp.float32)))


def flax_bytes(variables: Mapping[str, Any]) -> bytes:
    """msgpack of ``variables`` (numpy leaves)."""
    return flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(variables)))


def load_flax_variables(data: bytes) -> dict[str, Any]:
    return flax.serialization.msgpack_restore(data)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b)))
