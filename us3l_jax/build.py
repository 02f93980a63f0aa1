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

from us3l_jax import engine as engine_lib, methods, mesh as mesh_lib, models, optim, sampling
from us3l_jax import slim
from us3l_jax.data import augment, datasets, feeding
from us3l_jax.engine import online_probe as probe_lib
from us3l_jax.engine.online_probe import OnlineProbe
from us3l_jax.models.heads import SSLModel, hooked_layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Config = ml_collections.ConfigDict


def architecture_kwargs(config: Config) -> dict[str, Any]:
    """The ``models.create`` arguments that decide the backbone's shape (what the profiler
    counts): width range, ResNet sizes, ViT sizes and slicing."""
    m = config.model
    kw: dict[str, Any] = {"min_width": config.sampler.width_range[0]}
    if m.base_width is not None:
        kw["base_width"] = int(m.base_width)
    if m.stage_sizes is not None:
        kw["stage_sizes"] = tuple(int(s) for s in m.stage_sizes)
    for key in ("dim", "depth", "heads", "patch_size", "slicing"):
        if m[key] is not None:
            kw[key] = m[key]
    return kw


def _model_kwargs(config: Config) -> dict[str, Any]:
    m = config.model
    kw = {**architecture_kwargs(config), "dtype": DTYPES[m.dtype],
          "bn_group_size": config.method.group_size}
    if m.stop_grad_patch is not None:
        kw["stop_grad_patch"] = m.stop_grad_patch
    if m.name in models.VIT_NAMES:  # the size the torch-layout pos_embed is written for
        kw["image_size"] = view_recipe(config)[0].size
    if m.switchable_widths:
        kw["switchable_widths"] = switchable_widths(config)
    return kw


def switchable_widths(config: Config) -> tuple[float, ...]:
    """An S-Net's fixed width list, widest first (empty: universally slimmable)."""
    return tuple(sorted((float(w) for w in config.model.switchable_widths), reverse=True))


def is_supervised(config: Config) -> bool:
    return config.train.objective == "supervised"


def backbone(config: Config, num_classes: int | None = None, **overrides: Any):
    """The slimmable backbone the config trains (features when ``num_classes`` is None)."""
    return models.create(config.model.name, num_classes=num_classes,
                         **{**_model_kwargs(config), **overrides})


def method_kind(config: Config) -> str:
    """The method the config trains: us3l, vicreg, moco, seed or supervised."""
    return method_and_kind(config)[0]


def method(config: Config) -> Any:
    """The method's own config (``us3l_jax.methods.<kind>.Config``)."""
    return method_and_kind(config)[1]


def method_and_kind(config: Config) -> tuple[str, Any]:
    s = config.supervised
    return methods.select(config.method.to_dict(), config.train.objective,
                          dict(distill=s.distill, label_smoothing=s.label_smoothing))


def model(config: Config) -> SSLModel:
    m = method(config)
    h = config.heads
    bb = backbone(config)
    layers = tuple(name for name, _ in hooked_layers(bb, m.feature_layers)) \
        if m.feature_distill else ()
    return SSLModel(bb, proj_hidden=h.proj_hidden, proj_out=h.proj_out,
                    proj_style=h.proj_style, use_predictor=m.uses_predictor,
                    use_distill_head=m.uses_distill_head, head_hidden=h.head_hidden,
                    feature_layers=layers, bn_group_size=config.method.group_size,
                    dtype=DTYPES[config.model.dtype])


def sampler(config: Config) -> sampling.SamplerConfig:
    s = config.sampler
    out = sampling.SamplerConfig(
        width_range=tuple(s.width_range), num_samples=s.num_samples, sandwich=s.sandwich,
        schedule=None if s.schedule == "none" else s.schedule, stage_by=s.stage_by,
        individual_width=s.individual_width, seed=config.seed)
    if config.model.switchable_widths:  # S-Net: its whole width list at every step
        return dataclasses.replace(out, grid=switchable_widths(config), fixed=True)
    if s.grid_step is None:
        return out
    if not 0 < s.grid_step <= 1:
        raise ValueError(f"grid_step must be in (0, 1], got {s.grid_step}")
    grid = slim.distinct_widths(backbone(config).channel_config, *out.width_range,
                                step=s.grid_step)
    return dataclasses.replace(out, grid=tuple(grid))


