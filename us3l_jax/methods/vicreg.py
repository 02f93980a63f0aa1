"""VICReg made universally slimmable with the paper's three guidelines.

The base network (full width) learns with VICReg's loss (``objectives.vicreg``): invariance
to the momentum teacher's projection of the other view (the teacher, guideline 1, replaces
VICReg's second online branch; without ``momentum_base`` the two online views, as plain
VICReg), and variance / covariance regularizers on the online projections, which prevent
collapse without negatives. The sub-networks distil the teacher's projections through an
auxiliary head (guidelines 2 and 3), exactly as US3L: everything but the base loss is
``us3l``'s, switches included.

    python -m us3l_jax.main --config=configs/demo.py:vicreg --workdir=/tmp/us3l_demo_vicreg
"""
from __future__ import annotations

import dataclasses

import jax

from us3l_jax import objectives
from us3l_jax.methods import us3l
from us3l_jax.methods.base import Method
from us3l_jax.models.heads import SSLModel


@dataclasses.dataclass(frozen=True)
class Config:
    """``weights``: invariance, variance, covariance (the VICReg paper's 25, 25, 1);
    ``us3l``: the distillation, teacher and decay switches (its ``base_loss`` is unused)."""
    us3l: us3l.Config = us3l.Config()
    weights: tuple[float, float, float] = (25.0, 25.0, 1.0)

    def __post_init__(self):
        if len(self.weights) != 3 or min(self.weights) < 0:
            raise ValueError(f"weights must be three non-negative numbers (invariance, "
                             f"variance, covariance), got {self.weights}")

    uses_teacher = property(lambda self: self.us3l.uses_teacher)
    uses_predictor = False
    uses_distill_head = property(lambda self: self.us3l.uses_distill_head)
    feature_distill = property(lambda self: self.us3l.feature_distill)
    feature_layers = property(lambda self: self.us3l.feature_layers)
    group_size = property(lambda self: self.us3l.group_size)


def make(cfg: Config, model: SSLModel, views_fn, **kw) -> Method:
    """``kw``: ``total_steps`` and ``teacher_width``, as ``us3l.make``."""
    g = cfg.us3l.group_size

    def objective(o1, o2, z1, z2, targets):
        if targets is None:  # plain VICReg between the online views
            return objectives.vicreg(z1, z2, g, cfg.weights)
        # Invariance to the teacher's other view; both online views regularized.
        t1, t2 = jax.lax.stop_gradient((targets.t1, targets.t2))
        return (objectives.vicreg(z1, t2, g, cfg.weights) +
                objectives.vicreg(z2, t1, g, cfg.weights)) / 2

    return us3l.make(cfg.us3l, model, views_fn, objective=objective, **kw)._replace(
        name="VICReg")
