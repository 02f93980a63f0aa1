"""The online linear probe (``us3l_jax.engine.online_probe``) in the engine: it learns, and
the training beside it is bitwise the training without it, in both update modes and on a
mesh of two devices."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from us3l_jax import mesh as mesh_lib, optim
from us3l_jax.engine import Engine, online_probe
from us3l_jax.methods import us3l
from tests.helpers import REPO, leaves_equal, xla_flags
from tests.methods.tiny_resnet import BATCH, GROUP, make_images, make_method, make_model

CLASSES = 4
WIDTHS = [(1.0,), (1.0, 0.5), (1.0, 0.75, 0.25)]


def make_probe(model, lr=0.1, total_steps=20):
    def features(params, x):
        return model.backbone.apply({"params": params["backbone"]}, x, width=1.0, train=True)
    return online_probe.make(features, feature_dim=model.backbone.feature_dim(1.0),
                             num_classes=CLASSES, lr=lr, total_steps=total_steps)


def make_engine(update_mode, probe, mesh=None):
    cfg = us3l.Config(group_size=GROUP)
    model = make_model(cfg)
    tx, schedule = optim.make_optimizer(0.1, 20, reg_lambda=5e-5, reg_alpha=0.05)
    return Engine(make_method(cfg, model), tx, mesh or mesh_lib.make_mesh(jax.devices()[:1]),
                  batch_size=BATCH, group_size=GROUP, update_mode=update_mode,
                  lr_schedule=schedule, probe=make_probe(model) if probe else None)


def labels_of(batch=BATCH):
    return jnp.asarray(np.arange(batch) % CLASSES, jnp.int32)


def run(engine, steps=len(WIDTHS)):
    images = make_images()
    state = engine.init_state(jax.random.key(0), images)
    metrics = []
    for ws in WIDTHS[:steps]:
        state, m = engine.step(state, images, ws, labels_of())
        metrics.append(jax.device_get(m))
    return state, metrics


@pytest.mark.parametrize("update_mode,steps", [
    ("accumulate", 2), pytest.param("per_width", 2, marks=pytest.mark.slow)])
def test_the_probe_does_not_change_the_training(update_mode, steps):
    """Parameters, teacher, optimizer state, key and step after a base-only and a sandwich
    iteration (two updates in per_width mode) are bitwise those of the same engine without a
    probe; the probe's own state
    has moved from its zero start and its metrics are logged."""
    plain, _ = run(make_engine(update_mode, probe=False), steps)
    probed, metrics = run(make_engine(update_mode, probe=True), steps)
    assert plain.probe is None
    for field in ("params", "ema_params", "opt_state", "rng", "step", "queue"):
        assert leaves_equal(getattr(plain, field), getattr(probed, field)), field
    w = np.asarray(probed.probe["params"]["w"])
    assert w.shape == (make_model(us3l.Config()).backbone.feature_dim(1.0), CLASSES)
    assert np.abs(w).max() > 0
    for m in metrics:
        assert np.isfinite(m["probe/loss"]) and 0 <= m["probe/acc1"] <= 100
    # Zero weights: the first loss is exactly log(classes).
    np.testing.assert_allclose(metrics[0]["probe/loss"], np.log(CLASSES), rtol=1e-6)


@pytest.mark.slow
def test_probe_step_is_sgd_with_momentum_on_detached_features():
    """Two steps of ``online_probe.step`` equal optax SGD (momentum 0.9, cosine lr) on the
    features computed by hand, and no gradient reaches the network's parameters."""
    model = make_model(us3l.Config(group_size=GROUP))
    probe = make_probe(model, lr=0.5, total_steps=4)
    params = make_method(us3l.Config(group_size=GROUP), model).init(
        jax.random.key(0), None, jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32))[0]
    x = jnp.asarray(make_images(), jnp.float32) / 255.0
    y = labels_of()
    step = jax.jit(lambda s: online_probe.step(probe, s, params, x, y)[0])
    state = step(step(probe.init()))
    feats = jax.jit(probe.features)(params, x)
    p = {"w": jnp.zeros((feats.shape[1], CLASSES)), "b": jnp.zeros((CLASSES,))}
    tx = optax.sgd(optax.cosine_decay_schedule(0.5, 4), momentum=0.9)
    opt = tx.init(p)
    loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        feats @ p["w"] + p["b"], y))
    for _ in range(2):
        u, opt = tx.update(jax.grad(loss)(p), opt, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(state["params"]["w"], p["w"], rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(p["w"]).max()) > 1e-2  # it moved: the tolerance is small beside it
    grads = jax.jit(jax.grad(lambda q: online_probe.step(probe, probe.init(), q, x, y)[1]
                             ["probe/loss"]))(params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
    assert online_probe.accuracy(state, np.asarray(feats), np.asarray(y)) == \
        pytest.approx(100 * float(np.mean(np.argmax(feats @ p["w"] + p["b"], -1) == y)))


def test_the_probe_needs_labels_and_two_classes():
    engine = make_engine("accumulate", probe=True)
    images = make_images()
    state = engine.init_state(jax.random.key(0), images)
    with pytest.raises(ValueError, match="the online linear probe needs the batch's labels"):
        engine.step(state, images, (1.0,))
    with pytest.raises(ValueError, match="needs at least 2 classes, got 1"):
        online_probe.make(lambda p, x: x, feature_dim=3, num_classes=1, lr=0.1, total_steps=5)
    with pytest.raises(ValueError, match="online_linear_lr must be > 0, got 0"):
        online_probe.make(lambda p, x: x, feature_dim=3, num_classes=2, lr=0, total_steps=5)


@pytest.mark.slow
def test_the_probe_runs_on_two_devices():
    """On a mesh of two (forced CPU) devices the probe's state and the training beside it
    match one device's to float32 rounding (that the probe leaves the training bitwise
    unchanged is checked on one device above: compiling a third engine here cost 20 s)."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {REPO!r})
        import jax, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        from tests.engine.test_online_probe import make_engine, run
        from us3l_jax import mesh as mesh_lib
        two = mesh_lib.make_mesh(jax.devices()[:2])
        # Two iterations (base-only, then one sub-network): the compiles are the cost.
        probed, m = run(make_engine("accumulate", probe=True, mesh=two), 2)
        single, m1 = run(make_engine("accumulate", probe=True), 2)
        flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).tolist()
        print(json.dumps(dict(
            p2=flat(probed.params), p1=flat(single.params),
            devices=len(probed.probe["params"]["w"].sharding.device_set),
            w2=np.asarray(probed.probe["params"]["w"]).ravel().tolist(),
            w1=np.asarray(single.probe["params"]["w"]).ravel().tolist(),
            loss2=[float(x["probe/loss"]) for x in m], loss1=[float(x["probe/loss"]) for x in m1])))
    """)
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    np.testing.assert_allclose(out["p2"], out["p1"], rtol=1e-3, atol=1e-4)  # two updates
    np.testing.assert_allclose(out["loss2"], out["loss1"], rtol=1e-5)
    np.testing.assert_allclose(out["w2"], out["w1"], rtol=1e-4, atol=1e-6)


def test_a_checkpoint_of_the_train_state_before_the_probe_restores(tmp_path):
    """Without a probe the TrainState's tree is the six fields it had before the probe field
    existed: a state saved from that earlier class (a flax struct dataclass, as it was)
    restores into today's, and today's saves the same tree."""
    import flax
    import orbax.checkpoint as ocp

    from us3l_jax.engine import TrainState

    @flax.struct.dataclass
    class EarlierTrainState:
        step: jax.Array
        params: object
        ema_params: object
        opt_state: object
        rng: jax.Array
        queue: object = None

    fields = dict(step=jnp.int32(7), params={"backbone": {"w": jnp.arange(3.0)}},
                  ema_params=None, opt_state=(jnp.ones(2),), rng=jnp.zeros(2, jnp.uint32))
    key_paths = lambda t: [jax.tree_util.keystr(p) for p, _ in
                           jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: x is None)[0]]
    assert key_paths(TrainState(**fields)) == key_paths(EarlierTrainState(**fields))
    with_probe = TrainState(**fields, probe={"w": jnp.ones(1)})
    assert key_paths(with_probe)[-1] == ".probe['w']"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "old", EarlierTrainState(**fields))
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "old", jax.tree.map(
        ocp.utils.to_shape_dtype_struct, TrainState(**fields)))
    assert isinstance(restored, TrainState) and restored.probe is None
    assert leaves_equal(restored, TrainState(**fields)) and int(restored.step) == 7
    ckpt.save(tmp_path / "new", with_probe)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "new", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                       with_probe))
    assert leaves_equal(back, with_probe)
