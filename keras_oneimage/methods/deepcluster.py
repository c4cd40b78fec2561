"""DeepCluster: alternate k-means on the network's features and classification of the cluster ids.

Caron, Bojanowski, Joulin & Douze, "Deep clustering for unsupervised learning of visual features", ECCV 2018. Each
epoch the features of a fixed set of images are PCA-whitened, L2-normalised and clustered with k-means; the
cluster ids become pseudo-labels that a freshly initialised linear head learns to predict while the trunk trains.
Asano et al. (ICLR 2020, §4) run it on patches of a single image.

How `fit` drives it (the method supplies its own data, so the `train_step` gets pseudo-labels):

* ``backbone_options = {"sobel": True}``: `fit` builds the AlexNet with the fixed Sobel front end (Caron et al.
  §5 "Sobel filtering"); ``fit(..., method="deepcluster", sobel=False)`` trains it on colour instead (the Sobel
  front end drops colour, which linear probes on CIFAR-10 use from conv1 on).
* ``make_dataset(context)`` draws the **pool**: ``pool_size`` patches from
  :func:`~keras_oneimage.data.synthetic.patch_dataset`, once, with the run's seed (the single-image paper's saved
  dataset of augmented patches; a fixed pool also makes the NMI between successive assignments meaningful). The pool
  lives on the device as a ``uint8`` variable (``pool_size·S²·3`` bytes). The returned dataset yields *positions*
  ``0 … steps_per_epoch·batch_size − 1``, epoch after epoch; ``train_step`` maps a position through the epoch's
  sampling order to a pool index and gathers the patch and its pseudo-label from device variables. The dataset never
  reads the variables, so prefetching cannot race the re-clustering, and the gather works under XLA and
  ``tf.distribute``.
* ``method_callbacks(context)`` returns :class:`Recluster`, which at the start of every epoch extracts features
  (eval mode), clusters them, writes the pseudo-labels and a sampling order with equal counts per non-empty cluster,
  and re-initialises the head.

Logged each epoch: ``loss``, ``accuracy`` (pseudo-label accuracy), ``nmi`` (NMI between this epoch's and the previous
epoch's assignment of the pool, Caron et al. §5.1; the first epoch of a run compares with the trivial one-cluster
assignment, so it logs 0) and ``clusters`` (non-empty clusters).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.errors import InputError
from keras_oneimage.methods import kmeans as kmeans_lib
from keras_oneimage.methods.base import FitContext, SelfSupervisedMethod, unpack_patches
from keras_oneimage.methods.registry import register
from keras_oneimage.models.heads import check_head_widths, default_head_widths, mlp_head

#: Clusters. Caron et al. use k = 10,000 for 1.28M ImageNet images (≈128 images per cluster, §5.1 finds
#: over-segmentation helps). The default pool of 10,000 patches with k = 100 keeps ≈100 patches per cluster.
DEFAULT_NUM_CLUSTERS = 100
#: Patches clustered each epoch (a CIFAR-scale stand-in for the paper's 1.28M-patch dataset).
DEFAULT_POOL_SIZE = 10_000
#: PCA dimension before k-means (Caron et al. §4, "Implementation details").
DEFAULT_PCA_DIM = 256
#: Lloyd iterations per clustering (DeepCluster's faiss setting ``niter = 20``).
DEFAULT_KMEANS_ITERATIONS = 20
#: The head is re-initialised as in DeepCluster's code: weights N(0, 0.01²), bias 0.
HEAD_INIT_STDDEV = 0.01


def pseudo_label_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy of the cluster logits against the pseudo-labels (Caron et al. 2018, Eq. 1).

    A plain mean over this replica's batch: a ``keras.losses.Loss`` object would already divide by the replica
    count under ``tf.distribute``, and ``scaled_loss`` divides once more.
    """
    per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return tf.reduce_mean(tf.cast(per_example, tf.float32))


