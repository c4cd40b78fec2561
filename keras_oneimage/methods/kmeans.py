"""On-device clustering for DeepCluster: PCA-whitening, k-means and normalised mutual information.

DeepCluster (Caron et al., ECCV 2018, §3.2 and their ``clustering.py``) clusters conv features with faiss: PCA to
256 dimensions with whitening, L2 normalisation, then 20 Lloyd iterations of k-means, re-seeding empty clusters by
splitting a populated one. Here every step is TensorFlow, XLA-compiled (``jit_compile=True``), so it runs on the
accelerator that trains the network (GPU or TPU, inside a ``tf.distribute`` strategy) and needs no faiss.

Memory: distances are computed ``chunk_size`` points at a time, so the largest buffer is ``chunk_size × k`` floats.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import tensorflow as tf

# faiss's relative perturbation when an empty cluster takes over half of a populated one (faiss/Clustering.cpp).
SPLIT_EPS = 1.0 / 1024.0
# Largest distance block (points × centroids) computed at once: 2**26 floats = 256 MiB.
_MAX_BLOCK = 2**26


def as_float32(x) -> tf.Tensor:
    """``x`` as a float32 tensor. Features pooled under ``mixed_bfloat16`` arrive in bfloat16, which
    ``tf.convert_to_tensor(x, tf.float32)`` refuses; PCA and k-means need float32 sums either way."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.float32 else tf.cast(x, tf.float32)


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """Output of :func:`kmeans`: the final centroids and the assignment of every point to its nearest one."""

    centroids: np.ndarray  # (k, d) float32
    labels: np.ndarray  # (n,) int32, nearest final centroid
    inertia: float  # sum over points of the squared distance to the assigned centroid
    num_splits: int  # empty clusters re-seeded during the iterations


@dataclasses.dataclass(frozen=True)
class PCAWhitening:
    """A fitted PCA-whitening map ``x ↦ (x - mean) @ projection``; the output has identity covariance."""

    mean: tf.Tensor  # (d,)
    projection: tf.Tensor  # (d, dim): top eigenvectors scaled by eigenvalue**-1/2
    eigenvalues: tf.Tensor  # (dim,) descending

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(as_float32(x) - self.mean, self.projection)


