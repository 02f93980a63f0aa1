"""Objects from a config: model, method, sampler, views, optimizer, data and the trainer.

One place that turns a (validated) ``ml_collections`` config into the objects a run uses; the
pretraining loop, checkpoint restores, evaluation and the benchmarks all build through here.
Builders raise ``ValueError`` for values they cannot build; ``config.validate`` turns those
into ``ConfigError``s naming the field.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from us3l_jax import mesh as mesh_lib, models, optim, sampling, slim
from us3l_jax.data import augment, datasets, feeding
from us3l_jax.method import MethodConfig
from us3l_jax.models.heads import SSLModel
from us3l_jax import train as train_lib
from us3l_jax.train import Trainer, TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Config = ml_collections.ConfigDict


def _model_kwargs(config: Config) -> dict[str, Any]:
    m = config.model
    kw: dict[str, Any] = {"dtype": DTYPES[m.dtype], "min_width": config.sampler.width_range[0],
                          "bn_group_size": config.method.group_size}
    if m.base_width is not None:
        kw["base_width"] = int(m.base_width)
    if m.stage_sizes is not None:
        kw["stage_sizes"] = tuple(int(s) for s in m.stage_sizes)
    for key in ("dim", "depth", "heads", "patch_size", "slicing", "stop_grad_patch"):
        if m[key] is not None:
            kw[key] = m[key]
    if m.name in models.VIT_NAMES:  # the size the torch-layout pos_embed is written for
        kw["image_size"] = view_recipe(config)[0].size
    return kw


def backbone(config: Config, num_classes: int | None = None, **overrides: Any):
    """The slimmable backbone the config trains (features when ``num_classes`` is None)."""
    return models.create(config.model.name, num_classes=num_classes,
                         **{**_model_kwargs(config), **overrides})


def method(config: Config) -> MethodConfig:
    return MethodConfig(**config.method.to_dict())


def model(config: Config) -> SSLModel:
    m = method(config)
    h = config.heads
    return SSLModel(backbone(config), proj_hidden=h.proj_hidden, proj_out=h.proj_out,
                    proj_style=h.proj_style, use_predictor=m.uses_predictor,
                    use_distill_head=m.uses_distill_head, head_hidden=h.head_hidden,
                    bn_group_size=config.method.group_size, dtype=DTYPES[config.model.dtype])


def sampler(config: Config) -> sampling.SamplerConfig:
    s = config.sampler
    out = sampling.SamplerConfig(
        width_range=tuple(s.width_range), num_samples=s.num_samples, sandwich=s.sandwich,
        schedule=None if s.schedule == "none" else s.schedule, stage_by=s.stage_by,
        individual_width=s.individual_width, seed=config.seed)
    if s.grid_step is None:
        return out
    if not 0 < s.grid_step <= 1:
        raise ValueError(f"grid_step must be in (0, 1], got {s.grid_step}")
    grid = slim.distinct_widths(backbone(config).channel_config, *out.width_range,
                                step=s.grid_step)
    return dataclasses.replace(out, grid=tuple(grid))


def optimizer(config: Config, steps_per_epoch: int
              ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """(optax transform, lr schedule as a function of the iteration)."""
    o = config.optim
    if o.optimizer == "adamw":  # MoCo v3: per-iteration schedule, decoupled weight decay
        if o.reg_lambda:
            raise ValueError(f"optim.optimizer='adamw' uses optim.weight_decay; set "
                             f"optim.reg_lambda=0 (got {o.reg_lambda})")
        return optim.make_adamw(o.lr, o.epochs * steps_per_epoch,
                                warmup_steps=o.warmup_epochs * steps_per_epoch,
                                weight_decay=o.weight_decay)
    if o.optimizer != "sgd":
        raise ValueError(f"optim.optimizer={o.optimizer!r} is not one of ('sgd', 'adamw')")
    if o.weight_decay:
        raise ValueError("optim.weight_decay is AdamW's; SGD's decay is optim.reg_lambda "
                         f"(got weight_decay={o.weight_decay})")
    per_epoch = o.schedule_unit == "epoch"
    unit = (lambda epochs: epochs) if per_epoch else (lambda epochs: epochs * steps_per_epoch)
    return optim.make_optimizer(
        o.lr, unit(o.epochs), steps_per_epoch=steps_per_epoch if per_epoch else None,
        warmup=unit(o.warmup_epochs), momentum=o.momentum, reg_lambda=o.reg_lambda,
        reg_alpha=o.reg_alpha, reg_groups=o.reg_groups, reg_warmup=unit(o.reg_warmup_epochs),
        reg_rule=o.reg_rule, lars=o.lars)


def is_streaming(config: Config) -> bool:
    if config.data.streaming is None:
        return config.data.dataset == "imagenet2012"
    return bool(config.data.streaming)


def view_recipe(config: Config) -> tuple[augment.ViewConfig, augment.ViewConfig]:
    """The two SSL view recipes: ``cifar`` (no blur), ``imagenet`` (blur 0.5, 224), ``byol``
    (asymmetric blur 1.0/0.1 and solarize 0.2 on view 2; ``byol_cifar``: the same with CIFAR
    mean/std, as the official ViT runs), ``none`` (full crop, no colour ops,
    no flip: for debugging), at ``config.data.image_size`` when set."""
    name = config.data.augment
    if name == "cifar":
        recipe = augment.CIFAR_SSL, augment.CIFAR_SSL
    elif name == "imagenet":
        recipe = augment.IMAGENET_SSL, augment.IMAGENET_SSL
    elif name == "byol":
        recipe = augment.BYOL_VIEW1, augment.BYOL_VIEW2
    elif name == "byol_cifar":  # the official ViT runs: BYOL views, CIFAR mean/std
        recipe = tuple(dataclasses.replace(v, mean=augment.CIFAR_MEAN, std=augment.CIFAR_STD)
                       for v in (augment.BYOL_VIEW1, augment.BYOL_VIEW2))
    else:
        v = augment.ViewConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0,
                               grayscale_p=0.0, flip_p=0.0)
        recipe = v, v
    if config.data.image_size is not None:
        recipe = tuple(dataclasses.replace(v, size=config.data.image_size) for v in recipe)
    return recipe


def views(config: Config) -> tuple[augment.ViewConfig, augment.ViewConfig]:
    """The device-side view recipes: when streaming, the crops happen on the host, so these
    have ``crop=False``."""
    v1, v2 = view_recipe(config)
    if is_streaming(config):
        v1, v2 = (dataclasses.replace(v, crop=False) for v in (v1, v2))
    return v1, v2


def views_fn(config: Config):
    v1, v2 = views(config)
    return functools.partial(augment.ssl_views, cfg1=v1, cfg2=v2)


def image_spec(config: Config, mesh: Mesh,
               image_shape: tuple[int, ...] | None = None) -> jax.ShapeDtypeStruct:
    """A training batch of uint8 images: (B, H, W, 3) held on device, or (B, 2, S, S, 3) host
    crops when streaming. Parameter shapes do not depend on it (only views and BN groups do)."""
    size = views(config)[0].size
    if is_streaming(config):
        shape = (2, size, size, 3)
    else:
        shape = image_shape or (size, size, 3)
    return jax.ShapeDtypeStruct((config.optim.batch_size,) + tuple(shape), jnp.uint8,
                                sharding=mesh_lib.batch_sharding(mesh))


@dataclasses.dataclass
class Data:
    """The training input: ``batches(start_step)`` yields ``feeding.Batch``es."""
    batches: Callable[[int], Iterator[feeding.Batch]]
    steps_per_epoch: int
    image_spec: jax.ShapeDtypeStruct


def data(config: Config, mesh: Mesh) -> Data:
    """The training split, held on device (sharded) or streamed from the host."""
    if is_streaming(config):
        from us3l_jax.data import streaming
        source = datasets.open_source(config.data.dataset, "train",
                                      data_dir=config.data.data_dir)
        crops = streaming.HostCrops.from_views(*view_recipe(config))
        stream = streaming.StreamingDataset(
            source, global_batch_size=config.optim.batch_size, transform=crops,
            seed=config.seed, train=True, mesh=mesh, num_threads=config.data.num_threads)
        return Data(stream.iterator, stream.steps_per_epoch, image_spec(config, mesh))
    ds = datasets.load(config.data.dataset, "train", data_dir=config.data.data_dir,
                       image_size=config.data.image_size)
    feeder = feeding.TrainFeeder(feeding.DeviceDataset(ds, mesh), config.optim.batch_size,
                                 config.seed)
    return Data(feeder.iterate, feeder.steps_per_epoch,
                image_spec(config, mesh, ds.images.shape[1:]))


def teacher_width(config: Config) -> float:
    """The momentum teacher's width: the range's maximum, or an individual baseline's width."""
    return config.sampler.individual_width or config.sampler.width_range[1]


