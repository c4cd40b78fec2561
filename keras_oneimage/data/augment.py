"""The batched patch sampler (one inverse affine map per patch, no per-patch loop) that renders a recipe.

The recipe itself, :class:`AugmentConfig` and each setting's valid range (``RANGES``), lives in
:mod:`keras_oneimage.data.recipe` (no TensorFlow) and is re-exported here.

The paper (§3, "Data augmentation") builds its training set by taking random crops of a single image down to
a fraction β of its area with aspect ratios in [γ, 1/γ] (RandomResizedCrop), random rotations, flips and
colour jitter. :class:`PatchSampler` draws those parameters for a whole batch with stateless Philox RNG and
renders every patch by mapping each output pixel back into the source through one composed affine map (flip,
anisotropic scale, rotation, translation) followed by one trilinear read of the source pyramid
(:mod:`keras_oneimage.data.pyramid`), then a per-pixel linear colour transform. Everything is batched
arithmetic and gathers (no crop_and_resize / ImageProjectiveTransform, which have no XLA:CPU kernels), so
it compiles with XLA on CPU and GPU.

Edge handling: the axis-aligned crop always lies inside the image (as in RandomResizedCrop); only the corners
of a rotated crop can leave it, and those read the image mirrored about its border (reflection), which keeps
textures continuous instead of smearing edge pixels or filling black.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from keras_oneimage.data import pyramid as pyramid_lib
from keras_oneimage.data.recipe import RANGES, AugmentConfig, Range  # noqa: F401  (their home is recipe.py)
from keras_oneimage.errors import InputError

ALG = "philox"  # the default "auto_select" is ~35x slower under XLA on CPU


_UNIFORMS = ("source", "area", "aspect", "cx", "cy", "angle", "flip", "bright", "contrast", "blur", "noise")


_NOISE_KEY = 0x5DEECE66D  # xor-ed into the seed's key word: an independent stream for pixel noise


def _seed_tensor(seed: Any) -> tf.Tensor:
    """A shape-``[2]`` int64 stateless seed from an ``int`` or a shape-``[2]`` integer tensor."""
    if isinstance(seed, (int, np.integer)):
        seed = [int(seed), 0]
    return tf.cast(tf.convert_to_tensor(seed), tf.int64)


class PatchSampler:
    """Draws and renders augmented patches, in the style of a Keras preprocessing layer.

    ``get_random_transformation`` returns the per-patch parameters; ``transform`` renders them. Both are pure
    functions of their inputs (stateless RNG), so the same seed always gives the same patches.
    """

    def __init__(self, augment: AugmentConfig | None = None):
        self.augment = augment if augment is not None else AugmentConfig()
        if not isinstance(self.augment, AugmentConfig):
            raise InputError(f"augment must be an AugmentConfig, got {type(augment).__name__}")

    def get_random_transformation(self, batch_size: int, seed: Any,
                                  pyramid: pyramid_lib.Pyramid | None = None) -> dict[str, tf.Tensor]:
        """Per-patch parameters for a batch.

        Args:
          batch_size: patches to draw.
          seed: ``int`` or shape-``[2]`` integer tensor (stateless Philox seed).
          pyramid: the sources; their count and shapes bound the crops. Without it: one square source.

        Returns:
          dict of ``(B, ...)`` tensors: ``source`` (int32 index), ``center`` (x, y as fractions of the source
          width/height), ``area`` (crop area / source area), ``aspect`` (crop width / height in pixels),
          ``angle`` (radians), ``flip`` (bool), ``color_matrix`` (3x3), ``brightness``, ``contrast``,
          ``blur_sigma``, ``noise_std``, and ``noise_seed`` (shape ``[2]``).
        """
        cfg = self.augment
        b = int(batch_size)
        seed = _seed_tensor(seed)
        # ONE Philox call draws every per-patch number (each Philox op adds ~1 s of XLA:CPU compile time);
        # the colour matrix normals come from the last 10 uniforms by Box-Muller.
        draws = tf.random.stateless_uniform((len(_UNIFORMS) + 10, b), seed, alg=ALG)
        column = dict(zip(_UNIFORMS, tf.unstack(draws[:len(_UNIFORMS)])))
        radius = tf.sqrt(-2.0 * tf.math.log(1.0 - draws[len(_UNIFORMS)::2]))  # (5, B); 1 - u is in (0, 1]
        turn = 2.0 * math.pi * draws[len(_UNIFORMS) + 1::2]
        normals = tf.concat([radius * tf.cos(turn), radius * tf.sin(turn)], axis=0)[:9]  # (9, B)
        color_noise = tf.reshape(tf.transpose(normals), (b, 3, 3))

        def uniform(name, lo=0.0, hi=1.0):
            return lo + (hi - lo) * column[name]

        if pyramid is None:
            num_sources, sizes = 1, tf.constant([[1e4, 1e4]], tf.float32)
        else:
            num_sources, sizes = pyramid.num_sources, pyramid.sizes
        source = tf.minimum(tf.cast(column["source"] * num_sources, tf.int32), num_sources - 1)
        hw = tf.gather(sizes, source)
        height, width = hw[:, 0], hw[:, 1]
        ratio = width / height  # R
        gamma = cfg.aspect
        # Largest area with some aspect in [γ, 1/γ] that fits: a <= R/γ and a <= 1/(γR).
        area_hi = tf.minimum(tf.minimum(cfg.max_area, ratio / gamma), 1.0 / (gamma * ratio))
        area_lo = tf.minimum(tf.maximum(cfg.min_area, 1.0 / (height * width)), area_hi)
        area = area_lo + (area_hi - area_lo) * uniform("area")
        # Aspects r keeping the crop inside: a*R <= r <= R/a, intersected with [γ, 1/γ]; log-uniform.
        log_lo = tf.math.log(tf.maximum(gamma, area * ratio))
        log_hi = tf.math.log(tf.maximum(tf.minimum(1.0 / gamma, ratio / area), tf.maximum(gamma, area * ratio)))
        aspect = tf.exp(log_lo + (log_hi - log_lo) * uniform("aspect"))
        crop_w = tf.minimum(tf.sqrt(area * aspect / ratio), 1.0)  # fractions of the source width / height
        crop_h = tf.minimum(tf.sqrt(area * ratio / aspect), 1.0)
        center = tf.stack([crop_w / 2 + (1 - crop_w) * uniform("cx"), crop_h / 2 + (1 - crop_h) * uniform("cy")], -1)
        max_angle = math.radians(cfg.max_rotation)
        return {
            "source": source,
            "center": center,
            "area": area,
            "aspect": aspect,
            "angle": uniform("angle", -max_angle, max_angle),
            "flip": uniform("flip") < cfg.flip_prob,
            "color_matrix": tf.eye(3, batch_shape=[b]) + cfg.color * color_noise,
            "brightness": uniform("bright", -cfg.brightness, cfg.brightness),
            "contrast": uniform("contrast", 1.0 - cfg.contrast, 1.0 + cfg.contrast),
            "blur_sigma": uniform("blur", 0.0, cfg.blur_sigma),
            "noise_std": uniform("noise", 0.0, cfg.noise_std),
            "noise_seed": tf.stack([tf.bitwise.bitwise_xor(seed[0], _NOISE_KEY), seed[1]]),  # another Philox key
        }

    def transform(self, pyramid: pyramid_lib.Pyramid, params: dict[str, tf.Tensor], image_size: int) -> tf.Tensor:
        """Renders patches: ``float32 (B, S, S, 3)`` in ``[0, 1]``; ``finish(render_packed(...), params)``.

        For speed under XLA, compile the two halves separately (as :func:`~keras_oneimage.data.synthetic.
        patch_dataset` does): fused into one kernel, XLA:CPU recomputes the per-pixel geometry per channel.
        """
        return self.finish(self.render_packed(pyramid, params, image_size), params)

    def render_packed(self, pyramid: pyramid_lib.Pyramid, params: dict[str, tf.Tensor], image_size: int) -> tf.Tensor:
        """Geometry: ``int64 (B, S, S)`` packed RGB (see :func:`keras_oneimage.data.pyramid.unpack`).

        Output pixel ``(i, j)`` sits at ``p = ((j + .5) / S - .5, (i + .5) / S - .5)`` in the unit square. ONE
        inverse affine map per patch sends it to source pixels ``c + Rot(angle) @ diag(crop_w, crop_h) @
        Flip @ p``; positions are reflected into the image and read trilinearly at the patch footprint
        ``max(crop_w, crop_h) / S`` source pixels per output pixel.
        """
        s = int(image_size)
        hw = tf.gather(pyramid.sizes, params["source"])
        height, width = hw[:, 0], hw[:, 1]
        area_px = params["area"] * height * width
        crop_w = tf.sqrt(area_px * params["aspect"])  # source pixels
        crop_h = tf.sqrt(area_px / params["aspect"])
        cos, sin = tf.cos(params["angle"]), tf.sin(params["angle"])
        step_x = crop_w / s * tf.where(params["flip"], -1.0, 1.0)  # source pixels per output pixel
        step_y = crop_h / s
        # (u, v) = source position as fractions of width / height, affine in the output pixel (i, j).
        du_dj, du_di = cos * step_x / width, -sin * step_y / width
        dv_dj, dv_di = sin * step_x / height, cos * step_y / height
        first = 0.5 - s / 2.0  # output pixel centre of index 0, relative to the patch centre
        u0 = params["center"][:, 0] + first * (du_dj + du_di)
        v0 = params["center"][:, 1] + first * (dv_dj + dv_di)
        j = tf.range(s, dtype=tf.float32)[None, None, :]
        i = tf.range(s, dtype=tf.float32)[None, :, None]

        def col(t):
            return t[:, None, None]

        u = _reflect(col(u0) + col(du_dj) * j + col(du_di) * i)
        v = _reflect(col(v0) + col(dv_dj) * j + col(dv_di) * i)
        lod = tf.math.log(tf.maximum(crop_w, crop_h) / s) * (1.0 / math.log(2.0))
        return pyramid_lib.sample_packed(pyramid, params["source"], u, v, lod)

    def finish(self, packed: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
        """Colour: colour matrix, contrast about the patch mean, brightness (blur, noise); clipped to [0, 1].

        ``y = c M x + (1 - c) m + b`` per pixel, with ``m`` the grey mean of ``M x`` over the patch, estimated
        on a grid of about 16 x 16 of its pixels (exact for patches up to 31 pixels).
        """
        cfg = self.augment
        size = packed.shape[1]
        stride = max(1, size // 16)
        mean_rgb = tf.reduce_mean(pyramid_lib.unpack(packed[:, ::stride, ::stride]), axis=[1, 2])  # (B, 3)
        matrix, contrast = params["color_matrix"], params["contrast"]
        grey = tf.reduce_mean(tf.einsum("bcd,bd->bc", matrix, mean_rgb), axis=-1)
        bias = ((1.0 - contrast) * grey + params["brightness"])[:, None, None, None]
        scaled = (matrix * contrast[:, None, None])[:, None, None]  # (B, 1, 1, 3, 3)
        if cfg.blur_sigma > 0:
            rgb = _gaussian_blur(pyramid_lib.unpack(packed), params["blur_sigma"],
                                 radius=max(1, math.ceil(2 * cfg.blur_sigma)))
            channels = [rgb[..., d, None] for d in range(3)]
        else:  # broadcasting from the packed pixel: no per-element channel select, no RGB intermediate
            channels = pyramid_lib.unpack_channels(packed[..., None])
        out = bias + sum(scaled[..., d] * channels[d] for d in range(3))
        if cfg.noise_std > 0:
            noise = tf.random.stateless_normal(tf.shape(out), params["noise_seed"], alg=ALG)
            out = out + noise * params["noise_std"][:, None, None, None]
        return tf.clip_by_value(out, 0.0, 1.0)

    def sample(self, pyramid: pyramid_lib.Pyramid, batch_size: int, seed: Any, image_size: int) -> tf.Tensor:
        """``transform(pyramid, get_random_transformation(batch_size, seed, pyramid), image_size)``."""
        return self.transform(pyramid, self.get_random_transformation(batch_size, seed, pyramid), image_size)


def _reflect(t: tf.Tensor) -> tf.Tensor:
    """Mirrors unit coordinates in [-1, 2] into [0, 1] (a rotated in-image crop never reaches further)."""
    t = tf.abs(t)
    return tf.minimum(t, 2.0 - t)


def _gaussian_blur(rgb: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable per-patch gaussian blur (sigma ``(B,)`` in pixels, 0 = none) with reflected borders."""
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    sig = tf.maximum(sigma, 1e-3)[:, None]
    kernel = tf.exp(-0.5 * tf.square(taps[None, :] / sig))
    kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)  # (B, 2r + 1)
    s = rgb.shape[1]
    padded = tf.pad(rgb, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    rows = sum(kernel[:, k, None, None, None] * padded[:, k:k + s, :, :] for k in range(2 * radius + 1))
    return sum(kernel[:, k, None, None, None] * rows[:, :, k:k + s, :] for k in range(2 * radius + 1))
