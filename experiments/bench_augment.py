"""Patches per second: our XLA patch pipeline vs the authors' PIL generator vs stock Keras preprocessing layers.

One run, one machine, one source image (Image A by default), three generators of augmented patches:

  (a) ours: ``keras_oneimage.data.patch_dataset`` (inverse affine map + trilinear pyramid gather, XLA);
  (b) authors: a CPU re-implementation in PIL of what the paper's torchvision transforms do underneath:
      RandomCrop(0.5 x short side) -> RandomResizedCrop(S, scale=(1/500, 1), ratio=(3/4, 4/3), bicubic) ->
      RandomAffine(±30°, shear 30) -> RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.5) -> float array,
      run over every core with a multiprocessing Pool, as the authors generated their data;
  (c) stock: the same augmentations from stock ``keras.layers`` preprocessing layers in ``tf.data``.

Each rate is the median over several timed windows after a warm-up. Usage:

    .venv/bin/python experiments/bench_augment.py [--image PATH] [--sizes 64,224] [--quick]
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "image_a.jpg"


# ------------------------------------------------------------------------------------------- timing helper
def _rate(next_batch, patches_per_call: int, warmup: int, windows: int, calls_per_window: int) -> float:
    """Median patches/s over ``windows`` windows of ``calls_per_window`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        next_batch()
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls_per_window):
            next_batch()
        rates.append(patches_per_call * calls_per_window / (time.perf_counter() - start))
    return statistics.median(rates)


# ------------------------------------------------------------------------------------------------ (a) ours
def bench_ours(image: np.ndarray, size: int, batch: int, **timing) -> float:
    from keras_oneimage.data import patch_dataset

    iterator = iter(patch_dataset(image, image_size=size, batch_size=batch, seed=0))
    return _rate(lambda: next(iterator), batch, **timing)


# ------------------------------------------------------------------------------- (b) the authors', in PIL
_WORKER: dict = {}


def _init_worker(path: str, size: int, seed: int) -> None:
    from PIL import Image

    image = Image.open(path)
    image.load()
    _WORKER.update(image=image.convert("RGB"), size=size, rng=random.Random(seed + os.getpid()))


def _random_resized_crop_box(rng: random.Random, width: int, height: int, scale=(1 / 500, 1.0),
                             ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: 10 tries, then a central crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    w, h = width, height  # in-ratio fallback as torchvision (image ratio inside the range here)
    return 0, 0, w, h


def _affine_inverse(width: int, height: int, angle: float, shear: float) -> tuple[float, ...]:
    """PIL AFFINE data: output -> input map of a rotation + x-shear about the image centre."""
    cx, cy = width * 0.5, height * 0.5
    rot, sx = math.radians(angle), math.radians(shear)
    centre = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1.0]])
    rotation = np.array([[math.cos(rot), -math.sin(rot), 0], [math.sin(rot), math.cos(rot), 0], [0, 0, 1.0]])
    shearing = np.array([[1, math.tan(sx), 0], [0, 1, 0], [0, 0, 1.0]])
    forward = centre @ rotation @ shearing @ np.linalg.inv(centre)
    inverse = np.linalg.inv(forward)
    return tuple(inverse[:2].reshape(-1))


def _color_jitter(image, rng: random.Random, b=0.4, c=0.4, s=0.4, h=0.1):
    """torchvision ColorJitter on a PIL image: the four adjustments in random order."""
    from PIL import Image, ImageEnhance

    def hue(img):
        shift = int(rng.uniform(-h, h) * 255)
        hsv = np.array(img.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")

    ops = [lambda img: ImageEnhance.Brightness(img).enhance(rng.uniform(1 - b, 1 + b)),
           lambda img: ImageEnhance.Contrast(img).enhance(rng.uniform(1 - c, 1 + c)),
           lambda img: ImageEnhance.Color(img).enhance(rng.uniform(1 - s, 1 + s)),
           hue]
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


def authors_patch(image, size: int, rng: random.Random) -> np.ndarray:
    """One patch through the authors' transform chain (PIL, as torchvision runs it on PIL images)."""
    from PIL import Image

    width, height = image.size
    side = int(0.5 * min(width, height))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    patch = image.crop((left, top, left + side, top + side))  # RandomCrop
    box = _random_resized_crop_box(rng, side, side)
    patch = patch.crop(box).resize((size, size), Image.BICUBIC)  # RandomResizedCrop
    data = _affine_inverse(size, size, rng.uniform(-30, 30), rng.uniform(-30, 30))
    patch = patch.transform((size, size), Image.AFFINE, data, resample=Image.NEAREST, fillcolor=0)  # RandomAffine
    if rng.random() < 0.5:  # RandomApply(ColorJitter, p=0.5)
        patch = _color_jitter(patch, rng)
    return np.asarray(patch, dtype=np.float32) / 255.0  # ToTensor


def _worker_task(count: int) -> np.ndarray:
    image, size, rng = _WORKER["image"], _WORKER["size"], _WORKER["rng"]
    return np.stack([authors_patch(image, size, rng) for _ in range(count)])


def bench_authors(path: str, size: int, batch: int, processes: int, **timing) -> float:
    ctx = mp.get_context("spawn")  # never fork a process that runs TF threads
    with ctx.Pool(processes, initializer=_init_worker, initargs=(path, size, 0)) as pool:
        chunk = max(1, batch // processes)
        results = pool.imap(_worker_task, iter(lambda: chunk, None))  # endless stream of tasks
        return _rate(lambda: [next(results) for _ in range(processes)], chunk * processes, **timing)


# ----------------------------------------------------------------------------------- (c) stock Keras layers
def bench_keras(image: np.ndarray, size: int, batch: int, **timing) -> float:
    import keras
    import tensorflow as tf

    side = int(0.5 * min(image.shape[:2]))
    crop = keras.layers.RandomCrop(side, side)
    zoom = keras.layers.RandomZoom(height_factor=(-0.955, 0.0))  # keeps 1/500 .. 1 of the area
    resize = keras.layers.Resizing(size, size, interpolation="bicubic")
    per_batch = keras.Sequential([
        keras.layers.RandomRotation(30 / 360),
        keras.layers.RandomShear(x_factor=0.3),
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomColorJitter(value_range=(0, 1), brightness_factor=0.4, contrast_factor=0.4,
                                       saturation_factor=0.4, hue_factor=0.1),
    ])

    def one(x):
        return resize(zoom(crop(tf.cast(x, tf.float32) / 255.0)))

    ds = (tf.data.Dataset.from_tensors(tf.constant(image)).repeat()
          .map(one, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch)
          .map(lambda x: tf.clip_by_value(per_batch(x, training=True), 0.0, 1.0), num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE))
    iterator = iter(ds)
    return _rate(lambda: next(iterator), batch, **timing)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="source image (default: the paper's Image A)")
    parser.add_argument("--sizes", default="64,224", help="patch sizes, comma separated")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--windows", type=int, default=5, help="timed windows per measurement (median)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="Pool size for (b)")
    parser.add_argument("--quick", action="store_true", help="tiny counts, 64 px only: a smoke test in seconds")
    args = parser.parse_args(argv)

    from keras_oneimage.data import load_image

    image = load_image(args.image)
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    batch = 8 if args.quick else args.batch
    results: dict[int, dict[str, float]] = {}
    for size in sizes:
        big = size <= 64 and not args.quick
        timing = dict(warmup=2 if args.quick else 5, windows=2 if args.quick else args.windows,
                      calls_per_window=1 if args.quick else (20 if big else 5))
        slow_timing = dict(timing, warmup=1, calls_per_window=1 if args.quick else 3)
        results[size] = {
            "(a) ours: patch_dataset (XLA)": bench_ours(image, size, batch, **timing),
            "(b) authors: PIL + Pool": bench_authors(args.image, size, batch, args.processes, **slow_timing),
            "(c) stock keras.layers in tf.data": bench_keras(image, size, batch, **slow_timing),
        }
    print(f"\nsource: {args.image} {image.shape[1]}x{image.shape[0]}, batch {batch}, cores {os.cpu_count()}")
    print(f"{'generator':40s}" + "".join(f"{f'{s} px':>14s}" for s in sizes) + "   (patches/s, median)")
    for name in next(iter(results.values())):
        print(f"{name:40s}" + "".join(f"{results[s][name]:14.0f}" for s in sizes))
    for size in sizes:
        a, b, c = results[size].values()
        print(f"ratio at {size} px: (a)/(b) = {a / b:.1f}x   (a)/(c) = {a / c:.1f}x")
    return results


if __name__ == "__main__":
    main()
