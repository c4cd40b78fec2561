"""Linear probes on every tap of a frozen trunk, all trained in one pass (Asano et al., ICLR 2020, §4 "Evaluation").

The protocol follows the paper's released probe code (itself after Zhang et al. 2017), layer by layer:

* the trunk is frozen, its BatchNorm in inference mode, and it runs **once per batch** for all probes;
* each tap (post-ReLU) is max-pooled down to about 9k dimensions. At 224 px the paper uses conv1 6/6 pad 3,
  conv2 4/4, conv3-4 3/3 pad 1, conv5 2/2 (9600, 9216, 9600, 9600, 9216 dims). :func:`pooling_for` picks the
  non-overlapping window (size = stride, padding <= size/2) whose output is nearest 9216 dims on a log scale; it
  reproduces that table at 224 px and gives the 32/64 px settings listed in ``docs/probes.md``;
* BatchNorm without scale and shift (per channel, ``center=False, scale=False``), then a linear classifier
  (Glorot-uniform kernel, zero bias);
* SGD, momentum 0.9, weight decay 1e-5, learning rate 0.01, batch 192, 36 epochs with the rate divided by 10
  after 10, 20 and 30 epochs (scaled to ``epochs``: after 10/36, 20/36 and 30/36 of them);
* train-time augmentation only: random crop from the image zero-padded by 1/8 of its side, horizontal flip (the
  CIFAR-scale counterpart of the paper's random-resized crop; no ten-crop testing).

Accuracies are top-1 in ``[0, 1]`` on ``split``; pick hyper-parameters with :func:`probe_val`, never on ``test``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.data import pipelines
from keras_oneimage.data.labelled import LabelledData, load_labelled
from keras_oneimage.errors import InputError
from keras_oneimage.models.alexnet import AlexNet
from keras_oneimage.probes.protocols import ProbeProtocol, get_protocol

#: The taps probed by default, and the names a trunk without its own ``TAPS`` is checked against.
TAPS = AlexNet.TAPS
#: Probe input size the paper's pooling aims at (6 x 6 x 256 = 9216; its table lands on 9216 or 9600).
TARGET_DIMS = 9216
#: Paper probe code: 36 epochs, SGD lr 0.01 / momentum 0.9 / weight decay 1e-5, batch 192, lr /10 at 10, 20, 30.
PAPER_EPOCHS = 36
PAPER_DECAY_EPOCHS = (10, 20, 30)
LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-5
BATCH_SIZE = 192


# ------------------------------------------------------------------------------------------------------- pooling
@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """Max-pooling that brings one tap down to about :data:`TARGET_DIMS` features."""

    size: int
    stride: int
    padding: int
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]

    @property
    def dims(self) -> int:
        """Number of features after pooling (``h * w * c``)."""
        return math.prod(self.output_shape)

    def layers(self, name: str) -> list[keras.layers.Layer]:
        """Zero padding + max-pooling. Zero padding equals PyTorch's -inf padding here: the taps are post-ReLU."""
        out: list[keras.layers.Layer] = []
        if self.padding:
            out.append(keras.layers.ZeroPadding2D(self.padding, name=f"{name}_pad"))
        if self.size > 1:
            out.append(keras.layers.MaxPooling2D(self.size, strides=self.stride, name=f"{name}_pool"))
        return out


