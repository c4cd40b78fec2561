"""A fixed scattering transform in place of AlexNet's conv1-conv2 (the scattering row of Asano et al., Table 4).

Asano et al. (ICLR 2020, §4.3 and Table 4) ask whether conv1-2 learned from one image are worth more than a
hand-designed front end, and compare them with the 2-D scattering transform that Oyallon et al. ("Scaling the
Scattering Transform: Deep Hybrid Networks", ICCV 2017) put under a CNN. This module supplies that front end:

* :class:`ScatteringFrontEnd`: kymatio's ``Scattering2D`` (Bruna & Mallat 2013; Andreux et al., "Kymatio", JMLR
  2020) with ``J = 2`` scales, ``L = 8`` orientations and order 2, applied to each RGB channel separately. For an
  ``(B, S, S, 3)`` image in ``[0, 1]`` it returns ``(B, S/4, S/4, 3 * 81)`` channels-last: per colour channel,
  1 order-0 + ``J L`` = 16 order-1 + ``L^2 J (J - 1) / 2`` = 64 order-2 coefficients, channel index
  ``colour * 81 + path`` in kymatio's path order. It has no trainable weights.
* Normalisation, as Oyallon et al. (2017) do before their CNN: they follow the scattering with a BatchNorm
  without affine terms, i.e. a per-channel standardisation. A frozen front end cannot learn statistics while the
  rest trains, so here the per-channel mean and standard deviation are estimated once from training images
  (:meth:`ScatteringFrontEnd.adapt`; ``finetune`` does it before training) and then stay fixed — that BatchNorm
  in inference mode. ``log=True`` takes ``log(S + 1e-6)`` first (the log-scattering of Oyallon & Mallat,
  CVPR 2015), which evens out the orders' very different magnitudes (order 0 ≈ 0.5, order 2 ≈ 0.005).
* :class:`ScatteringAlexNet`: the scattering followed by the *rest* of the same AlexNet (conv3, conv4, conv5,
  pool5), a drop-in trunk for the Table 4 classifier. The scattering map has side ``S / 4``; conv3 of the
  AlexNet sees side 8 (cifar variant, 32 or 64 px) or 13 (imagenet variant, 224 px). When they differ, the map
  is average-pooled with AlexNet's own 3x3 / stride-2 pooling (its padding) until the sides agree: none at
  32 px (8 = 8), once at 64 px (16 → 8), twice at 224 px (56 → 27 → 13, the AlexNet's own pool1 / pool2
  arithmetic). Average rather than max pooling because scattering coefficients are already local averages
  (low-pass outputs) and a further average keeps them so. Sizes no number of poolings reaches are refused.

kymatio 0.3.0 under Keras 3 / TensorFlow 2.21: its Keras frontend (``kymatio.keras``) is a ``tf.keras`` layer
that imports ``kymatio.tensorflow``, which imports the 3-D scattering, which imports ``scipy.special.sph_harm``
(removed in SciPy 1.15), so it cannot be imported with a current SciPy; and it returns channels-first maps. The
2-D TensorFlow frontend module (``kymatio.scattering2d.frontend.tensorflow_frontend``, a ``tf.Module``) imports
cleanly, so :class:`ScatteringFrontEnd` wraps that in a Keras 3 layer; no SciPy pin is needed.

Translation covariance (tested): kymatio reflect-pads the image to a multiple of ``2^J`` and convolves circularly
on the padded grid, so for an image that is zero within 5 px of its border (the padding then adds only zeros)
a shift by ``2^J`` = 4 px shifts every path's output by exactly one position. Near content at the border it holds
only approximately (reflection is not circular).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import keras
import numpy as np
from keras import ops

from keras_oneimage.errors import InputError
from keras_oneimage.models.alexnet import (
    ALEXNET_WIDTHS,
    AlexNet,
    ConvBNReLU,
    _feature_shapes,
    _stem_spec,
    check_alexnet_options,
)

#: kymatio's TensorFlow 2-D frontend; imported alone it avoids kymatio's 3-D code (see the module docstring).
KYMATIO_MODULE = "kymatio.scattering2d.frontend.tensorflow_frontend"
INSTALL_HINT = "pip install keras-oneimage[scattering]"
#: Oyallon et al. (2017) on CIFAR and ImageNet: J = 2 scales, L = 8 orientations, order 2.
DEFAULT_J = 2
DEFAULT_L = 8
LOG_EPSILON = 1e-6  # keeps log finite where a coefficient is ~0; far below any coefficient of a natural image
#: Images :func:`~keras_oneimage.transfer.finetune` adapts the standardisation on: 243 means and deviations are
#: well estimated from a few thousand images (each gives (S/4)^2 positions), and it bounds the pass over CIFAR-10.
ADAPT_IMAGES = 5000
STD_FLOOR = 1e-6  # a channel constant over the adaptation images is left unscaled rather than divided by ~0


def require_kymatio():
    """The kymatio class ``ScatteringTensorFlow2D``, or an :class:`InputError` saying how to install it."""
    import importlib

    try:
        module = importlib.import_module(KYMATIO_MODULE)
    except ImportError as exc:  # ModuleNotFoundError, or a kymatio whose own imports fail
        raise InputError(f"the scattering front end needs kymatio 0.3 ({INSTALL_HINT}): {exc}") from None
    return module.ScatteringTensorFlow2D


def paths_per_channel(J: int, L: int) -> int:
    """Scattering paths of order <= 2 per input channel: 1 + J L + L^2 J (J - 1) / 2 (81 for J = 2, L = 8)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def _filters_as_tensors(scattering) -> None:
    """Replace kymatio's NumPy Fourier filters by complex64 eager tensors, in place.

    kymatio multiplies each spectrum by a float64 NumPy filter, which TensorFlow embeds into every traced graph as a
    new constant, converting it element by element on every trace; an eager tensor is captured by reference
    instead. ``init_scope`` keeps them eager when the layer is built inside a trace.
    """
    import tensorflow as tf

    with tf.init_scope():
        for bank in (scattering.phi, *scattering.psi):
            bank["levels"] = [tf.constant(np.asarray(level), dtype=tf.complex64) for level in bank["levels"]]