def optimizer(config: Config, steps_per_epoch: int
              ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """(optax transform, lr schedule as a function of the iteration); the backbone's frozen
    parameters (``frozen_params``, e.g. a ViT's fixed patch embedding) are never updated."""
    tx, lr = _optimizer(config, steps_per_epoch)
    frozen = getattr(backbone(config), "frozen_params", lambda: ())()
    return optim.freeze(tx, [("backbone",) + tuple(p) for p in frozen]), lr


def _optimizer(config: Config, steps_per_epoch: int):
    o = config.optim
    if o.optimizer == "adamw":  # MoCo v3: per-iteration schedule, decoupled weight decay
        # optim.reg_lambda: the official ViT --group-regularizer (Linear weights grouped by
        # input feature), which replaces the weight decay.
        vit = config.model.name.startswith("vit")
        return optim.make_adamw(o.lr, o.epochs * steps_per_epoch,
                                warmup_steps=o.warmup_epochs * steps_per_epoch,
                                weight_decay=o.weight_decay, count=o.adam_count,
                                reg_lambda=o.reg_lambda, reg_alpha=o.reg_alpha,
                                reg_groups=o.reg_groups, reg_warmup_epochs=o.reg_warmup_epochs,
                                steps_per_epoch=steps_per_epoch, reg_rule=o.reg_rule,
                                group_axis=optim.GROUPINGS["linear_inputs" if vit
                                                           else "output_channels"])
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


def classifier(config: Config):
    """The backbone with its classifier ``fc`` over the dataset's classes (supervised runs)."""
    return backbone(config, num_classes=datasets.num_classes(config.data.dataset,
                                                             config.data.data_dir))


def linear_train_view(config: Config) -> augment.ViewConfig:
    """The linear-evaluation training crops at the run's view size and normalisation
    (CIFAR-sized: RandomResizedCrop(S, (0.8, 1), bicubic) + flip; ImageNet-sized:
    RandomResizedCrop(S, (0.08, 1)) + flip), also the supervised training augmentation."""
    v = views(config)[0]
    base = augment.IMAGENET_LINEAR_TRAIN if v.size >= IMAGENET_SIZED else \
        augment.CIFAR_LINEAR_TRAIN
    return dataclasses.replace(base, size=v.size, mean=v.mean, std=v.std)


IMAGENET_SIZED = 128  # views at least this large use the ImageNet recipes


def training_method(config: Config, steps_per_epoch: int,
                    frozen_teacher: Any = None) -> methods.Method:
    """The ``Method`` the config trains. SEED / SEED-MSE need ``frozen_teacher``
    (``us3l_jax.teacher.load(config)``, which builds models through this module and so is
    loaded by the caller)."""
    kind, cfg = method_and_kind(config)
    if (kind == "seed") != (frozen_teacher is not None):
        raise ValueError("a frozen teacher (us3l_jax.teacher.load(config)) is needed "
                         "exactly when config.method.teacher='frozen'")
    if kind == "supervised":
        return methods.supervised.make(cfg, classifier(config), linear_train_view(config))
    views = views_fn(config)
    if kind == "seed":
        return methods.seed.make(cfg, model(config), views, teacher_model=frozen_teacher.model,
                                 teacher_variables=frozen_teacher.variables,
                                 teacher_width=frozen_teacher.width)
    kw = dict(total_steps=config.optim.epochs * steps_per_epoch,
              teacher_width=teacher_width(config))
    return getattr(methods, kind).make(cfg, model(config), views, **kw)


def trainer(config: Config, mesh: Mesh, steps_per_epoch: int,
            frozen_teacher: Any = None) -> engine_lib.Engine:
    """The run's engine running its method (``training_method``)."""
    tx, lr = optimizer(config, steps_per_epoch)
    total = config.optim.epochs * steps_per_epoch
    first_sub = None if is_supervised(config) else sampling.first_sub_network_step(
        sampler(config), steps_per_epoch, total)
    return engine_lib.Engine(
        training_method(config, steps_per_epoch, frozen_teacher), tx, mesh,
        batch_size=config.optim.batch_size, group_size=config.method.group_size,
        update_mode=config.method.update_mode, lr_schedule=lr, first_sub_step=first_sub,
        probe=online_probe(config, total))


def online_probe(config: Config, total_steps: int) -> OnlineProbe | None:
    """The online linear probe (``config.eval.online_linear``) on the backbone's features at
    the base width, or None."""
    if not config.eval.online_linear:
        return None
    bb, width = backbone(config), teacher_width(config)

    def features(params, x):
        return bb.apply({"params": params["backbone"]}, x, width=width, train=True)
    return probe_lib.make(features, feature_dim=bb.feature_dim(width),
                          num_classes=datasets.num_classes(config.data.dataset,
                                                           config.data.data_dir),
                          lr=config.eval.online_linear_lr, total_steps=total_steps)


def abstract_state(config: Config, mesh: Mesh | None = None,
                   frozen_teacher: Any = None) -> engine_lib.TrainState:
    """Shapes, dtypes and shardings of the TrainState a config trains (for restoring); needs
    no data (the optimizer's state does not depend on the schedule's length)."""
    mesh = mesh or mesh_lib.make_mesh()
    if method_kind(config) == "seed" and frozen_teacher is None:
        frozen_teacher = _shape_only_teacher(config)
    return trainer(config, mesh, 1, frozen_teacher).abstract_state(image_spec(config, mesh))


def _shape_only_teacher(config: Config):
    """A stand-in for SEED's frozen teacher: the student's state does not depend on it."""
    import types
    return types.SimpleNamespace(model=model(config), variables={}, width=1.0)
