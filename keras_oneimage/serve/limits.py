"""Per-request limits: what one request may ask of the server, checked before anything large is allocated.

A predict request costs memory in proportion to its rows, its image sizes and, above all, its outputs: the conv1 +
conv2 maps of the cifar AlexNet are 160 floats per input pixel, so one 1000x1000 image asks for 160 M floats
(640 MB as float32, more as JSON). Every front end (REST, gRPC) checks a request against :class:`Limits` once it
knows its shapes (for encoded images, from the file header, without decoding) and before the model runs; a
request over a limit gets 413 (REST) or ``RESOURCE_EXHAUSTED`` (gRPC).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Iterable, Sequence

from keras_oneimage.serve.errors import RequestError

DEFAULT_MAX_INSTANCES = 512
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_MAX_OUTPUT_ELEMENTS = 32 * 1024 * 1024  # 128 MiB of float32


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one predict request may ask for.

    Attributes:
      max_instances: rows (images) per request.
      max_pixels: height x width of each image.
      max_output_elements: values in all the request's outputs together (an upper bound computed from the input
        shapes, see :class:`~keras_oneimage.serve.models.OutputSize`).
    """

    max_instances: int = DEFAULT_MAX_INSTANCES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_output_elements: int = DEFAULT_MAX_OUTPUT_ELEMENTS

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")

    def check_instances(self, rows: int) -> None:
        if rows > self.max_instances:
            raise RequestError(
                f"the request has {rows} instances; this server takes at most {self.max_instances} per request "
                "(max_instances): split it",
                413,
            )

    def check_images(self, sizes: Iterable[tuple[int, int]]) -> None:
        for i, (height, width) in enumerate(sizes):
            if height * width > self.max_pixels:
                raise RequestError(
                    f"image {i} is {height}x{width} = {height * width} pixels; this server takes at most "
                    f"{self.max_pixels} pixels per image (max_pixels)",
                    413,
                )

    def check_outputs(self, elements: int) -> None:
        if elements > self.max_output_elements:
            raise RequestError(
                f"the request's outputs would hold {elements} values; this server answers at most "
                f"{self.max_output_elements} per request (max_output_elements): send fewer or smaller images",
                413,
            )


def encoded_image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image from its header, without decoding its pixels.

    Raises RequestError (400) for data that is not a JPEG, PNG, GIF, BMP or WebP file: the server cannot bound what
    decoding it would cost, and TensorFlow's decoder takes no other format either.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.format not in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"):
                raise UnidentifiedImageError(image.format)
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own ceiling, far above any sensible max_pixels
        raise RequestError(f"an image has more than {2 * Image.MAX_IMAGE_PIXELS} pixels", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(
            "an image is not in a known image file format (JPEG, PNG, GIF, BMP or WebP expected)"
        ) from None
    return int(height), int(width)


def image_sizes(shape: Sequence[int]) -> list[tuple[int, int]]:
    """[(height, width)] of the images of a ``(B, H, W, C)`` tensor shape (all the same); [] for other ranks."""
    if len(shape) != 4:
        return []
    return [(int(shape[1]), int(shape[2]))]
