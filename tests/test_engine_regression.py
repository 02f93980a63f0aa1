"""Same numbers before and after a refactor of the training step.

Each case is a config file variant (every ``configs/demo.py`` variant and a tiny version of
each paper config) trained for two iterations in both update modes; the parameters, the
teacher and the key queue it ends with are compared, to 1e-6 per entry, with the values
recorded in ``tests/regression_data/`` by the code before the change (as fingerprints of each
leaf, ``_fingerprint``, which keeps the recorded files small). To record them (only when a change
is *meant* to change the numbers, and say why in the commit):

    US3L_RECORD_REGRESSION=1 python -m pytest -m regression tests/test_engine_regression.py

It is marked ``regression`` (about 20 minutes on 2 cores), which the everyday and CI command
leave out: run ``python -m pytest -m regression`` whenever the engine or a method changes.

The cases run without the sampler's stage schedule, so sub-networks train from the first
iteration, and on digits at 16 px with base width 16 and a width grid of 0.25 so the whole file
stays cheap.
"""
import os
import zlib

import jax
import numpy as np
import pytest

from tests.helpers import load_config_module
from us3l_jax import pretrain

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regression_data")
RECORD = os.environ.get("US3L_RECORD_REGRESSION") == "1"
STEPS = 2
TEACHER = "{teacher}"  # replaced by the workdir of the frozen-teacher run

CASES = [
    # every configs/demo.py variant
    ("demo.py", None), ("demo.py", "smoke"), ("demo.py", "vit"), ("demo.py", "byol"),
    ("demo.py", "byol,0.25"), ("demo.py", "us_byol"), ("demo.py", "mocov2,0.5"),
    ("demo.py", f"seed,0.25,{TEACHER}"), ("demo.py", f"seed_mse,0.5,{TEACHER}"),
    ("demo.py", "supervised_us"), ("demo.py", "s_net"),
    # a tiny version of each paper config
    ("us3l_cifar10.py", "resnet18"), ("us3l_cifar100.py", "resnet50,official"),
    ("us3l_imagenet.py", "resnet50"), ("vit_cifar10.py", "tiny,us3l"),
    ("vit_cifar10.py", "tiny,us_mocov3"), ("byol_imagenet.py", "us_byol,resnet18"),
    ("mocov2_cifar100.py", "0.25"), ("seed_cifar100.py", f"seed_mse,resnet18,r18,0.25,{TEACHER}"),
    ("baselines_cifar100.py", "simclr,1.0"), ("baselines_cifar100.py", "simsiam,0.5"),
    ("baselines_cifar100.py", "us_simclr"), ("table1.py", "supervised_s_net_distill"),
    ("table1.py", "simsiam_s_net"), ("table7.py", "1"), ("table7.py", "6"),
    ("table7.py", "10"), ("strategies.py", "table9,0,1"), ("strategies.py", "table13,4"),
]


def _shrink(c, mode: str):
    """The config at test size, ``mode`` updates, sub-networks from iteration 0."""
    c.seed = 0
    c.data.dataset = "digits"
    c.data.image_size = 16
    c.data.streaming = False
    c.data.data_dir = None
    m = c.model
    if m.name.startswith("vit"):
        m.dim, m.depth, m.heads, m.patch_size = 32, 2, 2, 4
    elif "resnet" in m.name:
        m.base_width, m.stage_sizes = 16, (1, 1, 1, 1)
    c.heads.proj_hidden, c.heads.proj_out, c.heads.head_hidden = 32, 16, 32
    c.optim.batch_size = 16
    c.optim.epochs = 4
    c.optim.warmup_epochs = min(c.optim.warmup_epochs, 1)
    c.optim.reg_warmup_epochs = min(c.optim.reg_warmup_epochs, 1)
    c.method.group_size = 8
    c.method.update_mode = mode
    if c.method.queue_size:
        c.method.queue_size = 32
    c.sampler.schedule = "none"
    if not c.model.switchable_widths:
        c.sampler.grid_step = 0.25  # few distinct sub-networks: few programs to compile
    c.teacher.calibration_batches = 2
    c.train.max_steps = STEPS
    c.train.log_every_steps = 1
    c.train.compile_ahead = False
    c.eval.final_sweep = False
    c.eval.online_every_epochs = 0
    return c