def fit_pca_whitening(x, dim: int = 256, eps: float = 1e-7, *, method: str = "auto", power_iterations: int = 3,
                      seed: int = 0) -> PCAWhitening:
    """PCA on ``x`` (n, d) keeping ``min(dim, d)`` components, each scaled to unit variance.

    ``dim=256`` as DeepCluster (Caron et al. 2018, §4 "Implementation details"; faiss ``PCAMatrix(d, 256,
    eigen_power=-0.5)``). ``eps`` (relative to the largest eigenvalue, about float32's resolution) keeps dead,
    zero-variance directions finite without flattening real low-variance ones.

    ``method``: ``"exact"`` (``eigh`` of the d×d covariance), ``"randomized"`` (subspace iteration with
    ``power_iterations`` rounds on ``dim`` + oversampling directions, then Rayleigh–Ritz; Halko, Martinsson &
    Tropp 2011, Alg. 4.4 / 5.3), or ``"auto"``: randomized when ``d > 1024`` and ``dim <= d / 4``. A full ``eigh``
    is O(d³): for a 4096-d conv5 map it took ~2 minutes on a 2-core CPU, the randomized one seconds. Either way
    the whitened output has identity covariance on ``x`` (Rayleigh–Ritz keeps the projected covariance diagonal).
    """
    x = as_float32(x)
    d = int(x.shape[-1])
    keep = min(int(dim), d)
    if method == "auto":
        method = "randomized" if d > 1024 and keep <= d // 4 else "exact"
    mean, cov = _mean_cov(x)
    if method == "exact":
        eigenvalues, eigenvectors = tf.linalg.eigh(cov)  # ascending
    elif method == "randomized":
        rank = min(d, keep + max(16, keep // 4))
        key = tf.constant([seed % 2**31, 0x7CA], tf.int32)
        eigenvalues, eigenvectors = _randomized_eigh(cov, key, rank, int(power_iterations))
    else:
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    eigenvalues = tf.reverse(eigenvalues[-keep:], axis=[0])
    eigenvectors = tf.reverse(eigenvectors[:, -keep:], axis=[1])
    floor = eps * tf.maximum(eigenvalues[0], 1e-30)
    scale = tf.math.rsqrt(tf.maximum(eigenvalues, 0.0) + floor)
    return PCAWhitening(mean=mean, projection=eigenvectors * scale[None, :], eigenvalues=eigenvalues)


@tf.function(jit_compile=True)
def _randomized_eigh(cov: tf.Tensor, key: tf.Tensor, rank: int, iterations: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Approximate top-``rank`` eigenpairs of a PSD matrix, ascending like ``tf.linalg.eigh``."""
    probe = tf.random.stateless_normal((tf.shape(cov)[0], rank), seed=key, alg="philox")
    basis, _ = tf.linalg.qr(tf.matmul(cov, probe))
    for _ in range(iterations):
        basis, _ = tf.linalg.qr(tf.matmul(cov, basis))
    small = tf.matmul(basis, tf.matmul(cov, basis), transpose_a=True)
    eigenvalues, vectors = tf.linalg.eigh((small + tf.transpose(small)) / 2.0)
    return eigenvalues, tf.matmul(basis, vectors)


@tf.function(jit_compile=True)
def _mean_cov(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    n = tf.cast(tf.shape(x)[0], tf.float32)
    mean = tf.reduce_mean(x, axis=0)
    centred = x - mean
    return mean, tf.matmul(centred, centred, transpose_a=True) / tf.maximum(n - 1.0, 1.0)


def preprocess_features(x, dim: int = 256) -> tf.Tensor:
    """DeepCluster's feature preprocessing: PCA-whiten to ``dim`` dimensions, then L2-normalise each row."""
    x = as_float32(x)  # once: the whitening is fitted on x and applied to it
    whitened = fit_pca_whitening(x, dim)(x)
    return tf.math.l2_normalize(whitened, axis=-1)


def kmeans(
    x,
    k: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    init: str | np.ndarray = "kmeans++",
    chunk_size: int | None = None,
    device: str | None = None,
) -> KMeansResult:
    """Lloyd's k-means on ``x`` (n, d), XLA-compiled; empty clusters are re-seeded by splitting a populated one.

    Args:
        x: points, float (n, d): an array, or a tensor (which stays on its device).
        k: number of clusters (``1 <= k <= n``).
        iterations: Lloyd iterations; 20 as DeepCluster (Caron et al. 2018, ``clustering.py``: ``niter = 20``).
        seed: seeds the initialisation and the choice of which cluster to split.
        init: ``"kmeans++"`` (greedy k-means++, Arthur & Vassilvitskii 2007; default: it costs about ``2 + ln k``
            Lloyd iterations and avoids the merged/split clusters random starts give), ``"random"`` (k distinct
            points, faiss's and so DeepCluster's choice), or an array of initial centroids (k, d).
        chunk_size: points per distance block; default keeps a block at most 2**26 floats.
        device: where to run, e.g. ``"/GPU:0"``; default: TensorFlow's placement (the first accelerator).

    An empty cluster takes a copy of a populated cluster ``j`` chosen with probability ∝ ``size_j - 1`` and the two
    are pushed apart by a relative ``±1/1024`` (as faiss, which DeepCluster uses); each gets half of ``j``'s points.
    """
    with tf.device(device) if device else contextlib.nullcontext():
        x = as_float32(x)  # a device tensor stays on its device
        if x.shape.rank != 2:
            raise ValueError(f"kmeans expects points of shape (n, d), got {tuple(x.shape)}")
        n, d = int(x.shape[0]), int(x.shape[1])
        k = int(k)
        if not 1 <= k <= n:
            raise ValueError(f"kmeans needs 1 <= k <= n, got k={k} for n={n} points")
        chunk = int(chunk_size or max(1, min(n, _MAX_BLOCK // k)))
        num_chunks = math.ceil(n / chunk)
        pad = num_chunks * chunk - n
        xc = tf.reshape(tf.pad(x, [[0, pad], [0, 0]]), [num_chunks, chunk, d])
        wc = tf.reshape(tf.pad(tf.ones([n], tf.float32), [[0, pad]]), [num_chunks, chunk])
        key = tf.constant([seed % 2**31, 0x6B6D], tf.int32)  # "km"
        if isinstance(init, str):
            if init == "kmeans++":
                centroids = _init_kmeanspp(xc, wc, key, k)
            elif init == "random":
                centroids = _init_random(xc, wc, key, k)
            else:
                raise ValueError(f"init must be 'kmeans++', 'random' or an array of centroids, got {init!r}")
        else:
            centroids = tf.constant(np.asarray(init, np.float32))
            if tuple(centroids.shape) != (k, d):
                raise ValueError(f"initial centroids must have shape {(k, d)}, got {tuple(centroids.shape)}")
        centroids, splits = _lloyd(xc, wc, centroids, key, int(iterations))
        labels, dist = _assign(xc, centroids)
    labels = labels.numpy().reshape(-1)[:n].astype(np.int32)
    inertia = float(np.sum(dist.numpy().reshape(-1)[:n], dtype=np.float64))
    return KMeansResult(centroids=centroids.numpy(), labels=labels, inertia=inertia, num_splits=int(splits))


def _sq_dist(x: tf.Tensor, c: tf.Tensor, c_sq: tf.Tensor) -> tf.Tensor:
    """Squared distances (m, k) between rows of x (m, d) and c (k, d): ||x||² - 2x·c + ||c||², clipped at 0."""
    x_sq = tf.reduce_sum(tf.square(x), axis=-1, keepdims=True)
    return tf.maximum(x_sq - 2.0 * tf.matmul(x, c, transpose_b=True) + c_sq[None, :], 0.0)


def _nearest(xc: tf.Tensor, c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Nearest centroid and its squared distance for every point; xc is (chunks, chunk, d), one chunk at a time."""
    c_sq = tf.reduce_sum(tf.square(c), axis=-1)

    def one(xb):
        dist = _sq_dist(xb, c, c_sq)
        return tf.argmin(dist, axis=-1, output_type=tf.int32), tf.reduce_min(dist, axis=-1)

    return tf.map_fn(one, xc, fn_output_signature=(tf.int32, tf.float32))


_assign = tf.function(_nearest, jit_compile=True)


def _gumbel_argmax(logits: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One sample from softmax(logits) by the Gumbel-max trick (stateless, XLA-friendly)."""
    u = tf.random.stateless_uniform(tf.shape(logits), seed=seed, minval=1e-12, maxval=1.0, alg="philox")
    return tf.argmax(logits - tf.math.log(-tf.math.log(u)), output_type=tf.int32)


@tf.function(jit_compile=True)
def _init_random(xc: tf.Tensor, wc: tf.Tensor, key: tf.Tensor, k: int) -> tf.Tensor:
    """k distinct real points chosen uniformly (as faiss's default initialisation)."""
    x = tf.reshape(xc, [-1, tf.shape(xc)[-1]])
    w = tf.reshape(wc, [-1])
    u = tf.random.stateless_uniform(tf.shape(w), seed=key, alg="philox")
    _, idx = tf.math.top_k(tf.where(w > 0, u, -1.0), k=k)
    return tf.gather(x, idx)


@tf.function(jit_compile=True)
def _init_kmeanspp(xc: tf.Tensor, wc: tf.Tensor, key: tf.Tensor, k: int) -> tf.Tensor:
    """Greedy k-means++ seeding: draw ``2 + ln k`` candidates ∝ D², keep the one that lowers the potential most.

    Plain k-means++ (one candidate) often leaves two true clusters under one seed; the greedy variant (Arthur &
    Vassilvitskii 2007, §6; scikit-learn's default) is markedly more reliable for the cost of a few distance passes.
    """
    x = tf.reshape(xc, [-1, tf.shape(xc)[-1]])
    w = tf.reshape(wc, [-1])
    x_sq = tf.reduce_sum(tf.square(x), axis=-1)
    trials = 2 + int(math.log(k)) if k > 1 else 1

    def dist_to(points):  # (m, d) -> (m, n)
        cross = tf.matmul(points, x, transpose_b=True)
        return tf.maximum(tf.reduce_sum(tf.square(points), -1, keepdims=True) - 2.0 * cross + x_sq[None], 0.0) * w

    def candidates(logits, seed):
        # Gumbel-top-k: `trials` draws without replacement, each ∝ exp(logits).
        u = tf.random.stateless_uniform(tf.shape(logits), seed=seed, minval=1e-12, maxval=1.0, alg="philox")
        return tf.math.top_k(logits - tf.math.log(-tf.math.log(u)), k=trials).indices

    first = _gumbel_argmax(tf.math.log(w), tf.random.experimental.stateless_fold_in(key, 0))
    centroids = tf.TensorArray(tf.float32, size=k, element_shape=x.shape[-1:])
    # tf.gather, not x[i]: XLA would need a sliced index as a compile-time constant and recompile per seed.
    seed_point = tf.gather(x, first)
    centroids = centroids.write(0, seed_point)
    d2 = dist_to(seed_point[None])[0]

    def body(t, cs, d2):
        # log(0) = -inf: padding and points already chosen are never drawn while any D² > 0 remains.
        logits = tf.where(d2 > 0, tf.math.log(d2), -np.inf)
        logits = tf.where(tf.reduce_any(d2 > 0), logits, tf.math.log(w))  # fewer distinct points than k
        idx = candidates(logits, tf.random.experimental.stateless_fold_in(key, t))
        new_d2 = tf.minimum(d2[None], dist_to(tf.gather(x, idx)))  # (trials, n)
        best = tf.argmin(tf.reduce_sum(new_d2, axis=-1), output_type=tf.int32)
        return t + 1, cs.write(t, tf.gather(x, tf.gather(idx, best))), tf.gather(new_d2, best)

    _, centroids, _ = tf.while_loop(lambda t, *_: t < k, body, (tf.constant(1), centroids, d2))
    return centroids.stack()


def _split_empty(c: tf.Tensor, counts: tf.Tensor, key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Re-seed every empty cluster from a populated one (faiss ``split_clusters``); returns (c, counts, n_split)."""
    d = tf.shape(c)[-1]
    sign = tf.where(tf.range(d) % 2 == 0, 1.0, -1.0)  # faiss alternates the perturbation's sign over dimensions

    def needs_split(c, counts, n):
        return tf.logical_and(tf.reduce_any(counts == 0), tf.reduce_max(counts) > 1)

    def body(c, counts, n):
        empty = tf.argmax(tf.cast(counts == 0, tf.int32), output_type=tf.int32)
        donor_weight = tf.maximum(counts - 1.0, 0.0)
        donor = _gumbel_argmax(tf.math.log(donor_weight), tf.random.experimental.stateless_fold_in(key, n))
        base = tf.gather(c, donor)
        c = tf.tensor_scatter_nd_update(
            c, [[empty], [donor]], tf.stack([base * (1.0 + SPLIT_EPS * sign), base * (1.0 - SPLIT_EPS * sign)])
        )
        donor_count = tf.gather(counts, donor)
        half = tf.floor(donor_count / 2.0)
        counts = tf.tensor_scatter_nd_update(counts, [[empty], [donor]], tf.stack([half, donor_count - half]))
        return c, counts, n + 1

    return tf.while_loop(needs_split, body, (c, counts, tf.constant(0)))


@tf.function(jit_compile=True)
def _lloyd(xc: tf.Tensor, wc: tf.Tensor, c: tf.Tensor, key: tf.Tensor, iterations: int):
    """``iterations`` rounds of assign → mean → split-empty; returns (centroids, total splits)."""
    k = tf.shape(c)[0]
    x = tf.reshape(xc, [-1, tf.shape(xc)[-1]])
    w = tf.reshape(wc, [-1])

    def body(i, c, total):
        labels, _ = _nearest(xc, c)
        labels = tf.reshape(labels, [-1])
        sums = tf.math.unsorted_segment_sum(x * w[:, None], labels, k)
        counts = tf.math.unsorted_segment_sum(w, labels, k)
        c = tf.where(counts[:, None] > 0, sums / tf.maximum(counts, 1.0)[:, None], c)
        c, _, n = _split_empty(c, counts, tf.random.experimental.stateless_fold_in(key, 1000 + i))
        return i + 1, c, total + n

    _, c, total = tf.while_loop(lambda i, *_: i < iterations, body, (tf.constant(0), c, tf.constant(0)))
    return c, total


def normalized_mutual_info(a, b) -> float:
    """NMI of two labelings, normalised by the arithmetic mean of their entropies (sklearn's default).

    DeepCluster (Caron et al. 2018, §5.1, Fig. 2b) tracks NMI between the assignments of successive epochs as a
    stability signal. Two constant labelings count as identical (1.0).
    """
    a = np.asarray(a).reshape(-1)
    b = np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.size == 0:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    ka, kb = ai.max() + 1, bi.max() + 1
    joint = np.bincount(ai * kb + bi, minlength=ka * kb).reshape(ka, kb).astype(np.float64) / a.size
    pa, pb = joint.sum(1), joint.sum(0)
    h_a = -np.sum(pa * np.log(pa))
    h_b = -np.sum(pb * np.log(pb))
    if h_a == 0.0 and h_b == 0.0:
        return 1.0
    nz = joint > 0
    mi = np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz]))
    return float(max(mi, 0.0) / max((h_a + h_b) / 2.0, 1e-300))
