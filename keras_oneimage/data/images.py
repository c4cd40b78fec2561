"""Loading the source image(s): any path, array or tensor in, ``uint8 (H, W, 3)`` RGB out.

Files are read as bytes (so file names that are not UTF-8 work), their declared size is read from the header
*before* decoding (decompression-bomb guard), JPEG EXIF orientation is applied, and decoding uses TensorFlow
with Pillow as the fallback for what TF cannot decode (CMYK JPEG, palette BMP, TIFF, WebP, ...). Every problem
is an :class:`~keras_oneimage.errors.InputError` whose one-line message names the file.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import os
import stat
import threading
from typing import Sequence, Union

import numpy as np
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.errors import InputError

ImageSource = Union[str, os.PathLike, np.ndarray, tf.Tensor]

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MPix: ~10x the paper's largest source image, well below a RAM problem
DEFAULT_MIN_SIZE = 8  # shortest side; smaller images hold too little texture to cut patches from

def _display(path: str | bytes) -> str:
    """A printable one-line form of a path, even when it is not valid UTF-8."""
    if isinstance(path, bytes):
        text = path.decode("utf-8", "backslashreplace")
    else:
        text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return repr(text)


def missing_reason(path: str | bytes | os.PathLike) -> str:
    """Why ``os.path.exists(path)`` is False, in words: ``"no such file"``, ``"symlink loop"``, a dangling link...

    ``os.path.exists`` answers False for every failing ``stat``; the user needs to know which it was.
    """
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (a symbolic link that points back to itself, directly or through others)"
        if err.errno == errno.ENOENT and os.path.islink(path):
            return f"broken symbolic link (it points to {_display(os.readlink(path))}, which does not exist)"
        if err.errno == errno.ENOENT:
            return "no such file"
        if err.errno == errno.ENOTDIR:
            return "no such file (a part of the path is not a directory)"
        return f"cannot read the file ({err.strerror or err})"
    return "no such file"


# ----------------------------------------------------------------------------------------------- headers
_EXIF_ORIENTATION = 0x0112
#: Pillow's decompression-bomb limit is one global; it is lifted while a header is read (under this lock) because
#: ``max_pixels`` is checked on the declared size right after, with that size in the message.
_PILLOW_LIMIT_LOCK = threading.Lock()
#: Huffman-coded JPEG frame types: sequential (baseline/extended/lossless) and progressive. Arithmetic coding
#: (C9-CF) can squeeze a flat block below a bit, so the data-size check below does not apply to it.
_JPEG_HUFFMAN_SEQUENTIAL = {0xC0, 0xC1, 0xC3}
_JPEG_HUFFMAN_PROGRESSIVE = {0xC2}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclasses.dataclass(frozen=True)
class _Header:
    """What a file's header declares, read by Pillow without decoding the pixels."""

    format: str  # Pillow's format name: "JPEG", "PNG", "GIF", "BMP", "TIFF", ...
    width: int
    height: int
    mode: str  # Pillow's mode: "RGB", "CMYK", "P", ...
    orientation: int  # EXIF orientation 1-8 of a JPEG (1: stored upright)

    @property
    def tf_decodes(self) -> bool:
        """Whether TensorFlow decodes this file. TF keeps its decoders for the formats it reads (so the pixels,
        hence the source-image digests of existing runs, stay as they were), except where it reads them wrong:
        a CMYK JPEG, and a BMP of 8 bits or fewer per pixel (TF returns palette indices as gray)."""
        if self.format == "JPEG":
            return self.mode != "CMYK"
        if self.format == "BMP":
            return self.mode in ("RGB", "RGBA")
        return self.format in ("PNG", "GIF")