def _config(path: str, arg: str | None, mode: str, teacher: str):
    arg = None if arg is None else arg.replace(TEACHER, teacher)
    return _shrink(load_config_module(os.path.join("configs", path)).get_config(arg), mode)


def _fingerprint(name: str, x: np.ndarray) -> np.ndarray:
    """A leaf in few numbers: its first 16 entries, then its sums of x, |x| and x^2 and four
    projections on random +-1 vectors (seeded by the leaf's name). A change of one entry by
    more than the tolerance moves the sums or a projection by more than their tolerance."""
    x = x.astype(np.float64).ravel()
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    signs = rng.choice([-1.0, 1.0], size=(4, x.size))
    head = np.zeros(16)
    head[:min(16, x.size)] = x[:16]
    return np.concatenate([head, [x.sum(), np.abs(x).sum(), np.square(x).sum()], signs @ x])


def _scale(x: np.ndarray) -> np.ndarray:
    """The tolerance of each fingerprint entry for entries off by 1e-6 (relative or absolute)."""
    a = np.abs(x.astype(np.float64).ravel())
    head = np.zeros(16)
    head[:min(16, a.size)] = a[:16]
    tol = 1e-6 * (1 + a)
    return np.concatenate([1e-6 * (1 + head), [tol.sum(), tol.sum(), 2 * (a * tol).sum()],
                           np.full(4, np.sqrt(np.square(tol).sum()) * 6 + tol.max())])


def _flat(state) -> dict[str, np.ndarray]:
    """The state's parameters, teacher and queue by path."""
    out = {}
    for part in ("params", "ema_params", "queue"):
        tree = getattr(state, part)
        if tree is None:
            continue
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out[part + jax.tree_util.keystr(path)] = np.asarray(leaf, np.float32)
    return out


@pytest.fixture(scope="module")
def frozen_teacher(tmp_path_factory):
    """The frozen teacher of the SEED cases: the tiny demo BYOL run, 3 iterations."""
    d = str(tmp_path_factory.mktemp("teacher"))
    pretrain.train(_config("demo.py", "byol", "accumulate", ""), d)
    return d


def _name(path, arg, mode):
    tag = (arg or "default").split(f",{TEACHER}")[0].replace(",", "_").replace("@", "at")
    return f"{path[:-3]}-{tag}-{mode}"


@pytest.mark.slow
@pytest.mark.regression
@pytest.mark.parametrize("path,arg", CASES, ids=[_name(p, a, "")[:-1] for p, a in CASES])
def test_parameters_match_the_recorded_run(path, arg, frozen_teacher, tmp_path):
    for mode in ("accumulate", "per_width"):
        state = pretrain.train(_config(path, arg, mode, frozen_teacher), str(tmp_path / mode))
        assert int(state.step) == STEPS
        leaves = _flat(state)
        got = {k: _fingerprint(k, v) for k, v in leaves.items()}
        file = os.path.join(DATA, _name(path, arg, mode) + ".npz")
        if RECORD:
            os.makedirs(DATA, exist_ok=True)
            np.savez_compressed(file, **got)
            continue
        want = dict(np.load(file))
        assert sorted(got) == sorted(want), f"{mode}: different state entries"
        for k in want:
            off = np.abs(got[k] - want[k]) > _scale(leaves[k])
            assert not off.any(), (f"{path}:{arg} {mode} {k}: fingerprint entries "
                                   f"{np.flatnonzero(off).tolist()} differ: {got[k][off]} vs "
                                   f"{want[k][off]}")
