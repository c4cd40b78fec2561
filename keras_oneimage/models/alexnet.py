"""AlexNet with BatchNorm, the trunk whose early layers the single-image paper trains.

Asano et al. (ICLR 2020, §4 "Architecture") use the AlexNet of the self-supervision benchmarks (Krizhevsky et al.
2012 widths 96-256-384-384-256, BatchNorm after every convolution, as in Gidaris et al. 2018 and Caron et al. 2018)
and read linear probes off conv1 … conv5. ``variant="imagenet"`` is that network at 224 px; ``variant="cifar"``
keeps the widths but adapts the stem to 32/64 px inputs so it trains on a CPU.

The model takes float RGB in ``[0, 1]`` and normalises inside (fixed per-channel mean/std stored in the config), so
an exported trunk carries its preprocessing. ``sobel=True`` prepends the fixed Sobel front end used by DeepCluster.
"""
from __future__ import annotations

import math
from typing import Sequence

import keras
from keras import ops

from keras_oneimage.errors import InputError
from keras_oneimage.models.conv import SmallMapConv2D, SpaceToDepthConv2D
from keras_oneimage.models.trunk import IMAGENET_MEAN, IMAGENET_STD, Trunk

#: ImageNet channel statistics, the normalisation every benchmark AlexNet uses (torchvision convention).
#: Krizhevsky et al. (2012) widths, kept by Asano et al. (2020, §4).
ALEXNET_WIDTHS = (96, 256, 384, 384, 256)
VARIANTS = ("cifar", "imagenet")


_FUSED_DTYPES = ("float32", "bfloat16", "float16")


