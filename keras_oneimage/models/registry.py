"""Name → trunk class: the one place a trunk is chosen by name (``trunk="alexnet"`` or ``trunk="resnet18"``).

Every trunk is a ``keras.Model`` with the same contract (docs/DESIGN.md, "Trunks"): a ``TAPS`` tuple of tap names in
forward order, ``features(x, layers, training, dtype) -> {tap: (B, h, w, C)}``, ``feature_shapes(image_size)`` (the
taps plus ``"output"``, what ``call`` returns), ``variant`` (``"cifar"`` or ``"imagenet"``), ``image_size``, the
``sobel`` option, and a full ``get_config``. Consumers read tap names from the trunk (``trunk.TAPS``), never from here.

* ``"alexnet"`` (default): the BatchNorm AlexNet of Asano et al. (ICLR 2020), taps ``conv1`` … ``conv5``;
* ``"resnet18"``: ResNet-18 (He et al., CVPR 2016), taps ``stem``, ``stage1`` … ``stage4``.
"""
from __future__ import annotations

import inspect
from typing import Any

from keras_oneimage.errors import InputError
from keras_oneimage.models.alexnet import AlexNet
from keras_oneimage.models.resnet import ResNet18

DEFAULT_TRUNK = "alexnet"
_TRUNKS: dict[str, type] = {"alexnet": AlexNet, "resnet18": ResNet18}
#: Patch side from which the "imagenet" variant (strided stem, max-pools) is the default; below it, "cifar".
IMAGENET_FROM = 128


def available_trunks() -> tuple[str, ...]:
    """Names ``build_trunk`` accepts, the default first."""
    return (DEFAULT_TRUNK, *sorted(set(_TRUNKS) - {DEFAULT_TRUNK}))


def trunk_class(name: str | None = None) -> type:
    """The trunk class registered as ``name`` (case-insensitive; ``None``: the default); InputError if unknown."""
    key = DEFAULT_TRUNK if name is None else str(name).lower()
    if key not in _TRUNKS:
        raise InputError(f"unknown trunk {name!r}; choose one of: {', '.join(available_trunks())}")
    return _TRUNKS[key]


def default_variant(image_size: int) -> str:
    """``"imagenet"`` from :data:`IMAGENET_FROM` px, ``"cifar"`` below: the package's rule for every trunk."""
    return "imagenet" if int(image_size) >= IMAGENET_FROM else "cifar"


def build_trunk(name: str | None = DEFAULT_TRUNK, *, variant: str | None = None, image_size: int = 64,
                **options: Any):
    """A new, unbuilt trunk ``name`` for ``image_size`` px inputs.

    Args:
      name: one of :func:`available_trunks` (``None``: the default, ``"alexnet"``).
      variant: ``"cifar"`` or ``"imagenet"``; ``None`` picks it from ``image_size`` (:func:`default_variant`).
      image_size: the input side the trunk is built for.
      **options: the trunk's own constructor options (``sobel``, ``widths``, ``mean``, ``std``, ``name``, ...).
    """
    cls = trunk_class(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise InputError(f"image_size must be a positive integer, got {image_size!r}")
    unknown = sorted(set(options) - _options_of(cls))
    if unknown:
        raise InputError(f"the {_name_of(cls)!r} trunk has no option(s) {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(_options_of(cls)))}")
    variant = default_variant(image_size) if variant is None else variant
    return cls(variant=variant, image_size=image_size, **options)


#: Keyword arguments every Keras model takes besides its own.
_KERAS_OPTIONS = frozenset({"name", "dtype", "trainable"})


def _options_of(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    own = {p for p, v in params.items() if v.kind is v.POSITIONAL_OR_KEYWORD or v.kind is v.KEYWORD_ONLY}
    return (own | _KERAS_OPTIONS) - {"self", "variant", "image_size"}


def _name_of(cls: type) -> str:
    """The registry name of trunk class ``cls``."""
    return next(name for name, known in _TRUNKS.items() if known is cls)


def trunk_name(model: Any) -> str:
    """The registry name of a trunk, or of the trunk of a model with ``.backbone`` (a method, a classifier).

    InputError for anything else, so a caller never records a name it cannot rebuild.
    """
    trunk = getattr(model, "backbone", model)
    for name, cls in _TRUNKS.items():
        if type(trunk) is cls:
            return name
    for name, cls in _TRUNKS.items():  # a user subclass of a registered trunk
        if isinstance(trunk, cls):
            return name
    raise InputError(f"{type(trunk).__name__} is not a registered trunk; known: {', '.join(available_trunks())}")
