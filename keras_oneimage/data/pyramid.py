"""Mip pyramids of the source images and trilinear sampling from them (anti-aliased patch extraction).

A crop of a 2560-pixel image shrunk to a 64-pixel patch covers ~40 source pixels per output pixel; a bare
bilinear gather would then alias (moiré). Instead each source is reduced once into a pyramid of 2x box (area)
downsamples, and every output pixel reads the two levels whose texel size brackets its footprint and blends
them (trilinear filtering, as in texture mapping).

Layout, built for XLA on CPU (where gathers dominate and fused per-channel code recomputes addresses):

* every level of every source is flattened into ONE ``int32`` buffer of texels packed ``R | G << 8 | B << 16``
  with a small ``(source, level) -> (offset, width, height)`` table, so any level of any source is addressed
  arithmetically (no per-level branches) and read with scalar gathers (4 bytes per texel: Image A's pyramid
  takes 26 MB; storing pre-widened int64 texels measured no faster);
* level ``l`` covers the source with texels ``2**l`` source pixels wide (odd sides are edge-replicated before
  halving), so one continuous source coordinate maps to every level by a scale;
* the 8 texels of a trilinear read are widened to "SWAR" ``int64`` words (R, G, B in 21-bit fields) and
  accumulated with integer weights (1/32 sub-texel, 1/8 level steps, summing to 8192), so all three channels
  cost one integer multiply-add per texel and a pixel is ONE ``int64`` element (fields cannot overflow:
  255 * 8192 < 2**21); :func:`unpack` splits it into RGB.
  Positions are converted to fixed point (1/32 texel) once, so the texel index and its weight are a
  shift and a mask.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

FIELD_BITS = 21  # SWAR field per channel: 255 * 8192 < 2**21
SUBTEXEL = 32  # bilinear weight steps per texel along each axis
LEVEL_STEPS = 8  # blend steps between two pyramid levels
WEIGHT_SUM = SUBTEXEL * SUBTEXEL * LEVEL_STEPS  # 8192
_LOG2_SUBTEXEL = 5


@dataclasses.dataclass(frozen=True, eq=False)
class Pyramid:
    """Mip pyramids of ``num_sources`` images packed for gather-based trilinear sampling.

    Attributes:
      texels: ``int32 (P,)``: every level of every source, row-major, packed ``R | G << 8 | B << 16``.
      levels: ``int32 (N, L, 3)``: per source and level, ``(offset into texels, width, height)``. Sources
        with fewer levels repeat their last (1x1) level.
      sizes: ``float32 (N, 2)``: ``(height, width)`` of each source at level 0.
      num_sources: ``N``.
      num_levels: ``L``, the most levels of any source (the last level of every source is 1x1).
    """

    texels: tf.Tensor
    levels: tf.Tensor
    sizes: tf.Tensor
    num_sources: int
    num_levels: int

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every source image."""
        return [(int(h), int(w)) for h, w in self.sizes.numpy()]


def _halve(level: np.ndarray) -> np.ndarray:
    """2x box (area) downsample of a float ``(H, W, 3)`` array; odd sides are edge-replicated first."""
    h, w = level.shape[:2]
    if h % 2 or w % 2:
        level = np.pad(level, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return 0.25 * (level[0::2, 0::2] + level[1::2, 0::2] + level[0::2, 1::2] + level[1::2, 1::2])


def _pack(level_u8: np.ndarray) -> np.ndarray:
    """``int32 (H * W,)`` texels ``R | G << 8 | B << 16`` of a uint8 ``(H, W, 3)`` level."""
    px = level_u8.reshape(-1, 3).astype(np.int32)
    return px[:, 0] | (px[:, 1] << 8) | (px[:, 2] << 16)


def build_pyramid(images: Sequence[np.ndarray] | np.ndarray) -> Pyramid:
    """Builds the packed mip pyramids of ``uint8 (H, W, 3)`` source images (once, with numpy).

    Levels are halved until both sides are one pixel. The float average of each level feeds the next, so
    rounding to ``uint8`` happens once per level.
    """
    if isinstance(images, np.ndarray):
        images = [images]
    chunks, tables, sizes = [], [], []
    offset = 0
    for image in images:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"build_pyramid wants uint8 (H, W, 3) arrays, got {image.dtype} {image.shape}")
        sizes.append(image.shape[:2])
        level = image.astype(np.float32)
        level_u8 = image
        table = []
        while True:
            h, w = level_u8.shape[:2]
            chunks.append(_pack(level_u8))
            table.append((offset, w, h))
            offset += h * w
            if h == 1 and w == 1:
                break
            level = _halve(level)
            level_u8 = np.clip(np.rint(level), 0, 255).astype(np.uint8)
        tables.append(table)
    if offset >= 2**31 - 2**20:
        raise ValueError(f"the source pyramids hold {offset} texels, more than int32 indexing allows")
    num_levels = max(len(t) for t in tables)
    table_arr = np.array([t + [t[-1]] * (num_levels - len(t)) for t in tables], dtype=np.int32)
    return Pyramid(
        texels=tf.constant(np.concatenate(chunks)),
        levels=tf.constant(table_arr),
        sizes=tf.constant(np.array(sizes, dtype=np.float32)),
        num_sources=len(tables),
        num_levels=num_levels,
    )


