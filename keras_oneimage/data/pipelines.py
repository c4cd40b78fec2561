"""Labelled images to batches: the tf.data pipelines shared by the linear probes, kNN, fine-tuning and the
supervised reference.

Every pipeline takes the unbatched ``(float32 HxWx3 in [0, 1], int32)`` examples of a
:class:`~keras_oneimage.data.labelled.LabelledData` split, resizes them to the model's side and batches them.
The train pipelines are stateless and seeded: the same seed gives the same stream, reshuffled every epoch.
"""
from __future__ import annotations

import math

import tensorflow as tf

#: Shuffle buffer budget in bytes of decoded float32 images: the whole split when it fits, else as much as this.
SHUFFLE_BYTES = 256 << 20


def train_pipeline(ds: tf.data.Dataset, size: int, num_examples: int, batch_size: int, seed: int) -> tf.data.Dataset:
    """Resize, reshuffle every epoch, pad-and-crop + flip (stateless, seeded), batch. Same seed, same stream."""
    pad = max(1, round(size / 8))  # 4 px at 32 px: the usual CIFAR pad-4 random crop
    buffer = max(1, min(num_examples, SHUFFLE_BYTES // (size * size * 3 * 4)))
    ds = ds.map(resizer(size), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    noise = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)

    def augment(example, r):
        image, label = example
        keys = tf.random.experimental.stateless_split(tf.stack([r, tf.constant(seed, tf.int64)]), num=2)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, [size, size, 3], seed=keys[0])
        image = tf.image.stateless_random_flip_left_right(image, seed=keys[1])
        return image, label

    ds = tf.data.Dataset.zip(ds, noise).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def eval_pipeline(ds: tf.data.Dataset, size: int, batch_size: int, resize: int | None = None) -> tf.data.Dataset:
    """Resize and batch, in order, no augmentation. ``resize``: resize to that side first, then centre-crop
    ``size`` (the paper's test transform: 256, then 224)."""
    if resize is None:
        ds = ds.map(resizer(size), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        offset = (resize - size) // 2

        def centre(image, label):
            image, label = resizer(resize)(image, label)
            return image[offset:offset + size, offset:offset + size], label

        ds = ds.map(centre, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def resized_crop_pipeline(
    ds: tf.data.Dataset, size: int, num_examples: int, batch_size: int, seed: int,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.data.Dataset:
    """The ImageNet-style train transform of the paper's probes: a random crop covering ``scale`` of the image
    with aspect ratio in ``ratio`` (log-uniform), resized to ``size``, and a horizontal flip. Stateless, seeded."""
    buffer = max(1, min(num_examples, SHUFFLE_BYTES // (size * size * 3 * 4)))
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    noise = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def augment(example, r):
        image, label = example
        image = tf.convert_to_tensor(image, tf.float32)
        keys = tf.random.experimental.stateless_split(tf.stack([r, tf.constant(seed, tf.int64)]), num=4)
        u = tf.random.stateless_uniform([4], seed=keys[0], alg="philox")
        area = scale[0] + (scale[1] - scale[0]) * u[0]
        aspect = tf.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        # Box in normalised coordinates, clipped to the image (torchvision retries; clipping keeps it one op).
        w = tf.minimum(tf.sqrt(area * aspect), 1.0)
        h = tf.minimum(tf.sqrt(area / aspect), 1.0)
        y0, x0 = (1.0 - h) * u[2], (1.0 - w) * u[3]
        box = tf.stack([y0, x0, y0 + h, x0 + w])[None]
        crop = tf.image.crop_and_resize(image[None], box, [0], [size, size], method="bilinear")[0]
        crop = tf.image.stateless_random_flip_left_right(crop, seed=keys[1])
        return tf.clip_by_value(crop, 0.0, 1.0), tf.cast(label, tf.int32)

    ds = tf.data.Dataset.zip(ds, noise).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def resizer(size: int):
    """``(image, label) -> (image resized to size x size, int32 label)``, leaving images of that size as they are."""

    def resize(image, label):
        image = tf.convert_to_tensor(image, tf.float32)
        if tuple(image.shape[:2]) != (size, size):  # static shape unknown or different
            image = tf.image.resize(image, [size, size], antialias=True)
        return tf.ensure_shape(image, [size, size, 3]), tf.cast(label, tf.int32)

    return resize
