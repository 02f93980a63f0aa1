"""A tiny slimmable ResNet (base width 16, one block per stage, 8x8 inputs) with US3L's
heads, shared by the method and engine tests."""
import jax
import jax.numpy as jnp
import numpy as np

from us3l_jax import models
from us3l_jax.methods import us3l
from us3l_jax.models.heads import SSLModel

BATCH, SIZE, GROUP = 16, 8, 8


def noisy_views(key, images):
    """A cheap, deterministic stand-in for the SSL augmentation: two noisy copies."""
    x = images.astype(jnp.float32) / 255.0
    k1, k2 = jax.random.split(key)
    return (x + 0.1 * jax.random.normal(k1, x.shape),
            x + 0.1 * jax.random.normal(k2, x.shape))


def make_model(cfg: us3l.Config, dtype=jnp.float32) -> SSLModel:
    """The tiny ResNet with the heads ``cfg`` uses."""
    bb = models.create("cifar_resnet18", base_width=16, stage_sizes=(1, 1, 1, 1),
                       bn_group_size=cfg.group_size, dtype=dtype)
    return SSLModel(bb, proj_hidden=32, proj_out=16, head_hidden=32,
                    use_predictor=cfg.uses_predictor, use_distill_head=cfg.uses_distill_head,
                    bn_group_size=cfg.group_size, dtype=dtype)


def make_method(cfg: us3l.Config, model: SSLModel | None = None, total_steps: int = 20):
    return us3l.make(cfg, model or make_model(cfg), noisy_views, total_steps=total_steps)


def make_images(seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    return jax.device_put(rng.integers(0, 256, (batch, SIZE, SIZE, 3)).astype(np.uint8))
