"""Files a sub-network is shipped as, and how each is read back (to verify it).

Every exported model computes the BN-folded plain network of one width (``fold.py``):

* input ``images``: float32, NHWC ``(batch, size, size, 3)`` with a **dynamic batch** (the
  symbolic dimension ``batch`` in both ONNX and StableHLO: any batch size runs), **already
  normalised** as in the
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

import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
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
# The batch dimension's name in both files: any batch size runs.
BATCH = "batch"
# What writing and checking a format imports that JAX and flax do not bring: ONNX needs the
# [export] extra; jax.export's serialization needs flatbuffers (a core dependency of ours,
# which an install with --no-deps or into a prepared image may still lack).
REQUIRES = {"onnx": ("jax2onnx", "onnxruntime"), "stablehlo": ("flatbuffers",), "torch": (),
            "flax": ()}
EXTRA_HINT = "pip install 'us3l_jax[export]' (from a checkout: pip install -e \".[export]\")"


def install_hint(modules: Sequence[str]) -> str:
    """How to install ``modules``: the [export] extra for ONNX's, else by name."""
    if set(modules) & set(REQUIRES["onnx"]):
        return EXTRA_HINT
    return "pip install " + " ".join(modules)

Fn = Callable[[jax.Array], jax.Array]


def missing(fmt: str) -> list[str]:
    """The modules ``fmt`` needs that are not installed (found without importing them)."""
    return [m for m in REQUIRES[fmt] if importlib.util.find_spec(m) is None]


def available_formats() -> list[str]:
    """The formats whose dependencies are installed, in ``FORMATS`` order."""
    return [f for f in FORMATS if not missing(f)]


def check_formats(text: str) -> list[str]:
    """``'onnx,torch'`` -> ``['onnx', 'torch']``. ``ValueError`` naming an unknown format, or
    a requested format whose dependencies are not installed (so that nothing is computed
    before a failing import)."""
    items = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in items if f not in FORMATS]
    if unknown or not items:
        raise ValueError(f"unknown format {(unknown or [text])[0]!r}; valid: "
                         f"{', '.join(FORMATS)} (comma-separated)")
    for f in items:
        if missing(f):
            raise ValueError(f"format {f!r} needs {', '.join(missing(f))}, not installed: "
                             f"{install_hint(missing(f))}, or leave {f} out of --format")
    return list(dict.fromkeys(items))


def default_formats() -> tuple[list[str], str | None]:
    """``(formats, note)``: every format whose dependencies are installed, and a line saying
    which were left out and why (None when none were)."""
    left_out = [f for f in FORMATS if missing(f)]
    if not left_out:
        return list(FORMATS), None
    needs = sorted({m for f in left_out for m in missing(f)})
    hints = "; ".join(dict.fromkeys(install_hint(missing(f)) for f in left_out))
    return available_formats(), (
        f"note: not exporting {', '.join(left_out)}: {', '.join(needs)} not installed "
        f"({hints})")


def input_spec(input_shape: Sequence[int | None]) -> jax.ShapeDtypeStruct:
    """float32 spec of ``input_shape``; a leading None becomes the symbolic ``batch``."""
    if input_shape[0] is None:
        dims = ", ".join([BATCH] + [str(int(d)) for d in input_shape[1:]])
        return jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), jnp.float32)
    return jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)


def onnx_bytes(fn: Fn, input_shape: Sequence[int | None], name: str = "us3l") -> bytes:
    """The ONNX model (opset 23) of ``fn`` on a float32 input of ``input_shape``; a leading
    None is the dynamic axis ``batch``."""
    # jax2onnx imports every plugin; its dm_pix ones (unused by our networks) fail under this
    # JAX and log tracebacks that would read as an export failure.
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.CRITICAL)
    # onnx_ir warns of untyped shape constants (a ViT's reshapes); the file is checked anyway.
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    from jax2onnx import to_onnx

    shape = tuple(BATCH if d is None else int(d) for d in input_shape)
    proto = to_onnx(fn, [shape], model_name=name,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    return proto.SerializeToString()


def run_onnx(data: bytes, x: np.ndarray) -> np.ndarray:
    """``data``'s output on ``x`` with onnxruntime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(x, np.float32)})[0]


def stablehlo_bytes(fn: Fn, input_shape: Sequence[int | None]) -> bytes:
    """Serialized ``jax.export`` artifact of ``fn`` (weights embedded as constants); a leading
    None in ``input_shape`` is the symbolic dimension ``batch``."""
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(input_spec(input_shape))
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
