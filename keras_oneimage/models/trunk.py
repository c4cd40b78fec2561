"""What every trunk shares: input normalisation, the optional Sobel front end, named taps read along one path.

A trunk subclass (``AlexNet``, ``ResNet18``) checks its own options, calls :meth:`Trunk._init_common`, creates its
layers, and describes its forward pass as :meth:`Trunk._tap_path` (the layers from one tap to the next) plus
:meth:`Trunk._output_layers` (what ``call`` applies after the last tap). ``call``, ``features`` and ``build`` then
walk that one path, so a tap is always the activation ``call`` computes at that point (docs/DESIGN.md, "Trunks").
"""
from __future__ import annotations

from typing import Iterable, Sequence

import keras
from keras import ops

from keras_oneimage import validation
from keras_oneimage.errors import InputError
from keras_oneimage.models.sobel import Sobel

#: ImageNet channel statistics: the default input normalisation of every trunk (inputs are RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Trunk(keras.Model):
    """Base class of the trunks; see the module docstring. Subclasses set ``TAPS`` (tap names in forward order)."""

    TAPS: tuple[str, ...] = ()

    def _init_common(self, variant: str, image_size: int, sobel: bool, widths: tuple[int, ...],
                     mean: Sequence[float], std: Sequence[float]) -> None:
        """Store the options every trunk has (after the subclass checked its own) and create the Sobel layer."""
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise InputError(f"mean/std must be three numbers each (std > 0), got {mean!r} / {std!r}")
        self.variant = variant
        self.image_size = int(image_size)
        self.sobel = bool(sobel)
        self.widths = widths
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Every sublayer gets this model's dtype policy, so a trunk built under a mixed-precision policy (or
        # reloaded from a config that records one) computes in it throughout; weights stay float32.
        self.sobel_layer = Sobel(name="sobel", dtype=self.dtype_policy) if self.sobel else None

    # ------------------------------------------------------------------------------------------- the one path
    def _tap_path(self) -> tuple[tuple[str, tuple[keras.layers.Layer, ...]], ...]:
        """``(tap, layers running from the previous tap up to it)`` in forward order.

        Built on demand by the subclass: Keras would wrap a stored nested tuple of layers in its tracking
        containers.
        """
        raise NotImplementedError

    def _output_layers(self) -> tuple[keras.layers.Layer, ...]:
        """Layers ``call`` applies after the last tap (a final pooling)."""
        return ()

    @classmethod
    def early_taps(cls) -> tuple[str, ...]:
        """The trunk's "early layers": its first two taps, the analogue of the paper's conv1-conv2.

        Asano et al. (ICLR 2020) find that one image suffices to learn conv1-conv2 of an AlexNet; this is the block
        their fine-tuning experiment (Table 4) freezes. AlexNet: ``conv1``, ``conv2``; ResNet-18: ``stem``,
        ``stage1`` (the stem and the first stage run at the stem's resolution, before any stage downsamples).
        """
        return cls.TAPS[:2]

    def tap_layers(self, name: str) -> tuple[keras.layers.Layer, ...]:
        """The layers the path runs from the previous tap up to tap ``name`` (a pooling, then the tap's block).

        Copying or freezing a tap means these layers: whatever holds weights between two taps belongs to the later
        one. InputError for a name that is not one of ``TAPS``.
        """
        (name,) = validation.layer_names(name, self.TAPS, "tap")
        return dict(self._tap_path())[name]

    # ------------------------------------------------------------------------------------------------ forward
    def preprocess(self, x):
        """[0, 1] RGB → normalised input of the first layer (and Sobel gradients when ``sobel``)."""
        x = ops.cast(x, self.compute_dtype)
        mean = ops.cast(ops.convert_to_tensor(self.mean), x.dtype)
        std = ops.cast(ops.convert_to_tensor(self.std), x.dtype)
        x = (x - mean) / std
        return self.sobel_layer(x) if self.sobel_layer is not None else x

    def call(self, x, training=None):
        x = self.preprocess(x)
        for _, layers in self._tap_path():
            for layer in layers:
                x = layer(x, training=training)
        for layer in self._output_layers():
            x = layer(x, training=training)
        return x

    def features(
        self,
        x,
        layers: str | Iterable[str] | None = None,
        training: bool = False,
        dtype: str | None = "float32",
    ) -> dict:
        """The requested taps (``None``: :meth:`early_taps`) from one forward pass that stops after the deepest of them.

        ``dtype`` casts the taps (default float32, so probes get float32 even under a mixed-precision policy);
        ``None`` keeps the compute dtype.
        """
        names = validation.layer_names(self.early_taps() if layers is None else layers, self.TAPS)
        deepest = max(self.TAPS.index(n) for n in names)
        out = {}
        x = self.preprocess(x)
        for tap, path in self._tap_path()[: deepest + 1]:
            for layer in path:
                x = layer(x, training=training)
            if tap in names:
                out[tap] = ops.cast(x, dtype) if dtype is not None else x
        return {n: out[n] for n in names}

    @property
    def input_channels(self) -> int:
        """Channels the first layer sees: 2 with the Sobel front end, 3 otherwise."""
        return 2 if self.sobel else 3

    def build(self, input_shape=None):
        """Creates every weight for inputs of ``input_shape`` (default ``(None, S, S, 3)``)."""
        if input_shape is None:
            input_shape = (None, self.image_size, self.image_size, 3)
        shape = tuple(input_shape)
        layers = [self.sobel_layer] if self.sobel_layer is not None else []
        layers += [layer for _, path in self._tap_path() for layer in path]
        for layer in layers:
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
            "sobel": self.sobel,
            "widths": list(self.widths),
            "mean": list(self.mean),
            "std": list(self.std),
        }
