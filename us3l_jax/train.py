"""The US3L training step: pure functions for one iteration, and the cache of their programs.

One iteration (paper Algorithm 1):

1. ``views``: two augmented views of the batch (on device, stored in the compute dtype);
2. ``base_grads``: EMA update of the teacher from the parameters at the start of the
   iteration (once per iteration, before the teacher forward), teacher forward at full width,
   the base network at ``widths[0]`` (1.0 with the sandwich rule) and its loss;
3. ``sub_grads``: for every sampled sub-width, the distillation loss of ``head(sub-network)``
   against the targets of step 2;
4. ``apply_update``: gradients -> optimizer. ``accumulate`` (paper) makes one update per
   iteration with the summed gradients; ``per_width`` (official code) uses ``base_update`` /
   ``sub_update``, one update after each width sharing the optimizer state, later widths
   seeing the already-updated parameters, and ``finish`` counts the iteration.

Every function is pure; ``Trainer`` binds the static parts (model, method, width, mesh) with
``functools.partial``, jits each (kind, channel configuration) once and runs them.

**Communication.** Gradients of replicated parameters would normally be all-reduced by every
program. When whole BN/negative groups live on each device (``method.group_size`` divides the
per-device batch, the official per-GPU setting), the losses decompose over devices, so each
program computes only its device's partial gradient inside ``shard_map`` and keeps it sharded
(leading axis = devices); ``accumulate`` adds partials across programs and reduces once, in
``apply_update``. Otherwise (groups spanning devices) programs fall back to replicated
gradients, reduced in each program.

Widths are chosen on the host (``us3l_jax.sampling``) and reach compiled code as static
Python floats: one compiled program per distinct channel configuration, so a sub-network costs
in proportion to its FLOPs (no ``lax.switch`` or masking, which are slower or keep every
branch's residuals).
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from us3l_jax import mesh as mesh_lib
from us3l_jax import keyqueue, objectives
from us3l_jax.method import MethodConfig, ema_momentum, ema_update, teacher_subset
from us3l_jax.models.heads import SSLModel

PyTree = Any
ViewsFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
DATA = mesh_lib.DATA_AXIS


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: ``step`` (iterations done), ``params``
    ({backbone, projector[, predictor][, distill_head]}), ``ema_params`` (teacher copy of
    {backbone, projector}, or None), ``opt_state`` and the base PRNG key ``rng`` (per-step keys
    are ``fold_in(rng, step)``, so resuming at step k reproduces the same randomness). ``rng``
    is raw key data (uint32), which checkpoints store as a plain array. ``queue``: the key
    queue of MoCo v2 / SEED (``us3l_jax.keyqueue``), None for every other method."""
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    queue: Any = None


# ------------------------------------------------------------------------------ state


def init_state(rng: jax.Array, *, model: SSLModel, method: MethodConfig,
               tx: optax.GradientTransformation, view_spec: jax.ShapeDtypeStruct) -> TrainState:
    """Full-size parameters from ``model.init`` on a batch shaped like one view (so grouped BN
    sees a valid batch); the teacher starts as an exact copy (``encoder_k = deepcopy(q)``)."""
    init_rng, data_rng = jax.random.split(rng)
    params = flax.core.unfreeze(
        model.init(init_rng, jnp.zeros(view_spec.shape, jnp.float32), 1.0)["params"])
    if method.aux_head_init == "copy":  # the official ViT code's deepcopy of the predictor
        params["distill_head"] = jax.tree.map(jnp.copy, params["predictor"])
    ema = jax.tree.map(jnp.copy, teacher_subset(params)) if method.uses_ema_teacher else None
    # The queue's key is derived from, not split off, ``rng``: runs without a queue keep
    # exactly the initialisation they always had.
    queue = keyqueue.init(jax.random.fold_in(rng, 1), method.queue_size, model.proj_out) \
        if method.queue_size else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                      opt_state=tx.init(params), rng=jax.random.key_data(data_rng), queue=queue)


