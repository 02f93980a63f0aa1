"""The paper's linear evaluation: a linear classifier on the frozen backbone.

The backbone runs at the evaluated width in **eval mode** with that width's calibrated BN
statistics, also while the classifier trains (the official code puts the whole model in
``eval()``), on the linear-eval training augmentation; only the classifier is updated. The
reported number is the top-1 accuracy after the last epoch (no model selection).

Recipes:
* ``CIFAR`` (paper Appendix A): SGD momentum 0.9, lr 30, wd 0, 100 epochs, lr ×0.1 at
  epochs 60 and 80, batch 512.
* ``TRANSFER``: the same with batch 256 (64/GPU × 4).
* ``IMAGENET``: SGD + LARS (trust 0.001, apex LARC without clipping), lr 0.8, cosine
  per epoch over 60 epochs, batch 1024: the official configs. The paper says it follows
  SimSiam's protocol (LARS, batch 4096, 90 epochs); ``eval.linear_epochs=90`` gets its length
  (docs/fidelity.md, "Linear evaluation").
* ``VIT`` (the official ViT linear evaluation, MoCo v3's ``main_lincls``): SGD momentum 0.9,
  lr 0.1 (0.1 x batch/256 at batch 256), wd 0, 90 epochs, cosine per epoch, classifier
  initialised N(0, 0.01) with zero bias. ``recipe_for`` picks it for ViT backbones. A ViT has
  no BN, so there is nothing to calibrate; its views are the ImageNet-sized ones
  (RandomResizedCrop(224) + flip; Resize(256) + CenterCrop(224); ``transforms.for_run``).

The classifier init is a recipe field (``classifier_init``). ``uniform`` (CNN recipes) is the
official ``fc``: a linear layer on the slimmed feature whose weight and bias are drawn from
U(±1/sqrt(d)) with d the full-width feature size (PyTorch's default init of the full-size
layer, then sliced). ``normal`` is the ViT ``head`` re-initialised by ``main_lincls``: weight
N(0, std 0.01), bias 0. Each epoch visits a fresh permutation of the training set in full
batches (the last partial batch is dropped).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from us3l_jax import models, optim
from us3l_jax.data import augment, feeding

log = logging.getLogger(__name__)
PyTree = Any
SCHEDULES = ("multistep", "cosine")
CLASSIFIER_INITS = ("uniform", "normal")  # U(±1/sqrt(full d)) / N(0, 0.01) weight, zero bias
NORMAL_INIT_STD = 0.01


@dataclasses.dataclass(frozen=True)
class LinearRecipe:
    epochs: int = 100
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 512
    schedule: str = "multistep"
    milestones: tuple[int, ...] = (60, 80)  # epochs at which the rate is multiplied by gamma
    gamma: float = 0.1
    lars: bool = False
    trust_coefficient: float = 0.001
    classifier_init: str = "uniform"  # one of CLASSIFIER_INITS

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; valid: {SCHEDULES}")
        if self.classifier_init not in CLASSIFIER_INITS:
            raise ValueError(f"unknown classifier init {self.classifier_init!r}; valid: "
                             f"{CLASSIFIER_INITS}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"linear recipe needs epochs, batch_size and lr > 0: {self}")

    def with_epochs(self, epochs: int) -> LinearRecipe:
        """The recipe shortened/lengthened to ``epochs``, milestones at the same fractions
        (100 -> 2 epochs puts 60/80 at 1/2)."""
        ms = tuple(max(1, round(m * epochs / self.epochs)) for m in self.milestones)
        return dataclasses.replace(self, epochs=epochs, milestones=ms)


CIFAR = LinearRecipe()
TRANSFER = LinearRecipe(batch_size=256)
IMAGENET = LinearRecipe(epochs=60, lr=0.8, batch_size=1024, schedule="cosine", milestones=(),
                        lars=True)
VIT_BATCH = 256
VIT = LinearRecipe(epochs=90, lr=0.1 * VIT_BATCH / 256, batch_size=VIT_BATCH, schedule="cosine",
                   milestones=(), classifier_init="normal")
RECIPES = {"cifar": CIFAR, "transfer": TRANSFER, "imagenet": IMAGENET, "vit": VIT}


def recipe_for(name: str, dataset: str, epochs: int | None = None,
               model: str | None = None) -> LinearRecipe:
    """The recipe ``name`` (``auto``: the ViT one when ``model`` is a ViT, else ImageNet's for
    imagenet2012, the transfer one for Flowers/Pets/DTD, else CIFAR's), optionally with
    ``epochs`` instead of its own."""
    if name == "auto":
        name = ("vit" if model in models.VIT_NAMES else
                "imagenet" if dataset == "imagenet2012" else
                "transfer" if dataset in ("oxford_flowers102", "oxford_iiit_pet", "dtd")
                else "cifar")
    if name not in RECIPES:
        raise ValueError(f"unknown linear recipe {name!r}; valid: auto, {', '.join(RECIPES)}")
    r = RECIPES[name]
    return r if epochs is None else r.with_epochs(int(epochs))


def lr_schedule(recipe: LinearRecipe, steps_per_epoch: int) -> Callable[[Any], jax.Array]:
    """The learning rate as a function of the step (constant within an epoch)."""
    if recipe.schedule == "cosine":
        return optim.cosine_lr(recipe.lr, recipe.epochs, steps_per_epoch=steps_per_epoch)
    # The rate drops from the first step of each milestone epoch on (optax: count >= boundary).
    return optax.piecewise_constant_schedule(
        recipe.lr, {m * steps_per_epoch: recipe.gamma for m in recipe.milestones})


def make_optimizer(recipe: LinearRecipe, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum (PyTorch semantics: b = μ·b + g, p -= lr·b), coupled weight decay,
    optional LARS trust ratio."""
    parts = []
    if recipe.weight_decay:
        parts.append(optax.add_decayed_weights(recipe.weight_decay))
    if recipe.lars:
        parts.append(optax.scale_by_trust_ratio(trust_coefficient=recipe.trust_coefficient))
    parts.append(optax.sgd(lr_schedule(recipe, steps_per_epoch), momentum=recipe.momentum))
    return optax.chain(*parts)


def init_classifier(key: jax.Array, feature_dim: int, full_dim: int, num_classes: int,
                    init: str = "uniform") -> dict[str, jax.Array]:
    """The classifier ``{'w': (feature_dim, num_classes), 'b': (num_classes,)}`` drawn as
    ``init`` says (see the module docstring; ``full_dim`` sets the uniform bound)."""
    if init not in CLASSIFIER_INITS:
        raise ValueError(f"unknown classifier init {init!r}; valid: {CLASSIFIER_INITS}")
    kw, kb = jax.random.split(key)
    if init == "normal":
        return {"w": NORMAL_INIT_STD * jax.random.normal(kw, (feature_dim, num_classes),
                                                         jnp.float32),
                "b": jnp.zeros((num_classes,), jnp.float32)}
    bound = 1.0 / math.sqrt(full_dim)
    return {"w": jax.random.uniform(kw, (feature_dim, num_classes), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (num_classes,), jnp.float32, -bound, bound)}


def _frozen_features(backbone, params, batch_stats, x, width):
    y = backbone.apply({"params": params, "batch_stats": batch_stats}, x, width=width,
                       train=False)
    return jax.lax.stop_gradient(y.astype(jnp.float32))


@functools.lru_cache(maxsize=16)
def _train_step_fn(backbone: nn.Module, width: float, view: augment.ViewConfig,
                   recipe: LinearRecipe, steps_per_epoch: int):
    tx = make_optimizer(recipe, steps_per_epoch)

    def step(clf, opt_state, backbone_params, batch_stats, images, labels, key):
        feats = _frozen_features(backbone, backbone_params, batch_stats,
                                 augment.view(key, images, view), width)

        def loss_fn(c):
            logits = feats @ c["w"] + c["b"]
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

        loss, grads = jax.value_and_grad(loss_fn)(clf)
        updates, opt_state = tx.update(grads, opt_state, clf)
        return optax.apply_updates(clf, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), tx


def train(backbone: nn.Module, params: PyTree, batch_stats: PyTree,
          data: feeding.DeviceDataset, width: float, view: augment.ViewConfig,
          recipe: LinearRecipe = CIFAR, seed: int = 0) -> tuple[dict[str, np.ndarray],
                                                                 list[float]]:
    """Trains the classifier on frozen features; returns it and the mean loss per epoch."""
    width = float(width)
    feeder = feeding.TrainFeeder(data, recipe.batch_size, seed)
    spe = feeder.steps_per_epoch
    step_fn, tx = _train_step_fn(backbone, width, view, recipe, spe)
    init_key, key = jax.random.split(jax.random.key(seed))
    clf = init_classifier(init_key, backbone.feature_dim(width), backbone.feature_dim(1.0),
                          data.num_classes, recipe.classifier_init)

    def step(state, batch, k):
        c, o, loss = step_fn(*state, params, batch_stats, batch.images, batch.labels, k)
        return (c, o), loss

    (clf, _), history = run_epochs(feeder, recipe.epochs, key, step, (clf, tx.init(clf)),
                                   f"linear w={width:g}")
    return jax.device_get(clf), history


def run_epochs(feeder: feeding.TrainFeeder, epochs: int, key: jax.Array,
               step: Callable[[Any, feeding.Batch, jax.Array], tuple[Any, jax.Array]],
               state: Any, what: str) -> tuple[Any, list[float]]:
    """``epochs`` passes over ``feeder``'s batches: ``state, loss = step(state, batch, key_k)``
    for global step k with ``key_k = fold_in(key, k)``. Returns the final state and the mean
    loss per epoch (fetched once per epoch)."""
    spe = feeder.steps_per_epoch
    history = []
    for epoch in range(epochs):
        losses = []
        for i in range(spe):
            k = epoch * spe + i
            state, loss = step(state, feeder.batch(k), jax.random.fold_in(key, k))
            losses.append(loss)
        history.append(float(np.mean(jax.device_get(losses))))
        log.debug("%s epoch %d/%d loss %.4f", what, epoch + 1, epochs, history[-1])
    return state, history


def accuracy(clf: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of features ``x`` that the classifier labels ``y``."""
    pred = np.argmax(np.asarray(x, np.float32) @ clf["w"] + clf["b"], axis=-1)
    return float(np.mean(pred == np.asarray(y)))
