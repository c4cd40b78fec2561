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

from keras_oneimage.methods.base import SelfSupervisedMethod, unpack_patches
from keras_oneimage.methods.registry import register
from keras_oneimage.models.heads import check_head_widths, default_head_widths, mlp_head

NUM_ROTATIONS = 4
__all__ = ["NUM_ROTATIONS", "RotNet", "rotate_batch", "rotation_loss"]


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

    views_per_patch = NUM_ROTATIONS

    def __init__(self, backbone: keras.Model, head_widths: Sequence[int] | None = None, **kwargs):
        kwargs.setdefault("name", "rotnet")
        super().__init__(backbone, **kwargs)
        self.head_widths = check_head_widths(default_head_widths(backbone) if head_widths is None else head_widths)
        self.head = mlp_head(self.head_widths, NUM_ROTATIONS, dtype=self.dtype_policy)
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
