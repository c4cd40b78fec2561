"""keras-oneimage: learn the first layers of a CNN from one image.

Asano, Rupprecht & Vedaldi, "A critical analysis of self-supervision, or what we can learn from a single image",
ICLR 2020.

Public names are imported lazily, so ``import keras_oneimage`` does not pull in TensorFlow until one is used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "fit": "keras_oneimage.api",
    "probe": "keras_oneimage.api",
    "load_trained": "keras_oneimage.api",
    "export": "keras_oneimage.export.savedmodel",
    "serve": "keras_oneimage.serve.server",
    "tune": "keras_oneimage.tuning",
    "finetune": "keras_oneimage.transfer",
    "load_image": "keras_oneimage.data.images",
    "load_images": "keras_oneimage.data.images",
    "load_labelled": "keras_oneimage.data.labelled",
    "patch_dataset": "keras_oneimage.data.synthetic",
    "AugmentConfig": "keras_oneimage.data.augment",
    "AlexNet": "keras_oneimage.models.alexnet",
    "ResNet18": "keras_oneimage.models.resnet",
    "build_trunk": "keras_oneimage.models.registry",
    "available_trunks": "keras_oneimage.models.registry",
    "ProbeCallback": "keras_oneimage.probes.callback",
    "InputError": "keras_oneimage.errors",
    "NonFiniteLossError": "keras_oneimage.errors",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_oneimage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