def abstract_state(model: SSLModel, method: MethodConfig, tx: optax.GradientTransformation,
                   view_spec: jax.ShapeDtypeStruct, mesh: Mesh | None = None) -> TrainState:
    """Shapes and dtypes of the TrainState (replicated over ``mesh`` when given), without
    computing anything: what a checkpoint restore needs."""
    shapes = jax.eval_shape(functools.partial(init_state, model=model, method=method, tx=tx,
                                              view_spec=view_spec), jax.random.key(0))
    if mesh is None:
        return shapes
    repl = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), shapes)


# ------------------------------------------------------------------------------ losses


def _pair(model: SSLModel, fn, params, a1, a2, *args):
    """``fn`` (an ``SSLModel`` method) applied to both views: as one pass of the concatenated
    batch when BN groups cannot straddle the views (the group size divides the batch), which
    gives the same statistics as two passes with half the program and larger matmuls."""
    b = a1.shape[0]
    g = model.bn_group_size
    if g is not None and b % g == 0:
        out = model.apply({"params": params}, jnp.concatenate([a1, a2]), *args, method=fn)
        return jax.tree.map(lambda o: o[:b], out), jax.tree.map(lambda o: o[b:], out)
    return tuple(model.apply({"params": params}, a, *args, method=fn) for a in (a1, a2))


def _encode(model: SSLModel, params, v1, v2, width, features: bool):
    """Projections of both views and, with ``features``, the hooked backbone features of the
    same forward (else None): (z1, z2, (f1, f2) or None)."""
    if not features:
        return *_pair(model, SSLModel.encode, params, v1, v2, width), None
    (z1, f1), (z2, f2) = _pair(model, SSLModel.encode_features, params, v1, v2, width)
    return z1, z2, (f1, f2)


def _online(model, params, v1, v2, width, head, features=False):
    """(head outputs, projections, student features) of both views; the head is
    ``predictor``, ``distill_head`` or None (the projections themselves). With ``features``
    the hooked features mapped to full width by ``proj_conv`` (else None)."""
    z1, z2, feats = _encode(model, params, v1, v2, width, features)
    if feats is not None:
        feats = tuple(model.apply({"params": params}, f, width,
                                  method=SSLModel.project_features) for f in feats)
    if head is None:
        return z1, z2, z1, z2, feats
    fn = {"predictor": SSLModel.predict, "distill_head": SSLModel.distill}[head]
    p1, p2 = _pair(model, fn, params, z1, z2)
    return p1, p2, z1, z2, feats


def _pair_loss(method: MethodConfig, name: str, o1, o2, t1, t2):
    """Cross-view loss of outputs (o1, o2) against targets (t1, t2)."""
    if name == "infonce":
        return objectives.infonce_distill(o1, o2, t1, t2, method.tau,
                                          group_size=method.group_size)
    if name == "mocov3":
        return objectives.moco_v3(o1, o2, t1, t2, method.tau, group_size=method.group_size)
    return objectives.neg_cosine(o1, o2, t1, t2)


def _self_loss(method: MethodConfig, o1, o2, z1, z2):
    """The base loss without a teacher: SimCLR between the online views, or SimSiam's
    predictor against the stop-gradient other view."""
    if method.base_loss == "infonce":
        return objectives.simclr_infonce(z1, z2, method.tau, group_size=method.group_size)
    sg = jax.lax.stop_gradient
    return objectives.neg_cosine(o1, o2, sg(z1), sg(z2))


def _own_objective(method, o1, o2, z1, z2, teacher_out):
    """The base loss of head outputs ``o`` / projections ``z``: against the teacher's other
    view if ``teacher_out`` is given, else self-targets."""
    if teacher_out is not None:
        return _pair_loss(method, method.base_loss, o1, o2, *teacher_out)
    return _self_loss(method, o1, o2, z1, z2)


