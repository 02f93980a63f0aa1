"""The width sweep: for each width, calibrate BN -> probe, then write the report.

``run_sweep`` evaluates a pretraining run's checkpoint at every requested width with one or
more protocols. Per width the BN statistics are calibrated once (or reused from
``<workdir>/bn_stats/...`` when made with the same procedure and settings) and the cached features are
shared by ``fast`` and ``knn``. Arguments are checked before anything heavy runs: a missing
run or checkpoint, a width outside the trained range, an unknown protocol, dataset or paper
row each raise one clear error.

Where the report goes: the pretraining run's own sweep is ``<workdir>/sweep.*``; a later
evaluation (``new_report=True``, as the CLI does) never replaces a report: it goes to a new
folder ``<workdir>/eval/<protocols>-<widths>[-<n>]/`` (the dataset first when it is not the
pretraining one, ``-step<N>`` last for an explicit step), or into ``out`` if that holds no
sweep yet. Each report also goes to TensorBoard (``<report dir>/tb``, so the run's own sweep
lands beside the training curves): accuracy per width as ``sweep/<dataset>/<protocol>/w<width>``
at the checkpoint's step, the table and the run's config as text.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from us3l_jax import build, calibration as calib, checkpointing, config as config_lib
from us3l_jax import paper as paper_lib, paths as path_lib, profile as profile_lib
from us3l_jax.data import datasets
from us3l_jax.evaluate import report
from us3l_jax.evaluate.evaluator import (Evaluator, calibration_settings, check_protocol,
                                         check_width, timed)

log = logging.getLogger(__name__)
Record = dict[str, Any]


def _as_list(protocol: str | Sequence[str]) -> list[str]:
    items = protocol.split(",") if isinstance(protocol, str) else list(protocol)
    items = [p.strip() for p in items if p.strip()]
    if not items:
        raise ValueError("no protocol given; valid: fast, knn, paper")
    return [check_protocol(p) for p in dict.fromkeys(items)]


def _widths(widths: str | Sequence[float]) -> list[Any]:
    """A list of widths from a sequence or a comma-separated string."""
    if not isinstance(widths, str):
        return list(widths)
    try:
        parsed = [float(w) for w in widths.split(",") if w.strip()]
    except ValueError:
        parsed = []
    if not parsed:
        raise ValueError(f"widths must be comma-separated numbers, got {widths!r}")
    return parsed


def run_sweep(workdir: str, widths: str | Sequence[float] | None = None,
              protocol: str | Sequence[str] | None = None, dataset: str | None = None,
              out: str | None = None, step: int | None = None, *,
              epochs: int | None = None, calibration_batches: int | None = None,
              recalibrate: bool = False, paper_row: str | None = None,
              calibration: str | None = None, mesh=None,
              echo: Callable[[str], None] | None = print,
              new_report: bool = False, trust_unverified: bool = False) -> list[Record]:
    """Evaluates run ``workdir`` at ``widths`` and writes ``sweep.json/.md/.png`` into ``out``.

    Args:
      workdir: a pretraining run (``config.json`` + ``checkpoints/``).
      widths: a sequence or a comma-separated string (default ``config.eval.sweep_widths``);
        each must lie in the trained range.
      protocol: ``fast``, ``knn``, ``paper`` or several (a list or "fast,knn");
        default ``config.eval.sweep_protocol``.
      dataset: evaluation dataset (default the pretraining one); transfer sets calibrate on
        their own training split.
      out: report directory (default ``workdir``, or a new folder with ``new_report``);
        ``step``: checkpoint (default latest).
      epochs: epochs of the paper and finetune protocols instead of the recipe's
        (milestones scale with it).
      calibration_batches: instead of ``config.eval.calibration_batches``.
      recalibrate: ignore stored statistics.
      calibration: a BN calibration procedure (``calibration.PRESETS``) instead of
        ``config.eval.calibration``.
      paper_row: a ``paper.ROWS`` key drawn beside ours (default ``config.eval.paper_row``).
      echo: where the table and timings are printed (None: silent).
      new_report: never replace a report: ``out`` must hold no sweep yet, and without
        ``out`` the report goes to a new ``<workdir>/eval/...`` folder (module docstring).
      trust_unverified: use checkpoints that lack their checksum file (else skipped).
    Returns:
      The records (also in ``sweep.json``), widest width first, protocols in the given order.
    """
    config = checkpointing.read_config(workdir)
    if calibration is not None:
        config.eval.calibration = calib.check_preset(calibration)
    protocols = _as_list(protocol or config.eval.sweep_protocol)
    widths = list(dict.fromkeys(check_width(config, w)
                                for w in _widths(widths or config.eval.sweep_widths)))
    dataset = dataset or config.data.dataset
    datasets.check_name(dataset)
    row_key = paper_row or config.eval.paper_row
    paper = paper_lib.get(row_key) if row_key else None
    if epochs is not None:
        config.eval.linear_epochs = int(epochs)
    if new_report and out is not None:
        held = [f for f in report.FILES if path_lib.exists(os.path.join(out, f))]
        if held:
            raise ValueError(f"{out} already holds a sweep ({', '.join(held)}); choose another "
                             "--out, or leave it out for a new folder under <workdir>/eval/")
    pre = checkpointing.load_pretrained(workdir, step, abstract_state=build.abstract_state,
                                        trust_unverified=trust_unverified)
    settings = calibration_settings(config, calibration_batches, dataset)
    procedure = calib.procedure_key(config.eval.calibration, settings)
    t_load = time.perf_counter()
    ev = Evaluator(config, dataset, mesh=mesh)
    log.info("loaded %s (%d train / %d test) in %.1fs", dataset, ev.train.num_examples,
             ev.test.num_examples, time.perf_counter() - t_load)
    params = pre.params["backbone"]
    records: list[Record] = []
    totals = {"calibration": 0.0, "features": 0.0, **{p: 0.0 for p in protocols}}
    for w in sorted(widths, reverse=True):
        (stats, reused), t_cal = timed(ev.calibrated, params, w, settings, workdir, pre.step,
                                       recalibrate, store_in=out)
        feats, t_feat = (None, 0.0)
        if any(p in ("fast", "knn") for p in protocols):
            feats, t_feat = timed(ev.features, params, stats, w)
        totals["calibration"] += t_cal
        totals["features"] += t_feat
        cost = profile_lib.profile(config.model.name, w, ev.data.size, None, "backbone",
                                   **build.architecture_kwargs(config))
        for p in protocols:
            acc, t_probe = timed(ev.run, p, params, stats, w, feats)
            totals[p] += t_probe
            rec: Record = {
                "width": w, "protocol": p, "accuracy": round(100.0 * acc, 3),
                "dataset": dataset, "step": pre.step, "model": config.model.name,
                "params": cost["params"], "macs": cost["macs"], "input_size": ev.data.size,
                "feature_dim": ev.backbone.feature_dim(w), "num_train": ev.train.num_examples,
                "num_test": ev.test.num_examples, "time_s": round(t_probe, 3),
                "calibration_s": round(t_cal, 3), "features_s": round(t_feat, 3),
                "calibration_reused": reused, "calibration": config.eval.calibration,
                "calibration_procedure": procedure,
                "calibration_mode": settings.mode,
                "calibration_batches": settings.num_batches}
            if p == "paper":
                rec["linear_epochs"] = ev.recipe.epochs
            if paper is not None:
                rec["paper_row"] = paper.key
                rec["paper_accuracy"] = paper.at(w)
            records.append(rec)
            log.info("width %g %s: %.2f%% (probe %.1fs, calibration %.1fs%s)", w, p,
                     rec["accuracy"], t_probe, t_cal, ", reused" if reused else "")
    if out is None:
        out = workdir
        if new_report:
            name = [dataset] if dataset != config.data.dataset else []
            name += ["+".join(protocols), "_".join(str(w) for w in sorted(widths, reverse=True))]
            name += [f"step{pre.step}"] if step is not None else []
            out = claim_dir(os.path.join(workdir, "eval", "-".join(name)))
    paths = report.write(records, out, paper)
    log_tensorboard(records, out, config, paper)
    if echo is not None:
        echo(report.describe(records))
        echo(report.markdown_table(records, paper))
        echo(format_calibration(records))
        echo(format_times(totals, len(widths)))
        echo("wrote " + ", ".join(paths))
    return records


def claim_dir(base: str) -> str:
    """Creates and returns ``base``, or ``base-2``, ``base-3``, ... if taken (atomically: two
    evaluations at once never share a folder). In a bucket, which has no folders to create
    exclusively, the first name with nothing below it is taken (not atomic)."""
    path, n = base, 1
    while True:
        try:
            if not path_lib.is_local(path):
                if path_lib.exists(path):
                    raise FileExistsError(path)
                return path
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}-{n}"


def log_tensorboard(records: Sequence[Record], out: str, config, paper=None) -> str:
    """Writes the sweep to TensorBoard events in ``<out>/tb`` (process 0 only): accuracy per
    width at the checkpoint's step, the table and the config (JSON) as text."""
    import jax
    from tensorboardX import SummaryWriter

    logdir = os.path.join(out, "tb")
    if jax.process_index() != 0:
        return logdir
    path_lib.tensorboard_on_buckets()
    step = records[0]["step"]
    with SummaryWriter(logdir) as tb:
        for r in records:
            tb.add_scalar(f"sweep/{r['dataset']}/{r['protocol']}/w{r['width']}", r["accuracy"],
                          step)
        tb.add_text("sweep", report.describe(records) + "\n\n"
                    + report.markdown_table(records, paper), step)
        # Indented: TensorBoard renders text as markdown, this keeps the JSON verbatim.
        tb.add_text("config", "\n".join("    " + line for line in
                                         config_lib.to_json(config).splitlines()), step)
    return logdir


def format_calibration(records: Sequence[Record]) -> str:
    """``BN statistics custom-cumulative-linear_train-4x64-s0: reused at 1.0, calibrated at
    0.5``: which stored procedure each width used."""
    how: dict[str, list[str]] = {"reused": [], "calibrated": []}
    for w in dict.fromkeys(r["width"] for r in records):
        r = next(r for r in records if r["width"] == w)
        how["reused" if r["calibration_reused"] else "calibrated"].append(f"{w}")
    return (f"BN statistics {records[0]['calibration_procedure']}: "
            + ", ".join(f"{k} at {', '.join(ws)}" for k, ws in how.items() if ws))


def format_times(totals: dict[str, float], num_widths: int) -> str:
    """``time over N widths: calibration 3.1s, features 2.0s, fast 1.2s, knn 0.4s``."""
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in totals.items() if v or k in ("calibration",))
    return f"time over {num_widths} widths: {parts}"
