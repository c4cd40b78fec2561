"""Name → self-supervised method class. The one place a new method is added.

A method is a ``keras.Model`` subclass (see :class:`keras_oneimage.methods.base.SelfSupervisedMethod`) decorated
with ``@register("name")``. ``fit(image, method="name")`` then works, from the API and the CLI.
"""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from keras_oneimage.errors import InputError

T = TypeVar("T", bound=type)

_REGISTRY: dict[str, type] = {}

# Built-in methods, imported lazily so that `import keras_oneimage` stays light. A fourth method adds one line here
# (or calls `register` from user code) and nothing else changes.
_BUILTIN_MODULES = {
    "rotnet": "keras_oneimage.methods.rotnet",
    "deepcluster": "keras_oneimage.methods.deepcluster",
    "bigan": "keras_oneimage.methods.bigan",
    "jigsaw": "keras_oneimage.methods.jigsaw",
}


def register(name: str) -> Callable[[T], T]:
    """Class decorator that makes a method available to ``fit(..., method=name)``."""

    def decorator(cls: T) -> T:
        key = name.lower()
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"a method named {name!r} is already registered ({existing.__qualname__})")
        _REGISTRY[key] = cls
        cls.method_name = key
        return cls

    return decorator


def get(name: str) -> type:
    """The method class registered as ``name`` (case-insensitive); InputError if there is none."""
    key = str(name).lower()
    if key not in _REGISTRY and key in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[key])
    if key not in _REGISTRY:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(available())}")
    return _REGISTRY[key]


def available() -> tuple[str, ...]:
    """Names of every registered or built-in method, sorted."""
    return tuple(sorted(set(_REGISTRY) | set(_BUILTIN_MODULES)))