def pooling_for(shape: Sequence[int], target_dims: int = TARGET_DIMS) -> PoolSpec:
    """The non-overlapping max-pooling (size = stride, padding <= size // 2) landing nearest ``target_dims``.

    Distance is ``|log(dims / target_dims)|``; ties go to less padding, then the smaller window. At 224 px this
    gives exactly the paper's table (conv1 6/6 pad 3, conv2 4/4, conv3-4 3/3 pad 1, conv5 2/2).
    """
    h, w, c = (int(s) for s in shape)
    if min(h, w, c) < 1:
        raise InputError(f"cannot pool a tap of shape {tuple(shape)}")
    if target_dims < 1:
        raise InputError(f"target_dims must be positive, got {target_dims}")
    best, best_key = None, None
    for size in range(1, max(h, w) + 1):
        for pad in range(size // 2 + 1):
            oh, ow = (h + 2 * pad - size) // size + 1, (w + 2 * pad - size) // size + 1
            if oh < 1 or ow < 1:
                continue
            key = (abs(math.log(oh * ow * c / target_dims)), pad, size)
            if best_key is None or key < best_key:
                best_key, best = key, PoolSpec(size, size, pad, (h, w, c), (oh, ow, c))
    return best


def tap_shapes(backbone, layers: Sequence[str], image_size: int) -> dict[str, tuple[int, int, int]]:
    """``{layer: (h, w, c)}`` of the taps for square inputs of side ``image_size``."""
    if hasattr(backbone, "feature_shapes"):
        shapes = backbone.feature_shapes(image_size)
        return {layer: tuple(int(s) for s in shapes[layer]) for layer in layers}
    feats = backbone.features(tf.zeros((1, image_size, image_size, 3)), layers=tuple(layers), training=False)
    return {layer: tuple(int(s) for s in feats[layer].shape[1:]) for layer in layers}


def pooling_table(
    backbone, layers: Sequence[str] | None = None, image_size: int | None = None, target_dims: int = TARGET_DIMS
) -> dict[str, PoolSpec]:
    """The :class:`PoolSpec` of each probed layer of ``backbone`` at ``image_size`` (default: the backbone's)."""
    layers = check_layers(backbone, layers)
    size = probe_image_size(backbone, None, image_size)
    return {layer: pooling_for(shape, target_dims) for layer, shape in tap_shapes(backbone, layers, size).items()}


# --------------------------------------------------------------------------------------------------------- model
class LinearProbes(keras.Model):
    """One linear probe per tap on a frozen trunk; ``train_step`` runs the trunk once per batch for all of them.

    The trunk is held through its bound ``features`` method, so its weights are not variables of this model and
    nothing here can update them (gradients only reach the probes).
    """

    def __init__(
        self,
        backbone,
        pooling: Mapping[str, PoolSpec],
        num_classes: int,
        *,
        seed: int = 0,
        **kwargs,
    ):
        kwargs.setdefault("name", "linear_probes")
        super().__init__(**kwargs)
        self._features: Callable = backbone.features
        self.probe_layers = tuple(pooling)
        self.heads = {}
        for i, (layer, spec) in enumerate(pooling.items()):
            head = keras.Sequential(
                [
                    *spec.layers(f"{layer}"),
                    keras.layers.BatchNormalization(
                        center=False, scale=False, momentum=0.9, epsilon=1e-5, name=f"{layer}_bn"
                    ),
                    keras.layers.Flatten(name=f"{layer}_flatten"),
                    keras.layers.Dense(
                        num_classes,
                        kernel_initializer=keras.initializers.GlorotUniform(seed=seed * 7919 + i),
                        name=f"{layer}_linear",
                    ),
                ],
                name=f"probe_{layer}",
            )
            head.build((None, *spec.input_shape))
            self.heads[layer] = head
        self._ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracies = {
            layer: keras.metrics.SparseCategoricalAccuracy(name=f"acc_{layer}") for layer in self.probe_layers
        }
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker, *self.accuracies.values()]

    def trunk(self, x) -> dict:
        """The probed taps, computed in ONE forward pass of the frozen trunk (BatchNorm in inference mode)."""
        feats = self._features(x, layers=self.probe_layers, training=False)
        return {layer: tf.stop_gradient(tf.cast(feats[layer], tf.float32)) for layer in self.probe_layers}

    def call(self, x, training=False):
        feats = self.trunk(x)
        return {layer: self.heads[layer](feats[layer], training=training) for layer in self.probe_layers}

    def _update(self, y, logits: Mapping) -> tf.Tensor:
        losses = [self._ce(y, logits[layer]) for layer in self.probe_layers]
        total = tf.add_n(losses)
        self.loss_tracker.update_state(total)
        for layer in self.probe_layers:
            self.accuracies[layer].update_state(y, logits[layer])
        return total

    def train_step(self, data):
        x, y = data
        feats = self.trunk(x)
        with tf.GradientTape() as tape:
            logits = {layer: self.heads[layer](feats[layer], training=True) for layer in self.probe_layers}
            total = tf.add_n([self._ce(y, logits[layer]) for layer in self.probe_layers])
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(total, variables), variables)
        self._update(y, logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data
        self._update(y, self(x, training=False))
        return {m.name: m.result() for m in self.metrics}


def step_schedule(learning_rate: float, epochs: int,
                  decay_epochs: Sequence[int] = PAPER_DECAY_EPOCHS) -> Callable[[int], float]:
    """The paper's step schedule scaled to ``epochs``: /10 after 10/36, 20/36 and 30/36 of the epochs."""

    def schedule(epoch: int, lr: float | None = None) -> float:
        drops = sum(epoch * PAPER_EPOCHS >= b * epochs for b in decay_epochs)
        return float(learning_rate * 0.1**drops)

    return schedule


def protocol_pooling(protocol: ProbeProtocol, shapes: Mapping[str, Sequence[int]],
                     target_dims: int | None = None) -> dict[str, PoolSpec]:
    """``{layer: PoolSpec}`` for taps of ``shapes`` under ``protocol``: its fixed windows (the paper's table), else
    the window nearest ``target_dims`` (default: the protocol's)."""
    out = {}
    for layer, shape in shapes.items():
        h, w, c = (int(v) for v in shape)
        if protocol.pooling is not None and layer in protocol.pooling:
            size, stride, pad = protocol.pooling[layer]
            oh, ow = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
            if oh < 1 or ow < 1:
                raise InputError(f"the {protocol.name!r} protocol pools {layer} {size}/{stride} pad {pad}, "
                                 f"too large for its {h}x{w} map: use a larger image_size")
            out[layer] = PoolSpec(size, stride, pad, (h, w, c), (oh, ow, c))
        else:
            out[layer] = pooling_for((h, w, c), target_dims or protocol.target_dims)
    return out


# ------------------------------------------------------------------------------------------------------ public API
def probe(
    backbone,
    data: LabelledData | str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    protocol: str | ProbeProtocol | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    target_dims: int | None = None,
    split: str = "test",
    verbose: int = 1,
    augment: bool = True,
) -> dict[str, float]:
    """Train linear probes on the frozen ``backbone``'s taps; return ``{layer: top-1 accuracy on split}``.

    Args:
        backbone: a model with ``features(x, layers, training) -> {layer: tap}`` (e.g. :class:`AlexNet`).
        data: a :class:`LabelledData`, or a name/path for :func:`load_labelled`.
        layers: taps to probe, all trained together in one pass over the data (default: every tap of the
            trunk, ``backbone.TAPS``: conv1 … conv5 of an AlexNet, stem, stage1 … stage4 of a ResNet-18).
        protocol: a name from :data:`~keras_oneimage.probes.protocols.PROTOCOLS` (``"cifar"`` by default,
            ``"paper"`` for the authors' 224 px protocol, ``"coarse"`` for ~1k-dim pooling) or a
            :class:`~keras_oneimage.probes.protocols.ProbeProtocol`. It sets the pooling, the image transforms
            and the defaults of the arguments below that are left ``None``.
        epochs, batch_size, learning_rate, weight_decay: the paper's probe code uses 36, 192, 0.01, 1e-5.
        seed: seeds shuffling, augmentation and probe initialisation (the result is reproducible).
        image_size: side the images are resized to (default: the protocol's, else ``backbone.image_size``, else
            the data's).
        target_dims: the pooled feature size each tap is brought near (protocols without fixed pooling).
        split: ``"val"`` (for tuning) or ``"test"`` (for reporting).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.
        augment: the protocol's train-time augmentation (the trunk runs every epoch). ``False`` runs the
            trunk **once** per image (the test transform) and trains the probes on its cached pooled taps:
            ``epochs`` times cheaper in trunk compute, at ~184 KB of memory per training image (5 taps of ~9k
            float32); no augmentation.
    """
    return probe_splits(
        backbone, data, (split,), layers=layers, protocol=protocol, epochs=epochs, batch_size=batch_size,
        seed=seed, image_size=image_size, learning_rate=learning_rate, weight_decay=weight_decay,
        target_dims=target_dims, verbose=verbose, augment=augment,
    )[split]  # fmt: skip


def probe_splits(
    backbone,
    data: LabelledData | str | os.PathLike,
    splits: Sequence[str] = ("val", "test"),
    *,
    layers: Sequence[str] | None = None,
    protocol: str | ProbeProtocol | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    target_dims: int | None = None,
    verbose: int = 1,
    augment: bool = True,
) -> dict[str, dict[str, float]]:
    """Probes trained **once** on ``data.train`` and scored on each of ``splits``: ``{split: {layer: accuracy}}``.

    The arguments are :func:`probe`'s, which is this function for one split. Report ``test`` beside the ``val``
    numbers any choice was made on, at the cost of one training.
    """
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    model, evaluation = _train(
        backbone, data, layers=layers, protocol=get_protocol(protocol), epochs=epochs, batch_size=batch_size,
        seed=seed, image_size=image_size, learning_rate=learning_rate, weight_decay=weight_decay,
        target_dims=target_dims, splits=splits, verbose=verbose, augment=bool(augment),
    )  # fmt: skip
    out = {}
    for split in splits:
        scores = model.evaluate(evaluation(split), verbose=verbose, return_dict=True)
        out[split] = {layer: float(scores[f"acc_{layer}"]) for layer in model.probe_layers}
    return out


def probe_val(backbone, data: LabelledData | str | os.PathLike, **kwargs) -> dict[str, float]:
    """:func:`probe` scored on the validation split (carved from train): the number to tune hyper-parameters on."""
    if "split" in kwargs:
        raise InputError("probe_val always scores the 'val' split; use probe(split=...) for another")
    return probe(backbone, data, split="val", **kwargs)


def _train(
    backbone,
    data,
    *,
    layers,
    protocol,
    epochs,
    batch_size,
    seed,
    image_size,
    learning_rate,
    weight_decay,
    target_dims,
    splits,
    verbose,
    augment=True,
) -> tuple[LinearProbes, Callable[[str], tf.data.Dataset]]:
    data = as_labelled(data)
    layers = check_layers(backbone, layers)
    given = protocol.resolve(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                             weight_decay=weight_decay)
    epochs = validation.positive_int("epochs", given["epochs"])
    batch_size = validation.positive_int("batch_size", given["batch_size"])
    learning_rate = validation.positive_finite("learning_rate", given["learning_rate"])
    weight_decay = given["weight_decay"]
    seed = validation.seed(seed)
    if target_dims is not None:
        target_dims = validation.positive_int("target_dims", target_dims)
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise InputError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if not splits or any(split not in ("val", "test") for split in splits):
        raise InputError(f"split must be 'val' or 'test', got {splits if len(splits) != 1 else splits[0]!r}")
    if data.train_size == 0:
        raise InputError("the labelled data has no training examples")
    for split in splits:
        if data.size(split) == 0:
            raise InputError(f"the {split!r} split is empty" + (" (load it with val_fraction > 0)" * (split == "val")))
    size = probe_image_size(backbone, data, protocol.image_size if image_size is None else image_size)
    if protocol.eval_resize is not None and protocol.eval_resize < size:
        raise InputError(f"the {protocol.name!r} protocol resizes test images to {protocol.eval_resize} px, "
                         f"below the probe input of {size} px")
    # A batch larger than every split is one batch per epoch either way; clamping keeps tf.data from reserving
    # room for a batch of a billion (probe --batch_size=1000000000 on 8 images ran CPU-bound for minutes).
    batch_size = min(batch_size, max(data.train_size, *(data.size(split) for split in splits)))
    pooling = protocol_pooling(protocol, tap_shapes(backbone, layers, size), target_dims)

    def evaluation_images(name: str) -> tf.data.Dataset:
        return pipelines.eval_pipeline(data.split(name), size, batch_size, resize=protocol.eval_resize)

    if augment:
        model = LinearProbes(backbone, pooling, data.num_classes, seed=seed)
        if protocol.train_transform == "resized_crop_flip":
            train = pipelines.resized_crop_pipeline(data.train, size, data.train_size, batch_size, seed)
        else:
            train = pipelines.train_pipeline(data.train, size, data.train_size, batch_size, seed)
        evaluation = evaluation_images

    else:  # the trunk runs once per image; the probes train on its pooled taps for every epoch
        taps, labels = pooled_taps(backbone, pooling, evaluation_images("train"))
        model = train_probes_on_taps(
            taps, labels, data.num_classes, protocol, epochs=epochs, batch_size=batch_size, seed=seed,
            learning_rate=learning_rate, weight_decay=weight_decay, verbose=verbose,
        )  # fmt: skip

        def evaluation(name: str) -> tf.data.Dataset:
            return taps_dataset(*pooled_taps(backbone, pooling, evaluation_images(name)), batch_size)

        return model, evaluation

    _compile_and_fit(model, train, protocol, epochs, learning_rate, weight_decay, verbose)
    return model, evaluation


def _compile_and_fit(model, train, protocol, epochs, learning_rate, weight_decay, verbose) -> None:
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=protocol.momentum, weight_decay=weight_decay or None),
        jit_compile=False,
    )
    lr_schedule = step_schedule(learning_rate, epochs, protocol.decay_epochs)
    schedule = keras.callbacks.LearningRateScheduler(lr_schedule, verbose=0)
    model.fit(train, epochs=epochs, verbose=verbose, callbacks=[schedule], shuffle=False)


