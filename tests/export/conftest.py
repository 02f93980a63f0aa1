"""A tiny run to export: the demo smoke config (ResNet-18 layout, one block per stage, base
width 16, widths [0.25, 1], 16 px digits, with feature distillation) with one checkpoint of
random weights. Export needs
a checkpoint and BN calibration, not a trained network; making the weights on the host skips
compiling the model's init and training steps (pretraining is tested elsewhere), which would
take most of these tests' time on a CPU."""
import jax
import numpy as np
import pytest

from us3l_jax import build, checkpointing
from tests import helpers

STEP = 3  # any step number; the random state is stored under it


def random_variables(abstract, seed=0):
    """Random values of the given shapes (any pytree of ShapeDtypeStructs), made on the host
    (no compilation): kernels at He scale, BN scales and variances in [0.5, 1.5] (1 / 0 would
    hide slicing mistakes), small biases and means; integer leaves (step, rng) zero."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if not np.issubdtype(s.dtype, np.floating):
            return np.zeros(s.shape, s.dtype)
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            return rng.normal(0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape).astype(s.dtype)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        return rng.normal(0, 0.1, s.shape).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def random_state(config, seed=0):
    """A TrainState of the config's shapes with ``random_variables``' values."""
    return random_variables(build.abstract_state(config), seed)


def make_run(workdir, config):
    """A run of ``config`` in ``workdir``: its config.json and one random checkpoint."""
    checkpointing.write_config(workdir, config)
    ckpt = checkpointing.Checkpointer(workdir, config, async_save=False)
    ckpt.save(STEP, random_state(config))
    ckpt.wait()
    ckpt.close()
    return workdir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    # With feature distillation, so the checkpoint also holds the training-only proj_conv.
    config = helpers.demo_config("smoke", eval__calibration_batches=2,
                                 method__feature_distill=True)
    return make_run(str(tmp_path_factory.mktemp("export_run")), config)


@pytest.fixture(scope="session")
def tiny_vit_run(tmp_path_factory):
    """The ViT demo (dim 64, depth 4, 4 heads, patch 4, 16 px) with ``slicing='embed'``, whose
    widths are smaller ViTs: no BatchNorm, so nothing to calibrate."""
    config = helpers.demo_config("vit", model__slicing="embed")
    return make_run(str(tmp_path_factory.mktemp("export_vit_run")), config)
