"""RotNet: predict which of four rotations (0°, 90°, 180°, 270°) was applied to a patch.

Gidaris, Singh & Komodakis, "Unsupervised representation learning by predicting image rotations", ICLR 2018. Each
patch appears in all four orientations in the same batch (their §2.2 finding that this works best), rotated exactly
with ``tf.image.rot90``; a small MLP head on the flattened conv5 map classifies the rotation. Asano et al. (ICLR
2020, §4) train it on patches of a single image.
"""
from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from keras_oneimage.errors import InputError
from keras_oneimage.methods.base import SelfSupervisedMethod, unpack_patches
from keras_oneimage.methods.registry import register
from keras_oneimage.models.alexnet import FusedBatchNormalization

NUM_ROTATIONS = 4
#: Gidaris et al. 2018 put two 4096-wide fully connected layers on AlexNet's conv5 (as in AlexNet's classifier).
IMAGENET_HEAD = (4096, 4096)
#: For the small "cifar" AlexNet (4x4x256 conv5 map) a 1024-wide head trains faster on a CPU and is plenty
#: for a 4-way task; a documented departure from the paper's head.
CIFAR_HEAD = (1024, 1024)


def rotate_batch(patches: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(B, S, S, C)`` → ``(4B, S, S, C)`` rotated by 0, 90, 180, 270 degrees (counter-clockwise), and labels 0..3.

    The rotated copies are concatenated in label order: rows ``k*B … (k+1)*B - 1`` are rotated by ``k * 90°``.
    """
    rotated = [patches] + [tf.image.rot90(patches, k=k) for k in range(1, NUM_ROTATIONS)]
    batch = tf.shape(patches)[0]
    labels = tf.repeat(tf.range(NUM_ROTATIONS, dtype=tf.int32), batch)
    return tf.concat(rotated, axis=0), labels


def rotation_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy over this replica's batch (not yet scaled for distribution)."""
    per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return tf.reduce_mean(per_example)


@register("rotnet")
@keras.saving.register_keras_serializable(package="keras_oneimage")
class RotNet(SelfSupervisedMethod):
    """Rotation prediction on top of an AlexNet ``backbone``.

    Args:
        backbone: the trunk (an `AlexNet`); its pooled conv5 map feeds the head.
        head_widths: hidden widths of the head (flatten → [Dense → BN → ReLU] per width → Dense 4). Default
            ``(4096, 4096)`` as Gidaris et al. 2018 for the "imagenet" variant; ``(1024, 1024)`` for "cifar".
    """

    def __init__(self, backbone: keras.Model, head_widths: Sequence[int] | None = None, **kwargs):
        kwargs.setdefault("name", "rotnet")
        super().__init__(backbone, **kwargs)
        if head_widths is None:
            head_widths = IMAGENET_HEAD if getattr(backbone, "variant", "cifar") == "imagenet" else CIFAR_HEAD
        head_widths = tuple(int(w) for w in head_widths)
        if any(w < 1 for w in head_widths):
            raise InputError(f"head_widths must be positive integers, got {head_widths!r}")
        self.head_widths = head_widths
        dtype = self.dtype_policy  # the head computes like the method (a policy scope, or the saved config)
        layers: list[keras.layers.Layer] = [keras.layers.Flatten(name="flatten", dtype=dtype)]
        for i, width in enumerate(head_widths, start=1):
            layers += [
                keras.layers.Dense(width, use_bias=False, name=f"fc{i}", dtype=dtype),
                FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name=f"fc{i}_bn", dtype=dtype),
                keras.layers.ReLU(name=f"fc{i}_relu", dtype=dtype),
            ]
        # Logits in float32 even under a mixed-precision policy, so the softmax cross-entropy is stable.
        layers.append(keras.layers.Dense(NUM_ROTATIONS, dtype="float32", name="logits"))
        self.head = keras.Sequential(layers, name="head")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="rotation_accuracy")
        self.loss_fn = rotation_loss

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def call(self, x, training=None):
        """Rotation logits ``(B, 4)`` (float32) for patches ``x`` as given (no rotation applied here)."""
        return self.head(self.backbone(x, training=training), training=training)

    def default_optimizer(self) -> keras.optimizers.Optimizer:
        """SGD with momentum 0.9 and weight decay 5e-4 (Gidaris et al. 2018, §3); a smaller lr for small batches."""
        return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9, weight_decay=5e-4)

    def _step(self, data, training: bool):
        inputs, labels = rotate_batch(unpack_patches(data))
        if training:
            with tf.GradientTape() as tape:
                logits = self(inputs, training=True)
                loss = self.loss_fn(labels, logits)
                scaled = self.scaled_loss(loss)
            self.minimize(scaled, tape)
        else:
            logits = self(inputs, training=False)
            loss = self.loss_fn(labels, logits)
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        return self._step(data, training=True)

    def test_step(self, data):
        return self._step(data, training=False)

    def get_config(self) -> dict:
        return {**super().get_config(), "head_widths": list(self.head_widths)}
