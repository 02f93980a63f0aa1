"""Exporting one width of a pretraining run, and the table a user picks a width from.

``export_run`` resolves the width (given, or the widest that fits a budget), loads the
checkpoint, takes that width's calibrated BN statistics (stored next to the checkpoint, or
calibrated now exactly as ``python -m us3l_jax.evaluate`` does), folds BN into the convs,
writes the requested files into a temporary directory, checks each against the JAX model at
batches 1 and 7 (every file takes any batch size), and renames the directory to ``out``: a
failed export leaves nothing behind. A torch export also gets ``model.py``, a plain-PyTorch
builder (``torch_model``). ``width_table`` measures every distinct width of the run;
``load_width`` gives a width's network and variables to the Python API (``api``).
"""
from __future__ import annotations

import functools
import importlib.util
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
from us3l_jax import paths as path_lib
from us3l_jax.evaluate import transforms
from us3l_jax.evaluate.evaluator import Evaluator, calibration_settings, check_width
from us3l_jax.export import artifacts
from us3l_jax.export import widths as widths_lib
from us3l_jax.export.fold import fold_batchnorm
from us3l_jax.models import mobilenet_v2 as mbv2
from us3l_jax.models.plain import PlainMobileNetV2, PlainResNet, plain_network, slice_module
from us3l_jax.models.vit import LN_EPS, VisionTransformer
from us3l_jax.torch_layout import (plain_from_torch_state_dict, plain_to_torch_state_dict,
                                   safetensors_bytes, safetensors_from_bytes)

log = logging.getLogger(__name__)
CARD = "model_card.json"
SWEEP = "sweep.json"
TABLE_FILES = ("width_table.json", "width_table.png")
TORCH_BUILDER = "model.py"
# Verification input: fixed batches of standard-normal images (normalised inputs have unit
# scale) of each size in VERIFY_BATCHES (the files have a dynamic batch: 1 and a size no
# shape is built for); agreement to this relative tolerance of the output's largest magnitude
# is required.
VERIFY_SEED, VERIFY_RTOL, VERIFY_BATCHES = 0, 1e-4, (1, 7)

Echo = Callable[[str], None] | None


def check_out(out: str) -> str:
    """``out`` as an absolute path that can become the export directory: new, or an empty
    directory, in a folder this process can write (tried by making and removing a directory
    there, so that no work is done for a write that would fail). ``ValueError`` for an
    existing file, a non-empty directory or a folder that cannot be written. Exports are
    local files: a URL (``gs://``) is refused, copy the folder there once it is written."""
    if not path_lib.is_local(out):
        raise ValueError(f"--out {out!r}: exports are written to a local folder; give a local "
                         f"--out and copy it (gcloud storage cp -r <out> {out})")
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {out!r} is an existing file; give a new or empty directory")
    if os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"--out {out!r} is a directory that is not empty; give a new or "
                         "empty directory (nothing is overwritten)")
    _check_writable(os.path.dirname(path), f"--out {out!r}")
    return path


def _check_writable(folder: str, what: str) -> None:
    """``ValueError`` unless a directory can be created in ``folder`` (or, where ``folder``
    does not exist yet, in its nearest existing ancestor); nothing is left behind."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what}: {existing!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".us3l_write_check.", dir=existing))
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {existing!r} ({e.strerror or e}); give a "
                         "folder you can write") from None


def image_size(config: ml_collections.ConfigDict, size: int | None = None) -> int:
    """The side of the exported input: ``size``, else the run's evaluation crop."""
    if size is None:
        return transforms.for_run(config).size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"--image-size must be a positive integer, got {size!r}")
    return size


