"""Exporting one width of a pretraining run, and the table a user picks a width from.

``export_run`` resolves the width (given, or the widest that fits a budget), loads the
checkpoint, takes that width's calibrated BN statistics (stored next to the checkpoint, or
calibrated now exactly as ``python -m us3l_jax.evaluate`` does), folds BN into the convs,
writes the requested files into a temporary directory, checks each against the JAX model,
and renames the directory to ``out``: a failed export leaves nothing behind.
``width_table`` measures every distinct width of the run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from us3l_jax import build, calibration as calib, checkpointing, config as config_lib, fileio
from us3l_jax.evaluate import transforms
from us3l_jax.evaluate.evaluator import Evaluator, calibration_settings, check_width
from us3l_jax.export import artifacts
from us3l_jax.export import widths as widths_lib
from us3l_jax.export.fold import fold_batchnorm
from us3l_jax.models.plain import plain_network, slice_module
from us3l_jax.torch_layout import (plain_from_torch_state_dict, plain_to_torch_state_dict,
                                   safetensors_bytes, safetensors_from_bytes)

log = logging.getLogger(__name__)
CARD = "model_card.json"
SWEEP = "sweep.json"
TABLE_FILES = ("width_table.json", "width_table.png")
# Verification input: a fixed batch of standard-normal images (normalised inputs have unit
# scale); agreement to this relative tolerance of the output's largest magnitude is required.
VERIFY_SEED, VERIFY_RTOL = 0, 1e-4

Echo = Callable[[str], None] | None


def check_out(out: str) -> str:
    """``out`` as an absolute path that can become the export directory: new, or an empty
    directory. ``ValueError`` for an existing file or a non-empty directory."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {out!r} is an existing file; give a new or empty directory")
    if os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"--out {out!r} is a directory that is not empty; give a new or "
                         "empty directory (nothing is overwritten)")
    return path


def image_size(config: ml_collections.ConfigDict, size: int | None = None) -> int:
    """The side of the exported input: ``size``, else the run's evaluation crop."""
    if size is None:
        return transforms.for_run(config).size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"--image-size must be a positive integer, got {size!r}")
    return size


def read_sweep(workdir: str) -> list[dict[str, Any]]:
    """Records of ``<workdir>/sweep.json`` (the evaluate CLI's report), [] if there is none."""
    path = os.path.join(workdir, SWEEP)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def _calibrated(config: ml_collections.ConfigDict, params: Any, width: float, workdir: str,
                step: int, calibration_batches: int | None) -> tuple[Any, dict[str, Any], bool]:
    """``(batch_stats, meta, reused)`` of ``width``: the stored statistics when they were made
    with the run's calibration settings, else calibrated now (and stored) by the evaluator."""
    settings = calibration_settings(config, calibration_batches)
    meta = calib.settings_meta(settings, width, step, config.data.dataset)
    stored = calib.load_stats(calib.stats_path(workdir, step, width))
    if stored is not None and stored[1] == meta:
        return stored[0], meta, True
    # Only now is the dataset loaded: exporting a calibrated width needs no data.
    stats, reused = Evaluator(config).calibrated(params, width, settings, workdir, step)
    return stats, meta, reused


def _backbone(config: ml_collections.ConfigDict) -> nn.Module:
    """The run's backbone computing in float32 whatever its training dtype: exported files
    are float32 (parameters always are), and verified against float32 JAX to 1e-4."""
    return build.backbone(config, dtype=jnp.float32)


def _channels(folded_params: Mapping[str, Any]) -> dict[str, int]:
    """Output channels of every conv (its path -> count), in parameter order."""
    flat = traverse_util.flatten_dict(dict(folded_params))
    return {"/".join(k[:-1]): int(np.shape(v)[-1]) for k, v in flat.items()
            if k[-1] == "kernel"}


