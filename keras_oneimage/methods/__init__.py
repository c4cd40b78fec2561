"""Self-supervised methods; each registers itself with :mod:`keras_oneimage.methods.registry`."""
from keras_oneimage.methods.base import FitContext, SelfSupervisedMethod
from keras_oneimage.methods.registry import available, get, register

__all__ = ["FitContext", "SelfSupervisedMethod", "available", "get", "register"]
