"""Source images in, endless augmented patch batches out (Asano et al., ICLR 2020, §3).

Names are imported lazily (as in the top-level package), so that the TensorFlow-free modules of this package
(:mod:`keras_oneimage.data.recipe`, read by the command line's ``--help``) do not pull in TensorFlow.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "AugmentConfig": "keras_oneimage.data.recipe",
    "PatchSampler": "keras_oneimage.data.augment",
    "Pyramid": "keras_oneimage.data.pyramid",
    "build_pyramid": "keras_oneimage.data.pyramid",
    "load_image": "keras_oneimage.data.images",
    "load_images": "keras_oneimage.data.images",
    "patch_dataset": "keras_oneimage.data.synthetic",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_oneimage.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