def _shift(t: tf.Tensor, bits: int) -> tf.Tensor:
    """``t << bits`` (``bits < 0``: right shift) for int64 tensors."""
    if bits >= 0:
        return tf.bitwise.left_shift(t, tf.constant(bits, t.dtype))
    return tf.bitwise.right_shift(t, tf.constant(-bits, t.dtype))


def sample_packed(pyramid: Pyramid, source: tf.Tensor, u: tf.Tensor, v: tf.Tensor, lod: tf.Tensor) -> tf.Tensor:
    """Trilinear reads of the pyramid, one packed ``int64`` per pixel (see :func:`unpack`).

    Args:
      pyramid: from :func:`build_pyramid`.
      source: ``int32 (B,)`` source index of each patch.
      u, v: ``float32 (B, S, S)`` positions as fractions of the source width / height (0 = left / top edge,
        1 = right / bottom edge); outside ``[0, 1]`` they clamp to the edge texels.
      lod: ``float32 (B,)`` level of detail, ``log2`` of the footprint in source pixels per output pixel;
        clamped to ``[0, L - 1]`` (below 0 is plain bilinear magnification from level 0).

    Returns:
      ``int64 (B, S, S)``: R, G, B weighted sums in 21-bit fields, scaled by ``255 * WEIGHT_SUM``.
    """
    last = float(pyramid.num_levels - 1)
    lod = tf.clip_by_value(lod, 0.0, last)
    base = tf.floor(lod)
    hw = tf.gather(pyramid.sizes, source)
    w1 = tf.cast(tf.round((lod - base) * LEVEL_STEPS), tf.int64)
    acc = None
    for level, level_weight in ((base, LEVEL_STEPS - w1), (tf.minimum(base + 1.0, last), w1)):
        table = tf.gather_nd(pyramid.levels, tf.stack([source, tf.cast(level, tf.int32)], axis=-1))
        offset, width = table[:, 0, None, None], table[:, 1, None, None]
        scale = tf.pow(2.0, -level) * SUBTEXEL

        def fixed(t, extent, size):
            # Texel centres sit at integer + 0.5 level pixels; clamp to the edge centres, then to 1/32 texel.
            pos = t * (extent * scale)[:, None, None] - 0.5 * SUBTEXEL
            last_centre = tf.cast((size - 1) * SUBTEXEL, tf.float32)
            return tf.cast(tf.clip_by_value(pos, 0.0, last_centre) + 0.5, tf.int32)

        xf = fixed(u, hw[:, 1], table[:, 1, None, None])
        yf = fixed(v, hw[:, 0], table[:, 2, None, None])
        wx1 = tf.cast(xf & (SUBTEXEL - 1), tf.int64)
        wy1 = tf.cast(yf & (SUBTEXEL - 1), tf.int64)
        i00 = offset + tf.bitwise.right_shift(yf, _LOG2_SUBTEXEL) * width + tf.bitwise.right_shift(xf, _LOG2_SUBTEXEL)
        i01 = i00 + width
        # On the last column/row the +1 neighbour is another row/level (or clamped past the end) but its
        # weight is exactly 0 there, since the position was clamped to the last texel centre.
        def fetch(index):
            return _widen(tf.gather(pyramid.texels, index))

        top = (SUBTEXEL - wx1) * fetch(i00) + wx1 * fetch(i00 + 1)
        bot = (SUBTEXEL - wx1) * fetch(i01) + wx1 * fetch(i01 + 1)
        term = level_weight[:, None, None] * ((SUBTEXEL - wy1) * top + wy1 * bot)
        acc = term if acc is None else acc + term
    return acc


def _widen(texel: tf.Tensor) -> tf.Tensor:
    """int32 ``R | G << 8 | B << 16`` -> int64 ``R | G << 21 | B << 42``."""
    t = tf.cast(texel, tf.int64)
    return (t & 0xFF) | _shift(t & 0xFF00, FIELD_BITS - 8) | _shift(t & 0xFF0000, 2 * FIELD_BITS - 16)


def unpack_channels(packed: tf.Tensor) -> list[tf.Tensor]:
    """``int64`` from :func:`sample_packed` -> ``[R, G, B]`` float32 tensors of the same shape, in ``[0, 1]``."""
    mask = (1 << FIELD_BITS) - 1
    scale = 1.0 / (255.0 * WEIGHT_SUM)
    return [tf.cast(_shift(packed, -FIELD_BITS * c) & mask, tf.float32) * scale for c in range(3)]


def unpack(packed: tf.Tensor) -> tf.Tensor:
    """``int64 (...)`` from :func:`sample_packed` -> ``float32 (..., 3)`` RGB in ``[0, 1]``."""
    return tf.stack(unpack_channels(packed), axis=-1)


def sample(pyramid: Pyramid, source: tf.Tensor, u: tf.Tensor, v: tf.Tensor, lod: tf.Tensor) -> tf.Tensor:
    """``unpack(sample_packed(...))``: ``float32 (B, S, S, 3)`` RGB in ``[0, 1]``."""
    return unpack(sample_packed(pyramid, source, u, v, lod))
