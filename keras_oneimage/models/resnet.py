"""ResNet-18, the stronger trunk the critique of the single-image paper asks about.

He, Zhang, Ren & Sun, "Deep residual learning for image recognition" (CVPR 2016), Table 1, 18-layer column:
a stem, then four stages of two BasicBlocks (3x3 conv → BN → ReLU → 3x3 conv → BN, plus the shortcut, then ReLU)
with widths 64-128-256-512; the first block of stages 2-4 halves the map with a stride-2 3x3 conv and a 1x1
stride-2 projection shortcut (their option B, as torchvision). Asano et al. (ICLR 2020) only train AlexNet; this
trunk lets one ask whether the finding holds for a stronger CNN (Kolesnikov et al., CVPR 2019, "Revisiting
self-supervised visual representation learning", found that conclusions drawn on one architecture need not carry
over to another).

Two stems, chosen like the AlexNet's ``variant``:

* ``"imagenet"``: 7x7 conv stride 2 (pad 3), then a 3x3 stride-2 max-pool (pad 1): 224 px → 112 → 56 … 7;
* ``"cifar"``: one 3x3 conv stride 1 and no max-pool, the stem of He et al.'s own CIFAR experiments (§4.2) and of
  the usual CIFAR ResNet-18: 32 px → stage maps 32, 16, 8, 4.

Taps, read like the AlexNet's ``conv1`` … ``conv5``: ``stem`` (post-BN, post-ReLU, before the max-pool) and
``stage1`` … ``stage4`` (the output of each stage's last block, after its final ReLU). Every tap is post-ReLU, so
the probes' zero padding equals -inf padding there too. ``call`` returns the global average pool of ``stage4``,
``(B, 1, 1, 512)``, the feature He et al.'s classifier reads.

Padding is explicit and symmetric where the stride is 2 (PyTorch's convention), so a map of side ``n`` becomes
``ceil(n / 2)`` in every stride-2 layer and the shortcut and residual paths always agree, for odd sides too.
As the AlexNet, the model takes float RGB in ``[0, 1]`` and normalises inside; ``sobel=True`` prepends the fixed
Sobel front end (DeepCluster's ``backbone_options``).
"""
from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from keras_oneimage.errors import InputError
from keras_oneimage.models.alexnet import ConvBNReLU, FusedBatchNormalization
from keras_oneimage.models.trunk import IMAGENET_MEAN, IMAGENET_STD, Trunk

#: He et al. (2016), Table 1: widths of conv2_x … conv5_x (our ``stage1`` … ``stage4``) and blocks per stage.
RESNET18_WIDTHS = (64, 128, 256, 512)
RESNET18_BLOCKS = (2, 2, 2, 2)
VARIANTS = ("cifar", "imagenet")


def _batch_norm(name: str, dtype) -> FusedBatchNormalization:
    # torchvision's BatchNorm2d defaults (momentum 0.1 in PyTorch's convention, eps 1e-5), as the AlexNet's.
    return FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_oneimage")
class BasicBlock(keras.layers.Layer):
    """He et al. (2016), Fig. 2: ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``.

    ``strides=2`` halves the map in the first conv; ``project`` replaces the identity shortcut by a 1x1 conv (same
    stride) and BatchNorm, needed whenever the stride or the width changes (option B).
    """

    def __init__(self, filters: int, strides: int = 1, project: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)
        self.project = bool(project)
        dtype = self.dtype_policy
        # Stride 2 pads 1 px on every side (symmetric, as PyTorch) instead of TF's asymmetric "same".
        self.conv1 = ConvBNReLU(self.filters, 3, self.strides, 1 if self.strides > 1 else "same", name="conv1",
                                dtype=dtype)
        self.conv2 = keras.layers.Conv2D(self.filters, 3, padding="same", use_bias=False,
                                         kernel_initializer="he_normal", name="conv2", dtype=dtype)
        self.bn2 = _batch_norm("bn2", dtype)
        if self.project:
            self.shortcut = keras.layers.Conv2D(self.filters, 1, strides=self.strides, use_bias=False,
                                                kernel_initializer="he_normal", name="shortcut", dtype=dtype)
            self.shortcut_bn = _batch_norm("shortcut_bn", dtype)
        else:
            self.shortcut = self.shortcut_bn = None

    def build(self, input_shape):
        if not self.project and (self.strides != 1 or input_shape[-1] != self.filters):
            raise ValueError(f"a block without projection cannot map {input_shape[-1]} channels at stride "
                             f"{self.strides} to {self.filters}")
        self.conv1.build(input_shape)
        mid = self.conv1.compute_output_shape(input_shape)
        self.conv2.build(mid)
        self.bn2.build(self.conv2.compute_output_shape(mid))
        if self.project:
            self.shortcut.build(input_shape)
            self.shortcut_bn.build(self.shortcut.compute_output_shape(input_shape))

    def call(self, x, training=None):
        residual = self.bn2(self.conv2(self.conv1(x, training=training)), training=training)
        shortcut = self.shortcut_bn(self.shortcut(x), training=training) if self.project else x
        return ops.relu(residual + shortcut)

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides, "project": self.project}


