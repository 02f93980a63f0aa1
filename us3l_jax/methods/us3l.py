"""US3L (paper Algorithm 1) with the loss-design switches of Table 7, which are its ablations.

The base network (width 1.0 with the sandwich rule) learns with the base loss against a
momentum teacher; every sub-network distils the teacher's projections through an auxiliary
head. The switches turn it into each row of Table 7, including the plain slimmable baselines
(``simclr``, ``byol``, ``simsiam`` and ``mocov3`` are named settings of them):

* ``base_loss``: ``infonce`` (against the teacher's other view with ``momentum_base``, else
  SimCLR between the online views), ``mse`` (negative cosine of the predictor against the
  teacher / the stop-gradient online other view: BYOL / SimSiam) or ``mocov3``;
* ``distill_loss``: the sub-networks' loss against the targets; ``none`` trains each
  sub-network with the base loss on its own outputs (no inplace distillation);
* ``aux_head``: ``new`` (head g, Eq. 3), ``shared`` (the predictor) or ``none``;
* ``momentum_base`` / ``momentum_sub``: targets from the EMA teacher for the base network /
  the sub-networks; without ``momentum_sub`` the base network's detached projections;
* ``feature_distill``: the official ResNet-50 configs' intermediate-feature MSE, weighted
  by ``feature_distill_weight`` (docs/fidelity.md);
* ``decay_rule``: ``group_reg`` or ``weight_decay`` (which groups an update decays,
  docs/fidelity.md "Weight decay");
* ``ema_updates``: ``iteration`` (one EMA step of the teacher per iteration, before the base
  network's loss) or ``width`` (one more before every sub-network's loss, from the parameters
  it sees: the official US+MoCo v3; docs/fidelity.md "Vision Transformers and MoCo v3").
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from us3l_jax import objectives
from us3l_jax.methods import ema, forward
from us3l_jax.methods.base import Method
from us3l_jax.models.heads import SSLModel

BASE_LOSSES = ("infonce", "mse", "mocov3")
DISTILL_LOSSES = ("none", "mse", "infonce", "mocov3")
AUX_HEADS = ("none", "shared", "new")
AUX_HEAD_INITS = ("independent", "copy")
DECAY_RULES = ("group_reg", "weight_decay")
EMA_UPDATES = ("iteration", "width")


@dataclasses.dataclass(frozen=True)
class Config:
    """US3L's switches; the defaults are Table 7 case 13 (US3L)."""
    base_loss: str = "infonce"
    distill_loss: str = "mse"
    aux_head: str = "new"
    momentum_base: bool = True
    momentum_sub: bool = True
    tau: float = 0.5
    distill_weight: float = 1.0
    group_size: int | None = None
    ema_momentum: float = 0.99
    ema_schedule: str = "constant"
    ema_updates: str = "iteration"
    decay_rule: str = "group_reg"
    aux_head_init: str = "independent"  # the ViT code's ``copy`` of the predictor into g
    feature_distill: bool = False
    feature_distill_weight: float = 1.0
    feature_layers: tuple[str, ...] = ()

    def __post_init__(self):
        for name, allowed in [("base_loss", BASE_LOSSES), ("distill_loss", DISTILL_LOSSES),
                              ("aux_head", AUX_HEADS), ("aux_head_init", AUX_HEAD_INITS),
                              ("decay_rule", DECAY_RULES), ("ema_schedule", ema.EMA_SCHEDULES),
                              ("ema_updates", EMA_UPDATES)]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")
        if self.aux_head == "shared" and not self.uses_predictor:
            raise ValueError("aux_head='shared' shares the base network's predictor, which only "
                             "exists with base_loss='mse' or 'mocov3'; use aux_head='new' or "
                             "'none'")
        if self.base_loss == "mocov3" and not self.momentum_base:
            raise ValueError("base_loss='mocov3' contrasts against the momentum encoder's keys; "
                             "it needs momentum_base=True")
        if self.aux_head_init == "copy" and not (self.uses_predictor and self.uses_distill_head):
            raise ValueError("aux_head_init='copy' copies the predictor into the new head: it "
                             "needs aux_head='new' and a base loss with a predictor ('mse' or "
                             "'mocov3')")
        if self.ema_updates == "width" and not self.uses_teacher:
            raise ValueError("ema_updates='width' steps the momentum teacher at every width; "
                             "it needs momentum_base or momentum_sub")
        if self.feature_distill and not self.uses_teacher:
            raise ValueError("feature_distill distils the momentum teacher's features; it "
                             "needs momentum_base or momentum_sub")
        if not self.feature_distill_weight >= 0:
            raise ValueError(f"feature_distill_weight must be >= 0, got "
                             f"{self.feature_distill_weight}")

    uses_teacher = property(lambda self: self.momentum_base or self.momentum_sub)
    uses_predictor = property(lambda self: self.base_loss in ("mse", "mocov3"))
    uses_distill_head = property(lambda self: self.aux_head == "new")

    def param_groups(self) -> frozenset[str]:
        return frozenset({"backbone", "projector"}
                         | ({"predictor"} if self.uses_predictor else set())
                         | ({"distill_head"} if self.uses_distill_head else set())
                         | ({"proj_conv"} if self.feature_distill else set()))

    def decay_groups(self, sub: bool, base_width: float = 1.0) -> frozenset[str]:
        """Groups decayed by an update that trains sub-networks (``sub``) or only the base
        network, of width ``base_width``.

        ``group_reg`` (the official GroupReg loss term): every group but ``proj_conv``, except
        that the heads (predictor, auxiliary head) are skipped in an update at width 1.0: the
        official term skips them by name only when the width is 1.0, so an individually
        trained network below 1.0 (Table 15) has its predictor regularized in every update.
        ``weight_decay`` (PyTorch SGD): every group the update's losses reach.
        """
        if sub or (self.decay_rule == "group_reg" and base_width != 1.0):
            return self.param_groups() - ({"proj_conv"} if self.decay_rule == "group_reg"
                                          else set())
        base = {"backbone", "projector"}
        if self.decay_rule == "weight_decay" and self.uses_predictor:
            base.add("predictor")
        return frozenset(base)

    def late_decay_groups(self) -> frozenset[str]:
        """``weight_decay``: groups only sub-networks train (the auxiliary head), which PyTorch
        decays in every update once they have had a gradient. Empty for ``group_reg``."""
        if self.decay_rule != "weight_decay":
            return frozenset()
        return self._late_groups()

    def _late_groups(self) -> frozenset[str]:
        """Groups the base network's loss never reaches (the auxiliary head)."""
        return self.param_groups() - dataclasses.replace(
            self, decay_rule="weight_decay").decay_groups(sub=False)

    def grad_flags(self, sub: bool, step: jax.Array, first_sub_step: int | None) -> dict:
        """Per group: does it have a gradient in this update, as PyTorch sees it? Every group
        a loss has reached so far: in base-only updates the base network's groups, and the
        late groups after iteration ``first_sub_step`` (the first that trained sub-networks;
        None: never); in updates that train sub-networks every group. Read on device, so it
        costs no extra program. It is the ``weight_decay`` rule's decay (PyTorch decays
        exactly the parameters that have a gradient) and what AdamW's per-parameter count
        (``optim.scale_by_adam_per_param``) steps."""
        if sub:
            return {k: True for k in self.param_groups()}
        plain = dataclasses.replace(self, decay_rule="weight_decay")
        flags: dict[str, Any] = {k: True for k in plain.decay_groups(sub=False)}
        late = self._late_groups()
        if late:
            used = jnp.asarray(False) if first_sub_step is None else step > first_sub_step
            flags.update({k: used for k in late})
        return flags

    def decay_flags(self, sub: bool, step: jax.Array, first_sub_step: int | None,
                    base_width: float = 1.0) -> dict:
        """Per group: decayed by this update? ``weight_decay``: the groups with a gradient
        (``grad_flags``); ``group_reg``: the regularizer's groups (``decay_groups``)."""
        if self.decay_rule == "weight_decay":
            return self.grad_flags(sub, step, first_sub_step)
        return {k: True for k in self.decay_groups(sub, base_width)}