def _own_loss(model, method, params, v1, v2, width, teacher_out):
    """The base loss of a network at ``width`` (with the predictor when the method has one):
    against the teacher's other view if ``teacher_out`` is given, else self-targets.
    Returns (loss, z1, z2)."""
    head = "predictor" if method.uses_predictor else None
    o1, o2, z1, z2, _ = _online(model, params, v1, v2, width, head)
    return _own_objective(method, o1, o2, z1, z2, teacher_out), z1, z2


def teacher_outputs(ema, v1, v2, *, model: SSLModel, width: float):
    """Projections of the momentum teacher at ``width`` for both views, detached: (k1, k2),
    and with feature distillation (``model.feature_layers``) a third element, the hooked
    features of both views from the same forward, ``(f1, f2)`` ({block: map} each)."""
    k1, k2, feats = _encode(model, ema, v1, v2, width, bool(model.feature_layers))
    out = (k1, k2) if feats is None else (k1, k2, feats)
    return jax.lax.stop_gradient(out)


def base_loss(params, teacher_out, v1, v2, *, model: SSLModel, method: MethodConfig,
              width: float):
    """Loss of the base network; aux: (targets of the sub-networks, metrics). The targets are
    (t1, t2) and, with feature distillation, the teacher's features (``teacher_outputs``)."""
    loss, z1, z2 = _own_loss(model, method, params, v1, v2, width,
                             teacher_out[:2] if method.momentum_base else None)
    if method.momentum_sub:
        targets = teacher_out[:2]
    else:
        targets = (jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2))
    if method.feature_distill:
        targets = (*targets, teacher_out[2])
    metrics = {"loss/base": loss, "embed_std": objectives.embedding_std(z1)}
    return loss, (targets, metrics)


def sub_loss(params, targets, v1, v2, *, model: SSLModel, method: MethodConfig, width: float):
    """Weighted loss of the sub-network at ``width``; aux: (None, {"raw": unweighted distill
    loss[, "feature": unweighted feature-distillation loss]})."""
    features = method.feature_distill
    if method.distill_loss == "none":  # trained like the base network, on its own
        head = "predictor" if method.uses_predictor else None
        o1, o2, z1, z2, feats = _online(model, params, v1, v2, width, head, features)
        loss = _own_objective(method, o1, o2, z1, z2,
                              targets[:2] if method.momentum_sub else None)
    else:
        head = {"new": "distill_head", "shared": "predictor", "none": None}[method.aux_head]
        o1, o2, _, _, feats = _online(model, params, v1, v2, width, head, features)
        loss = _pair_loss(method, method.distill_loss, o1, o2, *targets[:2])
    metrics = {"raw": loss}
    if features:
        metrics["feature"] = objectives.feature_mse(*feats, *targets[2])
    return _weighted(method, metrics), (None, metrics)


def _weighted(method: MethodConfig, metrics) -> jax.Array:
    """A sub-network's loss from its unweighted terms (``sub_loss``'s metrics)."""
    loss = method.distill_weight * metrics["raw"]
    if "feature" in metrics:
        loss = loss + method.feature_distill_weight * metrics["feature"]
    return loss


# ------------------------------------------------------------------------------ gradients


