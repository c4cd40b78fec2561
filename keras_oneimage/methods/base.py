"""What every self-supervised method shares: a backbone, a train_step, and optional per-method callbacks."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import keras
import numpy as np


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


class SelfSupervisedMethod(keras.Model):
    """Base class: a method owns ``self.backbone`` (an AlexNet) and implements ``train_step(patches)``.

    ``patches`` is a float32 batch ``(B, S, S, 3)`` in ``[0, 1]`` from ``patch_dataset``.
    """

    method_name: str = "base"

    def __init__(self, backbone: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def default_optimizer(self) -> keras.optimizers.Optimizer | dict:
        """Optimizer used when `fit` is not given one (methods with several players return their own)."""
        return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)

    def method_callbacks(self, context: FitContext) -> list[keras.callbacks.Callback]:
        """Extra callbacks the method needs during `fit` (e.g. DeepCluster's re-clustering). Default: none."""
        return []