class Targets(NamedTuple):
    """What the sub-networks learn from: projections of both views, and the teacher's hooked
    features with feature distillation."""
    t1: jax.Array
    t2: jax.Array
    features: Any = None


def _pair_loss(cfg: Config, name: str, o1, o2, t1, t2):
    """Cross-view loss of outputs (o1, o2) against targets (t1, t2)."""
    if name == "infonce":
        return objectives.infonce_distill(o1, o2, t1, t2, cfg.tau, group_size=cfg.group_size)
    if name == "mocov3":
        return objectives.moco_v3(o1, o2, t1, t2, cfg.tau, group_size=cfg.group_size)
    if name == "mse":
        return objectives.neg_cosine(o1, o2, t1, t2)
    raise ValueError(f"unknown loss {name!r}")


def own_loss(cfg: Config, o1, o2, z1, z2, targets: Targets | None):
    """The base loss of head outputs ``o`` / projections ``z``: against ``targets`` (the
    teacher's other view) if given, else SimCLR between the views or SimSiam's predictor
    against the stop-gradient other view."""
    if targets is not None:
        return _pair_loss(cfg, cfg.base_loss, o1, o2, targets.t1, targets.t2)
    if cfg.base_loss == "infonce":
        return objectives.simclr_infonce(z1, z2, cfg.tau, group_size=cfg.group_size)
    sg = jax.lax.stop_gradient
    return objectives.neg_cosine(o1, o2, sg(z1), sg(z2))