@keras.saving.register_keras_serializable(package="keras_oneimage")
class ScatteringFrontEnd(keras.layers.Layer):
    """``(B, S, S, 3)`` in ``[0, 1]`` → ``(B, S/2^J, S/2^J, 3 * paths)`` order-2 scattering, fixed.

    Args:
      J: number of scales (the output is subsampled by ``2^J``); Oyallon et al. (2017) use 2.
      L: number of orientations; 8 in Oyallon et al. (2017).
      log: take ``log(S + 1e-6)`` before standardising (Oyallon & Mallat 2015's log-scattering).

    The per-channel ``mean`` and ``std`` (non-trainable weights, 0 and 1 until :meth:`adapt`) standardise the
    output; they are saved with the model. The spatial size is fixed at build time (kymatio precomputes its
    filters for it); it always computes in float32 (FFTs in complex64).
    """

    def __init__(self, J: int = DEFAULT_J, L: int = DEFAULT_L, log: bool = False, **kwargs):
        kwargs["trainable"] = False  # a fixed transform: nothing in it is ever trained
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        for name, value in (("J", J), ("L", L)):
            if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 1:
                raise InputError(f"scattering {name} must be a positive integer, got {value!r}")
        self.J, self.L, self.log = int(J), int(L), bool(log)
        self._scattering_class = require_kymatio()  # fails here, at construction, when kymatio is missing
        self.paths = paths_per_channel(self.J, self.L)
        self._kymatio = None

    def build(self, input_shape):
        side = self.check_input_shape(input_shape)
        # kymatio's tf.Module with its precomputed Fourier filters; not a Keras weight (rebuilt from the config).
        scattering = self._scattering_class(J=self.J, shape=(side, side), L=self.L, max_order=2)
        _filters_as_tensors(scattering)
        object.__setattr__(self, "_kymatio", scattering)  # untracked: it holds constants, no variables
        self.input_spec_shape = (side, side, int(input_shape[-1]))
        channels = input_shape[-1] * self.paths
        self.mean = self.add_weight(name="mean", shape=(channels,), initializer="zeros", trainable=False)
        self.std = self.add_weight(name="std", shape=(channels,), initializer="ones", trainable=False)

    def check_input_shape(self, input_shape) -> int:
        """The square side of ``input_shape`` (B, S, S, C), or an InputError saying why it cannot be scattered."""
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[1] != input_shape[2] or not input_shape[3]:
            raise InputError(f"the scattering front end needs square images of a known size, got {tuple(input_shape)}")
        side = int(input_shape[1])
        # kymatio reflect-pads by up to 2^J px per side, and tf.pad REFLECT needs fewer than `side` px.
        if side < 2 ** (self.J + 1):
            raise InputError(f"images of {side} px are too small for a scattering with J={self.J} "
                             f"(at least {2 ** (self.J + 1)} px)")
        return side

    def scatter(self, x):
        """The raw scattering ``(B, s, s, C * paths)``, before log and standardisation."""
        import tensorflow as tf

        side = int(x.shape[1]) // 2 ** self.J
        channels = int(x.shape[-1])
        if tuple(x.shape[1:]) != self.input_spec_shape:
            raise InputError(f"this scattering front end was built for {self.input_spec_shape} images, got "
                             f"{tuple(x.shape[1:])}")
        # kymatio's loops are plain Python over fixed filters: autograph would rewrite every one of its ~3000 calls
        # into graph control flow for nothing (tracing took ~4x longer with it).
        run = tf.autograph.experimental.do_not_convert(self._kymatio)
        coefficients = run(tf.transpose(tf.cast(x, tf.float32), (0, 3, 1, 2)))  # (B, C, paths, s, s)
        coefficients = tf.reshape(coefficients, (-1, channels * self.paths, side, side))
        return tf.transpose(coefficients, (0, 2, 3, 1))

    def _unstandardised(self, x):
        s = self.scatter(x)
        return ops.log(ops.maximum(s, 0.0) + LOG_EPSILON) if self.log else s

    def call(self, x):
        return (self._unstandardised(x) - self.mean) / self.std

    def adapt(self, batches: Iterable[Any], max_images: int | None = None) -> int:
        """Set ``mean`` / ``std`` to the per-channel statistics of the (log-)scattering of ``batches``.

        ``batches`` yields image batches ``(B, S, S, 3)`` or ``(images, labels, ...)`` tuples (a tf.data
        pipeline works). Stops after ``max_images``. Returns the number of images used.
        """
        import tensorflow as tf

        count, total, total_sq, n = 0, None, None, 0
        scatter = None  # one traced graph for every batch: eager kymatio runs ~1000 small ops one by one
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if max_images is not None:
                images = images[: max(0, max_images - count)]
            if len(images) == 0:
                break
            if not self.built:
                self.build(tuple(images.shape))
            if scatter is None:
                spec = tf.TensorSpec((None, *self.input_spec_shape), tf.float32)  # a short last batch: no retrace
                scatter = tf.function(self._unstandardised, input_signature=[spec])
            s = scatter(tf.convert_to_tensor(images, tf.float32))
            s = np.asarray(s.numpy(), np.float64).reshape(-1, s.shape[-1])
            total = s.sum(0) if total is None else total + s.sum(0)
            total_sq = (s * s).sum(0) if total_sq is None else total_sq + (s * s).sum(0)
            n += s.shape[0]
            count += len(images)
            if max_images is not None and count >= max_images:
                break
        if count == 0:
            raise InputError("adapt needs at least one image")
        mean = total / n
        std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
        self.mean.assign(mean.astype(np.float32))
        self.std.assign(np.where(std > STD_FLOOR, std, 1.0).astype(np.float32))
        return count

    def compute_output_shape(self, input_shape):
        side = None if input_shape[1] is None else int(input_shape[1]) // 2 ** self.J
        return (input_shape[0], side, side, int(input_shape[-1]) * self.paths)

    def get_config(self):
        config = super().get_config()
        config.pop("trainable", None)  # always False
        config.pop("dtype", None)  # always float32
        return {**config, "J": self.J, "L": self.L, "log": self.log}


