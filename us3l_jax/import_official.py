"""``python -m us3l_jax.import_official --state_dict=ckpt.safetensors --config=CONFIG
[--config.FIELD=VALUE ...] --workdir=DIR [--step=N]``: a run trained with the official
PyTorch code, as a workdir that ``python -m us3l_jax.evaluate`` and ``python -m
us3l_jax.export`` (and ``us3l_jax.export.load``) accept.

The official ``checkpoint.pth.tar`` is a torch pickle; convert it once where torch is
installed (``weights_only=False``: the file also pickles the training arguments; load only
a checkpoint you trust)::

    python -c "import torch, safetensors.torch as st; st.save_file(torch.load('checkpoint.pth.tar', map_location='cpu', weights_only=False)['state_dict'], 'ckpt.safetensors')"

``--config`` is this project's config of the same architecture (e.g.
``configs/us3l_cifar100.py:resnet18``, with ``--config.*`` overrides as for
``python -m us3l_jax.main``); it decides the model, its width range and how evaluation
calibrates BN. The backbone is read with ``torch_layout.official_backbone`` (the online
encoder ``module.encoder_q.*``, or MoCo v3's ``module.base_encoder.*``, or a bare
torchvision / timm backbone); the projector and the rest of the training state are not
imported: the checkpoint written holds the backbone and zeros elsewhere, so it is for
evaluation and export, **not for resuming training**. ``imported.json`` records the source
file and its SHA-256. BN statistics are calibrated per width by evaluate / export, as for any
run (the official running averages are of the full width only).

Bad input (no such file, not safetensors, a state dict of another architecture or size,
a workdir that holds anything) prints one line ``python -m us3l_jax.import_official: error:
...`` and exits 2, writing nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from us3l_jax import cli
from us3l_jax.errors import UsageError

PROG = "python -m us3l_jax.import_official"
RECORD = "imported.json"
_NAMES = ("state_dict", "config", "workdir", "step")


def _define() -> flags.FlagValues:
    """The command's flags, new for every call: config_flags defines one flag per override it
    parses, which a second parse in the same process would define twice."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config of the same architecture, e.g. "
                                    "configs/us3l_cifar100.py:resnet18", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("state_dict", None, "the official checkpoint's state_dict as "
                        "safetensors", flag_values=fv)
    flags.DEFINE_string("workdir", None, "the workdir to write (new or empty)", flag_values=fv)
    flags.DEFINE_integer("step", 0, "the step number the checkpoint is stored under",
                         flag_values=fv)
    return fv


def usage(fv: flags.FlagValues | None = None) -> str:
    return ("Import a run of the official PyTorch code as a workdir for evaluate and export.\n"
            f"  {PROG} --state_dict=ckpt.safetensors "
            "--config=configs/us3l_cifar100.py:resnet18 --workdir=DIR\n\n"
            f"Flags:\n{cli.format_flags(fv or _define(), _NAMES)}\n")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_fits(imported: dict[str, Any], abstract: Any) -> None:
    """``UsageError`` naming the first leaf whose shape differs from the config's model."""
    want = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v)
           for k, v in jax.tree_util.tree_flatten_with_path(imported)[0]}
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if bad:
        raise UsageError(f"the state dict does not fit --config's backbone: {len(bad)} "
                         f"parameter(s) differ, e.g. {bad[0]}: {got.get(bad[0], 'missing')} in "
                         f"the file, {want.get(bad[0], 'absent')} expected (check "
                         "config.model.name and its size fields)")


def import_state_dict(state_dict: str, config: ml_collections.ConfigDict, workdir: str,
                      step: int = 0) -> dict[str, Any]:
    """Writes the run ``workdir`` (config.json, one checkpoint at ``step``, imported.json)
    from the safetensors file ``state_dict``; returns the record. ``UsageError`` for bad
    input, before anything is written; a failure while writing leaves no workdir."""
    from us3l_jax import build, checkpointing, config as config_lib, fileio, torch_layout

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UsageError(f"--step must be a non-negative integer, got {step!r}")
    path = os.path.abspath(state_dict)
    if not os.path.isfile(path):
        raise UsageError(f"--state_dict {state_dict!r} does not exist")
    workdir = os.path.abspath(workdir)
    problem = fileio.unusable_dir(workdir)
    if problem:
        raise UsageError(f"--workdir={workdir}: {problem}")
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise UsageError(f"--workdir={workdir} is not empty; give a new or empty directory "
                         "(nothing is overwritten)")
    try:
        config_lib.validate(config)
    except ValueError as e:
        raise UsageError(f"config: {e}") from None
    try:
        sd = torch_layout.load_safetensors(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        raise UsageError(f"--state_dict {state_dict!r} is not a readable safetensors file "
                         f"({cli.one_line(e)}); convert the official checkpoint with "
                         "safetensors.torch.save_file(torch.load(f, map_location='cpu')"
                         "['state_dict'], out)") from None
    try:
        variables = torch_layout.official_backbone(config.model.name, sd,
                                                   **build.architecture_kwargs(config))
    except ValueError as e:
        raise UsageError(f"--state_dict {state_dict!r}: {e}") from None
    abstract = build.abstract_state(config)
    _check_fits(variables["params"], abstract.params["backbone"])
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    params = dict(zeros.params)
    params["backbone"] = jax.tree.map(lambda v, s: np.asarray(v, s.dtype), variables["params"],
                                      abstract.params["backbone"])
    state = zeros.replace(params=params)
    record = {"source": "official state dict", "state_dict": path, "sha256": _sha256(path),
              "model": config.model.name, "step": step, "imported": "backbone only; the rest "
              "of the training state is zeros: for evaluation and export, not for resuming"}
    # Written into a temporary sibling and renamed: a failure leaves no half-written run.
    parent = os.path.dirname(workdir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(workdir) + ".", suffix=".tmp",
                           dir=parent)
    try:
        checkpointing.write_config(tmp, config)
        ckpt = checkpointing.Checkpointer(tmp, config, async_save=False)
        try:
            ckpt.save(step, state)
            ckpt.wait()
        finally:
            ckpt.close()
        fileio.atomic_write_text(os.path.join(tmp, RECORD), json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~fileio.current_umask())
        if os.path.isdir(workdir):
            os.rmdir(workdir)  # empty (checked above)
        os.rename(tmp, workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def main(argv: Sequence[str] | None = None) -> int:
    # config_flags reads its --config.* overrides from sys.argv, so an in-process call with
    # its own argv (tests, notebooks) puts it there while parsing.
    fv = _define()
    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0] if saved else PROG] + list(argv)
    try:
        cli.parse(fv, argv, PROG, lambda: usage(fv))
    finally:
        sys.argv = saved
    for name in ("state_dict", "workdir"):
        if not fv[name].value:
            cli.fail(PROG, f"--{name} is required")
    try:
        config = fv.config
        if config is not None:
            config.to_dict()  # config_flags defers file-loading errors to first use
    except Exception as e:  # noqa: BLE001
        cli.fail(PROG, f"cannot load --config: {cli.one_line(e)}")
    if config is None:
        cli.fail(PROG, "--config is required (this project's config of the same "
                       "architecture, e.g. configs/us3l_cifar100.py:resnet18)")
    try:
        record = import_state_dict(fv.state_dict, config, fv.workdir, fv.step)
    except UsageError as e:
        cli.fail(PROG, e)
    print(f"imported {record['model']} from {record['state_dict']} into "
          f"{os.path.abspath(fv.workdir)} (step {record['step']}): python -m "
          f"us3l_jax.evaluate --workdir={fv.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