@keras.saving.register_keras_serializable(package="keras_oneimage")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TensorFlow's fused kernel (``FusedBatchNormV3``).

    Same weights, config, statistics and moving-average rule as the Keras layer (biased batch variance, moving
    statistics updated as ``m * momentum + batch * (1 - momentum)``), but one fused kernel forward and one
    backward instead of Keras's chain of element-wise ops in float32: the Keras layer upcasts a ``bfloat16``
    activation to float32 and makes ~10 passes over it, which cost more than the convolutions themselves under
    ``mixed_bfloat16`` (docs/performance.md). Applies to channels-last inputs of rank 4 (and rank 2, viewed as
    ``(B, 1, 1, C)``) on the TensorFlow backend; anything else (masks, renorm, synchronized, other axes,
    float64) falls back to the Keras implementation.
    """

    def _fusable(self, inputs, mask) -> bool:
        rank = len(inputs.shape)
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.renorm
            and not self.synchronized
            and rank in (2, 4)
            and self.axis in (-1, rank - 1)
            and keras.backend.standardize_dtype(inputs.dtype) in _FUSED_DTYPES
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.convert_to_tensor(inputs)
        channels = int(x.shape[-1])
        x4 = tf.reshape(x, (-1, 1, 1, channels)) if x.shape.rank == 2 else x
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones((channels,), tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros((channels,), tf.float32)
        if training and self.trainable:
            empty = tf.zeros((0,), tf.float32)
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x4, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=True,
            )
            # The kernel returns the unbiased (n / (n - 1)) variance; Keras keeps the biased one.
            n = tf.cast(tf.size(x4, out_type=tf.int64) // channels, tf.float32)
            variance = variance * tf.where(n > 1.0, (n - 1.0) / tf.maximum(n, 1.0), 1.0)
            for var, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                batch = tf.cast(batch, var.dtype)
                var.assign(var.value * self.momentum + batch * (1.0 - self.momentum))
        else:
            y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x4, scale=gamma, offset=beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=False,
            )
        if x.shape.rank == 2:
            y = tf.reshape(y, tf.shape(x))
        return ops.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_oneimage")
class ConvBNReLU(keras.layers.Layer):
    """Conv2D (no bias) → BatchNorm → ReLU; its output is a probe tap (post-BN, post-ReLU)."""

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, padding: int | str = "same", **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.padding = padding
        dtype = self.dtype_policy  # sublayers compute like their parent (set by a policy scope or the config)
        explicit_pad = isinstance(padding, int) and padding
        self.pad = keras.layers.ZeroPadding2D(padding, name="pad", dtype=dtype) if explicit_pad else None
        # Keras's Conv2D, made faster on CPUs (issue #15): a strided conv1 on space-to-depth blocks, and a matmul
        # filter gradient on conv3-conv5's small maps.
        conv_class = SpaceToDepthConv2D if self.strides > 1 else SmallMapConv2D
        self.conv = conv_class(
            self.filters,
            self.kernel_size,
            strides=self.strides,
            padding="same" if padding == "same" else "valid",
            use_bias=False,
            kernel_initializer="he_normal",  # Caron et al. 2018 initialise AlexNet with N(0, 2/n).
            name="conv",
            dtype=dtype,
        )
        self.bn = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name="bn", dtype=dtype)

    def build(self, input_shape):
        shape = input_shape
        if self.pad is not None:
            self.pad.build(shape)
            shape = self.pad.compute_output_shape(shape)
        self.conv.build(shape)
        self.bn.build(self.conv.compute_output_shape(shape))

    def call(self, x, training=None):
        if self.pad is not None:
            x = self.pad(x)
        return ops.relu(self.bn(self.conv(x), training=training))

    def compute_output_shape(self, input_shape):
        shape = self.pad.compute_output_shape(input_shape) if self.pad is not None else input_shape
        return self.conv.compute_output_shape(shape)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
        }


@keras.saving.register_keras_serializable(package="keras_oneimage")
class AlexNet(Trunk):
    """AlexNet-BN trunk. ``call`` returns the pooled conv5 map; ``features`` returns the conv1…conv5 taps.

    Args:
        variant: ``"imagenet"`` (224 px: conv1 11x11/4, max-pool 3/2 after conv1, conv2 and conv5) or ``"cifar"``
            (32/64 px: conv1 5x5 with stride ``image_size // 32`` so its map is 32x32, the same pooling pattern with
            "same" padding: conv2 at 16x16, conv3-5 at 8x8, output 4x4x256).
        image_size: input side the model is meant for (used for building and ``feature_shapes``; the network
            itself is fully convolutional).
        sobel: prepend the fixed grayscale→Sobel front end (DeepCluster, Caron et al. 2018 §5); conv1 then
            sees 2 channels.
        widths: the five conv widths (default 96-256-384-384-256, Asano et al. 2020 §4); smaller for quick tests.
        mean, std: per-channel input normalisation applied inside the model (ImageNet statistics by default).
    """

    TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")

    def __init__(
        self,
        variant: str = "cifar",
        image_size: int = 64,
        sobel: bool = False,
        widths: Sequence[int] = ALEXNET_WIDTHS,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ):
        kwargs.setdefault("name", "alexnet")
        super().__init__(**kwargs)
        widths = check_alexnet_options(variant, widths)
        self._init_common(variant, image_size, sobel, widths, mean, std)
        self._spec = _stem_spec(variant, self.image_size)
        shapes = _feature_shapes(self._spec, self.image_size, widths)
        if min(min(s[:2]) for s in shapes.values()) < 1:
            raise InputError(f"image_size {image_size} is too small for the {variant!r} AlexNet")

        dtype = self.dtype_policy  # every sublayer computes in the model's policy (models/trunk.py)
        conv1_kernel, conv1_stride, conv1_pad = self._spec["conv1"]
        pool_pad = self._spec["pool_padding"]
        self.conv1 = ConvBNReLU(widths[0], conv1_kernel, conv1_stride, conv1_pad, name="conv1", dtype=dtype)
        self.pool1 = keras.layers.MaxPooling2D(3, 2, padding=pool_pad, name="pool1", dtype=dtype)
        self.conv2 = ConvBNReLU(widths[1], 5, 1, "same", name="conv2", dtype=dtype)
        self.pool2 = keras.layers.MaxPooling2D(3, 2, padding=pool_pad, name="pool2", dtype=dtype)
        self.conv3 = ConvBNReLU(widths[2], 3, 1, "same", name="conv3", dtype=dtype)
        self.conv4 = ConvBNReLU(widths[3], 3, 1, "same", name="conv4", dtype=dtype)
        self.conv5 = ConvBNReLU(widths[4], 3, 1, "same", name="conv5", dtype=dtype)
        self.pool5 = keras.layers.MaxPooling2D(3, 2, padding=pool_pad, name="pool5", dtype=dtype)

    def _tap_path(self):
        # Each max-pool runs on the way to the next tap: the taps are post-BN, post-ReLU, before pooling.
        return (
            ("conv1", (self.conv1,)),
            ("conv2", (self.pool1, self.conv2)),
            ("conv3", (self.pool2, self.conv3)),
            ("conv4", (self.conv4,)),
            ("conv5", (self.conv5,)),
        )

    def _output_layers(self):
        return (self.pool5,)

    # ------------------------------------------------------------------------------------------------ shapes
    def feature_shapes(self, image_size: int | None = None) -> dict[str, tuple[int, int, int]]:
        """``{tap: (h, w, c)}`` for square inputs of side ``image_size`` (default: the model's), plus ``"output"``.

        The arithmetic of this model's own layers: its conv1 stride was fixed by the ``image_size`` it was built
        for, so another input side keeps that stride (a "cifar" trunk built for 64 px halves a 32 px input too).
        """
        size = self.image_size if image_size is None else int(image_size)
        return _feature_shapes(self._spec, size, self.widths)


def check_alexnet_options(variant: str, widths: Sequence[int]) -> tuple[int, ...]:
    """The widths as a tuple of five positive integers, after checking them and ``variant`` (InputError if not);
    shared by every model built on AlexNet's layer plan (the scattering trunk of Table 4 too)."""
    if variant not in VARIANTS:
        raise InputError(f"unknown AlexNet variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    widths = tuple(int(w) for w in widths)
    if len(widths) != 5 or min(widths) < 1:
        raise InputError(f"widths must be five positive integers, got {widths!r}")
    return widths


def _stem_spec(variant: str, image_size: int) -> dict:
    if variant == "imagenet":
        # Krizhevsky et al. 2012: conv1 11x11 stride 4 (pad 2 → 55x55 at 224 px), max-pools 3/2 without padding.
        return {"conv1": (11, 4, 2), "pool_padding": "valid"}
    # cifar: stride image_size // 32 keeps the conv1 map at 32x32 for 32 and 64 px inputs.
    return {"conv1": (5, max(1, image_size // 32), "same"), "pool_padding": "same"}


def _feature_shapes(spec: dict, size: int, widths: Sequence[int]) -> dict[str, tuple[int, int, int]]:
    kernel, stride, pad = spec["conv1"]
    if pad == "same":
        s = math.ceil(size / stride)
    else:
        s = (size + 2 * pad - kernel) // stride + 1

    def pool(n: int) -> int:
        return math.ceil(n / 2) if spec["pool_padding"] == "same" else (n - 3) // 2 + 1

    sides = {"conv1": s}
    s = pool(s)
    sides["conv2"] = s
    s = pool(s)
    sides.update(conv3=s, conv4=s, conv5=s)
    sides["output"] = pool(s)
    channels = dict(zip(AlexNet.TAPS, widths), output=widths[4])
    return {k: (v, v, channels[k]) for k, v in sides.items()}
