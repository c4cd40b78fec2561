"""The MLP heads that sit on a trunk's flattened conv5 map: RotNet's, DeepCluster's and the fine-tuned classifier's."""
from __future__ import annotations

from typing import Sequence

import keras

from keras_oneimage.errors import InputError
from keras_oneimage.models.alexnet import FusedBatchNormalization

#: Hidden widths of the MLP heads: AlexNet's fc6-fc7 for the "imagenet" variant (Gidaris et al. 2018; Caron et al.
#: 2018), a quarter of that for the CIFAR-scale "cifar" variant.
IMAGENET_HEAD = (4096, 4096)
CIFAR_HEAD = (1024, 1024)


def default_head_widths(backbone) -> tuple[int, ...]:
    """:data:`IMAGENET_HEAD` for an "imagenet" AlexNet, else :data:`CIFAR_HEAD`."""
    return IMAGENET_HEAD if getattr(backbone, "variant", "cifar") == "imagenet" else CIFAR_HEAD


def check_head_widths(head_widths: Sequence[int]) -> tuple[int, ...]:
    """``head_widths`` as a tuple of positive ints, or :class:`InputError` (a float or a bool is refused, not
    truncated)."""
    if isinstance(head_widths, (str, bytes)):
        raise InputError(f"head_widths must be a sequence of positive integers, got {head_widths!r}")
    try:
        widths = tuple(head_widths)
    except TypeError:
        raise InputError(f"head_widths must be a sequence of positive integers, got {head_widths!r}") from None
    if any(isinstance(w, bool) or not hasattr(w, "__index__") or int(w) < 1 for w in widths):
        raise InputError(f"head_widths must be positive integers, got {head_widths!r}")
    return tuple(int(w) for w in widths)


def mlp_head(widths: Sequence[int], outputs: int, *, dtype, output_initializer="glorot_uniform",
             name: str = "head") -> keras.Sequential:
    """flatten → [Dense (no bias) → BatchNorm → ReLU] per width → Dense(outputs) logits in float32.

    BatchNorm keeps the top layer's input at unit scale whatever the trunk's feature size, so the top layer's
    step size does not grow with the feature dimension (a linear layer straight on 4k unnormalised conv5 features
    overshoots at SGD lr 0.05). Hidden layers compute in ``dtype`` (the method's policy); the logits are float32
    even under mixed precision, so the softmax cross-entropy is stable.
    """
    layers: list[keras.layers.Layer] = [keras.layers.Flatten(name="flatten", dtype=dtype)]
    for i, width in enumerate(widths, start=1):
        layers += [
            keras.layers.Dense(width, use_bias=False, name=f"fc{i}", dtype=dtype),
            FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name=f"fc{i}_bn", dtype=dtype),
            keras.layers.ReLU(name=f"fc{i}_relu", dtype=dtype),
        ]
    layers.append(keras.layers.Dense(outputs, kernel_initializer=output_initializer, dtype="float32", name="logits"))
    return keras.Sequential(layers, name=name)
