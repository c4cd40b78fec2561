"""The search space: which augmentation settings a search may vary, over what ranges, and what a trial's values mean.

A space is a plain dict ``{name: spec}``. The specs are declarations, not a second hyper-parameter system: each one
declares itself on a ``keras_tuner.HyperParameters`` (:func:`hyperparameters_for`), which does the sampling. What a
name may take is one table, :data:`PARAMETERS`: the :class:`~keras_oneimage.data.recipe.AugmentConfig` fields with
their valid ranges read from ``recipe.RANGES`` (never copied), plus three tuner-only names:

* ``strength``: global scale of the whole recipe (:meth:`AugmentConfig.scaled`), applied last;
* ``flip`` (bool): flips on (the base ``flip_prob``) or off;
* ``color_jitter``: multiplies the base ``color``, ``brightness`` and ``contrast`` together.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import keras_tuner

from keras_oneimage.data.recipe import RANGES, AugmentConfig, Range
from keras_oneimage.errors import InputError

#: Keras Tuner's bookkeeping entries in a trial's values (``tuner/epochs``, ``tuner/trial_id``, ...).
HP_PREFIX = "tuner/"


# ------------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Parameter:
    """What a search-space name means: a number within ``valid``, or an on/off switch (``valid`` is None)."""

    valid: Range | None

    @property
    def kind(self) -> str:
        return "bool" if self.valid is None else "float"

    @property
    def doc(self) -> str:
        return "horizontal flips on (base flip_prob) or off" if self.valid is None else self.valid.doc


#: Every name a search space may use. The searched ``strength`` and ``color_jitter`` are capped: beyond these caps
#: every setting they scale sits at its own limit.
PARAMETERS: dict[str, Parameter] = {
    "strength": Parameter(Range(0.0, 4.0, doc="global strength, AugmentConfig.scaled(); applied last")),
    **{name: Parameter(valid) for name, valid in RANGES.items()},
    "flip": Parameter(None),
    "color_jitter": Parameter(Range(0.0, 5.0, doc="multiplies the base color, brightness and contrast")),
}

#: Coarse names and the fine-grained fields they set: a space may name one side only.
_CONFLICTS = (("flip", ("flip_prob",)), ("color_jitter", ("color", "brightness", "contrast")))


def _checked(name: str, value: Any, what: str) -> Any:
    """``value`` if parameter ``name`` can take it (a bool for ``flip``, else a finite number in its range)."""
    param = PARAMETERS[name]
    if param.valid is None:
        if not isinstance(value, bool):
            raise InputError(f"search space {name!r}: {what} must be True or False, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"search space {name!r}: {what} must be a finite number, got {value!r}")
    if not param.valid.contains(float(value)):
        valid = param.valid.interval() if math.isfinite(param.valid.high) else f"the valid range {param.valid.interval()}"
        raise InputError(f"search space {name!r}: {what} {float(value)!r} is outside {valid}")
    return float(value)


# ------------------------------------------------------------------------------------------------- the specs
@dataclasses.dataclass(frozen=True)
class Fixed:
    """A parameter held at ``value`` (it is recorded in every trial, but never searched)."""

    value: Any

    def checked(self, name: str) -> "Fixed":
        return Fixed(_checked(name, self.value, "the fixed value"))

    def declare(self, hp: keras_tuner.HyperParameters, name: str) -> None:
        hp.Fixed(name, self.value)


@dataclasses.dataclass(frozen=True)
class Float:
    """A real parameter drawn from ``[low, high]`` (log-uniformly when ``log``)."""

    low: float
    high: float
    log: bool = False
    default: float | None = None

    def checked(self, name: str) -> "Float":
        if PARAMETERS[name].valid is None:
            raise InputError(f"search space {name!r} is on/off; use Boolean(), Fixed(True/False) or "
                             "Choice([True, False])")
        low, high = _checked(name, self.low, "low"), _checked(name, self.high, "high")
        if not low < high:
            raise InputError(f"search space {name!r}: Float needs low < high, got {low!r}, {high!r} "
                             "(use Fixed for one value)")
        if self.log and low <= 0:
            raise InputError(f"search space {name!r}: a log-scale Float needs low > 0, got {low!r}")
        default = None if self.default is None else _checked(name, self.default, "the default")
        if default is not None and not low <= default <= high:
            raise InputError(f"search space {name!r}: default {default!r} is outside [{low!r}, {high!r}]")
        return Float(low, high, bool(self.log), default)

    def declare(self, hp: keras_tuner.HyperParameters, name: str) -> None:
        hp.Float(name, self.low, self.high, sampling="log" if self.log else "linear",
                 **({} if self.default is None else {"default": self.default}))


@dataclasses.dataclass(frozen=True)
class Choice:
    """A parameter taking one of ``values``."""

    values: tuple
    default: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.values, (str, bytes)) or not isinstance(self.values, Sequence):
            raise InputError(f"Choice needs a list of values, got {self.values!r}")
        object.__setattr__(self, "values", tuple(self.values))

    def checked(self, name: str) -> "Choice":
        values = tuple(_checked(name, v, "a choice") for v in self.values)
        if not values:
            raise InputError(f"search space {name!r}: Choice needs at least one value")
        if len(set(values)) != len(values):
            raise InputError(f"search space {name!r}: Choice values repeat: {list(values)}")
        default = None if self.default is None else _checked(name, self.default, "the default")
        if default is not None and default not in values:
            raise InputError(f"search space {name!r}: default {default!r} is not one of {list(values)}")
        return Choice(values, default)

    def declare(self, hp: keras_tuner.HyperParameters, name: str) -> None:
        if PARAMETERS[name].valid is None:  # Keras Tuner's Choice turns bools into ints: use its Boolean
            if len(self.values) == 1:
                hp.Fixed(name, self.values[0])
            else:
                hp.Boolean(name, default=True if self.default is None else self.default)
            return
        hp.Choice(name, list(self.values), **({} if self.default is None else {"default": self.default}))


@dataclasses.dataclass(frozen=True)
class Boolean:
    """An on/off parameter (``flip``)."""

    default: bool = True

    def checked(self, name: str) -> "Boolean":
        if PARAMETERS[name].valid is not None:
            raise InputError(f"search space {name!r} is a number; Boolean() only fits 'flip'")
        return Boolean(_checked(name, self.default, "the default"))

    def declare(self, hp: keras_tuner.HyperParameters, name: str) -> None:
        hp.Boolean(name, default=self.default)


Spec = Fixed | Float | Choice | Boolean

#: The space searched when ``search_space`` is not given (each entry can be overridden or dropped).
DEFAULT_SEARCH_SPACE: dict[str, Spec] = {
    "strength": Float(0.25, 1.5, default=1.0),
    "min_area": Float(1e-5, 1e-1, log=True, default=1e-4),
    "max_rotation": Float(0.0, 60.0, default=35.0),
    "color_jitter": Float(0.0, 2.0, default=1.0),
    "flip": Boolean(default=True),
}

#: Ranges worth adding for the optional components (they are off in the paper's recipe).
SUGGESTED_EXTRAS: dict[str, Spec] = {
    "noise_std": Float(0.0, 0.1),
    "blur_sigma": Float(0.0, 2.0),
    "aspect": Float(0.5, 1.0),
}


# ------------------------------------------------------------------------------------------ building a space
def _as_spec(name: str, value: Any) -> Spec | None:
    if value is None or isinstance(value, (Fixed, Float, Choice, Boolean)):
        return value
    if isinstance(value, (bool, int, float, str)):
        return Fixed(value)
    if isinstance(value, (list, tuple)):
        return Choice(tuple(value))
    raise InputError(
        f"search space entry {name!r} must be Fixed(v), Float(lo, hi), Choice([...]), Boolean(), a value, a list "
        f"or None; got {value!r}"
    )


def resolve_search_space(overrides: Mapping[str, Any] | None = None) -> dict[str, Spec]:
    """:data:`DEFAULT_SEARCH_SPACE` with ``overrides`` applied and checked; ``None`` values drop a parameter.

    An override is a spec (:class:`Fixed`, :class:`Float`, :class:`Choice`, :class:`Boolean`), a plain value
    (shorthand for ``Fixed``), a list (shorthand for ``Choice``) or ``None``. Raises :class:`InputError` for an
    unknown name, a value outside the parameter's valid range, or two parameters that set the same thing
    (``flip`` with ``flip_prob``; ``color_jitter`` with ``color``/``brightness``/``contrast``).
    """
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise InputError(f"search_space must be a dict {{name: spec}}, got {type(overrides).__name__}")
    space: dict[str, Spec] = dict(DEFAULT_SEARCH_SPACE)
    for name, value in overrides.items():
        if name not in PARAMETERS:
            raise InputError(f"unknown search space parameter {name!r}; choose from {', '.join(PARAMETERS)}")
        spec = _as_spec(name, value)
        if spec is None:
            space.pop(name, None)
        else:
            space[name] = spec
    for coarse, fine in _CONFLICTS:
        clash = [f for f in fine if f in space]  # never defaults: the user added them
        if coarse in space and clash:
            if coarse in overrides:
                raise InputError(f"search space: {coarse!r} and {clash} set the same augmentation; drop one (None)")
            space.pop(coarse)  # the user named the fine-grained parameters: they replace the default coarse one
    return {name: spec.checked(name) for name, spec in space.items()}


def parse_search_space(text: str) -> dict[str, Spec | None]:
    """Overrides from a command-line string such as ``"strength=1, min_area=1e-4..0.1:log, max_rotation=-"``.

    Comma-separated entries: ``name=-`` drops, ``name=lo..hi`` is a Float (``:log`` for log scale),
    ``name=a|b|c`` a Choice, ``name=v`` a Fixed value; ``true``/``false`` are booleans.
    """

    def scalar(token: str) -> Any:
        token = token.strip()
        if token.lower() in ("true", "false"):
            return token.lower() == "true"
        try:
            return float(token)
        except ValueError:
            raise InputError(f"search space: cannot read {token!r} as a number or true/false") from None

    out: dict[str, Spec | None] = {}
    for entry in (e.strip() for e in (text or "").split(",")):
        if not entry:
            continue
        name, sep, rhs = entry.partition("=")
        name, rhs = name.strip(), rhs.strip()
        if not sep or not name or not rhs:
            raise InputError(f"search space entry {entry!r} is not name=value")
        if rhs == "-":
            out[name] = None
        elif ".." in rhs:
            body, _, flag = rhs.partition(":")
            if flag not in ("", "log"):
                raise InputError(f"search space entry {entry!r}: only ':log' may follow a range")
            low, _, high = body.partition("..")
            out[name] = Float(scalar(low), scalar(high), log=flag == "log")
        elif "|" in rhs:
            out[name] = Choice(tuple(scalar(v) for v in rhs.split("|")))
        else:
            out[name] = Fixed(scalar(rhs))
    return out


def hyperparameters_for(space: Mapping[str, Spec]) -> keras_tuner.HyperParameters:
    """The Keras Tuner ``HyperParameters`` on which every entry of a resolved ``space`` is declared."""
    hp = keras_tuner.HyperParameters()
    for name, spec in space.items():
        spec.declare(hp, name)
    return hp


def space_description(space: Mapping[str, Spec]) -> dict[str, dict[str, Any]]:
    """JSON-able ``{name: {"type": ..., ...}}`` of a resolved space (recorded with the project)."""
    return {
        name: {"type": type(spec).__name__, **{k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in dataclasses.asdict(spec).items()}}
        for name, spec in space.items()
    }


# ------------------------------------------------------------------------------------------- a trial's values
def search_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without Keras Tuner's bookkeeping entries (``tuner/epochs``, ``tuner/trial_id``, ...)."""
    return {k: v for k, v in values.items() if not k.startswith(HP_PREFIX)}


