"""The US3L training step: TrainState, loss design (paper Table 7) and compiled programs.

One iteration (paper Algorithm 1, reference §5.2):

1. two augmented views of the batch (on device);
2. EMA update of the teacher from the parameters at the start of the iteration (once per
   iteration, before the teacher forward), teacher forward at full width;
3. base network at ``widths[0]`` (1.0 with the sandwich rule) and the base loss;
4. for every sampled sub-width, the distillation loss of ``head(sub-network)`` against the
   targets of step 2/3;
5. gradients -> optimizer. ``accumulate`` (paper, default): one update per iteration with the
   summed gradients; ``per_width`` (official code): one update after each width, sharing the
   optimizer state, later widths seeing the already-updated parameters.

Widths are chosen on the host (``us3l_jax.sampling``) and reach compiled code as static Python
floats: one compiled program per distinct channel configuration, so a sub-network costs in
proportion to its FLOPs and the number of programs is bounded by the number of distinct widths
(DESIGN.md: no ``lax.switch``/masking, which are slower or keep every branch's residuals).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from us3l_jax import mesh as mesh_lib
from us3l_jax import objectives
from us3l_jax.models.heads import SSLModel

BASE_LOSSES = ("infonce", "mse")
DISTILL_LOSSES = ("none", "mse", "infonce")
AUX_HEADS = ("none", "shared", "new")
UPDATE_MODES = ("accumulate", "per_width")
EMA_SCHEDULES = ("constant", "cosine")
TEACHER_KEYS = ("backbone", "projector")


# Paper Table 7 (main text) as flags: case -> (base loss, distill loss, auxiliary distill head,
# momentum target for the base network, for the sub-networks). The main table's rows are
# appendix Table 17 cases 1, 3, 7, 8, 9, 12, 15, 17, 18, 19, 20, 22, 23, 24, 25, 27, 28, where
# the head column distinguishes a shared from a new head.
TABLE7_CASES: dict[int, tuple[str, str, str, bool, bool]] = {
    1: ("mse", "none", "none", False, False),       # SimSiam on every width: collapses
    2: ("mse", "mse", "shared", False, False),      # US+SimSiam (inplace distillation)
    3: ("mse", "mse", "shared", True, True),
    4: ("mse", "mse", "new", True, True),
    5: ("mse", "infonce", "none", False, False),
    6: ("mse", "infonce", "none", False, True),
    7: ("mse", "infonce", "none", True, True),
    8: ("mse", "infonce", "new", True, True),
    9: ("infonce", "none", "none", False, False),
    10: ("infonce", "mse", "none", False, False),
    11: ("infonce", "mse", "none", False, True),
    12: ("infonce", "mse", "none", True, True),
    13: ("infonce", "mse", "new", True, True),      # US3L
    14: ("infonce", "infonce", "none", False, False),
    15: ("infonce", "infonce", "none", False, True),
    16: ("infonce", "infonce", "none", True, True),
    17: ("infonce", "infonce", "new", True, True),
}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The loss design of paper Table 7 as flags; US3L is case 13 (the defaults).

    * ``base_loss``: ``infonce`` (NT-Xent: against the teacher's other view when
      ``momentum_base``, else SimCLR between the two online views) or ``mse`` (negative cosine
      of the predictor output against the teacher / the stop-gradient online other view:
      BYOL / SimSiam).
    * ``distill_loss``: loss of each sub-network against the targets; ``none`` trains every
      sub-network with the base loss on its own outputs (no inplace distillation).
    * ``aux_head``: ``new`` (a separate head g for sub-networks, Eq. 3), ``shared`` (the base
      network's predictor; needs ``base_loss='mse'``), or ``none``.
    * ``momentum_base`` / ``momentum_sub``: targets from the EMA teacher (width 1.0) for the
      base network / the sub-networks; without ``momentum_sub`` the targets are the base
      network's own outputs, detached (Algorithm 1, line 6).
    """
    base_loss: str = "infonce"
    distill_loss: str = "mse"
    aux_head: str = "new"
    momentum_base: bool = True
    momentum_sub: bool = True
    tau: float = 0.5
    distill_weight: float = 1.0
    group_size: int | None = None  # examples per group for negatives (and BN, via the model)
    update_mode: str = "accumulate"
    ema_momentum: float = 0.99
    ema_schedule: str = "constant"

    def __post_init__(self):
        for name, value, allowed in [("base_loss", self.base_loss, BASE_LOSSES),
                                     ("distill_loss", self.distill_loss, DISTILL_LOSSES),
                                     ("aux_head", self.aux_head, AUX_HEADS),
                                     ("update_mode", self.update_mode, UPDATE_MODES),
                                     ("ema_schedule", self.ema_schedule, EMA_SCHEDULES)]:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")
        if self.aux_head == "shared" and self.base_loss != "mse":
            raise ValueError("aux_head='shared' shares the base network's predictor, which only "
                             "exists with base_loss='mse'; use aux_head='new' or 'none'")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")

    @classmethod
    def table7(cls, case: int, **overrides: Any) -> "MethodConfig":
        """The loss design of paper Table 7, case ``case`` (1-17); US3L is case 13."""
        if case not in TABLE7_CASES:
            raise ValueError(f"Table 7 has cases 1-17, got {case}")
        base, distill, head, mom_base, mom_sub = TABLE7_CASES[case]
        return cls(**{**dict(base_loss=base, distill_loss=distill, aux_head=head,
                             momentum_base=mom_base, momentum_sub=mom_sub), **overrides})

    @property
    def uses_teacher(self) -> bool:
        return self.momentum_base or self.momentum_sub

    @property
    def uses_predictor(self) -> bool:
        return self.base_loss == "mse"

    @property
    def uses_distill_head(self) -> bool:
        return self.aux_head == "new"

    def param_groups(self) -> frozenset[str]:
        return frozenset({"backbone", "projector"}
                         | ({"predictor"} if self.uses_predictor else set())
                         | ({"distill_head"} if self.uses_distill_head else set()))

    def decay_groups(self, sub: bool) -> frozenset[str]:
        """Top-level parameter groups that get weight decay in an update.

        As the official GroupReg (reference §6, §12.11): heads (``predictor*``) are left out
        at width 1.0 and included at sub-widths. So the base-only updates (per-width mode, and
        stage-1 iterations in accumulate mode) decay {backbone, projector}; updates that include
        sub-networks decay everything. This also keeps a head that has not been used yet
        untouched (its gradient is zero), like PyTorch skipping parameters whose grad is None.
        """
        return self.param_groups() if sub else frozenset({"backbone", "projector"})


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: ``step`` (iterations done), ``params``
    ({backbone, projector[, predictor][, distill_head]}), ``ema_params`` (teacher copy of
    {backbone, projector}, or None), ``opt_state`` and the base PRNG key ``rng`` (per-step keys
    are ``fold_in(rng, step)``, so resuming at step k reproduces the same randomness). ``rng``
    is raw key data (uint32), which checkpoints store as a plain array."""
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def ema_momentum(method: MethodConfig, step: jax.Array, total_steps: int) -> jax.Array:
    """Constant m, or the cosine ramp m_t = 1 - (1 - m)(1 + cos(pi t / T)) / 2 (BYOL/MoCo v3)."""
    m = jnp.asarray(method.ema_momentum, jnp.float32)
    if method.ema_schedule == "constant":
        return m
    t = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
    return 1.0 - (1.0 - m) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def _teacher_subset(params):
    return {k: params[k] for k in TEACHER_KEYS}


class US3LTrainer:
    """Builds and caches the compiled programs of the US3L step and runs one iteration.

    Args:
      model: the ``SSLModel`` bundle (its ``use_predictor``/``use_distill_head`` must match
        ``method``).
      method: the loss design.
      tx: an optax transformation (``us3l_jax.optim.make_optimizer``). Its ``update`` receives
        the extra arguments ``step=`` (the iteration: schedules must not advance per update,
        since ``per_width`` makes several updates per iteration) and ``decay_mask=``.
      lr_schedule: function of the iteration, for the logged learning rate.
      views_fn: ``(key, uint8 images) -> (view1, view2)``, jittable (``us3l_jax.data.augment``).
      mesh: device mesh; the batch is sharded over its data axis, state replicated.
      total_steps: iterations of the run (for the EMA cosine schedule).
      teacher_width: width of the momentum teacher (the range's maximum).
    """

    def __init__(self, model: SSLModel, method: MethodConfig, tx: optax.GradientTransformation,
                 views_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
                 mesh: Mesh, total_steps: int, teacher_width: float = 1.0,
                 lr_schedule: Callable[[Any], Any] | None = None,
                 config_key: Callable[[float], Any] | None = None, compile_threads: int = 2):
        if model.use_predictor != method.uses_predictor:
            raise ValueError("model.use_predictor must equal method.uses_predictor")
        if model.use_distill_head != method.uses_distill_head:
            raise ValueError("model.use_distill_head must equal method.uses_distill_head")
        self.model = model
        self.method = method
        self.tx = tx
        self.views_fn = views_fn
        self.mesh = mesh
        self.total_steps = int(total_steps)
        self.teacher_width = float(teacher_width)
        self.lr_schedule = lr_schedule
        # Widths with the same channel configuration share one program.
        self.config_key = config_key or model.backbone.channel_config
        self._programs: dict[Any, Any] = {}
        self._compiled: dict[Any, futures.Future] = {}
        self._lock = threading.Lock()
        self._compile_pool = futures.ThreadPoolExecutor(max_workers=compile_threads,
                                                        thread_name_prefix="us3l-compile")
        self.compile_seconds = 0.0
        self.compiled_programs = 0
        self._repl = mesh_lib.replicated(mesh)
        self._batch = mesh_lib.batch_sharding(mesh)

    # ------------------------------------------------------------------ state

    def init_state(self, rng: jax.Array, images: jax.Array) -> TrainState:
        """Full-size parameters from ``model.init`` on a batch shaped like the views of
        ``images`` (so grouped BN sees a valid batch); the teacher starts as an exact copy
        (``encoder_k = deepcopy(encoder_q)``)."""
        init_rng, data_rng = jax.random.split(rng)
        view = jax.eval_shape(self.views_fn, jax.random.key(0), images)[0]
        x = jnp.zeros(view.shape, jnp.float32)

        def init(key):
            params = self.model.init(key, x, 1.0)["params"]
            params = flax.core.unfreeze(params)
            ema = _teacher_subset(params) if self.method.uses_teacher else None
            ema = jax.tree.map(jnp.copy, ema)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                              opt_state=self.tx.init(params),
                              rng=jax.random.key_data(data_rng))

        return jax.jit(init, out_shardings=self._repl)(init_rng)

    # ------------------------------------------------------------------ losses

    def _views_together(self, batch: int) -> bool:
        """Whether both views can go through one pass of the concatenated batch: true when BN
        groups never straddle the views (the group size divides the batch). That gives the
        same statistics as two separate passes (the official encoder_q(x1), encoder_q(x2)),
        with half the program size and larger matmuls."""
        g = self.model.bn_group_size
        return g is not None and batch % g == 0

    def _pair(self, fn, params, a1, a2, *args):
        """``fn`` (an ``SSLModel`` method) applied to both views."""
        b = a1.shape[0]
        if self._views_together(b):
            out = self.model.apply({"params": params}, jnp.concatenate([a1, a2]), *args,
                                   method=fn)
            return out[:b], out[b:]
        return tuple(self.model.apply({"params": params}, a, *args, method=fn)
                     for a in (a1, a2))

    def _online(self, params, v1, v2, width, head):
        z1, z2 = self._pair(SSLModel.encode, params, v1, v2, width)
        if head is None:
            return z1, z2, z1, z2
        fn = {"predictor": SSLModel.predict, "distill_head": SSLModel.distill}[head]
        p1, p2 = self._pair(fn, params, z1, z2)
        return p1, p2, z1, z2

    def _pair_loss(self, name, o1, o2, t1, t2):
        """Cross-view loss of outputs (o1, o2) against targets (t1, t2)."""
        g = self.method.group_size
        if name == "infonce":
            return objectives.infonce_distill(o1, o2, t1, t2, self.method.tau, group_size=g)
        return objectives.neg_cosine(o1, o2, t1, t2)

    def _self_loss(self, name, o1, o2, z1, z2):
        """The base loss without a teacher: SimCLR between the online views, or SimSiam's
        predictor against the stop-gradient other view."""
        if name == "infonce":
            return objectives.simclr_infonce(z1, z2, self.method.tau,
                                             group_size=self.method.group_size)
        sg = jax.lax.stop_gradient
        return objectives.neg_cosine(o1, o2, sg(z1), sg(z2))

    def _teacher(self, ema, v1, v2):
        k1, k2 = self._pair(SSLModel.encode, ema, v1, v2, self.teacher_width)
        return jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)

    def _own_loss(self, params, v1, v2, width, teacher_out):
        """The base loss of a network at ``width`` (with the predictor when the method has
        one): against the teacher's other view if ``teacher_out`` is given, else self-targets.
        Returns (loss, z1, z2)."""
        head = "predictor" if self.method.uses_predictor else None
        o1, o2, z1, z2 = self._online(params, v1, v2, width, head)
        if teacher_out is not None:
            loss = self._pair_loss(self.method.base_loss, o1, o2, *teacher_out)
        else:
            loss = self._self_loss(self.method.base_loss, o1, o2, z1, z2)
        return loss, z1, z2

    def _base_loss(self, params, teacher_out, v1, v2, width):
        m = self.method
        loss, z1, z2 = self._own_loss(params, v1, v2, width,
                                      teacher_out if m.momentum_base else None)
        if m.momentum_sub:
            targets = teacher_out
        else:
            targets = (jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2))
        metrics = {"loss/base": loss, "embed_std": objectives.embedding_std(z1)}
        return loss, (targets, metrics)

    def _sub_loss(self, params, targets, v1, v2, width):
        m = self.method
        if m.distill_loss == "none":  # trained like the base network, on its own
            loss, _, _ = self._own_loss(params, v1, v2, width,
                                        targets if m.momentum_sub else None)
        else:
            head = {"new": "distill_head", "shared": "predictor", "none": None}[m.aux_head]
            o1, o2, _, _ = self._online(params, v1, v2, width, head)
            loss = self._pair_loss(m.distill_loss, o1, o2, *targets)
        return m.distill_weight * loss, loss

    # ------------------------------------------------------------------ programs
    # Shardings are explicit so that a program compiled ahead of time (in a background thread)
    # accepts exactly the arrays the loop produces: state, gradients and metrics replicated;
    # views and targets sharded over the batch.

    def _jit(self, fn, in_shardings, out_shardings, donate=()):
        return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                       donate_argnums=donate)

    def _make_views(self):
        def views(rng, step, images):
            key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
            return self.views_fn(key, images)
        r, b = self._repl, self._batch
        return self._jit(views, (r, r, b), (b, b))

    def _ema_and_teacher(self, params, ema, step, v1, v2):
        if not self.method.uses_teacher:
            return ema, None, jnp.float32(0)
        m = ema_momentum(self.method, step, self.total_steps)
        ema = jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema, _teacher_subset(params))
        return ema, self._teacher(ema, v1, v2), m

    def _apply_update(self, state, grads, groups, step):
        """One optimizer update at iteration ``step``. Parameter groups the update's losses did
        not reach (e.g. the auxiliary head while only the base width trains) are left out of
        weight decay: their gradient is exactly zero, so they stay untouched until first used,
        like PyTorch's SGD skipping parameters whose grad is None (reference §5.2)."""
        decay_mask = {k: jax.tree.map(lambda _, on=(k in groups): on, v)
                      for k, v in state.params.items()}
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, step=step,
                                            decay_mask=decay_mask)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state), optax.global_norm(grads)

    def _lr_metrics(self, step):
        return {} if self.lr_schedule is None else {"lr": self.lr_schedule(step)}

    def _make_base(self, width):
        m, r, b = self.method, self._repl, self._batch
        grad_fn = jax.grad(self._base_loss, has_aux=True)

        if m.update_mode == "accumulate":
            def base(params, ema, step, v1, v2):
                ema, teacher_out, mom = self._ema_and_teacher(params, ema, step, v1, v2)
                grads, (targets, metrics) = grad_fn(params, teacher_out, v1, v2, width)
                metrics["ema_momentum"] = mom
                return ema, grads, targets, metrics
            return self._jit(base, (r, r, r, b, b), (r, r, b, r), donate=(1,))

        def base_update(state, v1, v2):
            ema, teacher_out, mom = self._ema_and_teacher(state.params, state.ema_params,
                                                          state.step, v1, v2)
            grads, (targets, metrics) = grad_fn(state.params, teacher_out, v1, v2, width)
            state, gn = self._apply_update(state.replace(ema_params=ema), grads,
                                           m.decay_groups(sub=False), state.step)
            metrics.update(ema_momentum=mom, grad_norm=gn, **self._lr_metrics(state.step))
            return state, targets, metrics
        return self._jit(base_update, (r, b, b), (r, b, r), donate=(0,))

    def _make_sub(self, width):
        m, r, b = self.method, self._repl, self._batch
        loss_fn = jax.value_and_grad(self._sub_loss, has_aux=True)

        if m.update_mode == "accumulate":
            def sub(params, grads_acc, targets, v1, v2):
                (_, raw), grads = loss_fn(params, targets, v1, v2, width)
                return jax.tree.map(jnp.add, grads_acc, grads), raw
            return self._jit(sub, (r, r, b, b, b), (r, r), donate=(1,))

        def sub_update(state, targets, v1, v2):
            (_, raw), grads = loss_fn(state.params, targets, v1, v2, width)
            state, gn = self._apply_update(state, grads, m.decay_groups(sub=True), state.step)
            return state, raw, gn
        return self._jit(sub_update, (r, b, b, b), (r, r, r), donate=(0,))

    def _make_apply(self, groups):
        r = self._repl

        def apply(state, grads):
            step = state.step
            state, gn = self._apply_update(state, grads, groups, step)
            state = state.replace(step=step + 1)
            return state, {"grad_norm": gn, **self._lr_metrics(step)}
        return self._jit(apply, (r, r), (r, r), donate=(0,))

    def _make_increment(self):
        r = self._repl
        return self._jit(lambda s: s.replace(step=s.step + 1), (r,), r, donate=(0,))

    def _get(self, kind: str, width: float | None = None, groups: frozenset | None = None):
        """The jitted function for a program, created once per channel configuration."""
        if kind in ("base", "sub"):
            key = (kind, self.config_key(width))
        else:
            key = (kind, groups)
        with self._lock:
            fn = self._programs.get(key)
            if fn is None:
                make = {"base": lambda: self._make_base(width),
                        "sub": lambda: self._make_sub(width),
                        "apply": lambda: self._make_apply(groups),
                        "views": self._make_views,
                        "increment": self._make_increment}[kind]
                fn = self._programs[key] = make()
        return key, fn

    def _call(self, kind: str, args: tuple, width: float | None = None,
              groups: frozenset | None = None):
        """Runs a program: its ahead-of-time compiled executable if one is ready or being
        compiled (waiting for it), else the jitted function (compiling now)."""
        key, fn = self._get(kind, width, groups)
        fut = self._compiled.get(key)
        if fut is not None:
            return fut.result()(*args)
        return fn(*args)

    def compile_ahead(self, state: TrainState, images: jax.Array, base_widths: Sequence[float],
                      sub_widths: Sequence[float]) -> list[futures.Future]:
        """Compiles the programs for these widths in background threads (XLA releases the
        GIL), so training starts as soon as the first programs are ready and later stages'
        programs are usually compiled by the time they are needed. Returns the futures."""
        spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        r, b = self._repl, self._batch
        abs_state = jax.tree.map(lambda a: spec(a, r), state)
        abs_images = spec(images, b)
        abs_step = jax.ShapeDtypeStruct((), jnp.int32, sharding=r)
        _, views = self._get("views")
        v1, v2 = jax.tree.map(lambda a: spec(a, b), jax.eval_shape(
            views, abs_state.rng, abs_step, abs_images))
        todo = [("views", (abs_state.rng, abs_step, abs_images), None, None)]
        if self.method.update_mode == "accumulate":
            base_args = (abs_state.params, abs_state.ema_params, abs_step, v1, v2)
        else:
            base_args = (abs_state, v1, v2)
        _, base_fn = self._get("base", base_widths[0])
        out = jax.eval_shape(base_fn, *base_args)
        targets = jax.tree.map(lambda a: spec(a, b), out[2 if len(out) == 4 else 1])
        grads = abs_state.params
        for w in base_widths:
            todo.append(("base", base_args, w, None))
        for w in sub_widths:
            args = ((abs_state.params, grads, targets, v1, v2)
                    if self.method.update_mode == "accumulate" else (abs_state, targets, v1, v2))
            todo.append(("sub", args, w, None))
        if self.method.update_mode == "accumulate":
            m = self.method
            for groups in {m.decay_groups(False), m.decay_groups(True)}:
                todo.append(("apply", (abs_state, grads), None, groups))
        else:
            todo.append(("increment", (abs_state,), None, None))
        submitted = []
        for kind, args, w, groups in todo:
            key, fn = self._get(kind, w, groups)
            with self._lock:
                if key in self._compiled:
                    continue
                fut = self._compile_pool.submit(self._compile, fn, args)
                self._compiled[key] = fut
            submitted.append(fut)
        return submitted

    def _compile(self, fn, args):
        t = time.perf_counter()
        compiled = fn.lower(*args).compile()
        with self._lock:
            self.compile_seconds += time.perf_counter() - t
            self.compiled_programs += 1
        return compiled

    @property
    def num_programs(self) -> int:
        """Distinct programs created so far (each compiles exactly once)."""
        return len(self._programs)

    # ------------------------------------------------------------------ one iteration

    def step(self, state: TrainState, images: jax.Array, widths: Sequence[float],
             step: int) -> tuple[TrainState, dict[str, jax.Array]]:
        """Runs iteration ``step`` (a host int equal to ``state.step``) on a uint8 batch.

        ``widths[0]`` is the base network's width, the rest are sub-networks. Returns the new
        state and device-side metrics (fetch them only when logging, to keep dispatch async).
        """
        if not widths:
            raise ValueError("widths must contain at least the base width")
        base_w, subs = float(widths[0]), [float(w) for w in widths[1:]]
        m = self.method
        step_arr = jnp.int32(step)
        v1, v2 = self._call("views", (state.rng, step_arr, images))
        metrics: dict[str, Any] = {}
        if m.update_mode == "accumulate":
            ema, grads, targets, out = self._call(
                "base", (state.params, state.ema_params, step_arr, v1, v2), width=base_w)
            metrics.update(out)
            for i, w in enumerate(subs):
                grads, metrics[f"loss/sub{i}"] = self._call(
                    "sub", (state.params, grads, targets, v1, v2), width=w)
            # The base program consumed (donated) the old teacher; hand over the new one.
            state = state.replace(ema_params=ema)
            groups = m.decay_groups(sub=bool(subs))
            state, out = self._call("apply", (state, grads), groups=groups)
            metrics.update(out)
        else:
            state, targets, out = self._call("base", (state, v1, v2), width=base_w)
            metrics.update(out)
            for i, w in enumerate(subs):
                state, metrics[f"loss/sub{i}"], metrics[f"grad_norm/sub{i}"] = self._call(
                    "sub", (state, targets, v1, v2), width=w)
            state = self._call("increment", (state,))
        total = metrics["loss/base"]
        for i in range(len(subs)):
            total = total + m.distill_weight * metrics[f"loss/sub{i}"]
        metrics["loss/total"] = total
        return state, metrics
