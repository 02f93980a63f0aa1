"""Evaluating any width of a pretrained US3L run.

* ``features``: frozen eval-mode features; ``probe``: the fast softmax probe on them;
  ``knn``: weighted kNN (k = 200, T = 0.1); ``linear``: the paper's linear evaluation.
* ``transforms``: splits and linear-eval transforms per dataset; ``evaluator``: one dataset,
  any width, any protocol; ``sweep``: ``run_sweep`` over widths -> ``report`` (sweep.json /
  .md / .png), with the paper's numbers from ``us3l_jax.paper``; ``online``: the pretraining
  monitor.

Per-width BN statistics come from ``us3l_jax.calibration`` (cumulative or official EMA,
stored next to the checkpoint in ``<workdir>/bn_stats/step_<N>/<procedure>/width_<w>.msgpack``,
one file per calibration procedure), which export and the SEED teacher share.

CLI: ``python -m us3l_jax.evaluate --workdir=RUN --widths=1.0,0.5,0.25 --protocol=fast``.
"""
import importlib

# Exports load their module on first use (PEP 562), so that importing one leaf module does
# not pull in the evaluator, which builds models through ``us3l_jax.build``.
_EXPORTS = {"PROTOCOLS": "evaluator", "Evaluator": "evaluator", "OnlineEvaluator": "online",
            "markdown_table": "report", "run_sweep": "sweep"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
