"""What every self-supervised method shares: a backbone, a train_step, and optional per-method callbacks."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class FitContext:
    """What `fit` knows about the run, handed to a method so it can build its own callbacks.

    DeepCluster uses it to draw the patch pool it clusters each epoch; BiGAN to know where to write sample grids.
    """

    images: Sequence[np.ndarray]
    image_size: int
    batch_size: int
    seed: int
    augment: Any  # keras_oneimage.data.augment.AugmentConfig
    steps_per_epoch: int
    epochs: int
    output_dir: str | None


def unpack_patches(data):
    """The patch batch from what `fit` hands `train_step`: a tensor, or the first element of a tuple/list."""
    while isinstance(data, (tuple, list)):
        data = data[0]
    return data


def scale_loss_for_replicas(loss):
    """Divide a per-replica mean loss by the replica count, so summed gradients equal the global-batch mean.

    Under a ``tf.distribute`` strategy the optimizer all-reduces (sums) gradients across replicas. Keras ``Loss``
    objects with the default reduction already apply this scaling, so compute losses with the functional forms
    (``keras.losses.sparse_categorical_crossentropy`` …) and a plain mean, then scale once here (via
    `SelfSupervisedMethod.scaled_loss`). Without a strategy it returns ``loss`` unchanged.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss * tf.cast(1.0 / replicas, loss.dtype)
    return loss


@keras.saving.register_keras_serializable(package="keras_oneimage")
class SelfSupervisedMethod(keras.Model):
    """Base class: a method owns ``self.backbone`` (an AlexNet) and implements ``train_step(patches)``.

    ``patches`` is a float32 batch ``(B, S, S, 3)`` in ``[0, 1]`` from ``patch_dataset``. Subclasses add their
    constructor options to ``get_config``; the backbone is serialized here, so ``model.keras`` round-trips.
    `run_training` compiles an uncompiled method with ``compile(optimizer=default_optimizer())``; a method whose
    ``default_optimizer`` returns a dict (several players) overrides ``compile`` to accept it.
    """

    method_name: str = "base"
    #: How many trunk passes one patch of the batch costs in a training step (RotNet: its 4 rotations); `fit`'s
    #: memory estimate multiplies by it (keras_oneimage.validation.check_step_memory).
    views_per_patch: int = 1
    #: Options `fit` builds the trunk with (DeepCluster: ``{"sobel": True}``); see :meth:`trunk_options`.
    backbone_options: dict[str, Any] = {}

    def __init__(self, backbone: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    @classmethod
    def trunk_input_size(cls, image_size: int) -> int:
        """The side of what the trunk sees when the method trains on ``image_size`` px patches.

        The patch itself for most methods; a method that feeds the trunk parts of a patch (Jigsaw's tiles)
        overrides this, and the trunk is built for that size wherever a method's trunk is built.
        """
        return image_size

    @classmethod
    def trunk_options(cls, method_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options `fit` builds this method's trunk with: the class's ``backbone_options`` (DeepCluster's Sobel
        front end), each overridden by the method option of the same name (``fit(..., sobel=False)``).

        Such an option also reaches the method's constructor, which records it and checks that its trunk has it.
        """
        options = dict(cls.backbone_options)
        options.update({k: v for k, v in (method_options or {}).items() if k in options})
        return options

    def call(self, x, training=None):
        return self.backbone(x, training=training)

    def default_optimizer(self) -> keras.optimizers.Optimizer | dict:
        """Optimizer used when `fit` is not given one (methods with several players return their own)."""
        return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)

    def method_callbacks(self, context: FitContext) -> list[keras.callbacks.Callback]:
        """Extra callbacks the method needs during `fit` (e.g. DeepCluster's re-clustering). Default: none."""
        return []

    def scaled_loss(self, loss, optimizer=None):
        """Call inside the ``GradientTape``: the loss to differentiate (replica- and loss-scale-aware).

        Divides by the replica count (see `scale_loss_for_replicas`) and applies the optimizer's loss scale
        (non-trivial only for a ``mixed_float16`` LossScaleOptimizer).
        """
        optimizer = optimizer or self.optimizer
        return optimizer.scale_loss(scale_loss_for_replicas(loss))

    def minimize(self, scaled_loss, tape: tf.GradientTape, variables=None, optimizer=None) -> None:
        """One optimizer step on ``scaled_loss`` (from `scaled_loss`, recorded on ``tape``)."""
        optimizer = optimizer or self.optimizer
        variables = self.trainable_variables if variables is None else variables
        grads = tape.gradient(scaled_loss, variables)
        optimizer.apply(grads, variables)

    def get_config(self) -> dict:
        base = super().get_config()
        base = {k: base[k] for k in ("name", "trainable", "dtype") if k in base}
        return {**base, "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"], custom_objects=custom_objects)
        return cls(**config)
