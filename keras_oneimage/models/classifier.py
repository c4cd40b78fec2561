"""The classifier built on a trunk: the fine-tuned model of Table 4 and the supervised reference trunk.

Named for the paper's AlexNet (the name is what saved ``.keras`` classifiers record); any registered trunk works,
e.g. a ResNet-18, whose ``call`` output (the global average pool of stage4) the head flattens likewise.
"""
from __future__ import annotations

from typing import Sequence

import keras

from keras_oneimage.models.alexnet import AlexNet
from keras_oneimage.models.heads import check_head_widths, default_head_widths


@keras.saving.register_keras_serializable(package="keras_oneimage")
class AlexNetClassifier(keras.Model):
    """A trunk and a classifier head: flatten → [dropout → dense → BN → ReLU] per width → dense logits.

    ``call`` returns float32 logits ``(B, num_classes)``. ``backbone`` is the trunk (an :class:`AlexNet`, a
    ResNet-18, or the scattering trunk of Table 4).
    """

    def __init__(
        self,
        backbone: AlexNet,
        num_classes: int,
        head_widths: Sequence[int] | None = None,
        dropout: float = 0.5,
        seed: int = 0,
        **kwargs,
    ):
        kwargs.setdefault("name", "alexnet_classifier")
        super().__init__(**kwargs)
        if head_widths is None:
            head_widths = default_head_widths(backbone)  # as the RotNet and DeepCluster heads
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.head_widths = check_head_widths(head_widths)
        self.dropout = float(dropout)
        self.seed = int(seed)
        layers: list[keras.layers.Layer] = [keras.layers.Flatten(name="flatten")]
        for i, width in enumerate(self.head_widths, start=1):
            if self.dropout > 0:
                layers.append(keras.layers.Dropout(self.dropout, seed=self.seed * 31 + i, name=f"drop{i}"))
            layers += [
                keras.layers.Dense(width, use_bias=False, name=f"fc{i}"),
                keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"fc{i}_bn"),
                keras.layers.ReLU(name=f"fc{i}_relu"),
            ]
        layers.append(keras.layers.Dense(self.num_classes, dtype="float32", name="logits"))
        self.head = keras.Sequential(layers, name="head")

    def build(self, input_shape=None):
        if input_shape is None:
            input_shape = (None, self.backbone.image_size, self.backbone.image_size, 3)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        side = input_shape[1]
        h, w, c = self.backbone.feature_shapes(side)["output"] if side is not None else (None, None, None)
        self.head.build((None, h, w, c))
        self.built = True

    def call(self, x, training=None):
        return self.head(self.backbone(x, training=training), training=training)

    def get_config(self):
        base = super().get_config()
        base = {k: base[k] for k in ("name", "trainable", "dtype") if k in base}
        return {
            **base,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
            "head_widths": list(self.head_widths),
            "dropout": self.dropout,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"], custom_objects=custom_objects)
        return cls(**config)
