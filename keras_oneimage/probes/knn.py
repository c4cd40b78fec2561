"""k-nearest-neighbour evaluation of every tap of a frozen trunk, on the linear probes' pooled features.

A training-free companion of the linear probes (:mod:`keras_oneimage.probes.linear`): each tap is max-pooled to about
9k dimensions exactly as for the probes, flattened and L2-normalised; an evaluation image takes the labels of its
``k`` most cosine-similar training images. Voting follows Wu et al. (2018, "Unsupervised feature learning via
non-parametric instance discrimination", §3.4): neighbour ``i`` votes with weight ``exp(s_i / temperature)``
(temperature 0.07). ``temperature=None`` gives a plain majority vote (ties go to the lower class index). ``k=20``
as in the brief's protocol (Wu et al. use 200 on ImageNet).

Memory: the evaluation split's features are held in chunks of at most ``max_query_bytes``; the training split
streams through in batches (one trunk pass per batch for all layers) and each chunk keeps a running top-k, so
nothing of size ``train x dims`` is ever stored. Each further chunk costs one more pass over the training split.
"""
from __future__ import annotations

import os
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.data.labelled import LabelledData
from keras_oneimage.data.pipelines import eval_pipeline
from keras_oneimage.errors import InputError
from keras_oneimage.probes.linear import (
    TAPS,
    TARGET_DIMS,
    PoolSpec,
    as_labelled,
    check_layers,
    pooling_for,
    probe_image_size,
    tap_shapes,
)

K = 20
TEMPERATURE = 0.07  # Wu et al. 2018
BATCH_SIZE = 256
MAX_QUERY_BYTES = 1 << 30


def knn_probe(
    backbone,
    data: LabelledData | str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    k: int = K,
    temperature: float | None = TEMPERATURE,
    batch_size: int = BATCH_SIZE,
    image_size: int | None = None,
    target_dims: int = TARGET_DIMS,
    split: str = "test",
    max_query_bytes: int = MAX_QUERY_BYTES,
) -> dict[str, float]:
    """``{layer: top-1 kNN accuracy on split}`` with the training split as the memory bank."""
    predictions, labels = knn_predict(
        backbone, data, layers=layers, k=k, temperature=temperature, batch_size=batch_size, image_size=image_size,
        target_dims=target_dims, split=split, max_query_bytes=max_query_bytes,
    )  # fmt: skip
    return {layer: float(np.mean(pred == labels)) for layer, pred in predictions.items()}


