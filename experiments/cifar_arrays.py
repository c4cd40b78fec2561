"""CIFAR-10 (JPEG) decoded once into uint8 arrays and cached as ``.npz``, for the long experiments.

The library's :func:`keras_oneimage.data.labelled.load_labelled` decodes JPEG files on every pass. The probe study,
the supervised reference and the full table each go over the 60,000 images many times, so they load this cache
instead (same split: ``load_labelled``'s stratified, seeded val split), and build a :class:`LabelledData` from it
with :func:`keras_oneimage.data.labelled.from_arrays`.
"""
from __future__ import annotations

import functools
import os
import pathlib

import numpy as np

SPLITS = ("train", "val", "test")


def cache_path(seed: int, val_fraction: float) -> pathlib.Path:
    from keras_oneimage.data.labelled import default_cache_dir

    return default_cache_dir() / f"cifar10_arrays_seed{seed}_val{val_fraction:g}.npz"


@functools.lru_cache(maxsize=2)  # the table's N-image rows and its probes read the same 180 MB file
def load_arrays(seed: int = 0, val_fraction: float = 0.1, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """``{"train_x", "train_y", "val_x", "val_y", "test_x", "test_y"}``; decodes and caches on first use."""
    path = cache_path(seed, val_fraction)
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    from keras_oneimage.data.labelled import load_labelled

    data = load_labelled("cifar10", seed=seed, val_fraction=val_fraction, data_dir=data_dir)
    arrays = {}
    for split in SPLITS:
        xs, ys = [], []
        for x, y in data.split(split).batch(1000):
            xs.append(np.clip(np.round(x.numpy() * 255.0), 0, 255).astype(np.uint8) if x.dtype != np.uint8
                      else x.numpy())
            ys.append(y.numpy().astype(np.int32))
        arrays[f"{split}_x"], arrays[f"{split}_y"] = np.concatenate(xs), np.concatenate(ys)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def labelled(seed: int = 0, val_fraction: float = 0.1, max_per_class: int | None = None):
    """The cached arrays as a :class:`LabelledData` (float32 images in [0, 1], as ``load_labelled`` gives)."""
    import tensorflow as tf

    from keras_oneimage.data.labelled import LabelledData

    a = load_arrays(seed, val_fraction)
    if max_per_class is not None:
        a = {**a, **_subsample(a, "train", max_per_class), **_subsample(a, "test", max_per_class)}

    def dataset(split):
        ds = tf.data.Dataset.from_tensor_slices((a[f"{split}_x"], a[f"{split}_y"]))
        return ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y), num_parallel_calls=tf.data.AUTOTUNE)

    return LabelledData(
        train=dataset("train"), val=dataset("val"), test=dataset("test"), num_classes=10,
        class_names=tuple(str(i) for i in range(10)), train_size=len(a["train_y"]), val_size=len(a["val_y"]),
        test_size=len(a["test_y"]), source=str(cache_path(seed, val_fraction)),
    )


def _subsample(a: dict, split: str, per_class: int) -> dict:
    y = a[f"{split}_y"]
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    keep.sort()
    return {f"{split}_x": a[f"{split}_x"][keep], f"{split}_y": y[keep]}