def trainer(config: Config, mesh: Mesh, steps_per_epoch: int,
            frozen_teacher: Any = None) -> Trainer:
    """The run's trainer; SEED / SEED-MSE / MoCo v2 get ``BaselineTrainer``, SEED with
    ``frozen_teacher`` (``us3l_jax.teacher.load(config)``, which builds models through this
    module and so is loaded by the caller)."""
    tx, lr = optimizer(config, steps_per_epoch)
    m = method(config)
    total = config.optim.epochs * steps_per_epoch
    kw = dict(batch_size=config.optim.batch_size, total_steps=total,
              teacher_width=teacher_width(config), lr_schedule=lr,
              first_sub_step=sampling.first_sub_network_step(sampler(config), steps_per_epoch,
                                                             total))
    if m.is_single_width_baseline:
        from us3l_jax import baseline_train
        if (m.teacher == "frozen") != (frozen_teacher is not None):
            raise ValueError("a frozen teacher (us3l_jax.teacher.load(config)) is needed "
                             "exactly when config.method.teacher='frozen'")
        return baseline_train.BaselineTrainer(model(config), m, tx, views_fn(config), mesh,
                                              teacher=frozen_teacher, **kw)
    return Trainer(model(config), m, tx, views_fn(config), mesh, **kw)


def abstract_state(config: Config, mesh: Mesh | None = None) -> TrainState:
    """Shapes, dtypes and shardings of the TrainState a config trains (for restoring); needs
    no data (the optimizer's state does not depend on the schedule's length)."""
    mesh = mesh or mesh_lib.make_mesh()
    tx, _ = optimizer(config, steps_per_epoch=1)
    spec = image_spec(config, mesh)
    view = jax.eval_shape(views_fn(config), jax.random.key(0), spec)[0]
    return train_lib.abstract_state(model(config), method(config), tx, view, mesh)
