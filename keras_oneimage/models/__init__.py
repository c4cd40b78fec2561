"""CNN trunks: the BatchNorm AlexNet of the self-supervision benchmarks and its fixed Sobel front end."""
from keras_oneimage.models.alexnet import AlexNet, ConvBNReLU
from keras_oneimage.models.sobel import Sobel

__all__ = ["AlexNet", "ConvBNReLU", "Sobel"]