def taps_dataset(taps: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int,
                 seed: int | None = None) -> tf.data.Dataset:
    """Batches of ``({layer: pooled taps}, labels)`` from in-memory arrays; reshuffled every epoch when ``seed`` is
    given. Batches are gathered by index, so a shuffle moves indices, not the ~37 KB rows themselves."""
    tensors = {layer: tf.constant(v) for layer, v in taps.items()}
    y = tf.constant(labels)
    index = tf.data.Dataset.range(len(labels))
    if seed is not None:
        index = index.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)

    def gather(i):
        return {layer: tf.gather(v, i) for layer, v in tensors.items()}, tf.gather(y, i)

    return index.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def train_probes_on_taps(
    taps: Mapping[str, np.ndarray],
    labels: np.ndarray,
    num_classes: int,
    protocol: str | ProbeProtocol | None = None,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    verbose: int = 0,
) -> LinearProbes:
    """Linear probes trained on precomputed, pooled taps (``{layer: (n, h, w, c)}``) with ``protocol``'s head,
    optimiser and schedule; score them with ``model.evaluate(taps_dataset(taps, labels, batch))``.

    This is the cached path of :func:`probe_splits`; it also lets a study pool one trunk pass several ways.
    """
    protocol = get_protocol(protocol)
    given = protocol.resolve(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                             weight_decay=weight_decay)
    specs = {layer: PoolSpec(1, 1, 0, v.shape[1:], v.shape[1:]) for layer, v in taps.items()}
    model = LinearProbes(PooledTaps(), specs, num_classes, seed=seed)
    _compile_and_fit(model, taps_dataset(taps, labels, given["batch_size"], seed), protocol, given["epochs"],
                     given["learning_rate"], given["weight_decay"], verbose)
    return model