def make(cfg: Config, model: SSLModel, views_fn, *, total_steps: int,
         teacher_width: float = 1.0, objective=None) -> Method:
    """The ``Method`` of ``cfg`` on ``model``; ``views_fn(key, images) -> (v1, v2)``.
    ``objective(o1, o2, z1, z2, targets)``: a base loss replacing ``cfg.base_loss``'s
    (``own_loss``), for methods built on US3L's distillation."""
    objective = objective or functools.partial(own_loss, cfg)
    if (model.use_predictor, model.use_distill_head, bool(model.feature_layers)) != (
            cfg.uses_predictor, cfg.uses_distill_head, cfg.feature_distill):
        raise ValueError("the model's heads (use_predictor, use_distill_head, "
                         "feature_layers) must match the method's")
    predictor = "predictor" if cfg.uses_predictor else None
    features = cfg.feature_distill

    def online(params, v1, v2, width, head_name, feats=False):
        z1, z2, f = forward.encode(model, params, v1, v2, width, feats)
        if f is not None:
            f = tuple(model.apply({"params": params}, x, width,
                                  method=SSLModel.project_features) for x in f)
        return *forward.head(model, params, z1, z2, head_name), z1, z2, f

    def init(key, extra_key, view_spec):
        del extra_key
        params = forward.init_params(model, key, view_spec)
        if cfg.aux_head_init == "copy":  # the official ViT code's deepcopy of the predictor
            params["distill_head"] = jax.tree.map(jnp.copy, params["predictor"])
        return params, ema.init(params) if cfg.uses_teacher else None, None

    def base_loss(params, ctx, batch, width):
        v1, v2 = batch
        teacher = None
        if cfg.uses_teacher:
            teacher = Targets(*forward.teacher(model, ctx.teacher, v1, v2, teacher_width,
                                               features))
        o1, o2, z1, z2, _ = online(params, v1, v2, width, predictor)
        loss = objective(o1, o2, z1, z2, teacher if cfg.momentum_base else None)
        if cfg.momentum_sub:
            targets = teacher
        else:
            targets = Targets(jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2),
                              teacher.features if features else None)
        return loss, (targets, {"loss/base": loss, "embed_std": objectives.embedding_std(z1)})

    def sub_loss(params, targets, batch, width):
        v1, v2 = batch
        if cfg.distill_loss == "none":  # trained like the base network, on its own
            o1, o2, z1, z2, f = online(params, v1, v2, width, predictor, features)
            loss = objective(o1, o2, z1, z2, targets if cfg.momentum_sub else None)
        else:
            head = {"new": "distill_head", "shared": "predictor", "none": None}[cfg.aux_head]
            o1, o2, _, _, f = online(params, v1, v2, width, head, features)
            loss = _pair_loss(cfg, cfg.distill_loss, o1, o2, targets.t1, targets.t2)
        metrics = {"raw": loss}
        weighted = cfg.distill_weight * loss
        if features:
            metrics["loss/feature"] = objectives.feature_mse(*f, *targets.features)
            weighted = weighted + cfg.feature_distill_weight * metrics["loss/feature"]
        return weighted, metrics

    def teacher_step(params, teacher, step):
        if not cfg.uses_teacher:
            return teacher, {"ema_momentum": jnp.float32(0)}
        return ema.teacher_step(cfg.ema_momentum, cfg.ema_schedule, total_steps)(
            params, teacher, step)

    return Method(init=init, views=lambda key, images, labels: views_fn(key, images),
                  base_loss=base_loss, sub_loss=sub_loss, teacher_step=teacher_step,
                  decay=functools.partial(cfg.decay_flags, base_width=teacher_width),
                  active=cfg.grad_flags,
                  teacher_per_width=cfg.ema_updates == "width",
                  config_key=model.backbone.channel_config,
                  dtype=model.dtype, sub_sums=("loss/feature",) if features else (),
                  name="us3l")