def knn_predict(
    backbone,
    data: LabelledData | str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    k: int = K,
    temperature: float | None = TEMPERATURE,
    batch_size: int = BATCH_SIZE,
    image_size: int | None = None,
    target_dims: int = TARGET_DIMS,
    split: str = "test",
    max_query_bytes: int = MAX_QUERY_BYTES,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The kNN predicted class of every ``split`` image per layer, and the true labels, as numpy arrays."""
    data = as_labelled(data)
    layers = check_layers(backbone, layers)
    k = validation.positive_int("k", k)
    batch_size = validation.positive_int("batch_size", batch_size)
    max_query_bytes = validation.positive_int("max_query_bytes", max_query_bytes)
    if temperature is not None:
        temperature = validation.positive_finite("temperature", temperature)
    if split not in ("val", "test"):
        raise InputError(f"split must be 'val' or 'test', got {split!r}")
    if data.train_size == 0 or data.size(split) == 0:
        raise InputError(f"kNN needs a non-empty train split and {split!r} split")
    size = probe_image_size(backbone, data, image_size)
    pooling = {
        layer: pooling_for(shape, validation.positive_int("target_dims", target_dims))
        for layer, shape in tap_shapes(backbone, layers, size).items()
    }
    k = min(k, data.train_size)
    batch_size = min(batch_size, max(data.train_size, data.size(split)))  # as the linear probe: no billion-row batch
    embed = _embedder(backbone, pooling)
    bank = eval_pipeline(data.train, size, batch_size)
    chunk = max(1, max_query_bytes // (4 * sum(spec.dims for spec in pooling.values())))

    predictions: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    labels = []
    for queries, query_labels in _query_chunks(eval_pipeline(data.split(split), size, batch_size), embed, chunk):
        top_sim, top_label = _nearest(queries, bank, embed, k)
        for layer in layers:
            predictions[layer].append(_vote(top_sim[layer], top_label[layer], data.num_classes, temperature))
        labels.append(query_labels)
    return {layer: np.concatenate(p) for layer, p in predictions.items()}, np.concatenate(labels)


def _embedder(backbone, pooling: Mapping[str, PoolSpec]):
    layers = tuple(pooling)

    @tf.function(reduce_retracing=True)
    def embed(x):
        feats = backbone.features(x, layers=layers, training=False)
        out = {}
        for layer, spec in pooling.items():
            f = tf.cast(feats[layer], tf.float32)
            if spec.padding:  # zero padding = -inf padding for post-ReLU taps
                p = spec.padding
                f = tf.pad(f, [[0, 0], [p, p], [p, p], [0, 0]])
            if spec.size > 1:
                f = tf.nn.max_pool2d(f, spec.size, spec.stride, "VALID")
            out[layer] = tf.math.l2_normalize(tf.reshape(f, [tf.shape(f)[0], -1]), axis=1)
        return out

    return embed


def _query_chunks(ds: tf.data.Dataset, embed, chunk: int) -> Iterator[tuple[dict[str, tf.Tensor], np.ndarray]]:
    """Embedded evaluation images in chunks of about ``chunk`` examples (one trunk pass per batch)."""
    feats: dict[str, list] = {}
    labels: list = []
    count = 0
    for x, y in ds:
        for layer, f in embed(x).items():
            feats.setdefault(layer, []).append(f)
        labels.append(y.numpy())
        count += len(labels[-1])
        if count >= chunk:
            yield {layer: tf.concat(f, 0) for layer, f in feats.items()}, np.concatenate(labels)
            feats, labels, count = {}, [], 0
    if count:
        yield {layer: tf.concat(f, 0) for layer, f in feats.items()}, np.concatenate(labels)


@tf.function(reduce_retracing=True)
def _merge(queries, keys, key_labels, top_sim, top_label, k: int):
    sim = tf.matmul(queries, keys, transpose_b=True)  # cosine: both sides are L2-normalised
    cand_sim = tf.concat([top_sim, sim], axis=1)
    cand_label = tf.concat([top_label, tf.tile(key_labels[None, :], [tf.shape(queries)[0], 1])], axis=1)
    top_sim, index = tf.math.top_k(cand_sim, k=k)
    return top_sim, tf.gather(cand_label, index, batch_dims=1)


def _nearest(queries: Mapping[str, tf.Tensor], bank: tf.data.Dataset, embed, k: int):
    """Running top-k cosine similarities (and labels) of every query over the whole training split."""
    n = int(next(iter(queries.values())).shape[0])
    top_sim = {layer: tf.fill([n, k], -np.inf) for layer in queries}
    top_label = {layer: tf.fill([n, k], tf.constant(-1, tf.int32)) for layer in queries}
    for x, y in bank:
        keys = embed(x)
        y = tf.cast(y, tf.int32)
        for layer, q in queries.items():
            top_sim[layer], top_label[layer] = _merge(q, keys[layer], y, top_sim[layer], top_label[layer], k)
    return top_sim, top_label


def _vote(top_sim: tf.Tensor, top_label: tf.Tensor, num_classes: int, temperature: float | None) -> np.ndarray:
    sim, label = top_sim.numpy().astype(np.float64), top_label.numpy()
    valid = label >= 0
    if temperature is None:
        weight = valid.astype(np.float64)
    else:
        weight = np.where(valid, np.exp((sim - 1.0) / temperature), 0.0)  # shifted by the max cosine, 1
    scores = np.zeros((len(label), num_classes))
    rows = np.repeat(np.arange(len(label)), label.shape[1])
    np.add.at(scores, (rows, np.where(valid, label, 0).ravel()), weight.ravel())
    return scores.argmax(axis=1).astype(np.int32)