@keras.saving.register_keras_serializable(package="keras_oneimage")
class ScatteringAlexNet(keras.Model):
    """A fixed scattering front end and conv3-conv5 of an AlexNet: the trunk of Table 4's scattering row.

    ``call`` returns the pooled conv5 map, as :class:`AlexNet` does, so the Table 4 classifier takes it unchanged.
    ``variant``, ``image_size`` and ``widths`` describe the AlexNet whose conv1-2 the scattering replaces
    (``widths[0:2]`` are unused; conv3 sees the ``3 * 81`` scattering channels instead of conv2's).
    """

    TAPS = ("conv3", "conv4", "conv5")  # the trainable layers; conv1 and conv2 are the scattering
    REPLACED = ("conv1", "conv2")

    def __init__(
        self,
        variant: str = "cifar",
        image_size: int = 32,
        widths: Sequence[int] = ALEXNET_WIDTHS,
        J: int = DEFAULT_J,
        L: int = DEFAULT_L,
        log: bool = False,
        **kwargs,
    ):
        kwargs.setdefault("name", "scattering_alexnet")
        super().__init__(**kwargs)
        widths = check_alexnet_options(variant, widths)
        self.variant, self.image_size, self.widths = variant, int(image_size), widths
        dtype = self.dtype_policy
        self.scattering = ScatteringFrontEnd(J, L, log, name="scattering")
        self.fit_pools = [
            keras.layers.AveragePooling2D(3, 2, padding=self._pool_padding, name=f"fit_pool{i + 1}", dtype=dtype)
            for i in range(self._fit_pool_count(self.image_size))
        ]
        self.conv3 = ConvBNReLU(widths[2], 3, 1, "same", name="conv3", dtype=dtype)
        self.conv4 = ConvBNReLU(widths[3], 3, 1, "same", name="conv4", dtype=dtype)
        self.conv5 = ConvBNReLU(widths[4], 3, 1, "same", name="conv5", dtype=dtype)
        self.pool5 = keras.layers.MaxPooling2D(3, 2, padding=self._pool_padding, name="pool5", dtype=dtype)

    @classmethod
    def replacing_conv1_2(cls, trunk: AlexNet, image_size: int | None = None, **scattering) -> "ScatteringAlexNet":
        """The scattering trunk for ``trunk``'s architecture (variant, widths) at ``image_size`` (default the
        trunk's); all its weights are fresh. A Sobel trunk's Sobel front end goes with its conv1-2: the scattering
        sees the RGB image."""
        size = trunk.image_size if image_size is None else image_size
        return cls(variant=trunk.variant, image_size=size, widths=trunk.widths, **scattering)

    @property
    def J(self) -> int:
        return self.scattering.J

    @property
    def _pool_padding(self) -> str:
        return "valid" if self.variant == "imagenet" else "same"

    def _fit_pool_count(self, size: int) -> int:
        """How many 3/2 poolings bring the scattering map (side size / 2^J) to conv3's side; InputError if none."""
        want = self._alexnet_shapes(size)["conv3"][0]
        side, count = size // 2 ** self.scattering.J, 0
        while side > want:
            side = math.ceil(side / 2) if self._pool_padding == "same" else (side - 3) // 2 + 1
            count += 1
        if side != want:
            raise InputError(
                f"the scattering map of a {size} px image ({size // 2 ** self.scattering.J} px) cannot be pooled to "
                f"the {want} px that conv3 of the {self.variant!r} AlexNet sees; use 32 or 64 px (cifar) or 224 "
                "px (imagenet)"
            )
        return count

    def _alexnet_shapes(self, size: int) -> dict[str, tuple[int, int, int]]:
        """The tap shapes of the AlexNet this trunk stands in for (its conv3 side is what the scattering must match)."""
        return _feature_shapes(_stem_spec(self.variant, size), size, self.widths)

    def call(self, x, training=None):
        x = self.scattering(x)
        for pool in self.fit_pools:
            x = pool(x)
        for layer in (self.conv3, self.conv4, self.conv5):
            x = layer(x, training=training)
        return self.pool5(x)

    def feature_shapes(self, image_size: int | None = None) -> dict[str, tuple[int, int, int]]:
        """``{"scattering", "conv3", "conv4", "conv5", "output": (h, w, c)}`` for square inputs of ``image_size``."""
        size = self.image_size if image_size is None else int(image_size)
        self._fit_pool_count(size)  # refuses a size the scattering map cannot be pooled to
        shapes = self._alexnet_shapes(size)
        side = size // 2 ** self.scattering.J
        return {"scattering": (side, side, 3 * self.scattering.paths), **{n: shapes[n] for n in (*self.TAPS, "output")}}

    def build(self, input_shape=None):
        if input_shape is None:
            input_shape = (None, self.image_size, self.image_size, 3)
        shape = tuple(input_shape)
        if shape[1] is not None and self._fit_pool_count(int(shape[1])) != len(self.fit_pools):
            raise InputError(f"this scattering trunk was made for {self.image_size} px images, got {shape[1]} px")
        self.scattering.build(shape)
        shape = self.scattering.compute_output_shape(shape)
        for layer in (*self.fit_pools, self.conv3, self.conv4, self.conv5, self.pool5):
            if not layer.built:
                layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.built = True

    def get_config(self):
        base = super().get_config()
        base = {k: base[k] for k in ("name", "trainable", "dtype") if k in base}
        return {
            **base,
            "variant": self.variant,
            "image_size": self.image_size,
            "widths": list(self.widths),
            "J": self.scattering.J,
            "L": self.scattering.L,
            "log": self.scattering.log,
        }


def adapt_on(trunk: ScatteringAlexNet, images, image_size: int, batch_size: int = 128) -> int:
    """Standardise ``trunk``'s scattering on up to :data:`ADAPT_IMAGES` of a labelled ``tf.data`` split.

    The images are resized to ``image_size`` as for evaluation (no augmentation). Returns the number used.
    """
    from keras_oneimage.data.pipelines import eval_pipeline

    return trunk.scattering.adapt(eval_pipeline(images, image_size, batch_size), max_images=ADAPT_IMAGES)