@keras.saving.register_keras_serializable(package="keras_oneimage")
class ResNetStage(keras.layers.Layer):
    """``blocks`` BasicBlocks of width ``filters``; the first one strides and projects when asked."""

    def __init__(self, filters: int, blocks: int, strides: int = 1, project: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.num_blocks = int(filters), int(blocks)
        self.strides, self.project = int(strides), bool(project)
        dtype = self.dtype_policy
        self.blocks = [
            BasicBlock(self.filters, self.strides if i == 0 else 1, project=self.project and i == 0,
                       name=f"block{i + 1}", dtype=dtype)
            for i in range(self.num_blocks)
        ]

    def build(self, input_shape):
        shape = input_shape
        for block in self.blocks:
            block.build(shape)
            shape = block.compute_output_shape(shape)

    def call(self, x, training=None):
        for block in self.blocks:
            x = block(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        for block in self.blocks:
            input_shape = block.compute_output_shape(input_shape)
        return input_shape

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "blocks": self.num_blocks,
                "strides": self.strides, "project": self.project}


@keras.saving.register_keras_serializable(package="keras_oneimage")
class ResNet18(Trunk):
    """ResNet-18 trunk with BatchNorm. ``call`` returns the global average pool of ``stage4``; ``features`` returns
    the ``stem``, ``stage1`` … ``stage4`` taps.

    Args:
        variant: ``"imagenet"`` (7x7/2 stem and 3x3/2 max-pool, for 128 px and up) or ``"cifar"`` (3x3/1 stem, no
            max-pool, for 32/64 px); see the module docstring.
        image_size: input side the model is meant for (used for building and ``feature_shapes``; the network is
            fully convolutional).
        sobel: prepend the fixed grayscale→Sobel front end (DeepCluster); the stem then sees 2 channels.
        widths: the four stage widths (default 64-128-256-512, He et al. 2016); the stem has the first one.
            Smaller for quick tests.
        mean, std: per-channel input normalisation applied inside the model (ImageNet statistics by default).
    """

    TAPS = ("stem", "stage1", "stage2", "stage3", "stage4")

    def __init__(
        self,
        variant: str = "cifar",
        image_size: int = 64,
        sobel: bool = False,
        widths: Sequence[int] = RESNET18_WIDTHS,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ):
        kwargs.setdefault("name", "resnet18")
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise InputError(f"unknown ResNet-18 variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
        try:
            widths = tuple(int(w) for w in widths)
        except (TypeError, ValueError):
            raise InputError(f"widths must be four positive integers, got {widths!r}") from None
        if len(widths) != 4 or min(widths) < 1:
            raise InputError(f"widths must be four positive integers, got {widths!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise InputError(f"image_size must be a positive integer, got {image_size!r}")
        self._init_common(variant, image_size, sobel, widths, mean, std)

        dtype = self.dtype_policy  # every sublayer computes in the model's policy (see AlexNet)
        if variant == "imagenet":
            self.stem = ConvBNReLU(widths[0], 7, 2, 3, name="stem", dtype=dtype)
            # Zero padding equals PyTorch's -inf padding of this max-pool: its input is post-ReLU.
            self.stem_pad = keras.layers.ZeroPadding2D(1, name="stem_pad", dtype=dtype)
            self.stem_pool = keras.layers.MaxPooling2D(3, 2, name="stem_pool", dtype=dtype)
        else:
            self.stem = ConvBNReLU(widths[0], 3, 1, "same", name="stem", dtype=dtype)
            self.stem_pad = self.stem_pool = None
        self.stage1 = ResNetStage(widths[0], RESNET18_BLOCKS[0], 1, project=False, name="stage1", dtype=dtype)
        self.stage2 = ResNetStage(widths[1], RESNET18_BLOCKS[1], 2, project=True, name="stage2", dtype=dtype)
        self.stage3 = ResNetStage(widths[2], RESNET18_BLOCKS[2], 2, project=True, name="stage3", dtype=dtype)
        self.stage4 = ResNetStage(widths[3], RESNET18_BLOCKS[3], 2, project=True, name="stage4", dtype=dtype)
        self.avgpool = keras.layers.GlobalAveragePooling2D(keepdims=True, name="avgpool", dtype=dtype)

    def _tap_path(self) -> tuple[tuple[str, tuple[keras.layers.Layer, ...]], ...]:
        """``(tap, layers running from the previous tap up to it)`` in order.

        Built on demand: Keras would wrap a stored nested tuple of layers in its tracking containers.
        """
        stem_pooling = (self.stem_pad, self.stem_pool) if self.stem_pool is not None else ()
        return (
            ("stem", (self.stem,)),
            ("stage1", (*stem_pooling, self.stage1)),
            ("stage2", (self.stage2,)),
            ("stage3", (self.stage3,)),
            ("stage4", (self.stage4,)),
        )

    def _output_layers(self):
        return (self.avgpool,)

    # ------------------------------------------------------------------------------------------------ shapes
    def feature_shapes(self, image_size: int | None = None) -> dict[str, tuple[int, int, int]]:
        """``{tap: (h, w, c)}`` for square inputs of side ``image_size`` (default: the model's), plus ``"output"``."""
        size = self.image_size if image_size is None else int(image_size)
        return _feature_shapes(self.variant, size, self.widths)


def _halve(n: int) -> int:
    """Side after a stride-2 layer padded symmetrically (3x3 pad 1 conv or max-pool, 1x1 pad 0 conv)."""
    return (n - 1) // 2 + 1


def _feature_shapes(variant: str, size: int, widths: Sequence[int]) -> dict[str, tuple[int, int, int]]:
    if variant == "imagenet":
        stem = (size + 2 * 3 - 7) // 2 + 1  # 7x7 stride 2 pad 3
        side = _halve(stem)  # 3x3 stride 2 pad 1 max-pool
    else:
        stem = side = size
    shapes = {"stem": (stem, stem, widths[0])}
    for i, width in enumerate(widths):
        if i:
            side = _halve(side)
        shapes[f"stage{i + 1}"] = (side, side, width)
    shapes["output"] = (1, 1, widths[-1])
    return shapes