def _num_params(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _resolve_width(config, backbone: nn.Module, params: Any, width: Any,
                   budget: tuple[str, float] | None, size: int, batch: int,
                   repeats: int) -> tuple[float, dict[str, Any] | None]:
    """The width to export and, for a budget, what the pick was made from."""
    if (width is None) == (budget is None):
        raise ValueError("give exactly one of --width, --max-macs, --max-params, "
                         "--max-latency-ms")
    if budget is None:
        return check_width(config, width), None
    key, limit = budget
    rows = widths_lib.table(backbone, params, config.sampler.width_range[0], size, batch,
                            measure=False)
    if key == "latency_ms":
        row, measured = widths_lib.pick_measured(rows, limit, lambda w: widths_lib.latency(
            backbone, params, w, batch, size, repeats=repeats))
    else:
        row, measured = widths_lib.pick(rows, key, limit), 0
    return row.width, {"max_" + key: limit, "picked": row.width, "candidates": len(rows),
                       "latency_measured": measured, key: row.value(key)}


def _serialize(formats: Sequence[str], folded: nn.Module, folded_vars: Any, plain: nn.Module,
               sliced: Any, x: jax.Array, name: str
               ) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The bytes of each requested format and each file's output on ``x``, read back the way
    a user would (the torch file through our torchvision-key reader, as torch is optional)."""
    def fn(x):
        return folded.apply(folded_vars, x, train=False)

    files: dict[str, bytes] = {}
    outputs: dict[str, np.ndarray] = {}
    if "onnx" in formats:
        files["onnx"] = artifacts.onnx_bytes(fn, tuple(x.shape), name=name)
        outputs["onnx"] = artifacts.run_onnx(files["onnx"], np.asarray(x))
    if "stablehlo" in formats:
        files["stablehlo"] = artifacts.stablehlo_bytes(fn, tuple(x.shape))
        outputs["stablehlo"] = artifacts.run_stablehlo(files["stablehlo"], np.asarray(x))
    if "flax" in formats:
        files["flax"] = artifacts.flax_bytes(sliced)
        outputs["flax"] = np.asarray(plain.apply(artifacts.load_flax_variables(files["flax"]),
                                                 x, train=False))
    if "torch" in formats:
        files["torch"] = safetensors_bytes(plain_to_torch_state_dict(plain, sliced),
                                           {"model": name})
        torch_vars = plain_from_torch_state_dict(
            plain, safetensors_from_bytes(files["torch"]))
        outputs["torch"] = np.asarray(plain.apply(torch_vars, x, train=False))
    return files, outputs


def _verify(outputs: Mapping[str, np.ndarray], reference: np.ndarray) -> dict[str, float]:
    """Max abs difference of each output from ``reference``; ``RuntimeError`` (nothing is
    written) when one exceeds ``VERIFY_RTOL`` of the reference's largest magnitude."""
    diffs = {k: artifacts.max_abs_diff(v, reference) for k, v in outputs.items()}
    scale = float(np.max(np.abs(reference)))
    bad = {k: d for k, d in diffs.items() if d > VERIFY_RTOL * scale}
    if bad:
        raise RuntimeError(f"exported {', '.join(bad)} disagree with the JAX model: max abs "
                           f"diff {bad} > {VERIFY_RTOL} x {scale:.3g}")
    return diffs


def export_run(workdir: str, out: str, width: float | None = None,
               budget: tuple[str, float] | None = None,
               formats: Sequence[str] = artifacts.FORMATS, batch: int = 1,
               size: int | None = None, step: int | None = None,
               calibration_batches: int | None = None, repeats: int = 20,
               echo: Echo = print) -> dict[str, Any]:
    """Exports one width of run ``workdir`` into directory ``out``; returns the model card.

    Args:
      width: the width to export, or None with ``budget = (key, limit)`` where key is
        ``macs``, ``params`` or ``latency_ms``: the widest distinct width within the limit.
      formats: a subset of ``artifacts.FORMATS``; the card is always written.
      batch / size: the exported input is ``(batch, size, size, 3)``; latency is measured at
        it; size defaults to the run's evaluation crop.
      step: checkpoint (default latest); calibration_batches: instead of the run's setting.
    Raises ``ValueError`` / ``CheckpointError`` for bad arguments before anything is written.
    """
    t0 = time.perf_counter()
    formats = artifacts.check_formats(",".join(formats))
    out = check_out(out)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {batch!r}")
    config = checkpointing.read_config(workdir)
    if width is not None:
        check_width(config, width)
    size = image_size(config, size)
    pre = checkpointing.load_pretrained(workdir, step, abstract_state=build.abstract_state)
    backbone = _backbone(config)
    params = pre.params["backbone"]
    width, picked = _resolve_width(config, backbone, params, width, budget, size, batch,
                                   repeats)
    stats, calib_meta, reused = _calibrated(config, params, width, workdir, pre.step,
                                            calibration_batches)
    plain, sliced = slice_module(backbone, {"params": params, "batch_stats": stats}, width)
    folded, folded_vars = fold_batchnorm(plain, sliced)

    shape = (batch, size, size, 3)
    run_folded = widths_lib.eval_fn(folded)
    latency_ms = widths_lib.measure_latency(run_folded, folded_vars,
                                            jnp.zeros(shape, jnp.float32), repeats=repeats)
    x = jax.random.normal(jax.random.key(VERIFY_SEED), shape, jnp.float32)
    reference = np.asarray(jax.jit(lambda x: backbone.apply(
        {"params": params, "batch_stats": stats}, x, width=width, train=False))(x))
    files, outputs = _serialize(formats, folded, folded_vars, plain, sliced, x,
                                f"{config.model.name}_w{width}")
    outputs["folded"] = np.asarray(run_folded(folded_vars, x))
    diffs = _verify(outputs, reference)
    cost = widths_lib.costs(backbone, width, size)
    accuracy = widths_lib.sweep_accuracy(backbone, read_sweep(workdir)).get(
        tuple(backbone.channel_config(width)), {})
    eval_view = transforms.for_run(config).eval_view
    card = {
        "model": config.model.name, "width": width, "budget": picked,
        "channel_config": list(backbone.channel_config(width)),
        "channels": _channels(folded_vars["params"]),
        "params": cost["params"], "macs": cost["macs"],
        "cost_convention": "us3l_jax.profile 'backbone': params = conv + BN affine, MACs = "
                           f"conv, for one {size}x{size} image",
        "folded_params": _num_params(folded_vars),
        "latency_ms": {"median": round(latency_ms, 4), "batch": batch, "repeats": repeats,
                       "device": widths_lib.device_name()},
        "probe_accuracy": accuracy,
        "input": {"name": artifacts.INPUT_NAME, "shape": list(shape), "layout": "NHWC",
                  "dtype": "float32", "normalisation": "not included: feed "
                  "(pixel / 255 - mean) / std after resize + center crop",
                  "resize": eval_view.resize, "crop": eval_view.crop,
                  "interpolation": eval_view.interpolation, "mean": list(eval_view.mean),
                  "std": list(eval_view.std)},
        "output": {"name": artifacts.OUTPUT_NAME, "shape": [batch, int(reference.shape[-1])],
                   "dtype": "float32", "what": "global-average-pooled backbone features "
                   "(no classifier)"},
        "compute_dtype": "float32", "training_compute_dtype": config.model.dtype,
        "batchnorm": {"folded_into_convs": True, "calibration": calib_meta,
                      "calibration_reused": reused},
        "max_abs_diff_vs_jax": {k: float(f"{d:.3g}") for k, d in diffs.items()},
        "source": {"workdir": os.path.abspath(workdir), "step": pre.step,
                   "config_identity": checkpointing.identity(config),
                   "config": json.loads(config_lib.to_json(config))},
        "files": {},
    }
    _write_dir(out, files, card)
    if echo is not None:
        echo(f"exported {config.model.name} width {width} ({cost['params']:,} params, "
             f"{cost['macs']:,} MACs, {latency_ms:.3f} ms at batch {batch} on "
             f"{widths_lib.device_name()}) to {out} in {time.perf_counter() - t0:.1f}s: "
             + ", ".join(f"{f} {n:,} B" for f, n in
                         ((f, card["files"][f]["bytes"]) for f in card["files"])))
    return card


_WHAT = {"onnx": "ONNX model (onnxruntime), BN folded",
         "stablehlo": "serialized jax.export artifact (jax.export.deserialize(...).call(x)), "
                      "BN folded",
         "torch": "torchvision-keyed state dict (safetensors), BN unfolded with calibrated "
                  "running statistics",
         "flax": "msgpack of the plain network's params and batch_stats (unfolded); "
                 "us3l_jax.export.command.load_flax"}


def _write_dir(out: str, files: dict[str, bytes], card: dict[str, Any]) -> None:
    """Writes the files and the card into a temporary sibling of ``out``, then renames it."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=parent)
    try:
        for fmt, data in files.items():
            fileio.atomic_write_bytes(os.path.join(tmp, artifacts.FILES[fmt]), data)
        for fmt in artifacts.FORMATS:
            path = os.path.join(tmp, artifacts.FILES[fmt])
            if os.path.exists(path):
                card["files"][artifacts.FILES[fmt]] = {"bytes": os.path.getsize(path),
                                                       "what": _WHAT[fmt]}
        fileio.atomic_write_text(os.path.join(tmp, CARD), json.dumps(card, indent=2) + "\n")
        # mkdtemp makes the folder private; the export is not (files get fileio's modes).
        os.chmod(tmp, 0o777 & ~fileio.current_umask())
        if os.path.isdir(out):
            os.rmdir(out)  # empty (check_out); a rename cannot replace a directory otherwise
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_flax(directory: str) -> tuple[nn.Module, dict[str, Any]]:
    """``(plain network, variables)`` of an export's ``model.msgpack``: apply it as
    ``plain.apply(variables, x, train=False)``, or fold it (``fold.fold_batchnorm``)."""
    with open(os.path.join(directory, CARD)) as f:
        card = json.load(f)
    with open(os.path.join(directory, artifacts.FILES["flax"]), "rb") as f:
        variables = artifacts.load_flax_variables(f.read())
    config = config_lib.from_json(json.dumps(card["source"]["config"]))
    return plain_network(_backbone(config), card["width"]), variables


def width_table(workdir: str, out: str | None = None, batch: int = 1, size: int | None = None,
                step: int | None = None, repeats: int = 20,
                echo: Echo = print) -> list[widths_lib.Row]:
    """Params, MACs, measured latency and (with a ``sweep.json``) probe accuracy of every
    distinct width of run ``workdir``; printed and written as ``width_table.json/.png`` into
    ``out`` (default ``workdir``). Returns the rows, narrowest first."""
    config = checkpointing.read_config(workdir)
    size = image_size(config, size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {batch!r}")
    out = out or workdir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file; give a directory")
    pre = checkpointing.load_pretrained(workdir, step, abstract_state=build.abstract_state)
    backbone = _backbone(config)
    accuracy = widths_lib.sweep_accuracy(backbone, read_sweep(workdir))
    rows = widths_lib.table(backbone, pre.params["backbone"], config.sampler.width_range[0],
                            size, batch, accuracy, repeats=repeats)
    device = widths_lib.device_name()
    title = (f"{config.model.name} step {pre.step}, {size}px input, batch {batch}, "
             f"latency on {device}")
    records = [{"width": r.width, "channel_config": list(r.channels), "params": r.params,
                "macs": r.macs, "latency_ms": round(r.latency_ms, 4), "batch": batch,
                "device": device, "probe_accuracy": dict(r.accuracy)} for r in rows]
    paths = [os.path.join(out, f) for f in TABLE_FILES]
    fileio.atomic_write_text(paths[0], json.dumps(records, indent=2) + "\n")
    fileio.atomic_write_bytes(paths[1], widths_lib.plot_rows(rows, title))
    if echo is not None:
        echo(title)
        echo(widths_lib.format_rows(rows, device, batch))
        echo("wrote " + ", ".join(paths))
    return rows
