"""The augmentation recipe: how patches are cut from the source image(s), and each setting's valid range.

Kept free of TensorFlow so that the command line's ``--help`` (which prints these ranges) stays instant; the
renderer that applies a recipe is :mod:`keras_oneimage.data.augment`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from keras_oneimage.errors import InputError


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of one :class:`AugmentConfig` field, and what the field means.

    ``low`` is excluded when ``low_open`` (a crop area of 0 is no crop); ``high`` may be ``math.inf``. The tuner's
    search space (:mod:`keras_oneimage.tuning.space`) and the CLI help read these, so a range is written once.
    """

    low: float
    high: float = math.inf
    low_open: bool = False
    doc: str = ""

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def requirement(self) -> str:
        """``"in (0, 1]"`` or ``">= 0"``: what an error message says a value must be."""
        return self.interval() if math.isinf(self.high) else f"in {self.interval()}"

    def interval(self) -> str:
        """``"(0, 1]"``, ``"[0, 180]"`` or ``">= 0"``, for messages and help texts."""
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


#: Every AugmentConfig field's valid range (β, γ and the rest; Asano et al. 2020, §3).
RANGES: dict[str, Range] = {
    "min_area": Range(0.0, 1.0, low_open=True, doc="β: smallest crop area fraction"),
    "max_area": Range(0.0, 1.0, low_open=True, doc="largest crop area fraction"),
    "aspect": Range(0.0, 1.0, low_open=True, doc="γ: aspect ratios in [γ, 1/γ]"),
    "max_rotation": Range(0.0, 180.0, doc="rotations uniform in ± degrees"),
    "flip_prob": Range(0.0, 1.0, doc="horizontal flip probability"),
    "color": Range(0.0, doc="std of the random colour matrix"),
    "brightness": Range(0.0, 1.0, doc="brightness offset range"),
    "contrast": Range(0.0, 1.0, doc="contrast factor range"),
    "noise_std": Range(0.0, doc="gaussian pixel noise (max std)"),
    "blur_sigma": Range(0.0, 8.0, doc="gaussian blur (max sigma, output pixels)"),
}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """How patches are cut from the source image(s); defaults follow Asano et al. (ICLR 2020).

    Attributes:
      min_area: β, smallest crop as a fraction of the source area, §3 ("down to 1e-4 of the image"); never
        below one source pixel.
      max_area: largest crop fraction (1 = whole image, §3).
      aspect: γ, crop aspect ratios (width/height) are log-uniform in [γ, 1/γ], §3 (γ = 3/4).
      max_rotation: degrees; angles are uniform in ±max_rotation (§3 uses random rotations, ±35° here).
      flip_prob: probability of a horizontal flip (§3, 0.5).
      color: std of the random 3x3 colour matrix around the identity (§3 colour jitter).
      brightness: additive brightness offset, uniform in ±brightness (§3 colour jitter).
      contrast: contrast factor, uniform in [1 - contrast, 1 + contrast] (§3 colour jitter).
      noise_std: gaussian pixel noise; each patch draws its std uniformly in [0, noise_std] (off by default).
      blur_sigma: gaussian blur in output pixels; each patch draws sigma uniformly in [0, blur_sigma] (off).
    """

    min_area: float = 1e-4
    max_area: float = 1.0
    aspect: float = 3 / 4
    max_rotation: float = 35.0
    flip_prob: float = 0.5
    color: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2
    noise_std: float = 0.0
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise InputError(f"AugmentConfig.{field.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InputError(f"AugmentConfig.{field.name} must be finite, got {value!r}")
            object.__setattr__(self, field.name, float(value))
        for name, valid in RANGES.items():
            if not valid.contains(getattr(self, name)):
                raise InputError(f"bad AugmentConfig: {name} must be {valid.requirement()} (got {self})")
        if self.min_area > self.max_area:
            raise InputError(f"bad AugmentConfig: min_area (β) must not exceed max_area (got {self})")

    def scaled(self, strength: float) -> "AugmentConfig":
        """The same recipe at another strength: 0 = the whole image, unaugmented; 1 = these settings.

        Areas and aspect limits scale geometrically (``min_area ** strength`` relative to ``max_area``,
        ``aspect ** strength``), the others linearly; results are clamped to valid ranges, and the flip
        probability never rises above ``max(flip_prob, 0.5)``.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
                or strength < 0:
            raise InputError(f"augmentation strength must be a finite number >= 0, got {strength!r}")
        s = float(strength)
        max_area = self.max_area ** min(s, 1.0)
        min_area = max(max_area * (self.min_area / self.max_area) ** s, 1e-12)
        return dataclasses.replace(
            self,
            min_area=min(min_area, max_area),
            max_area=max_area,
            aspect=self.aspect ** s,
            max_rotation=min(self.max_rotation * s, RANGES["max_rotation"].high),
            flip_prob=min(self.flip_prob * s, max(self.flip_prob, 0.5)),
            color=self.color * s,
            brightness=min(self.brightness * s, RANGES["brightness"].high),
            contrast=min(self.contrast * s, RANGES["contrast"].high),
            noise_std=self.noise_std * s,
            blur_sigma=min(self.blur_sigma * s, RANGES["blur_sigma"].high),
        )