class PooledTaps:
    """Stands in for the trunk of :class:`LinearProbes` when the taps were computed (and pooled) beforehand:
    ``features(x)`` returns the ``{layer: pooled tap}`` dict it is given."""

    def features(self, x, layers, training=False) -> dict:
        return {layer: x[layer] for layer in layers}


def pooled_taps(backbone, pooling: Mapping[str, PoolSpec], batches: tf.data.Dataset):
    """Run the frozen trunk once over ``batches`` of ``(image, label)``; return ``({layer: pooled taps}, labels)``
    as numpy arrays (float32, ``(n, h, w, c)`` per layer, about 37 KB per layer and image at ~9k dims)."""
    layers = tuple(pooling)
    pools = {layer: spec.layers(layer) for layer, spec in pooling.items()}

    @tf.function(reduce_retracing=True)
    def forward(x):
        feats = backbone.features(x, layers=layers, training=False)
        out = {}
        for layer in layers:
            y = tf.cast(feats[layer], tf.float32)
            for pool in pools[layer]:
                y = pool(y)
            out[layer] = y
        return out

    chunks: dict[str, list] = {layer: [] for layer in layers}
    labels = []
    for x, y in batches:
        for layer, value in forward(x).items():
            chunks[layer].append(value.numpy())
        labels.append(y.numpy())
    return {layer: np.concatenate(c) for layer, c in chunks.items()}, np.concatenate(labels).astype(np.int32)


