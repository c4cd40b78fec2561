"""What every self-supervised method shares: a backbone, a train_step, and optional per-method callbacks."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_oneimage.errors import InputError

#: Keras dtype policies `fit` accepts for ``precision`` ("auto" resolves to one of the first two).
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@functools.lru_cache(maxsize=None)
def cpu_has_amx_bf16() -> bool:
    """True on x86 CPUs with AMX-BF16 tiles (Intel Sapphire Rapids and later), read from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def resolve_precision(precision: str | None = "auto") -> str:
    """The Keras dtype policy name for ``precision``.

    ``"auto"`` (or None) picks ``"mixed_bfloat16"`` when training runs on a CPU with AMX-BF16 and TensorFlow's
    oneDNN kernels are on (RotNet steps measured 2.2-2.9x faster than in float32, with the same probe accuracy;
    docs/performance.md), else ``"float32"`` (GPUs, and CPUs without bf16 matrix units, where bf16 is emulated).
    """
    if precision is None or precision == "auto":
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")
        on_cpu = not tf.config.list_physical_devices("GPU")
        return "mixed_bfloat16" if on_cpu and onednn and cpu_has_amx_bf16() else "float32"
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose 'auto' or one of: {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def precision_scope(precision: str | None = "auto") -> Iterator[str]:
    """Build models inside this block to give them the ``precision`` policy (resolved as `resolve_precision`);
    the global Keras policy is restored on exit. Yields the policy name.

    Weights stay float32 under the mixed policies; `AlexNet` and `RotNet` record the policy in their config, so a
    reloaded ``model.keras`` computes as it trained. ``AlexNet.features`` and every export return float32.
    """
    policy = resolve_precision(precision)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


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


#: Hidden widths of the MLP heads: AlexNet's fc6-fc7 for the "imagenet" variant (Gidaris et al. 2018; Caron et al.
#: 2018), a quarter of that for the CIFAR-scale "cifar" variant.
IMAGENET_HEAD = (4096, 4096)
CIFAR_HEAD = (1024, 1024)


def default_head_widths(backbone) -> tuple[int, ...]:
    """:data:`IMAGENET_HEAD` for an "imagenet" AlexNet, else :data:`CIFAR_HEAD`."""
    return IMAGENET_HEAD if getattr(backbone, "variant", "cifar") == "imagenet" else CIFAR_HEAD


def check_head_widths(head_widths: Sequence[int]) -> tuple[int, ...]:
    """``head_widths`` as a tuple of positive ints, or :class:`InputError`."""
    try:
        widths = tuple(int(w) for w in head_widths)
    except (TypeError, ValueError):
        raise InputError(f"head_widths must be a sequence of positive integers, got {head_widths!r}") from None
    if any(w < 1 for w in widths):
        raise InputError(f"head_widths must be positive integers, got {head_widths!r}")
    return widths


def mlp_head(widths: Sequence[int], outputs: int, *, dtype, output_initializer="glorot_uniform",
             name: str = "head") -> keras.Sequential:
    """flatten → [Dense (no bias) → BatchNorm → ReLU] per width → Dense(outputs) logits in float32.

    BatchNorm keeps the top layer's input at unit scale whatever the trunk's feature size, so the top layer's
    step size does not grow with the feature dimension (a linear layer straight on 4k unnormalised conv5 features
    overshoots at SGD lr 0.05). Hidden layers compute in ``dtype`` (the method's policy); the logits are float32
    even under mixed precision, so the softmax cross-entropy is stable.
    """
    from keras_oneimage.models.alexnet import FusedBatchNormalization

    layers: list[keras.layers.Layer] = [keras.layers.Flatten(name="flatten", dtype=dtype)]
    for i, width in enumerate(widths, start=1):
        layers += [
            keras.layers.Dense(width, use_bias=False, name=f"fc{i}", dtype=dtype),
            FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name=f"fc{i}_bn", dtype=dtype),
            keras.layers.ReLU(name=f"fc{i}_relu", dtype=dtype),
        ]
    layers.append(keras.layers.Dense(outputs, kernel_initializer=output_initializer, dtype="float32", name="logits"))
    return keras.Sequential(layers, name=name)


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
