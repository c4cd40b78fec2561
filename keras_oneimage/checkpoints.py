"""Load a trained method model from a ``model.keras`` checkpoint or a `fit` output directory."""
from __future__ import annotations

import importlib
import os
import pathlib
from typing import Any

from keras_oneimage.errors import InputError

CHECKPOINT_NAME = "model.keras"


def import_registered_classes() -> None:
    """Import the package's Keras classes so that ``keras.saving.load_model`` can rebuild them."""
    importlib.import_module("keras_oneimage.models.registry")  # every registered trunk (AlexNet, ResNet18)
    importlib.import_module("keras_oneimage.models.classifier")  # fine-tuned and supervised trunks
    from keras_oneimage.methods import registry

    for name in registry.available():
        try:
            registry.get(name)
        except ImportError:  # a method module that fails to import must not block loading the others
            pass


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """The ``model.keras`` file for ``path`` (the file itself, or a fit output_dir); InputError if missing."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(f"no checkpoint at {str(path)!r} (expected a {CHECKPOINT_NAME} file or a fit output_dir)")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, pathlib.Path]:
    """(method model, checkpoint file) loaded from ``path``, without its optimizer state."""
    import keras

    path = resolve_checkpoint(path)
    import zipfile

    if not zipfile.is_zipfile(path):  # Keras would report a corrupt archive as "File not found"
        raise InputError(
            f"cannot load checkpoint {str(path)!r}: not a Keras .keras archive (a zip file); corrupt, truncated or "
            "not a checkpoint"
        )
    import_registered_classes()
    try:
        return keras.saving.load_model(path, compile=False), path
    except Exception as exc:  # keras raises many error types for unreadable archives
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot load checkpoint {str(path)!r}: {first}") from None


def backbone_of(model_or_checkpoint: Any) -> Any:
    """The trunk (AlexNet, ResNet18, ...) of a method model, a backbone, or a checkpoint path."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        model_or_checkpoint, _ = load_checkpoint(model_or_checkpoint)
    backbone = getattr(model_or_checkpoint, "backbone", model_or_checkpoint)
    if not callable(getattr(backbone, "features", None)):
        raise InputError(
            f"expected a method model with a .backbone, a backbone with .features(x, layers), or a path to a "
            f"{CHECKPOINT_NAME} checkpoint; got {type(model_or_checkpoint).__name__}"
        )
    return backbone