def read_sweep(workdir: str) -> list[dict[str, Any]]:
    """Records of ``<workdir>/sweep.json`` (the evaluate CLI's report), [] if there is none.
    An unreadable file (not JSON, or not a list of records with a width, protocol and
    accuracy) is named in a warning and read as no records: probe accuracies are optional."""
    path = os.path.join(workdir, SWEEP)
    if not path_lib.exists(path):
        return []
    try:
        records = json.loads(path_lib.read_text(path))
        if not isinstance(records, list) or not all(
                isinstance(r, dict) and {"width", "protocol", "accuracy"} <= set(r)
                for r in records):
            raise ValueError("not a list of records with width, protocol and accuracy")
        for r in records:
            float(r["width"]), float(r["accuracy"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        log.warning("ignoring unreadable %s (%s); going on without probe accuracies "
                    "(rerun python -m us3l_jax.evaluate to rewrite it)", path, e)
        return []
    return records


def _calibrated(config: ml_collections.ConfigDict, params: Any, width: float, workdir: str,
                step: int, calibration_batches: int | None, calibration: str | None = None
                ) -> tuple[Any, dict[str, Any] | None, bool]:
    """``(batch_stats, procedure, reused)`` of ``width``: the statistics stored for the
    calibration procedure ``calibration`` (default the run's ``eval.calibration``), else
    calibrated now (and stored) by the evaluator. ``procedure``: its ``name``, ``key`` (the
    folder of its statistics) and ``settings`` (the stored meta). A backbone without
    BatchNorm (a ViT) has none: ``({}, None, False)``. A stored file that cannot be read is
    named, moved aside (``<file>.corrupt``) and recalibrated."""
    preset = calib.check_preset(calibration or config.eval.calibration)
    if not getattr(_backbone(config), "has_batch_norm", True):
        return {}, None, False
    settings = calibration_settings(config, calibration_batches, preset=preset)
    key = calib.procedure_key(preset, settings)
    meta = calib.settings_meta(settings, width, step, config.data.dataset)
    procedure = {"name": preset, "key": key, "settings": meta}

    def unreadable(path: str, e: Exception) -> None:  # keep it aside, recalibrate
        aside = _move_aside(path)
        log.warning("BN statistics %s are unreadable (%s: %s); moved to %s, recalibrating",
                    path, type(e).__name__, e, aside)

    found = calib.find_stats(calib.stored_paths(workdir, step, width, key), meta, unreadable)
    if found is not None:
        return found[0], procedure, True
    # Only now is the dataset loaded: exporting a calibrated width needs no data.
    stats, _ = Evaluator(config).calibrated(params, width, settings, workdir, step,
                                            recalibrate=True, preset=preset)
    return stats, procedure, False


def _move_aside(path: str) -> str:
    """Renames ``path`` to ``<path>.corrupt`` (``.corrupt.1``, ... if taken): kept, not
    deleted, as this tool did not write it."""
    aside, n = path + ".corrupt", 0
    while path_lib.exists(aside):
        n += 1
        aside = f"{path}.corrupt.{n}"
    path_lib.rename(path, aside)
    return aside


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


def torch_arch(plain: nn.Module) -> dict[str, Any]:
    """What ``torch_model.build`` needs to rebuild ``plain`` (a plain network) in PyTorch:
    its family and every channel count, as JSON values."""
    if isinstance(plain, PlainResNet):
        return {"family": "resnet", "stem": plain.stem, "stem_channels": plain.stem_channels,
                "blocks": [[[[list(c) for c in convs], down] for convs, down in stage]
                           for stage in plain.blocks]}
    if isinstance(plain, PlainMobileNetV2):
        return {"family": "mobilenet_v2", "stem_channels": plain.stem_channels,
                "stem_stride": plain.stem_stride, "head_channels": mbv2.HEAD_CHANNELS,
                "blocks": [list(b) for b in plain.blocks]}
    if isinstance(plain, VisionTransformer):
        return {"family": "vit", "image_size": plain.image_size,
                "patch_size": plain.patch_size, "dim": plain.dim, "depth": plain.depth,
                "heads": plain.heads, "mlp_ratio": plain.mlp_ratio, "eps": LN_EPS}
    raise TypeError(f"no torch builder for {type(plain).__name__}")


def torch_builder_source() -> str:
    """The text of ``model.py``: ``us3l_jax/export/torch_model.py``, which imports only torch
    and safetensors."""
    with open(os.path.join(os.path.dirname(__file__), "torch_model.py")) as f:
        return f.read()


def _torch_module_runner(files: Mapping[str, bytes], card_arch: dict[str, Any]
                         ) -> Callable[[np.ndarray], np.ndarray] | None:
    """``x -> output`` of ``model.py``'s network with ``model.safetensors`` loaded, run by
    torch (NHWC input transposed to NCHW); None when torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch  # deferred: optional, only to check model.py

    spec = importlib.util.spec_from_loader("us3l_export_model", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(files[TORCH_BUILDER], TORCH_BUILDER, "exec"), module.__dict__)
    net = module.build(card_arch)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in
          safetensors_from_bytes(files["torch"]).items()}
    net.load_state_dict(sd, strict=True)
    net.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    return run


def _serialize(formats: Sequence[str], folded: nn.Module, folded_vars: Any, plain: nn.Module,
               sliced: Any, size: int, name: str
               ) -> tuple[dict[str, bytes], dict[str, Callable[[np.ndarray], np.ndarray]]]:
    """The bytes of each requested format (dynamic batch) and, per file, a function running
    it on an NHWC batch, read back the way a user would (the torch file through our
    torchvision-key reader, and through ``model.py`` when torch is installed)."""
    def fn(x):
        return folded.apply(folded_vars, x, train=False)

    shape = (None, size, size, 3)
    files: dict[str, bytes] = {}
    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if "onnx" in formats:
        files["onnx"] = artifacts.onnx_bytes(fn, shape, name=name)
        runners["onnx"] = functools.partial(artifacts.run_onnx, files["onnx"])
    if "stablehlo" in formats:
        files["stablehlo"] = artifacts.stablehlo_bytes(fn, shape)
        runners["stablehlo"] = functools.partial(artifacts.run_stablehlo, files["stablehlo"])
    if "flax" in formats:
        files["flax"] = artifacts.flax_bytes(sliced)
        flax_fn = widths_lib.eval_fn(plain)
        flax_vars = artifacts.load_flax_variables(files["flax"])
        runners["flax"] = lambda x: np.asarray(flax_fn(flax_vars, x))
    if "torch" in formats:
        files["torch"] = safetensors_bytes(plain_to_torch_state_dict(plain, sliced),
                                           {"model": name})
        files[TORCH_BUILDER] = torch_builder_source().encode()
        torch_vars = plain_from_torch_state_dict(
            plain, safetensors_from_bytes(files["torch"]))
        plain_fn = widths_lib.eval_fn(plain)
        runners["torch"] = lambda x: np.asarray(plain_fn(torch_vars, x))
        torch_run = _torch_module_runner(files, torch_arch(plain))
        if torch_run is not None:
            runners["torch model.py"] = torch_run
    return files, runners


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


def load_width(workdir: str, width: float, step: int | None = None,
               calibration_batches: int | None = None, pre: Any = None,
               calibration: str | None = None
               ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``(plain network, variables, info)`` of ``width`` of run ``workdir``: the compact
    network of that width (``plain.apply(variables, x, train=False)`` on normalised NHWC
    images gives its features) with the BN statistics of the calibration procedure
    ``calibration`` (``calibration.PRESETS``; default the run's ``eval.calibration``):
    stored, or calibrated now as ``python -m us3l_jax.evaluate`` does. ``info``: step,
    width, the calibration meta, the procedure (name, key, settings) and whether stored
    statistics were reused. ``pre``: an already loaded checkpoint."""
    config = checkpointing.read_config(workdir) if pre is None else pre.config
    width = check_width(config, width)
    calib.check_preset(calibration or config.eval.calibration)
    if pre is None:
        pre = checkpointing.load_pretrained(workdir, step, abstract_state=build.abstract_state)
    backbone = _backbone(config)
    params = pre.params["backbone"]
    stats, procedure, reused = _calibrated(config, params, width, workdir, pre.step,
                                           calibration_batches, calibration)
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
    plain, sliced = slice_module(backbone, variables, width)
    return plain, sliced, {"step": pre.step, "width": width,
                           "calibration": procedure and procedure["settings"],
                           "calibration_procedure": procedure, "calibration_reused": reused}


def export_run(workdir: str, out: str, width: float | None = None,
               budget: tuple[str, float] | None = None,
               formats: Sequence[str] = artifacts.FORMATS, batch: int = 1,
               size: int | None = None, step: int | None = None,
               calibration_batches: int | None = None, repeats: int = 20,
               echo: Echo = print, calibration: str | None = None,
               trust_unverified: bool = False) -> dict[str, Any]:
    """Exports one width of run ``workdir`` into directory ``out``; returns the model card.

    Args:
      width: the width to export, or None with ``budget = (key, limit)`` where key is
        ``macs``, ``params`` or ``latency_ms``: the widest distinct width within the limit.
      formats: a subset of ``artifacts.FORMATS`` whose dependencies are installed; the card
        is always written.
      batch / size: latency is measured on ``(batch, size, size, 3)``; the files take any
        batch; size defaults to the run's evaluation crop.
      step: checkpoint (default latest); calibration_batches: instead of the run's setting.
      calibration: the BN calibration procedure whose statistics are folded in
        (``calibration.PRESETS``; default the run's ``eval.calibration``), named in the card.
      trust_unverified: use checkpoints that lack their checksum file (else skipped).
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
    calib.check_preset(calibration or config.eval.calibration)
    size = image_size(config, size)
    sweep = read_sweep(workdir)  # a bad file is reported now, not after the work
    pre = checkpointing.load_pretrained(workdir, step, abstract_state=build.abstract_state,
                                        trust_unverified=trust_unverified)
    backbone = _backbone(config)
    params = pre.params["backbone"]
    width, picked = _resolve_width(config, backbone, params, width, budget, size, batch,
                                   repeats)
    plain, sliced, info = load_width(workdir, width, calibration_batches=calibration_batches,
                                     pre=pre, calibration=calibration)
    folded, folded_vars = fold_batchnorm(plain, sliced)
    stats = sliced.get("batch_stats", {})

    run_folded = widths_lib.eval_fn(folded)
    latency_ms = widths_lib.measure_latency(run_folded, folded_vars,
                                            jnp.zeros((batch, size, size, 3), jnp.float32),
                                            repeats=repeats)
    files, runners = _serialize(formats, folded, folded_vars, plain, sliced, size,
                                f"{config.model.name}_w{width}")
    runners["folded"] = lambda x: np.asarray(run_folded(folded_vars, x))
    full = {"params": params, "batch_stats": stats} if stats else {"params": params}
    reference_fn = jax.jit(lambda x: backbone.apply(full, x, width=width, train=False))
    diffs: dict[str, float] = {}
    for i, b in enumerate(VERIFY_BATCHES):
        x = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(VERIFY_SEED), i),
                                         (b, size, size, 3), jnp.float32))
        reference = np.asarray(reference_fn(x))
        for k, d in _verify({k: run(x) for k, run in runners.items()}, reference).items():
            diffs[k] = max(d, diffs.get(k, 0.0))
    cost = widths_lib.costs(backbone, width, size)
    accuracy = widths_lib.sweep_accuracy(backbone, sweep).get(
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
        "input": {"name": artifacts.INPUT_NAME, "shape": [artifacts.BATCH, size, size, 3],
                  "batch": "dynamic: any size (checked at "
                           f"{', '.join(map(str, VERIFY_BATCHES))})",
                  "layout": "NHWC (torch model.py: NCHW)",
                  "dtype": "float32", "normalisation": "not included: feed "
                  "(pixel / 255 - mean) / std after resize + center crop",
                  "resize": eval_view.resize, "crop": eval_view.crop,
                  "interpolation": eval_view.interpolation, "mean": list(eval_view.mean),
                  "std": list(eval_view.std)},
        "output": {"name": artifacts.OUTPUT_NAME,
                   "shape": [artifacts.BATCH, int(backbone.feature_dim(width))],
                   "dtype": "float32", "what": "global-average-pooled backbone features "
                   "(no classifier)" if stats else "the normalised class token (no head)"},
        "compute_dtype": "float32", "training_compute_dtype": config.model.dtype,
        "batchnorm": ({"folded_into_convs": True, "calibration": info["calibration"],
                       "calibration_procedure": {
                           k: info["calibration_procedure"][k] for k in ("name", "key")},
                       "calibration_reused": info["calibration_reused"]} if stats else
                      {"folded_into_convs": False, "calibration": None,
                       "note": "the network has no BatchNorm"}),
        "max_abs_diff_vs_jax": {k: float(f"{d:.3g}") for k, d in diffs.items()},
        "verified_batches": list(VERIFY_BATCHES),
        "torch_arch": torch_arch(plain),
        "source": {"workdir": path_lib.absolute(workdir), "step": pre.step,
                   "config_identity": checkpointing.identity(config),
                   "config": json.loads(config_lib.to_json(config))},
        "files": {},
    }
    _write_dir(out, files, card)
    if echo is not None:
        bn = ""
        if stats:
            bn = (f", BN statistics {info['calibration_procedure']['key']} "
                  f"{'reused' if info['calibration_reused'] else 'calibrated now'}")
        echo(f"exported {config.model.name} width {width} ({cost['params']:,} params, "
             f"{cost['macs']:,} MACs, {latency_ms:.3f} ms at batch {batch} on "
             f"{widths_lib.device_name()}{bn}) to {out} in {time.perf_counter() - t0:.1f}s: "
             + ", ".join(f"{f} {n:,} B" for f, n in
                         ((f, card["files"][f]["bytes"]) for f in card["files"])))
    return card


_WHAT = {"onnx": "ONNX model (onnxruntime), BN folded, dynamic batch",
         "stablehlo": "serialized jax.export artifact (jax.export.deserialize(...).call(x)), "
                      "BN folded, symbolic batch",
         "torch": "torchvision-keyed state dict (safetensors), BN unfolded with calibrated "
                  "running statistics; build the network with model.py",
         TORCH_BUILDER: "plain-PyTorch builder of model.safetensors (torch and safetensors "
                        "only): import model; net = model.load(export_dir)",
         "flax": "msgpack of the plain network's params and batch_stats (unfolded); "
                 "us3l_jax.export.command.load_flax"}


def _write_dir(out: str, files: dict[str, bytes], card: dict[str, Any]) -> None:
    """Writes the files and the card into a temporary sibling of ``out``, then renames it."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=parent)
    try:
        for fmt, data in files.items():
            fileio.atomic_write_bytes(os.path.join(tmp, artifacts.FILES.get(fmt, fmt)), data)
        for fmt in (*artifacts.FORMATS, TORCH_BUILDER):
            path = os.path.join(tmp, artifacts.FILES.get(fmt, fmt))
            if os.path.exists(path):
                card["files"][artifacts.FILES.get(fmt, fmt)] = {
                    "bytes": os.path.getsize(path), "what": _WHAT[fmt]}
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
                step: int | None = None, repeats: int = 20, echo: Echo = print,
                trust_unverified: bool = False) -> list[widths_lib.Row]:
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
    _check_writable(out, f"--out {out!r}")
    pre = checkpointing.load_pretrained(workdir, step, abstract_state=build.abstract_state,
                                        trust_unverified=trust_unverified)
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
