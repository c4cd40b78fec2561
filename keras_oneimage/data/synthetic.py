"""The training set of the paper: an endless stream of augmented patches of one (or a few) image(s).

§3 of Asano et al. (ICLR 2020) turns a single image into a dataset by heavy augmentation. Here patches are
rendered on the fly, batch by batch, by two XLA-compiled kernels (:class:`~keras_oneimage.data.augment.
PatchSampler` over the packed pyramid of every source: geometry, then colour), so nothing is written to disk
and several sources cost no more than one (they share one texel buffer and one gather). Batch ``k`` of shard
``i`` uses the stateless seed ``fold_in(fold_in(seed, i), k)``: the stream is a pure function of
``(seed, shard_index)``, identical across runs, and different for other seeds or shards.
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.data import images as images_lib
from keras_oneimage.data import pyramid as pyramid_lib
from keras_oneimage.data.augment import ALG, AugmentConfig, PatchSampler
from keras_oneimage.errors import InputError


_CACHE_SIZE = 4  # compiled batch functions kept, so new datasets over the same images skip XLA compilation
_cache: collections.OrderedDict = collections.OrderedDict()
_COLOUR_KEYS = ("color_matrix", "brightness", "contrast", "blur_sigma", "noise_std", "noise_seed")


def batch_function(images, *, image_size: int = 64, batch_size: int = 64, augment: AugmentConfig | None = None):
    """``f(seed) -> float32 (B, S, S, 3)`` (two XLA-compiled stages), and the pyramid it reads.

    ``images`` is anything :func:`~keras_oneimage.data.images.load_images` accepts.
    """
    image_size = validation.int_at_least("image_size", image_size, 4)
    batch_size = validation.int_at_least("batch_size", batch_size, 1)
    sampler = PatchSampler(augment)
    if 2 * sampler.augment.blur_sigma > image_size:
        raise InputError(f"blur_sigma={sampler.augment.blur_sigma} is too large for {image_size}-pixel patches "
                         "(at most image_size / 2)")
    sources = images_lib.load_images(images)
    digest = hashlib.blake2b(digest_size=16)
    for source in sources:
        digest.update(repr(source.shape).encode())
        digest.update(source.data)
    key = (digest.hexdigest(), image_size, batch_size, sampler.augment)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    pyr = pyramid_lib.build_pyramid(sources)

    # Two XLA kernels: geometry -> one packed int64 per pixel, then colour. Fused into one, XLA:CPU would
    # recompute every pixel's addresses once per channel (docs/performance.md).
    @tf.function(jit_compile=True)
    def geometry(seed: tf.Tensor):
        params = sampler.get_random_transformation(batch_size, seed, pyr)
        colour = {k: params[k] for k in _COLOUR_KEYS}
        return sampler.render_packed(pyr, params, image_size), colour

    @tf.function(jit_compile=True)
    def colour(packed: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
        return sampler.finish(packed, params)

    def render(seed: tf.Tensor) -> tf.Tensor:
        return colour(*geometry(seed))

    _cache[key] = (render, pyr)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return render, pyr


def patch_dataset(images, *, image_size: int = 64, batch_size: int = 64, augment: AugmentConfig | None = None,
                  seed: int = 0, num_shards: int = 1, shard_index: int = 0, start_step: int = 0) -> tf.data.Dataset:
    """Infinite ``tf.data.Dataset`` of augmented patch batches, ``float32 (B, S, S, 3)`` in ``[0, 1]``.

    Args:
      images: a path / array / tensor, or a sequence of them (each patch picks one source uniformly).
      image_size: patch side ``S`` in pixels (64 in the paper's CIFAR-style AlexNet runs).
      batch_size: patches per batch.
      augment: :class:`AugmentConfig`; ``None`` = the paper's defaults.
      seed: the same seed gives the same stream.
      num_shards, shard_index: give each worker of a multi-worker run its own shard of a stream that
        differs from the other shards'.
      start_step: the index of the first batch. Batch ``i`` depends only on ``(seed, shard_index, i)``, so a run
        resumed after ``k`` steps continues the same stream with ``start_step=k`` (nothing is rendered to skip).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -2**63 <= seed < 2**63:
        raise InputError(f"seed must be a 64-bit integer, got {seed!r}")
    num_shards = validation.int_at_least("num_shards", num_shards, 1)
    shard_index = validation.int_at_least("shard_index", shard_index, 0)
    start_step = validation.int_at_least("start_step", start_step, 0)
    if shard_index >= num_shards:
        raise InputError(f"shard_index must be < num_shards ({num_shards}), got {shard_index}")
    render, _ = batch_function(images, image_size=image_size, batch_size=batch_size, augment=augment)
    base = tf.random.experimental.stateless_fold_in(tf.constant([int(seed), 0], tf.int64), shard_index, alg=ALG)

    def make_batch(step: tf.Tensor) -> tf.Tensor:
        return render(tf.random.experimental.stateless_fold_in(base, step, alg=ALG))

    options = tf.data.Options()
    options.deterministic = True
    return (tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
            .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
            .with_options(options))