# --------------------------------------------------------------------------------------------------------- checks
def as_labelled(data) -> LabelledData:
    """``data`` itself, or :func:`load_labelled` of a name/path."""
    if isinstance(data, LabelledData):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_labelled(data)
    raise InputError(f"data must be a LabelledData or a dataset name/path, got {type(data).__name__}")


def check_layers(backbone, layers: str | Iterable[str] | None) -> tuple[str, ...]:
    """The requested taps as a tuple, each known to the backbone (``backbone.TAPS``, else AlexNet's);
    ``None``: all of them, so every trunk is probed on its own taps."""
    if not hasattr(backbone, "features"):
        raise InputError(f"{type(backbone).__name__} has no features(x, layers) method to probe")
    known = tuple(getattr(backbone, "TAPS", TAPS))
    return known if layers is None else validation.layer_names(layers, known)


def probe_image_size(backbone, data: LabelledData | None, image_size: int | None) -> int:
    """The side probe images are resized to: ``image_size`` if given, else the trunk's, else the data's."""
    if image_size is not None:
        return validation.positive_int("image_size", image_size)
    if getattr(backbone, "image_size", None):
        return int(backbone.image_size)
    if data is not None:
        h, w = data.train.element_spec[0].shape[:2]
        if h is not None and h == w:
            return int(h)
    raise InputError("cannot tell the probe image size: pass image_size=")