def _header(data: bytes, what: str) -> _Header:
    """The declared format, size, mode and EXIF orientation (a lazy ``Image.open``: the header only); a PNG's
    chunk CRCs are checked too (TF and Pillow's decoders are lenient about some)."""
    from PIL import Image, UnidentifiedImageError

    with _PILLOW_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(data)) as image:
                header = _Header(image.format or "", *image.size, image.mode, _orientation(image))
                if header.format == "PNG":
                    try:
                        image.verify()  # reads every chunk and checks its CRC
                    except SyntaxError as err:
                        raise InputError(f"{what}: not a readable image (corrupt PNG: bad CRC or chunk: {err})") \
                            from None
        except UnidentifiedImageError:
            raise InputError(f"{what}: not an image file (expected JPEG, PNG, GIF, BMP or another format "
                             "Pillow reads)") from None
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - Pillow raises many types for broken headers
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(f"{what}: not a readable image ({message})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    return header


def _orientation(image) -> int:
    """A JPEG's EXIF orientation (1-8), 1 for other formats and for a missing or malformed EXIF block."""
    if image.format != "JPEG":
        return 1
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block does not make the picture unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _jpeg_too_short(data: bytes, width: int, height: int) -> str | None:
    """Why a JPEG cannot hold the ``width x height`` image its header declares, or None.

    libjpeg decodes a scan that ends early (a header claiming 9000x9000 over 16x16 of data) with only a warning
    ("Corrupt JPEG data: premature end of data segment") and fills the rest: TF and Pillow both return a huge,
    mostly flat image. Every 8x8 block of a Huffman-coded JPEG costs at least 2 bits in a sequential scan (a DC
    code and an end-of-block code) and at least 1 bit in a progressive one (its DC code in the first scan), so a
    file smaller than that for the blocks of its largest component is truncated or lying.
    """
    sof = _jpeg_frame_marker(data)
    bits_per_block = 2 if sof in _JPEG_HUFFMAN_SEQUENTIAL else 1 if sof in _JPEG_HUFFMAN_PROGRESSIVE else 0
    needed = ((width + 7) // 8) * ((height + 7) // 8) * bits_per_block // 8
    if len(data) < needed:
        return (f"the header declares {width}x{height} pixels, but the file has only {len(data):,} bytes, fewer "
                f"than the {needed:,} such a JPEG needs at the least (truncated or corrupt file)")
    return None


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The JPEG's start-of-frame marker (its coding: Huffman or arithmetic, sequential or progressive), or None.

    Pillow reads the same segments but does not keep the marker (only a "progressive" flag), and the bound above
    must tell arithmetic coding apart, so the segment headers are walked here.
    """
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # standalone markers
            pos += 2
            continue
        if marker in _JPEG_SOF:
            return marker
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


# ----------------------------------------------------------------------------------------------- pixels
def _upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """The decoded pixels turned as a viewer shows them, by ``ImageOps.exif_transpose`` (exact: flips and
    quarter turns)."""
    from PIL import Image, ImageOps

    pil = Image.fromarray(image)
    pil.getexif()[_EXIF_ORIENTATION] = orientation
    return np.array(ImageOps.exif_transpose(pil))


def _to_rgb_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Any supported dtype/channel layout -> ``uint8 (H, W, 3)``."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise InputError(f"{what}: expected an image of shape (H, W) or (H, W, C), got shape {array.shape}")
    channels = array.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise InputError(f"{what}: expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels, got {channels}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(f"{what}: float image contains NaN or infinity")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(f"{what}: float images must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        array = np.rint(array.astype(np.float32) * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise InputError(f"{what}: integer images must be uint8, uint16 or hold values in [0, 255]; "
                             f"got {array.dtype} in [{lo}, {hi}]")
        array = array.astype(np.uint8)
    else:
        raise InputError(f"{what}: unsupported pixel type {array.dtype} (use uint8, uint16 or float in [0, 1])")
    if channels in (2, 4):  # alpha is dropped, as tf.io.decode_image(channels=3) does
        array = array[..., :channels - 1]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _check_size(image: np.ndarray, what: str, min_size: int) -> np.ndarray:
    height, width = image.shape[:2]
    if min(height, width) < min_size:
        raise InputError(f"{what}: image is {width}x{height}, smaller than min_size={min_size} pixels per side")
    return image


def _decode_with_pillow(data: bytes, what: str) -> np.ndarray:
    from PIL import Image  # imported lazily: only the fallback path needs it

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)
            if image.mode == "F":  # 32-bit float (TIFF): convert("RGB") would clip 0..1 to black; keep the floats
                return np.asarray(image, dtype=np.float32)  # _to_rgb_uint8 takes [0, 1], refuses other ranges
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image).astype(np.uint16 if image.mode.startswith("I;16") else np.int64)
                if array.dtype == np.int64:
                    array = np.clip(array, 0, 65535).astype(np.uint16)
                return array
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
            return np.asarray(image)
    except Image.DecompressionBombError as err:  # only for formats without our own header check
        raise InputError(f"{what}: refused, the image is too large to decode safely ({err})") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for broken files
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{what}: cannot decode the image (corrupt, truncated or unsupported file: {message})") \
            from None


def _decode(data: bytes, header: _Header, what: str) -> np.ndarray:
    """Decodes with TF (first frame of animations, 16-bit PNG kept at 16 bits), else with Pillow."""
    if header.tf_decodes:
        try:
            if header.format == "PNG":
                return tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy()
            return tf.io.decode_image(data, channels=0, expand_animations=False).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.InternalError):
            pass  # a file TF rejects (e.g. a truncated one); Pillow decides if it is usable
    return _decode_with_pillow(data, what)


def _load_path(path: str | os.PathLike, max_pixels: int, min_size: int) -> np.ndarray:
    fs_path = os.fspath(path)
    what = _display(fs_path)
    if not os.path.exists(fs_path):
        raise InputError(f"{what}: {missing_reason(fs_path)}")
    if os.path.isdir(fs_path):
        raise InputError(f"{what}: is a directory, not an image file")
    try:
        info = os.stat(fs_path)
    except OSError as err:
        raise InputError(f"{what}: cannot read the file ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero would never end
        raise InputError(f"{what}: not a regular file (a device, FIFO or socket)")
    if info.st_size > 8 * max_pixels + (1 << 20):  # 8 bytes/pixel: uncompressed 16-bit RGBA, plus headers
        raise InputError(f"{what}: the file has {info.st_size:,} bytes, too many for max_pixels={max_pixels:,}; "
                         "pass a larger max_pixels (CLI: --max_pixels) if you trust it")
    try:
        with open(fs_path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InputError(f"{what}: cannot read the file ({err.strerror or err})") from None
    if not data:
        raise InputError(f"{what}: the file is empty")
    header = _header(data, what)
    width, height = header.width, header.height
    if width <= 0 or height <= 0:
        raise InputError(f"{what}: the header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"{what}: the header declares {width}x{height} = {width * height:,} pixels, above "
                         f"max_pixels={max_pixels:,}; pass a larger max_pixels (CLI: --max_pixels) if you trust it")
    if header.format == "JPEG":
        short = _jpeg_too_short(data, width, height)
        if short is not None:
            raise InputError(f"{what}: {short}")
    array = _to_rgb_uint8(_decode(data, header, what), what)
    if header.orientation != 1:
        array = _upright(array, header.orientation)
    return _check_size(array, what, min_size)


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """One source image as ``uint8 (H, W, 3)`` RGB, upright.

    Args:
      src: a path (``str`` / ``os.PathLike``) to a JPEG, PNG, GIF (first frame), BMP or any other file Pillow
        reads; or a numpy array / ``tf.Tensor`` of shape ``(H, W)``, ``(H, W, 1|2|3|4)`` and dtype ``uint8``,
        ``uint16`` or float in ``[0, 1]``. Gray is replicated to RGB; alpha is dropped.
      max_pixels: refuse files whose header declares more pixels (decompression-bomb guard).
      min_size: refuse images whose shorter side is smaller.

    Raises:
      InputError: with a one-line message naming the file, for anything unusable.
    """
    max_pixels = validation.positive_int("max_pixels", max_pixels)
    min_size = validation.positive_int("min_size", min_size)
    if isinstance(src, tf.Tensor):
        if not tf.executing_eagerly():
            raise InputError("load_image needs an eager tensor (call it outside tf.function)")
        return _check_size(_to_rgb_uint8(src.numpy(), "tensor image"), "tensor image", min_size)
    if isinstance(src, np.ndarray):
        if src.ndim == 4:
            raise InputError(f"array image: got a batch of shape {src.shape}; use load_images for several images")
        return _check_size(_to_rgb_uint8(src, "array image"), "array image", min_size)
    if isinstance(src, (str, os.PathLike)):
        if isinstance(src, str) and not src:
            raise InputError("empty image path")
        return _load_path(src, max_pixels, min_size)
    raise InputError(f"an image must be a file path, a numpy array or a tf.Tensor, got {type(src).__name__}")


def load_images(src: ImageSource | Sequence[ImageSource], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_size: int = DEFAULT_MIN_SIZE) -> list[np.ndarray]:
    """Several source images (a list/tuple of sources, a 4-D array/tensor, or one source) as a list of arrays."""
    if isinstance(src, tf.Tensor) and src.shape.rank == 4:
        src = list(src.numpy())
    elif isinstance(src, np.ndarray) and src.ndim == 4:
        src = list(src)
    if isinstance(src, (list, tuple)):
        if not src:
            raise InputError("no source images given (empty list)")
        return [load_image(s, max_pixels=max_pixels, min_size=min_size) for s in src]
    return [load_image(src, max_pixels=max_pixels, min_size=min_size)]
