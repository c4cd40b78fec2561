"""A corpus of bad and odd image files, written on demand, for the loader and CLI tests.

``make_corpus(dirpath)`` writes every case into ``dirpath`` and returns ``{name: (path, expected)}`` where
``expected`` is ``"error"`` (loading must raise ``InputError``) or ``"ok"`` (it must load). ``HINTS[name]`` is a
lower-case fragment the error message must contain. Nothing large is ever allocated: the decompression bombs
only *declare* huge sizes in their headers.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

# Fragments (lower case) that the InputError message must contain, per error case.
HINTS = {
    "missing": "no such file",
    "directory": "directory",
    "empty": "empty",
    "text_as_jpg": "not",
    "truncated_jpeg": "truncated",
    "png_bad_crc": "crc",
    "tiny_1x1": "min_size",
    "bomb_png": "max_pixels",
    "bomb_jpeg": "max_pixels",
    # issue 17: a header claiming 9000x9000 over 16x16 of data (libjpeg only warns, then fills 243 MB of gray)
    "lying_jpeg": "fewer than the 316,406 such a jpeg needs",
    "symlink_loop": "symlink loop",
    "float_tiff_out_of_range": "[0, 1]",  # mode F holding 0..255: refused, not clipped to a white/black image
}


def pattern(height: int = 24, width: int = 40) -> np.ndarray:
    """A uint8 RGB test card: red ramps left->right, green top->bottom, blue marks the top-left quadrant."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.zeros_like(x)], axis=-1)
    rgb[: height // 2, : width // 2, 2] = 255
    return rgb.astype(np.uint8)


def jpeg_bytes(image: np.ndarray | Image.Image, **save_kw) -> bytes:
    buf = io.BytesIO()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(buf, format="JPEG", quality=95, **save_kw)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png16_bytes(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of a ``uint16 (H, W, 3)`` array (Pillow cannot write these)."""
    height, width = rgb16.shape[:2]
    rows = rgb16.astype(">u2").reshape(height, width * 6 // 2)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose IHDR declares ``width x height`` RGB pixels (the data would not fill it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bomb_jpeg(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small valid JPEG with its frame header (SOF0) patched to declare ``width x height``."""
    data = bytearray(jpeg_bytes(pattern(16, 16)))
    pos = data.index(b"\xff\xc0")
    data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_jpeg(image: np.ndarray, orientation: int) -> bytes:
    """A JPEG of ``image`` (stored as is) whose EXIF says to display it with ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(image, exif=exif.tobytes())


def make_corpus(dirpath: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Writes the corpus into ``dirpath``; returns ``{name: (path, "error" | "ok")}``."""
    root = os.fspath(dirpath)
    os.makedirs(root, exist_ok=True)
    corpus: dict[str, tuple[str, str]] = {}

    def write(name: str, filename: str, data: bytes, expected: str) -> None:
        path = os.path.join(root, filename)
        with open(path, "wb") as f:
            f.write(data)
        corpus[name] = (path, expected)

    card = pattern()
    good_jpeg = jpeg_bytes(card)
    good_png = png_bytes(Image.fromarray(card))

    # --- must fail
    corpus["missing"] = (os.path.join(root, "does_not_exist.jpg"), "error")
    os.makedirs(os.path.join(root, "a_directory.jpg"), exist_ok=True)
    corpus["directory"] = (os.path.join(root, "a_directory.jpg"), "error")
    write("empty", "empty.jpg", b"", "error")
    write("text_as_jpg", "notes.jpg", b"these are my holiday notes, not a photo\n" * 4, "error")
    write("truncated_jpeg", "truncated.jpg", good_jpeg[: len(good_jpeg) * 6 // 10], "error")
    bad_crc = bytearray(good_png)
    idat = bad_crc.index(b"IDAT")
    (length,) = struct.unpack(">I", bad_crc[idat - 4:idat])
    bad_crc[idat + 4 + length] ^= 0xFF  # first byte of the IDAT CRC
    write("png_bad_crc", "bad_crc.png", bytes(bad_crc), "error")
    write("tiny_1x1", "tiny.png", png_bytes(Image.new("RGB", (1, 1), (10, 20, 30))), "error")
    write("bomb_png", "bomb.png", bomb_png(), "error")
    write("bomb_jpeg", "bomb.jpg", bomb_jpeg(), "error")
    write("lying_jpeg", "lying.jpg", bomb_jpeg(9000, 9000), "error")  # 81 Mpx: under max_pixels, over its data
    loop = os.path.join(root, "loop.jpg")
    if not os.path.lexists(loop):
        os.symlink(loop, loop)
    corpus["symlink_loop"] = (loop, "error")
    write("float_tiff_out_of_range", "float255.tif", tiff_bytes(card[..., 0].astype(np.float32)), "error")

    # --- must load
    write("plain_jpeg", "plain.jpg", good_jpeg, "ok")
    non_utf8 = os.path.join(os.fsencode(root), b"caf\xe9_\xff.jpg")
    with open(non_utf8, "wb") as f:
        f.write(good_jpeg)
    corpus["non_utf8_name"] = (os.fsdecode(non_utf8), "ok")
    write("exif_rotated", "exif_rotated.jpg", exif_jpeg(card, 6), "ok")
    cmyk = Image.fromarray(card).convert("CMYK")
    write("cmyk_jpeg", "cmyk.jpg", jpeg_bytes(cmyk), "ok")
    frames = [Image.new("RGB", (40, 24), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    write("animated_gif", "animated.gif", buf.getvalue(), "ok")
    write("png_16bit", "deep16.png", png16_bytes(card.astype(np.uint16) * 257), "ok")
    rgba = np.concatenate([card, np.full(card.shape[:2] + (1,), 128, np.uint8)], axis=-1)
    write("rgba_png", "rgba.png", png_bytes(Image.fromarray(rgba)), "ok")
    write("gray_png", "gray.png", png_bytes(Image.fromarray(card[..., 1])), "ok")
    write("gray_jpeg", "gray.jpg", jpeg_bytes(Image.fromarray(card[..., 1])), "ok")
    buf = io.BytesIO()
    Image.fromarray(card).convert("P").save(buf, format="BMP")
    write("palette_bmp", "palette.bmp", buf.getvalue(), "ok")
    buf = io.BytesIO()
    Image.fromarray(card).save(buf, format="BMP")
    write("rgb_bmp", "rgb.bmp", buf.getvalue(), "ok")
    write("float_tiff", "float01.tif", tiff_bytes(card[..., 0].astype(np.float32) / 255), "ok")  # gray in [0, 1]
    return corpus


def tiff_bytes(gray: np.ndarray) -> bytes:
    """A 32-bit float (Pillow mode "F") TIFF of a 2-D float32 array, as scientific cameras write."""
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.float32)).save(buf, format="TIFF")  # float32 2-D: mode "F"
    return buf.getvalue()
