"""Input-pipeline throughput on this machine: augmented images/s, device vs host.

    python experiments/bench_input.py --out bench_input.json [--quick] [--no-step] [--no-stream]

Cases (images/s counts input images; every SSL image yields two views):
* ``device_ssl_*``: ``augment.ssl_views`` jitted on the default JAX device (CIFAR_SSL on 32x32;
  IMAGENET_SSL cropping 224 views from 256x256 stored images, as the in-memory transfer sets).
* ``host_ssl_*``: the same recipe per image with PIL/numpy (torchvision-on-PIL, what the
  official DataLoader workers do), one core.
* ``cifar_r18_fwd_bwd_128``: one forward+backward of the full-width CIFAR ResNet-18 at batch
  128 (a lower bound of a US3L step, which runs >= 2 such passes plus a teacher forward), and
  the fraction augmentation / step it implies.
* ``stream_*``: the ImageNet host pipeline (``streaming.StreamingDataset``) on a synthetic
  source of 500x375 JPEGs decoded with PIL, 2 threads.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter, ImageOps  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from us3l_jax.data import augment, host_transforms, streaming  # noqa: E402


def _time(fn, repeats: int) -> float:
    """Best-of-``repeats`` seconds per call of ``fn`` (after one warm-up/compile call); the
    minimum, because this CPU is shared and contention only ever adds time."""
    jax.block_until_ready(fn(0))
    best = float("inf")
    for i in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(i + 1))
        best = min(best, time.perf_counter() - t)
    return best


def _images(n: int, size: int) -> np.ndarray:
    """Smooth random images (realistic for colour ops; noise would be as fast)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR))
                     for s in small])


def host_view(image: np.ndarray, rng: np.random.Generator, cfg: augment.ViewConfig) -> np.ndarray:
    """One SSL view with PIL, per image: the torchvision-on-PIL pipeline of the official code."""
    pil = Image.fromarray(image)
    h, w = image.shape[:2]
    box = host_transforms.rrc_box(rng, h, w, cfg.scale, cfg.ratio)
    pil = Image.fromarray(host_transforms.resized_crop(image, box, cfg.size, cfg.interpolation))
    if rng.random() < cfg.jitter_p:
        b, c, s = (rng.uniform(max(0, 1 - v), 1 + v)
                   for v in (cfg.brightness, cfg.contrast, cfg.saturation))
        hue = rng.uniform(-cfg.hue, cfg.hue)
        for op in rng.permutation(4):
            if op == 0:
                pil = ImageEnhance.Brightness(pil).enhance(b)
            elif op == 1:
                pil = ImageEnhance.Contrast(pil).enhance(c)
            elif op == 2:
                pil = ImageEnhance.Color(pil).enhance(s)
            else:  # torchvision functional_pil.adjust_hue
                hh, ss, vv = pil.convert("HSV").split()
                np_h = np.asarray(hh, np.uint8) + np.uint8(int(hue * 255) % 256)
                pil = Image.merge("HSV", (Image.fromarray(np_h, "L"), ss, vv)).convert("RGB")
    if rng.random() < cfg.grayscale_p:
        pil = pil.convert("L").convert("RGB")
    if cfg.blur_p and rng.random() < cfg.blur_p:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*cfg.blur_sigma)))
    if cfg.solarize_p and rng.random() < cfg.solarize_p:
        pil = ImageOps.solarize(pil, 128)
    if rng.random() < cfg.flip_p:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(pil, np.float32) / 255.0
    return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def bench_device(name: str, images: np.ndarray, cfg: augment.ViewConfig, repeats: int) -> dict:
    x = jax.device_put(images)
    key = jax.random.key(0)
    sec = _time(lambda i: augment.ssl_views(jax.random.fold_in(key, i), x, cfg), repeats)
    return dict(case=name, where="device", batch=len(images), in_size=images.shape[1],
                out_size=cfg.size, seconds_per_batch=sec, images_per_s=len(images) / sec)


def bench_host(name: str, images: np.ndarray, cfg: augment.ViewConfig, repeats: int) -> dict:
    rng = np.random.default_rng(0)

    def run(_):
        for img in images:
            host_view(img, rng, cfg), host_view(img, rng, cfg)

    sec = _time(run, repeats)
    return dict(case=name, where="host (PIL, 1 core)", batch=len(images),
                in_size=images.shape[1], out_size=cfg.size, seconds_per_batch=sec,
                images_per_s=len(images) / sec)


