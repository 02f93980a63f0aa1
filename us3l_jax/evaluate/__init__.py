"""Evaluating any width of a pretrained US3L run.

* ``calibrate``: per-width BN statistics (cumulative or official EMA), stored next to the
  checkpoint in ``<workdir>/bn_stats/step_<N>/width_<w>.msgpack``.
* ``features``: frozen eval-mode features; ``probe``: the fast softmax probe on them;
  ``knn``: weighted kNN (k = 200, T = 0.1); ``linear``: the paper's linear evaluation.
* ``transforms``: splits and linear-eval transforms per dataset; ``evaluator``: one dataset,
  any width, any protocol; ``sweep``: ``run_sweep`` over widths -> ``report`` (sweep.json /
  .md / .png), with the paper's numbers from ``paper``; ``online``: the pretraining monitor.

CLI: ``python -m us3l_jax.evaluate --workdir=RUN --widths=1.0,0.5,0.25 --protocol=fast``.
"""
# Submodules keep their names (``evaluate.calibrate`` is the module, not its function).
from us3l_jax.evaluate.calibrate import CalibrationSettings, load_stats, stats_path
from us3l_jax.evaluate.evaluator import PROTOCOLS, Evaluator
from us3l_jax.evaluate.online import OnlineEvaluator
from us3l_jax.evaluate.report import markdown_table
from us3l_jax.evaluate.sweep import run_sweep

__all__ = ["CalibrationSettings", "Evaluator", "OnlineEvaluator", "PROTOCOLS", "load_stats",
           "markdown_table", "run_sweep", "stats_path"]
