"""CNN trunks: the BatchNorm AlexNet of the self-supervision benchmarks, ResNet-18, the fixed Sobel front end, and
the registry that builds a trunk by name."""
from keras_oneimage.models.alexnet import AlexNet, ConvBNReLU
from keras_oneimage.models.registry import available_trunks, build_trunk, trunk_name
from keras_oneimage.models.resnet import ResNet18
from keras_oneimage.models.sobel import Sobel

__all__ = ["AlexNet", "ConvBNReLU", "ResNet18", "Sobel", "available_trunks", "build_trunk", "trunk_name"]