def device_local_groups(method: Any, batch_size: int, num_devices: int) -> bool:
    """Whether every device holds whole BN/negative groups (``method.group_size``; a
    ``MethodConfig`` or ``supervised.SupervisedConfig``), so the loss is a sum of per-device
    terms and gradients can stay per-device partial sums between programs."""
    g = method.group_size
    return g is not None and batch_size % num_devices == 0 and \
        (batch_size // num_devices) % g == 0


def _pmean_metrics(metrics):
    return jax.tree.map(lambda m: jax.lax.pmean(m, DATA), metrics)


def partial_grads(loss_fn, params, replicated, batch, *, mesh: Mesh, sharded: bool):
    """Gradient of ``loss_fn(params, *replicated, *batch) -> (loss, (batch_out, metrics))``
    as per-device partial sums: leaves of shape (devices, *param_shape), sharded over the data
    axis, whose sum over axis 0 is the gradient. Also returns ``batch_out`` (sharded like the
    batch) and ``metrics`` (averaged over devices).

    ``sharded``: the loss decomposes over devices (``device_local_groups``). Each device then
    differentiates the mean of its own groups divided by the device count: no communication
    here. Otherwise the gradient is taken globally (XLA all-reduces it) and returned with a
    leading axis of size 1, replicated.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if not sharded:
        g, (out, metrics) = grad_fn(params, *replicated, *batch)
        return jax.tree.map(lambda x: x[None], g), out, metrics
    n = mesh.shape[DATA]

    def local(params, replicated, batch):
        def scaled(p, *args):
            loss, aux = loss_fn(p, *args)
            return loss / n, aux
        g, (out, metrics) = jax.grad(scaled, has_aux=True)(params, *replicated, *batch)
        return jax.tree.map(lambda x: x[None], g), out, _pmean_metrics(metrics)

    # check_vma=False: the parameters enter replicated, and their gradient must stay the
    # device's own partial sum (with the check, JAX would psum it right here).
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(DATA)),
                         out_specs=(P(DATA), P(DATA), P()), check_vma=False)(
        params, replicated, batch)


def _sum_partials(partial):
    """The gradient from per-device partial sums: the one all-reduce of an iteration."""
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), partial)


def decay_flags(method: MethodConfig, sub: bool, step: jax.Array,
                first_sub_step: int | None) -> dict[str, bool | jax.Array]:
    """Whether each top-level parameter group is decayed by an update at iteration ``step``
    that trains sub-networks (``sub``) or only the base network (``MethodConfig.decay_groups``).

    Groups in ``method.late_decay_groups()`` (plain weight decay: the auxiliary head) are
    decayed by base-only updates only after iteration ``first_sub_step``, the first that trained
    sub-networks (None: never), as PyTorch's SGD skips a parameter until its first gradient.
    That test reads the step on device, so it costs no extra program.
    """
    flags: dict[str, bool | jax.Array] = {k: True for k in method.decay_groups(sub)}
    late = frozenset() if sub else method.late_decay_groups()
    if late:
        used = jnp.asarray(False) if first_sub_step is None else step > first_sub_step
        flags.update({k: used for k in late})
    return flags


def _update(state: TrainState, grads, tx, flags: dict[str, bool | jax.Array]
            ) -> tuple[TrainState, Any]:
    """One optimizer update at iteration ``state.step``, decaying the groups ``flags`` marks.
    Groups left out (e.g. the auxiliary head while only the base width trains) get only
    their zero gradient, so an unused head stays untouched until first used."""
    decay_mask = {k: jax.tree.map(lambda _, on=flags.get(k, False): on, v)
                  for k, v in state.params.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, step=state.step,
                                   decay_mask=decay_mask)
    return (state.replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), optax.global_norm(grads))


# ------------------------------------------------------------------------------ programs


def views(rng, step, images, *, views_fn: ViewsFn, dtype):
    """The two views of iteration ``step``, in the compute dtype (what every program reads)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    v1, v2 = views_fn(key, images)
    return v1.astype(dtype), v2.astype(dtype)


def base_grads(params, ema, step, v1, v2, *, model, method, width, teacher_width,
               total_steps, mesh, sharded):
    """EMA update, teacher forward and the base network's partial gradients: (new teacher,
    partial gradients, targets of the sub-networks, metrics)."""
    mom = jnp.float32(0)
    if method.uses_teacher:
        mom = ema_momentum(method, step, total_steps)
        ema = ema_update(ema, params, mom)

    def loss_fn(p, ema, v1, v2):
        t = teacher_outputs(ema, v1, v2, model=model, width=teacher_width) \
            if method.uses_teacher else None
        return base_loss(p, t, v1, v2, model=model, method=method, width=width)

    partial, targets, metrics = partial_grads(loss_fn, params, (ema,), (v1, v2), mesh=mesh,
                                              sharded=sharded)
    metrics = {**metrics, "ema_momentum": mom, "loss/total": metrics["loss/base"]}
    if method.feature_distill:
        metrics["loss/feature"] = jnp.float32(0)
    return ema, partial, targets, metrics


# Metrics summed over the widths of an iteration, carried through its programs: the weighted
# total loss and (feature distillation) the sub-networks' unweighted feature losses.
RUNNING = ("loss/total", "loss/feature")


def _sub_partial(params, targets, v1, v2, *, model, method, width, mesh, sharded):
    loss_fn = functools.partial(sub_loss, model=model, method=method, width=width)
    partial, _, metrics = partial_grads(loss_fn, params, (), (targets, v1, v2), mesh=mesh,
                                        sharded=sharded)
    return partial, metrics


def _add(method: MethodConfig, total: dict, metrics: dict) -> dict:
    """The running sums (``RUNNING``) after one more sub-network."""
    total = {**total, "loss/total": total["loss/total"] + _weighted(method, metrics)}
    if "feature" in metrics:
        total["loss/feature"] = total["loss/feature"] + metrics["feature"]
    return total


def sub_grads(params, partial, total, targets, v1, v2, *, method, **kw):
    """accumulate mode: adds the sub-network's partial gradients (no communication);
    returns (partial, running sums, this width's unweighted loss)."""
    g, m = _sub_partial(params, targets, v1, v2, method=method, **kw)
    return jax.tree.map(jnp.add, partial, g), _add(method, total, m), m["raw"]


def apply_update(state: TrainState, partial, *, tx,
                 decay: Callable[[jax.Array], dict[str, bool | jax.Array]], lr_schedule):
    """accumulate mode: reduces the partial gradients once, updates (decaying the groups
    ``decay(step)`` marks, see ``decay_flags``) and counts the iteration."""
    step = state.step
    state, gn = _update(state, _sum_partials(partial), tx, decay(step))
    metrics = {"grad_norm": gn}
    if lr_schedule is not None:
        metrics["lr"] = lr_schedule(step)
    return state.replace(step=step + 1), metrics


def base_update(state: TrainState, v1, v2, *, tx, lr_schedule, first_sub_step: int | None,
                **kw):
    """per_width mode: teacher, base network and its own update."""
    ema, partial, targets, metrics = base_grads(
        state.params, state.ema_params, state.step, v1, v2, **kw)
    state, gn = _update(state.replace(ema_params=ema), _sum_partials(partial), tx,
                        decay_flags(kw["method"], False, state.step, first_sub_step))
    metrics["grad_norm"] = gn
    if lr_schedule is not None:
        metrics["lr"] = lr_schedule(state.step)
    return state, targets, metrics


def sub_update(state: TrainState, total, targets, v1, v2, *, tx, method, **kw):
    """per_width mode: one sub-network and its own update (one reduction per update)."""
    g, m = _sub_partial(state.params, targets, v1, v2, method=method, **kw)
    state, gn = _update(state, _sum_partials(g), tx, decay_flags(method, True, state.step, None))
    return state, _add(method, total, m), m["raw"], gn


def finish(state: TrainState) -> TrainState:
    """per_width mode: counts the iteration."""
    return state.replace(step=state.step + 1)


# ------------------------------------------------------------------------------ the cache


class Programs:
    """Jitted programs by key, each compiled once: ahead of time in background threads
    (``trace``) or at first call (``call``). XLA compiles without the GIL, so ahead-of-time
    compilation overlaps training."""

    def __init__(self, threads: int = 2):
        self._jitted: dict[Any, Any] = {}
        self._compiled: dict[Any, futures.Future] = {}
        self._lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=threads,
                                                thread_name_prefix="us3l-compile")
        self.compile_seconds = 0.0
        self.compiled = 0
        self.seconds_by_key: dict[Any, float] = {}  # each program's own compile time

    def get(self, key, make: Callable[[], Any]):
        with self._lock:
            if key not in self._jitted:
                self._jitted[key] = make()
            return self._jitted[key]

    def call(self, key, make, *args):
        """Runs the program: its ahead-of-time executable if submitted (waiting for it), else
        the jitted function (compiling now)."""
        fut = self._compiled.get(key)
        if fut is not None:
            return fut.result()(*args)
        return self.get(key, make)(*args)

    def trace(self, key, make, *args):
        """Submits the program's compilation for these abstract arguments and returns its
        abstract outputs, so a dry run of the step reaches every later program."""
        fn = self.get(key, make)
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = self._pool.submit(self._compile, fn, args, key)
        return jax.eval_shape(fn, *args)

    def _compile(self, fn, args, key=None):
        t = time.perf_counter()
        compiled = fn.lower(*args).compile()
        with self._lock:
            seconds = time.perf_counter() - t
            self.compile_seconds += seconds
            self.seconds_by_key[key] = seconds
            self.compiled += 1
        return compiled

    def executable(self, key):
        """The compiled program of ``key`` (waiting for its ahead-of-time compilation)."""
        return self._compiled[key].result()

    def pending(self) -> list[futures.Future]:
        return list(self._compiled.values())

    def __len__(self) -> int:
        return len(self._jitted)