def bench_step(batch: int = 128) -> dict:
    """Forward+backward of the full CIFAR ResNet-18 (width 1.0) at ``batch``."""
    from us3l_jax import models

    model = models.create("cifar_resnet18")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 32, 32, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x[:2], width=1.0, train=True)["params"]

    @jax.jit
    def grad(p, x):
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, 1.0, True) ** 2))(p)

    t = time.perf_counter()
    jax.block_until_ready(grad(params, x))
    compile_s = time.perf_counter() - t
    sec = _time(lambda _: grad(params, x), repeats=2)
    return dict(case=f"cifar_r18_fwd_bwd_{batch}", where="device", batch=batch,
                seconds_per_batch=sec, images_per_s=batch / sec, compile_s=compile_s)


class _JpegSource:
    """Random-access source of JPEG bytes decoded with PIL on access (as tfds.data_source)."""

    def __init__(self, n: int, h: int = 375, w: int = 500):
        rng = np.random.default_rng(0)
        self._jpegs = []
        for _ in range(n):
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
            noise = rng.integers(-12, 13, (h, w, 3))
            img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            self._jpegs.append(buf.getvalue())

    def __len__(self) -> int:
        return len(self._jpegs)

    def __getitem__(self, i: int) -> dict:
        with Image.open(io.BytesIO(self._jpegs[i])) as im:
            return {"image": np.asarray(im.convert("RGB")), "label": i % 1000}


def bench_stream(name: str, transform, train: bool, steps: int, batch: int = 32) -> dict:
    src = _JpegSource(batch * (steps + 1))
    ds = streaming.StreamingDataset(src, global_batch_size=batch, transform=transform,
                                    train=train, num_threads=2, process_index=0,
                                    process_count=1)
    it = ds.host_iterator(0)
    next(it)  # warm-up: thread start, first reads
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    sec = (time.perf_counter() - t) / steps
    return dict(case=name, where="host stream (grain, 2 threads)", batch=batch,
                in_size="500x375 jpeg", out_size=224, seconds_per_batch=sec,
                images_per_s=batch / sec)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the records")
    p.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    p.add_argument("--no-step", action="store_true", help="skip the ResNet-18 step timing")
    p.add_argument("--no-stream", action="store_true", help="skip the streaming pipeline")
    args = p.parse_args(argv)
    n32, n224, reps = (64, 8, 2) if args.quick else (256, 32, 3)
    cifar, imnet = _images(n32, 32), _images(n224, 256)
    records = [
        bench_device("device_ssl_cifar32", cifar, augment.CIFAR_SSL, reps),
        bench_host("host_ssl_cifar32", cifar, augment.CIFAR_SSL, reps),
        bench_device("device_ssl_224_from256", imnet, augment.IMAGENET_SSL, reps),
        bench_host("host_ssl_224_from256", imnet, augment.IMAGENET_SSL, reps),
    ]
    if not args.no_step:
        step = bench_step(128)
        aug = 128 / records[0]["images_per_s"]
        step.update(aug_seconds_per_128=aug, aug_fraction_of_fwd_bwd=aug / step["seconds_per_batch"],
                    note="fraction vs ONE fwd+bwd pass: an upper bound of the fraction of a "
                         "US3L step (>= 2 passes + teacher)")
        records.append(step)
    if not args.no_stream:
        steps = 2 if args.quick else 8
        records.append(bench_stream("stream_train_2x224_crops", streaming.HostCrops(224), True,
                                    steps))
        records.append(bench_stream("stream_eval_256_224", streaming.HostEval(256, 224), False,
                                    steps))
    print(f"backend {jax.default_backend()} ({jax.device_count()} device), "
          f"{os.cpu_count()} CPU cores")
    print(f"{'case':28s} {'where':30s} {'batch':>5s} {'s/batch':>9s} {'images/s':>10s}")
    for r in records:
        print(f"{r['case']:28s} {r['where']:30s} {r['batch']:5d} {r['seconds_per_batch']:9.4f} "
              f"{r['images_per_s']:10.1f}")
    for r in records:
        if "aug_fraction_of_fwd_bwd" in r:
            print(f"augmentation of 128 CIFAR images (2 views): {r['aug_seconds_per_128']:.3f} s "
                  f"= {100 * r['aug_fraction_of_fwd_bwd']:.1f}% of one R-18 fwd+bwd at 128 "
                  f"({r['seconds_per_batch']:.2f} s)")
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()
