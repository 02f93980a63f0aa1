"""Fine-tuning transfer: the whole network trained at one width on a labelled dataset.

What the official code runs with ``LINEAR_EVAL: False`` (its transfer configs
``configs/{dtd,flowers,pets,aircraft}/resnet{18,50}_finetune_*.yaml``):

* the backbone at the evaluated width with a new classifier ``fc`` (PyTorch's default init
  of the full-size layer, input slimmed; the pretrained ``fc``/heads are dropped);
* every parameter trained by SGD (momentum 0.9, coupled weight decay on every parameter,
  BN and biases included), the rate a multi-step schedule of the epoch;
* the network in **train mode**: BN normalises with batch statistics per GPU batch (64 images,
  ``bn_group_size``) and updates its running statistics as PyTorch does (momentum 0.1,
  unbiased variance), starting from the statistics the evaluation calibrated for this width
  (the official configs load the width's calibrated checkpoint);
* the test split in eval mode with those running statistics, top-1 after the last epoch.

Training crops are the linear-evaluation ones of the run (ImageNet-sized: RandomResizedCrop
(0.08, 1) + flip; test Resize + CenterCrop), as the configs' ``AUG`` sections say.

Recipes (``RECIPES``), whole batch 256 = 64 per GPU x 4:

* ``us`` (default): the US backbone files (``resnet18_finetune_{dtd,flowers,pets}``, which
  fine-tune ``us_resnet50`` at a width): lr 0.1, weight decay 1e-4, 100 epochs, x0.1 at 60
  and 80.
* ``r50_dtd``, ``r50_flowers``, ``r50_pets``, ``r50_aircraft``, ``r18_aircraft``: the files
  for plain full-width networks (``resnet50_finetune_*``, ``resnet18_finetune_aircraft``):
  50 epochs, x0.1 at 30 and 40, lr 1e-3 (DTD, Flowers, R-18 Aircraft), 5e-4 with weight decay
  5e-4 (Pets), 5e-3 (R-50 Aircraft), weight decay 1e-4 otherwise.

The running statistics are updated with the whole batch's moments, where the official chain
is one GPU's 64 images (its buffers are broadcast from rank 0); the difference is the noise of
a 64- against a 256-image estimate.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from us3l_jax import calibration as calib
from us3l_jax.data import augment, feeding
from us3l_jax.evaluate import linear

PyTree = Any
OFFICIAL_BN_GROUP = 64  # the official fine-tuning's per-GPU batch


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe(linear.LinearRecipe):
    """A linear recipe's optimizer and schedule, applied to every parameter, plus the BN
    group of training-mode statistics and the running-statistics momentum."""
    epochs: int = 100
    lr: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 256
    bn_group_size: int | None = OFFICIAL_BN_GROUP
    bn_momentum: float = calib.EMA_MOMENTUM

    def __post_init__(self):
        super().__post_init__()
        if self.lars or self.schedule != "multistep":
            raise ValueError("fine-tuning runs SGD with a multi-step schedule, as the official "
                             "configs")
        g = self.bn_group_size
        if g is not None and (g < 1 or self.batch_size % g):
            raise ValueError(f"fine-tuning batch {self.batch_size} is not a multiple of its BN "
                             f"group {g}")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")


_PLAIN = dict(epochs=50, milestones=(30, 40), lr=1e-3)
RECIPES: dict[str, FinetuneRecipe] = {
    "us": FinetuneRecipe(),
    "r50_dtd": FinetuneRecipe(**_PLAIN),
    "r50_flowers": FinetuneRecipe(**_PLAIN),
    "r50_pets": FinetuneRecipe(**{**_PLAIN, "lr": 5e-4, "weight_decay": 5e-4}),
    "r50_aircraft": FinetuneRecipe(**{**_PLAIN, "lr": 5e-3}),
    "r18_aircraft": FinetuneRecipe(**_PLAIN),
}


def recipe_for(name: str, epochs: int | None = None) -> FinetuneRecipe:
    """The recipe ``name``, optionally with ``epochs`` (milestones at the same fractions)."""
    if name not in RECIPES:
        raise ValueError(f"unknown fine-tuning recipe {name!r}; valid: {', '.join(RECIPES)}")
    r = RECIPES[name]
    return r if epochs is None else r.with_epochs(int(epochs))


def init_fc(key: jax.Array, full_dim: int, num_classes: int) -> dict[str, jax.Array]:
    """A new full-size classifier ``fc`` (``kernel`` [full_dim, classes], ``bias``): PyTorch's
    default init, U(+-1/sqrt(full_dim)), as the official ``fc`` that the checkpoint lacks."""
    clf = linear.init_classifier(key, full_dim, full_dim, num_classes, "uniform")
    return {"kernel": clf["w"], "bias": clf["b"]}


@functools.lru_cache(maxsize=16)
def _train_step_fn(model: nn.Module, width: float, view: augment.ViewConfig,
                   recipe: FinetuneRecipe, steps_per_epoch: int):
    tx = linear.make_optimizer(recipe, steps_per_epoch)

    def step(params, batch_stats, opt_state, images, labels, key):
        x = augment.view(key, images, view)

        def loss_fn(p):
            logits, state = model.apply({"params": p}, x, width=width, train=True,
                                        mutable=["bn_moments"])
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels))
            return loss, state["bn_moments"]

        (loss, moments), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        batch_stats = calib.ema_update(batch_stats, jax.lax.stop_gradient(moments),
                                       recipe.bn_momentum)
        return params, batch_stats, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2)), tx


def train(model: nn.Module, params: PyTree, batch_stats: PyTree, data: feeding.DeviceDataset,
          width: float, view: augment.ViewConfig, recipe: FinetuneRecipe = RECIPES["us"],
          seed: int = 0) -> tuple[PyTree, PyTree, list[float]]:
    """Fine-tunes ``model`` (a backbone with ``num_classes`` set and ``bn_group_size`` =
    ``recipe.bn_group_size``) at ``width`` from the pretrained backbone ``params`` (any
    ``fc`` in them is replaced by a new one) and the width's calibrated ``batch_stats``.
    Returns the tuned params, the updated running statistics and the mean loss per epoch;
    the inputs are not modified."""
    width = float(width)
    if model.num_classes is None:
        raise ValueError("fine-tuning needs a model with a classifier (num_classes)")
    if getattr(model, "bn_group_size", None) != recipe.bn_group_size:
        raise ValueError(f"the model normalises per {model.bn_group_size} images, the recipe "
                         f"per {recipe.bn_group_size}")
    feeder = feeding.TrainFeeder(data, recipe.batch_size, seed)
    step_fn, tx = _train_step_fn(model, width, view, recipe, feeder.steps_per_epoch)
    init_key, key = jax.random.split(jax.random.key(seed))
    tuned = {k: v for k, v in params.items() if k != "fc"}
    tuned["fc"] = init_fc(init_key, model.feature_dim(1.0), data.num_classes)
    tuned = jax.tree.map(jnp.array, tuned)  # copies: the step donates its inputs
    stats = jax.tree.map(jnp.array, batch_stats)

    def step(state, batch, k):
        p, s, o, loss = step_fn(*state, batch.images, batch.labels, k)
        return (p, s, o), loss

    (tuned, stats, _), history = linear.run_epochs(
        feeder, recipe.epochs, key, step, (tuned, stats, tx.init(tuned)),
        f"finetune w={width:g}")
    return tuned, stats, history
