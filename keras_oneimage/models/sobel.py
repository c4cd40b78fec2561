"""A fixed Sobel front end: RGB → grayscale → (−∂x, −∂y) gradients (DeepCluster's filters, applied by correlation).

DeepCluster (Caron et al., ECCV 2018, §5 "Sobel filtering") feeds AlexNet the Sobel gradients of a grayscale image
instead of colour so that clustering cannot latch onto colour; the single-image paper keeps that choice for its
DeepCluster runs (Asano et al., ICLR 2020, §4). The weights are constants stored as non-trainable variables.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

#: ITU-R BT.601 luma weights, as used by DeepCluster's grayscale conversion.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def sobel_kernel() -> np.ndarray:
    """The (3, 3, 3, 2) kernel that maps RGB to the x and y Sobel responses of its grayscale version."""
    gx = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=np.float32)
    gy = gx.T
    gray = np.asarray(GRAY_WEIGHTS, dtype=np.float32)
    # Grayscale then Sobel is linear, so both fold into a single 3x3 conv: k[i, j, c, o] = gray[c] * g_o[i, j].
    return np.einsum("c,ijo->ijco", gray, np.stack([gx, gy], axis=-1)).astype(np.float32)


def _sobel_initializer(shape, dtype=None):
    return ops.cast(ops.convert_to_tensor(sobel_kernel().reshape(shape)), dtype or "float32")


@keras.saving.register_keras_serializable(package="keras_oneimage")
class Sobel(keras.layers.Layer):
    """Maps ``(B, H, W, 3)`` RGB to ``(B, H, W, 2)`` Sobel responses (−∂x, −∂y) of its grayscale; not trainable."""

    def __init__(self, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)

    def build(self, input_shape):
        if input_shape[-1] != 3:
            raise ValueError(f"Sobel expects 3 input channels, got shape {tuple(input_shape)}")
        self.kernel = self.add_weight(
            name="kernel", shape=(3, 3, 3, 2), initializer=_sobel_initializer, trainable=False
        )

    def call(self, x):
        return ops.conv(x, ops.cast(self.kernel, x.dtype), strides=1, padding="same")

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2)