def augment_from_values(values: Mapping[str, Any], base: AugmentConfig | None = None) -> AugmentConfig:
    """The :class:`AugmentConfig` for one trial's hyper-parameter ``values`` (``tuner/*`` entries are ignored).

    Order: the base recipe (paper defaults when ``None``) → the fields named in ``values`` → ``flip`` →
    ``color_jitter`` → ``.scaled(strength)``. Raises :class:`InputError` if the result is not a valid recipe
    (for instance ``min_area`` above ``max_area``).
    """
    base = AugmentConfig() if base is None else base
    values = search_values(values)
    unknown = [k for k in values if k not in PARAMETERS]
    if unknown:
        raise InputError(f"unknown augmentation parameter(s) {unknown}")
    config = dataclasses.replace(base, **{k: float(v) for k, v in values.items() if k in RANGES})
    if "flip" in values:
        config = dataclasses.replace(config, flip_prob=base.flip_prob if values["flip"] else 0.0)
    if "color_jitter" in values:
        j = float(values["color_jitter"])
        config = dataclasses.replace(
            config, color=base.color * j, brightness=min(base.brightness * j, RANGES["brightness"].high),
            contrast=min(base.contrast * j, RANGES["contrast"].high),
        )  # fmt: skip
    if "strength" in values:
        config = config.scaled(float(values["strength"]))
    return config