def balanced_order(labels: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A shuffled list of ``length`` pool indices with (±1) equal counts from every non-empty cluster.

    DeepCluster's ``UnifLabelSampler`` (Caron et al. §3.3, "Avoiding trivial parametrization"): sampling uniformly
    over clusters instead of over images keeps a few huge clusters from dominating the loss. Clusters smaller
    than their share are sampled with replacement.
    """
    labels = np.asarray(labels).reshape(-1)
    clusters = np.unique(labels)
    counts = np.full(len(clusters), length // len(clusters))
    counts[rng.permutation(len(clusters))[: length % len(clusters)]] += 1
    chunks = []
    for cluster, count in zip(clusters, counts):
        members = np.flatnonzero(labels == cluster)
        chunks.append(rng.choice(members, size=count, replace=len(members) < count))
    order = np.concatenate(chunks).astype(np.int32)
    return order[rng.permutation(len(order))]


def reset_optimizer_slots(optimizer: keras.optimizers.Optimizer, variables) -> int:
    """Zero the optimizer's slots (momentum, Adam moments) of ``variables``; returns how many were reset.

    DeepCluster builds a fresh optimizer for the re-initialised top layer every epoch; this is the Keras
    equivalent. Keras names a slot ``{variable.path with '/'→'_'}_{slot}`` (``add_variable_from_reference``).
    """
    if optimizer is None or not getattr(optimizer, "built", False):
        return 0
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    reset = 0
    for var in variables:
        prefix = var.path.replace("/", "_") + "_"
        for slot in inner.variables:
            if slot.name.startswith(prefix) and tuple(slot.shape) == tuple(var.shape):
                slot.assign(tf.zeros(slot.shape, slot.dtype))
                reset += 1
    return reset


@register("deepcluster")
@keras.saving.register_keras_serializable(package="keras_oneimage")
class DeepCluster(SelfSupervisedMethod):
    """DeepCluster on an AlexNet ``backbone`` built with ``sobel=True`` (see ``backbone_options``).

    Args:
        backbone: the trunk; its pooled conv5 map, flattened, is both the clustered feature and the MLP head's input.
        num_clusters: k of k-means (default 100, see ``DEFAULT_NUM_CLUSTERS``).
        pool_size: patches drawn once and re-clustered every epoch (default 10,000).
        pca_dim: PCA-whitening dimension before k-means (256, Caron et al. §4).
        kmeans_iterations: Lloyd iterations per epoch (20, as DeepCluster).
        feature_batch_size: batch size of the feature extraction pass.
        head_widths: hidden widths of the classifier MLP between the trunk and the re-initialised top layer
            (Caron et al.'s fc6-fc7; default ``(1024, 1024)`` for the "cifar" AlexNet, ``(4096, 4096)`` for
            "imagenet"; ``()`` puts the top layer straight on the trunk, which overshoots at lr 0.05).
        sobel: whether ``backbone`` has the Sobel front end (checked; `fit` builds the trunk to match). True is
            Caron et al.'s setting.
    """

    #: `fit` builds the backbone with these options: DeepCluster sees Sobel gradients, not colour.
    backbone_options = {"sobel": True}

    def __init__(
        self,
        backbone: keras.Model,
        num_clusters: int = DEFAULT_NUM_CLUSTERS,
        pool_size: int = DEFAULT_POOL_SIZE,
        pca_dim: int = DEFAULT_PCA_DIM,
        kmeans_iterations: int = DEFAULT_KMEANS_ITERATIONS,
        feature_batch_size: int = 256,
        head_widths: Sequence[int] | None = None,
        sobel: bool = True,
        **kwargs,
    ):
        kwargs.setdefault("name", "deepcluster")
        super().__init__(backbone, **kwargs)
        if not isinstance(sobel, (bool, np.bool_)):
            raise InputError(f"sobel must be True or False, got {sobel!r}")
        self.sobel = bool(sobel)
        trunk_sobel = bool(getattr(backbone, "sobel", False))
        if trunk_sobel != self.sobel:
            raise InputError(f"DeepCluster(sobel={self.sobel}) needs a trunk built with sobel={self.sobel}; "
                             f"this one has sobel={trunk_sobel}")
        for name, value, minimum in (
            ("num_clusters", num_clusters, 2),
            ("pool_size", pool_size, 2),
            ("pca_dim", pca_dim, 1),
            ("kmeans_iterations", kmeans_iterations, 1),
            ("feature_batch_size", feature_batch_size, 1),
        ):
            validation.int_at_least(name, value, minimum)
        if num_clusters > pool_size:
            raise InputError(f"num_clusters ({num_clusters}) must not exceed pool_size ({pool_size})")
        self.num_clusters = int(num_clusters)
        self.pool_size = int(pool_size)
        self.pca_dim = int(pca_dim)
        self.kmeans_iterations = int(kmeans_iterations)
        self.feature_batch_size = int(feature_batch_size)
        self.head_widths = check_head_widths(default_head_widths(backbone) if head_widths is None else head_widths)
        # The MLP (fc6-fc7 in Caron et al.'s AlexNet) persists across epochs; only its top layer is re-initialised.
        self.head = mlp_head(self.head_widths, self.num_clusters, dtype=self.dtype_policy,
                             output_initializer=keras.initializers.RandomNormal(stddev=HEAD_INIT_STDDEV))
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._state: _PoolState | None = None  # device variables, created by make_dataset
        self._extract_fn = None

    # ------------------------------------------------------------------------------------------------ model
    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def call(self, x, training=None):
        """Cluster logits ``(B, num_clusters)`` (float32) for patches ``x`` in [0, 1]."""
        return self.head(self.backbone(x, training=training), training=training)

    def default_optimizer(self) -> keras.optimizers.Optimizer:
        """SGD, lr 0.05, momentum 0.9, weight decay 1e-5 (Caron et al. 2018, §4 "Implementation details")."""
        return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9, weight_decay=1e-5)

    def build(self, input_shape=None):
        size = getattr(self.backbone, "image_size", None)
        if input_shape is None:
            input_shape = (None, size, size, 3)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self.head.build((None, *self.backbone.feature_shapes(input_shape[1])["output"]))
        self.built = True

    # ------------------------------------------------------------------------------------------------ data
    def make_dataset(self, context: FitContext) -> tf.data.Dataset:
        """Draw the pool (once per run) and return the dataset of sampling positions `fit` must train on.

        The pool is ``pool_size`` patches from ``patch_dataset(context.images, seed=context.seed, ...)``; the
        dataset yields int32 batches of positions ``0 … steps_per_epoch·batch_size − 1``, repeated every epoch.
        """
        from keras_oneimage.data.synthetic import patch_dataset

        size = int(context.image_size)
        if not self.built:
            self.build((None, size, size, 3))
        draw = min(self.pool_size, 256)
        stream = patch_dataset(
            context.images, image_size=size, batch_size=draw, augment=context.augment, seed=int(context.seed)
        )
        chunks = [
            np.asarray(np.round(np.clip(b.numpy(), 0.0, 1.0) * 255.0), np.uint8)
            for b in stream.take(math.ceil(self.pool_size / draw))
        ]
        pool = np.concatenate(chunks)[: self.pool_size]
        strategy = self.distribute_strategy or tf.distribute.get_strategy()
        with strategy.scope():
            self._state = _PoolState(pool)
        self._extract_fn = None
        epoch_length = int(context.steps_per_epoch) * int(context.batch_size)
        positions = tf.data.Dataset.range(epoch_length).map(lambda i: tf.cast(i, tf.int32))
        return positions.repeat().batch(int(context.batch_size), drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def method_callbacks(self, context: FitContext) -> list[keras.callbacks.Callback]:
        """The per-epoch re-clustering (:class:`Recluster`)."""
        return [Recluster(seed=int(context.seed))]

    # ------------------------------------------------------------------------------------------------ training
    def _gather(self, positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        state = self._state
        if state is None or positions.dtype not in (tf.int32, tf.int64):
            raise InputError(
                "DeepCluster trains on its own dataset: use keras_oneimage.fit(..., method='deepcluster'), or pass "
                "method.make_dataset(context) and method.method_callbacks(context) to Model.fit"
            )
        positions = tf.cast(tf.reshape(positions, [-1]), tf.int32)
        index = tf.gather(state.order, positions % self.pool_size)
        patches = tf.cast(tf.gather(state.pool, index), tf.float32) / 255.0
        # Random horizontal flip, the training-time augmentation DeepCluster keeps (the pool is fixed).
        seed = tf.stack([positions[0], tf.cast(self.optimizer.iterations, tf.int32)])
        flip = tf.random.stateless_uniform(tf.shape(index), seed=seed, alg="philox") < 0.5
        patches = tf.where(flip[:, None, None, None], tf.reverse(patches, axis=[2]), patches)
        return patches, tf.gather(state.labels, index)

    def train_step(self, data):
        patches, labels = self._gather(unpack_patches(data))
        with tf.GradientTape() as tape:
            logits = self(patches, training=True)
            loss = pseudo_label_loss(labels, logits)
            scaled = self.scaled_loss(loss)
        self.minimize(scaled, tape)
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(labels, logits)
        logs = {m.name: m.result() for m in self.metrics}
        logs["nmi"] = self._state.nmi.read_value()
        logs["clusters"] = self._state.nonempty.read_value()
        return logs

    # ------------------------------------------------------------------------------------------------ clustering
    def pool_features(self) -> tf.Tensor:
        """Flattened pooled-conv5 features ``(pool_size, D)`` of the pool, eval mode (BatchNorm statistics)."""
        state = self._require_state()
        if getattr(self, "_extract_fn", None) is None:
            batch = self.feature_batch_size

            @tf.function
            def extract(start):
                x = tf.cast(state.pool[start : start + batch], tf.float32) / 255.0
                return keras.ops.reshape(self.backbone(x, training=False), (tf.shape(x)[0], -1))

            self._extract_fn = extract
        starts = range(0, self.pool_size, self.feature_batch_size)
        return tf.concat([self._extract_fn(tf.constant(s)) for s in starts], axis=0)

    def recluster(self, seed: int) -> dict[str, float]:
        """Cluster the pool's features, install the pseudo-labels and a balanced order, re-initialise the head.

        Returns the clustering statistics (``nmi`` vs the previous assignment, ``clusters``, ``inertia``,
        ``seconds``).
        """
        state = self._require_state()
        start = time.perf_counter()
        features = kmeans_lib.preprocess_features(self.pool_features(), self.pca_dim)
        device = _first_device(self.distribute_strategy)
        result = kmeans_lib.kmeans(
            features, self.num_clusters, iterations=self.kmeans_iterations, seed=seed, device=device
        )
        labels = result.labels
        nmi = kmeans_lib.normalized_mutual_info(state.host_labels, labels)
        nonempty = len(np.unique(labels))
        if nonempty < self.num_clusters // 2:
            warnings.warn(
                f"DeepCluster: only {nonempty} of {self.num_clusters} clusters are non-empty; the features are "
                "collapsing (the trivial solution of Caron et al. §3.3): try a lower learning rate",
                RuntimeWarning,
                stacklevel=2,
            )
        rng = np.random.default_rng([seed, 0x5EED])
        state.install(labels, balanced_order(labels, self.pool_size, rng), nmi)
        self.reset_head(seed)
        return {
            "nmi": nmi,
            "clusters": float(nonempty),
            "inertia": result.inertia,
            "seconds": time.perf_counter() - start,
        }

    def reset_head(self, seed: int) -> None:
        """Fresh head weights N(0, 0.01²), zero bias, and zeroed optimizer slots (the pseudo-labels were renamed)."""
        dense = self.head.layers[-1]
        kernel = tf.random.stateless_normal(dense.kernel.shape, seed=[seed, 0x4EAD], stddev=HEAD_INIT_STDDEV)
        dense.kernel.assign(tf.cast(kernel, dense.kernel.dtype))
        dense.bias.assign(tf.zeros_like(dense.bias))
        reset_optimizer_slots(getattr(self, "optimizer", None), [dense.kernel, dense.bias])

    def _require_state(self) -> "_PoolState":
        if self._state is None:
            raise InputError("DeepCluster has no patch pool yet: call make_dataset(context) first")
        return self._state

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_clusters": self.num_clusters,
            "pool_size": self.pool_size,
            "pca_dim": self.pca_dim,
            "kmeans_iterations": self.kmeans_iterations,
            "feature_batch_size": self.feature_batch_size,
            "head_widths": list(self.head_widths),
            "sobel": self.sobel,
        }


class _PoolState:
    """The device-side data of a run: pool (uint8), pseudo-labels, sampling order, last NMI and cluster count.

    Plain ``tf.Variable`` objects held outside Keras's tracking, so ``model.keras`` stays small: the pool is
    re-drawn (deterministically, from the seed) and re-clustered when a run resumes.
    """

    def __init__(self, pool: np.ndarray):
        n = pool.shape[0]
        self.pool = tf.Variable(pool, trainable=False, name="deepcluster_pool")
        self.labels = tf.Variable(np.zeros(n, np.int32), trainable=False, name="deepcluster_labels")
        self.order = tf.Variable(np.arange(n, dtype=np.int32), trainable=False, name="deepcluster_order")
        self.nmi = tf.Variable(0.0, trainable=False, name="deepcluster_nmi")
        self.nonempty = tf.Variable(0.0, trainable=False, name="deepcluster_clusters")
        # Before the first clustering every patch is in one cluster, so the first epoch's NMI is 0.
        self.host_labels = np.zeros(n, np.int32)

    def install(self, labels: np.ndarray, order: np.ndarray, nmi: float) -> None:
        self.labels.assign(labels.astype(np.int32))
        self.order.assign(order.astype(np.int32))
        self.nmi.assign(nmi)
        self.nonempty.assign(float(len(np.unique(labels))))
        self.host_labels = labels


def _first_device(strategy) -> str | None:
    """The first replica's device of ``strategy`` (where k-means runs), or None for TensorFlow's default."""
    if strategy is None or not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return None
    try:
        devices = strategy.extended.worker_devices
    except (AttributeError, RuntimeError):  # the default strategy has no device list
        return None
    return devices[0] if devices else None


class Recluster(keras.callbacks.Callback):
    """At the start of every epoch: re-cluster the pool and reset the head (DeepCluster's outer loop)."""

    def __init__(self, seed: int = 0, verbose: bool = False):
        super().__init__()
        self.seed = int(seed)
        self.verbose = verbose
        self.history: list[dict[str, float]] = []

    def on_epoch_begin(self, epoch, logs=None):
        stats = self.model.recluster(seed=(self.seed * 1_000_003 + int(epoch)) % 2**31)
        self.history.append({"epoch": int(epoch), **stats})
        if self.verbose:
            print(f"DeepCluster epoch {epoch}: {stats['clusters']:.0f} clusters, NMI vs previous {stats['nmi']:.3f}, "
                  f"k-means {stats['seconds']:.1f}s")