# ------------------------------------------------------------------------------ the trainer


class Trainer:
    """Binds the step functions to one model, method and mesh and runs iterations.

    Args:
      model: the ``SSLModel`` bundle (its ``use_predictor``/``use_distill_head`` must match
        ``method``).
      method: the loss design.
      tx: an optax transformation (``us3l_jax.optim.make_optimizer``). Its ``update`` receives
        the extra arguments ``step=`` (the iteration: schedules must not advance per update,
        since ``per_width`` makes several updates per iteration) and ``decay_mask=``.
      views_fn: ``(key, uint8 images) -> (view1, view2)``, jittable (``us3l_jax.data.augment``).
      mesh: device mesh; the batch is sharded over its data axis, state replicated.
      batch_size: the global batch (decides whether gradients stay per-device partial sums).
      total_steps: iterations of the run (for the EMA cosine schedule).
      teacher_width: width of the momentum teacher (the range's maximum).
      lr_schedule: function of the iteration, for the logged learning rate.
      config_key: width -> channel configuration (programs are shared between widths with
        the same one); default the backbone's.
      reduce_once: keep per-device partial gradients between programs (one reduction per
        iteration in ``accumulate`` mode); default: in ``accumulate`` mode whenever
        ``device_local_groups`` allows, never in ``per_width`` mode (which reduces at every
        update, and sends fewer bytes reducing inside each program). False reduces in every
        program (same results to float32 rounding).
      first_sub_step: the first iteration that trains sub-networks (``sampling.
        first_sub_network_step``; None: none does), for ``decay_flags``.
    """

    def __init__(self, model: SSLModel, method: MethodConfig, tx: optax.GradientTransformation,
                 views_fn: ViewsFn, mesh: Mesh, *, batch_size: int, total_steps: int,
                 teacher_width: float = 1.0, lr_schedule: Callable[[Any], Any] | None = None,
                 config_key: Callable[[float], Any] | None = None, compile_threads: int = 2,
                 reduce_once: bool | None = None, first_sub_step: int | None = 0):
        if model.use_predictor != method.uses_predictor:
            raise ValueError("model.use_predictor must equal method.uses_predictor")
        if model.use_distill_head != method.uses_distill_head:
            raise ValueError("model.use_distill_head must equal method.uses_distill_head")
        if bool(model.feature_layers) != method.feature_distill:
            raise ValueError("model.feature_layers must be non-empty exactly when "
                             "method.feature_distill is on")
        self.model, self.method = model, method
        self.views_fn = views_fn
        self._init_programs(tx, mesh, method, batch_size=batch_size, lr_schedule=lr_schedule,
                            config_key=config_key or model.backbone.channel_config,
                            compile_threads=compile_threads, reduce_once=reduce_once)
        self._static = dict(model=model, method=method, mesh=mesh, sharded=self.sharded)
        self._teacher = dict(teacher_width=float(teacher_width), total_steps=int(total_steps))
        self._first_sub = None if first_sub_step is None else int(first_sub_step)

    def _init_programs(self, tx: optax.GradientTransformation, mesh: Mesh, groups: Any, *,
                       batch_size: int, lr_schedule: Callable[[Any], Any] | None,
                       config_key: Callable[[float], Any], compile_threads: int,
                       reduce_once: bool | None) -> None:
        """What every trainer keeps (this one and ``supervised.SupervisedTrainer``): optimizer,
        schedule, mesh shardings, whether partial gradients stay per device (``groups``: the
        config with the BN/negative ``group_size``) and the program cache."""
        self.tx, self.mesh, self.lr_schedule, self.config_key = tx, mesh, lr_schedule, config_key
        local = device_local_groups(groups, batch_size, mesh.devices.size)
        if reduce_once is None and getattr(groups, "update_mode", None) == "per_width":
            # per_width reduces at every update anyway, and reducing inside each program sends
            # only the slice a sub-network uses: kept per device, its gradient would travel
            # full-size and zero-padded (ImageNet ResNet-50, widths 1/0.5/0.25 on 8 devices:
            # 208 MiB per iteration against 379 MiB, from the compiled programs).
            reduce_once = False
        if reduce_once and not local:
            raise ValueError(
                f"reduce_once needs whole BN/negative groups on every device: group_size="
                f"{groups.group_size} must divide the per-device batch {batch_size} / "
                f"{mesh.devices.size}")
        self.sharded = local if reduce_once is None else bool(reduce_once)
        self.programs = Programs(compile_threads)
        self._repl = mesh_lib.replicated(mesh)
        self._batch = mesh_lib.batch_sharding(mesh)

    # ---------------------------------------------------------------- state

    def view_spec(self, image_spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.eval_shape(self.views_fn, jax.random.key(0), image_spec)[0]

    def init_state(self, rng: jax.Array, image_spec: jax.ShapeDtypeStruct) -> TrainState:
        init = functools.partial(init_state, model=self.model, method=self.method, tx=self.tx,
                                 view_spec=self.view_spec(image_spec))
        return jax.jit(init, out_shardings=self._repl)(rng)

    def abstract_state(self, image_spec: jax.ShapeDtypeStruct) -> TrainState:
        return abstract_state(self.model, self.method, self.tx, self.view_spec(image_spec),
                              self.mesh)

    # ---------------------------------------------------------------- programs
    # Shardings are explicit so that a program compiled ahead of time accepts exactly the
    # arrays the loop produces: state, teacher and metrics replicated; views, targets and
    # partial gradients sharded over the data axis (partials replicated in the fallback).

    def _jit(self, fn, in_shardings, out_shardings, donate=()):
        return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                       donate_argnums=donate)

    def _make(self, kind: str, width: float | None = None, sub: bool | None = None):
        r, b = self._repl, self._batch
        g = b if self.sharded else r  # partial gradients
        s, tx, lr = self._static, self.tx, self.lr_schedule
        if kind == "views":
            fn = functools.partial(views, views_fn=self.views_fn, dtype=self.model.dtype)
            return self._jit(fn, (r, r, b), (b, b))
        if kind == "base":
            fn = functools.partial(base_grads, width=width, **s, **self._teacher)
            return self._jit(fn, (r, r, r, b, b), (r, g, b, r), donate=(1,))
        if kind == "sub":
            fn = functools.partial(sub_grads, width=width, **s)
            return self._jit(fn, (r, g, r, b, b, b), (g, r, r), donate=(1,))
        if kind == "apply":
            decay = functools.partial(decay_flags, self.method, bool(sub),
                                      first_sub_step=self._first_sub)
            fn = functools.partial(apply_update, tx=tx, decay=decay, lr_schedule=lr)
            return self._jit(fn, (r, g), (r, r), donate=(0,))
        if kind == "base_update":
            fn = functools.partial(base_update, tx=tx, lr_schedule=lr, width=width,
                                   first_sub_step=self._first_sub, **s, **self._teacher)
            return self._jit(fn, (r, b, b), (r, b, r), donate=(0,))
        if kind == "sub_update":
            fn = functools.partial(sub_update, tx=tx, width=width, **s)
            return self._jit(fn, (r, r, b, b, b), (r, r, r, r), donate=(0,))
        if kind == "finish":
            return self._jit(finish, (r,), r, donate=(0,))
        raise ValueError(f"unknown program kind {kind!r}")

    def _program(self, run, kind: str, *args, width: float | None = None,
                 sub: bool | None = None):
        key = (kind, self.config_key(width) if width is not None else sub)
        return run(key, lambda: self._make(kind, width, sub), *args)

    @property
    def num_programs(self) -> int:
        """Distinct programs created so far (each compiles exactly once)."""
        return len(self.programs)

    # ---------------------------------------------------------------- one iteration

    def _iteration(self, run, state, images, widths: Sequence[float]):
        if not widths:
            raise ValueError("widths must contain at least the base width")
        base_w, subs = float(widths[0]), [float(w) for w in widths[1:]]
        m, prog = self.method, functools.partial(self._program, run)
        v1, v2 = prog("views", state.rng, state.step, images)
        metrics: dict[str, Any] = {}
        if m.update_mode == "accumulate":
            ema, partial, targets, out = prog("base", state.params, state.ema_params,
                                              state.step, v1, v2, width=base_w)
            total = {k: out.pop(k) for k in RUNNING if k in out}
            metrics.update(out)
            for i, w in enumerate(subs):
                partial, total, metrics[f"loss/sub{i}"] = prog(
                    "sub", state.params, partial, total, targets, v1, v2, width=w)
            # The base program consumed (donated) the old teacher; hand over the new one.
            state, out = prog("apply", state.replace(ema_params=ema), partial, sub=bool(subs))
            metrics.update(out)
        else:
            state, targets, out = prog("base_update", state, v1, v2, width=base_w)
            total = {k: out.pop(k) for k in RUNNING if k in out}
            metrics.update(out)
            for i, w in enumerate(subs):
                state, total, metrics[f"loss/sub{i}"], metrics[f"grad_norm/sub{i}"] = prog(
                    "sub_update", state, total, targets, v1, v2, width=w)
            state = prog("finish", state)
        metrics.update(total)
        return state, metrics

    def step(self, state: TrainState, images: jax.Array,
             widths: Sequence[float]) -> tuple[TrainState, dict[str, jax.Array]]:
        """Runs iteration ``state.step`` on a uint8 batch. ``widths[0]`` is the base network's
        width, the rest are sub-networks. Returns the new state and device-side metrics (fetch
        them only when logging, to keep dispatch asynchronous)."""
        return self._iteration(self.programs.call, state, images, widths)

    def compile_ahead(self, state: TrainState, images: jax.Array,
                      width_sets: Sequence[Sequence[float]]) -> list[futures.Future]:
        """Compiles, in background threads, every program that iterations with these width
        sets run: a dry run of ``step`` on abstract values, so it needs no list of its own.
        ``state``/``images`` may be arrays or ``ShapeDtypeStruct``s. Returns the futures."""
        for widths in width_sets:
            self.iteration_keys(state, images, widths)
        return self.programs.pending()

    def iteration_keys(self, state: TrainState, images: jax.Array,
                       widths: Sequence[float]) -> list[Any]:
        """Keys of the programs an iteration with ``widths`` runs, in order (``(kind,
        channel configuration)``, ``("apply", whether sub-networks trained)`` or ``(kind,
        None)``), from a dry run that also submits their compilation."""
        spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        keys = []

        def record(key, make, *args):
            keys.append(key)
            return self.programs.trace(key, make, *args)

        self._iteration(record, jax.tree.map(lambda a: spec(a, self._repl), state),
                        spec(images, self._batch), widths)
        return keys
