"""Keras Tuner search over the augmentation recipe, scored by linear probes on a validation split.

Asano et al. (ICLR 2020, §3 and Table 1) find that what a trunk learns from one image hinges on the augmentation:
crop scale (β), aspect ratio (γ), rotations, flips and colour jitter. :func:`tune` searches that recipe with Keras
Tuner: every trial trains a self-supervised method briefly on the source image(s) with one augmentation setting,
then trains linear probes on the frozen trunk and scores them on the **validation** split of a labelled set
(:func:`~keras_oneimage.probes.linear.probe_val`; the test split is never touched). The objective is one layer's
probe accuracy (``"conv2"``) or the mean over several (``"mean:conv1,conv2"``).

The search space is a plain dict ``{name: spec}``; a spec is :class:`Fixed`, :class:`Float`, :class:`Choice`,
:class:`Boolean`, or ``None`` (drop the parameter: it keeps the base recipe's value). ``search_space=`` overrides
:data:`DEFAULT_SEARCH_SPACE` name by name. Parameters (:data:`PARAMETERS`):

* ``strength``: global scale of the whole recipe (:meth:`AugmentConfig.scaled`), applied last;
* ``min_area`` (β), ``max_area``, ``aspect`` (γ), ``max_rotation``, ``flip_prob``, ``color``, ``brightness``,
  ``contrast``, ``noise_std``, ``blur_sigma``: the :class:`~keras_oneimage.data.augment.AugmentConfig` fields;
* ``flip`` (bool): flips on (the base ``flip_prob``) or off;
* ``color_jitter``: multiplies the base ``color``, ``brightness`` and ``contrast`` together.

Each trial lives in ``directory/project_name/trial_<id>/``: ``run/`` is a `fit`-style output directory
(``model.keras``, ``history.csv``, TensorBoard ``logs/``, ``backup/``), ``result.json`` holds the augmentation and
the probe scores, and ``hparams/`` a TensorBoard HParams record (``tensorboard --logdir directory/project_name``).
Rerunning :func:`tune` with the same ``directory`` and ``project_name`` resumes: finished trials are not trained
again, an interrupted trial restarts from its last completed epoch, and a larger ``max_trials`` extends the search.
Hyperband treats training epochs as the budget: a trial promoted to a larger budget continues from its parent
trial's checkpoint and is scored by the probe at the new budget.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
from typing import Any, Mapping, Sequence

import keras_tuner

from keras_oneimage import validation
from keras_oneimage.errors import InputError, NonFiniteLossError

ALGORITHMS = ("bayesian", "hyperband", "random")
TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")
TUNING_JSON = "keras_oneimage_tuning.json"
RESULT_JSON = "result.json"
RUN_DIR = "run"
_HP_PREFIX = "tuner/"


# ----------------------------------------------------------------------------------------------- search space
@dataclasses.dataclass(frozen=True)
class Fixed:
    """A parameter held at ``value`` (it is recorded in every trial, but never searched)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Float:
    """A real parameter drawn from ``[low, high]`` (log-uniformly when ``log``)."""

    low: float
    high: float
    log: bool = False
    default: float | None = None


@dataclasses.dataclass(frozen=True)
class Choice:
    """A parameter taking one of ``values``."""

    values: tuple
    default: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.values, (str, bytes)) or not isinstance(self.values, Sequence):
            raise InputError(f"Choice needs a list of values, got {self.values!r}")
        object.__setattr__(self, "values", tuple(self.values))


@dataclasses.dataclass(frozen=True)
class Boolean:
    """An on/off parameter (``flip``)."""

    default: bool = True


Spec = Fixed | Float | Choice | Boolean


@dataclasses.dataclass(frozen=True)
class Parameter:
    """What a search-space name means: its kind, its valid range and how it changes the recipe."""

    kind: str  # "float" or "bool"
    low: float = 0.0
    high: float = math.inf
    low_open: bool = False  # True: low itself is not allowed (must be > low)
    doc: str = ""


#: Every name a search space may use.
PARAMETERS: dict[str, Parameter] = {
    "strength": Parameter("float", 0.0, 4.0, doc="global strength, AugmentConfig.scaled(); applied last"),
    "min_area": Parameter("float", 0.0, 1.0, low_open=True, doc="β, smallest crop area fraction"),
    "max_area": Parameter("float", 0.0, 1.0, low_open=True, doc="largest crop area fraction"),
    "aspect": Parameter("float", 0.0, 1.0, low_open=True, doc="γ, aspect ratios in [γ, 1/γ]"),
    "max_rotation": Parameter("float", 0.0, 180.0, doc="rotations uniform in ± degrees"),
    "flip": Parameter("bool", doc="horizontal flips on (base flip_prob) or off"),
    "flip_prob": Parameter("float", 0.0, 1.0, doc="horizontal flip probability"),
    "color_jitter": Parameter("float", 0.0, 5.0, doc="multiplies the base color, brightness and contrast"),
    "color": Parameter("float", 0.0, 2.0, doc="std of the random colour matrix"),
    "brightness": Parameter("float", 0.0, 1.0, doc="brightness offset range"),
    "contrast": Parameter("float", 0.0, 1.0, doc="contrast factor range"),
    "noise_std": Parameter("float", 0.0, 1.0, doc="gaussian pixel noise (max std)"),
    "blur_sigma": Parameter("float", 0.0, 8.0, doc="gaussian blur (max sigma, output pixels)"),
}

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

_CONFLICTS = (("flip", ("flip_prob",)), ("color_jitter", ("color", "brightness", "contrast")))


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


def _check_value(name: str, value: Any, what: str) -> Any:
    param = PARAMETERS[name]
    if param.kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"search space {name!r}: {what} must be True or False, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"search space {name!r}: {what} must be a finite number, got {value!r}")
    value = float(value)
    too_low = value <= param.low if param.low_open else value < param.low
    if too_low or value > param.high:
        lo = "(" if param.low_open else "["
        raise InputError(f"search space {name!r}: {what} {value!r} is outside {lo}{param.low:g}, {param.high:g}]")
    return value


def _check_spec(name: str, spec: Spec) -> Spec:
    param = PARAMETERS[name]
    if isinstance(spec, Fixed):
        return Fixed(_check_value(name, spec.value, "the fixed value"))
    if isinstance(spec, Boolean):
        if param.kind != "bool":
            raise InputError(f"search space {name!r} is a number; Boolean() only fits 'flip'")
        return Boolean(_check_value(name, spec.default, "the default"))
    if isinstance(spec, Choice):
        values = tuple(_check_value(name, v, "a choice") for v in spec.values)
        if not values:
            raise InputError(f"search space {name!r}: Choice needs at least one value")
        if len(set(values)) != len(values):
            raise InputError(f"search space {name!r}: Choice values repeat: {list(values)}")
        default = None if spec.default is None else _check_value(name, spec.default, "the default")
        if default is not None and default not in values:
            raise InputError(f"search space {name!r}: default {default!r} is not one of {list(values)}")
        return Choice(values, default)
    # Float
    if param.kind != "float":
        raise InputError(f"search space {name!r} is on/off; use Boolean(), Fixed(True/False) or Choice([True, False])")
    low, high = _check_value(name, spec.low, "low"), _check_value(name, spec.high, "high")
    if not low < high:
        raise InputError(
            f"search space {name!r}: Float needs low < high, got {low!r}, {high!r} (use Fixed for one value)")
    if spec.log and low <= 0:
        raise InputError(f"search space {name!r}: a log-scale Float needs low > 0, got {low!r}")
    default = None
    if spec.default is not None:
        default = _check_value(name, spec.default, "the default")
        if not low <= default <= high:
            raise InputError(f"search space {name!r}: default {default!r} is outside [{low!r}, {high!r}]")
    return Float(low, high, bool(spec.log), default)


def resolve_search_space(overrides: Mapping[str, Any] | None = None) -> dict[str, Spec]:
    """:data:`DEFAULT_SEARCH_SPACE` with ``overrides`` applied and validated; ``None`` values drop a parameter.

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
    return {name: _check_spec(name, spec) for name, spec in space.items()}


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
    """The Keras Tuner ``HyperParameters`` registering every entry of a resolved ``space``."""
    hp = keras_tuner.HyperParameters()
    for name, spec in space.items():
        if isinstance(spec, Fixed):
            hp.Fixed(name, spec.value)
        elif isinstance(spec, Float):
            kwargs = {"sampling": "log" if spec.log else "linear"}
            if spec.default is not None:
                kwargs["default"] = spec.default
            hp.Float(name, spec.low, spec.high, **kwargs)
        elif isinstance(spec, Choice) and PARAMETERS[name].kind == "bool":  # Keras Tuner's Choice makes ints of bools
            if len(spec.values) == 1:
                hp.Fixed(name, spec.values[0])
            else:
                hp.Boolean(name, default=True if spec.default is None else spec.default)
        elif isinstance(spec, Choice):
            hp.Choice(name, list(spec.values), **({} if spec.default is None else {"default": spec.default}))
        else:
            hp.Boolean(name, default=spec.default)
    return hp


def space_description(space: Mapping[str, Spec]) -> dict[str, dict[str, Any]]:
    """JSON-able ``{name: {"type": ..., ...}}`` of a resolved space (recorded with the project)."""
    return {
        name: {"type": type(spec).__name__, **{k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in dataclasses.asdict(spec).items()}}
        for name, spec in space.items()
    }


def augment_from_values(values: Mapping[str, Any], base: Any = None):
    """The :class:`AugmentConfig` for one trial's hyper-parameter ``values`` (``tuner/*`` entries are ignored).

    Order: the base recipe (paper defaults when ``None``) → the fields named in ``values`` → ``flip`` →
    ``color_jitter`` → ``.scaled(strength)``. Raises :class:`InputError` if the result is not a valid recipe
    (for instance ``min_area`` above ``max_area``).
    """
    from keras_oneimage.data.augment import AugmentConfig

    base = AugmentConfig() if base is None else base
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = [k for k in values if not k.startswith(_HP_PREFIX) and k not in PARAMETERS]
    if unknown:
        raise InputError(f"unknown augmentation parameter(s) {unknown}")
    direct = {k: float(v) for k, v in values.items() if k in fields}
    config = dataclasses.replace(base, **direct)
    if "flip" in values:
        config = dataclasses.replace(config, flip_prob=base.flip_prob if values["flip"] else 0.0)
    if "color_jitter" in values:
        j = float(values["color_jitter"])
        config = dataclasses.replace(
            config, color=base.color * j, brightness=min(base.brightness * j, 1.0), contrast=min(base.contrast * j, 1.0)
        )
    if "strength" in values:
        config = config.scaled(float(values["strength"]))
    return config


def search_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without Keras Tuner's bookkeeping entries (``tuner/epochs``, ``tuner/trial_id``, ...)."""
    return {k: v for k, v in values.items() if not k.startswith(_HP_PREFIX)}


# --------------------------------------------------------------------------------------------------- objective
@dataclasses.dataclass(frozen=True)
class ProbeObjective:
    """``"conv2"`` (one layer's val accuracy) or ``"mean:conv1,conv2"`` (the mean over layers)."""

    spec: str
    layers: tuple[str, ...]
    name: str  # the Keras Tuner metric name

    @classmethod
    def parse(cls, spec: str) -> "ProbeObjective":
        if not isinstance(spec, str) or not spec.strip():
            raise InputError(f"objective must be a layer name or 'mean:conv1,conv2', got {spec!r}")
        text = spec.strip()
        if text.startswith("mean:"):
            layers = tuple(s.strip() for s in text[len("mean:"):].split(",") if s.strip())
            mean = True
        else:
            layers, mean = (text,), False
        bad = [layer for layer in layers if layer not in TAPS]
        if not layers or bad:
            raise InputError(f"objective {spec!r}: unknown layer(s) {bad or '(none)'}; choose from {', '.join(TAPS)}")
        if len(set(layers)) != len(layers):
            raise InputError(f"objective {spec!r}: layers repeat")
        layers = tuple(sorted(layers, key=TAPS.index))
        name = f"val_mean_{'_'.join(layers)}" if mean else f"val_{layers[0]}"
        return cls(f"mean:{','.join(layers)}" if mean else layers[0], layers, name)

    def value(self, scores: Mapping[str, float]) -> float:
        """The objective from per-layer val accuracies (the mean when several layers)."""
        return float(sum(float(scores[layer]) for layer in self.layers) / len(self.layers))


# ------------------------------------------------------------------------------------------------ training core
def train_method(
    images: Any,
    *,
    method: str = "rotnet",
    augment: Any = None,
    image_size: int = 32,
    batch_size: int = 64,
    epochs: int = 2,
    steps_per_epoch: int = 100,
    seed: int = 0,
    stream_seed: int | None = None,
    widths: Sequence[int] | None = None,
    variant: str | None = None,
    output_dir: str | os.PathLike | None = None,
    callbacks: Sequence[Any] | None = None,
    verbose: str | int = 0,
    method_options: Mapping[str, Any] | None = None,
    precision: str = "float32",
):
    """`keras_oneimage.fit`'s training core, with AlexNet ``widths`` and a separate patch-stream seed.

    ``images``: anything :func:`~keras_oneimage.data.images.load_images` accepts (decoded arrays are cheapest).
    ``seed`` seeds the weights; ``stream_seed`` (default ``seed``) the patch stream. With ``output_dir`` the run
    checkpoints every epoch and a rerun resumes after the last completed epoch (as `fit`), but no ``run.json`` is
    written. ``precision`` is `fit`'s (``"auto"``: bf16 on AMX CPUs). Returns the trained method model.
    """
    import keras

    from keras_oneimage import api
    from keras_oneimage.data.augment import AugmentConfig
    from keras_oneimage.data.images import load_images
    from keras_oneimage.data.synthetic import patch_dataset
    from keras_oneimage.methods import registry
    from keras_oneimage.methods.base import FitContext
    from keras_oneimage.precision import precision_scope, resolve_precision
    from keras_oneimage.models.alexnet import AlexNet
    from keras_oneimage.training import completed_epochs, run_training

    image_size = api._positive_int("image_size", image_size)
    batch_size = api._positive_int("batch_size", batch_size)
    epochs = api._positive_int("epochs", epochs)
    steps_per_epoch = api._positive_int("steps_per_epoch", steps_per_epoch)
    method_cls = registry.get(method)
    variant = api._variant_for(image_size, variant)
    augment = AugmentConfig() if augment is None else augment
    sources = load_images(images)
    stream_seed = int(seed if stream_seed is None else stream_seed)
    resolve_precision(precision)  # validated before anything is built

    keras.utils.set_random_seed(int(seed))
    backbone_kwargs = dict(getattr(method_cls, "backbone_options", {}))
    if widths is not None:
        backbone_kwargs["widths"] = tuple(widths)
    with precision_scope(precision):
        backbone = AlexNet(variant=variant, image_size=method_cls.trunk_input_size(image_size), **backbone_kwargs)
        model = method_cls(backbone=backbone, **dict(method_options or {}))
    context = FitContext(
        images=sources, image_size=image_size, batch_size=batch_size, seed=stream_seed, augment=augment,
        steps_per_epoch=steps_per_epoch, epochs=epochs, output_dir=None if output_dir is None else str(output_dir),
    )  # fmt: skip
    make_dataset = getattr(model, "make_dataset", None)
    if make_dataset is not None:
        dataset = make_dataset(context)
    else:
        dataset = patch_dataset(sources, image_size=image_size, batch_size=batch_size, augment=augment,
                                seed=stream_seed, start_step=completed_epochs(output_dir) * steps_per_epoch)
    run_training(
        model, dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
        output_dir=None if output_dir is None else str(output_dir), callbacks=list(callbacks or []),
        context=context, verbose=verbose,
    )  # fmt: skip
    return model


def _probe_val(backbone, data, **kwargs) -> dict[str, float]:
    """The validation-split probe (a seam for tests); never the test split."""
    from keras_oneimage.probes.linear import probe_val

    return probe_val(backbone, data, **kwargs)


# -------------------------------------------------------------------------------------------------------- tuner
@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything a trial needs besides its hyper-parameters (fixed for a project)."""

    images: tuple  # decoded uint8 arrays
    method: str
    image_size: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    seed: int
    widths: tuple[int, ...] | None
    variant: str | None
    probe_epochs: int
    probe_batch_size: int
    method_options: Mapping[str, Any]
    base_augment: Any
    precision: str = "float32"
    probe_augment: bool = True
    probe_learning_rate: float | None = None


def _stream_seed(seed: int, initial_epoch: int) -> int:
    """A fresh patch stream for a Hyperband continuation (the parent already consumed ``seed``'s stream)."""
    return int(seed) if initial_epoch == 0 else int(seed) + 1_000_003 * int(initial_epoch)


class AugmentationTuner(keras_tuner.Tuner):
    """A Keras Tuner whose trial trains a method on the source image and returns the val probe accuracies.

    ``run_trial`` returns ``{objective.name: value, "val_<layer>": accuracy, ...}``. It honours Hyperband's
    ``tuner/epochs`` (the trial's total epochs), ``tuner/initial_epoch`` and ``tuner/trial_id`` (continue from
    that trial's checkpoint: its ``run/backup`` is copied and training resumes after its last epoch).
    """

    def __init__(self, oracle, *, settings: _Settings, data, objective: ProbeObjective, keep_backups: bool,
                 **kwargs):
        self.settings = settings
        self.data = data
        self.probe_objective = objective
        self.keep_backups = keep_backups
        self.trained: list[str] = []  # trial ids run by this tuner object (i.e. in this call)
        super().__init__(oracle=oracle, **kwargs)

    def run_trial(self, trial, *args, **kwargs):
        s = self.settings
        values = dict(trial.hyperparameters.values)
        epochs = int(values.get("tuner/epochs", s.epochs))
        initial_epoch = int(values.get("tuner/initial_epoch", 0))
        parent = values.get("tuner/trial_id")
        try:
            augment = augment_from_values(values, s.base_augment)
        except InputError as exc:  # an infeasible corner of the space: fail this trial, keep searching
            raise keras_tuner.errors.FailedTrialError(str(exc)) from None
        trial_dir = pathlib.Path(self.get_trial_dir(trial.trial_id))
        run_dir = trial_dir / RUN_DIR
        resumed_from = _adopt_parent_checkpoint(run_dir, self._run_dir_of(parent) if parent else None)
        self.trained.append(trial.trial_id)

        import keras

        keras.backend.clear_session()
        try:
            model = train_method(
                list(s.images), method=s.method, augment=augment, image_size=s.image_size,
                batch_size=s.batch_size, epochs=epochs, steps_per_epoch=s.steps_per_epoch, seed=s.seed,
                stream_seed=_stream_seed(s.seed, initial_epoch), widths=s.widths, variant=s.variant,
                output_dir=run_dir, verbose=2 if self.oracle.verbose == 2 else 0,
                method_options=s.method_options, precision=s.precision,
            )  # fmt: skip
        except NonFiniteLossError as exc:
            raise keras_tuner.errors.FailedTrialError(str(exc)) from None
        scores = _probe_val(
            model.backbone, self.data, layers=self.probe_objective.layers, epochs=s.probe_epochs,
            batch_size=s.probe_batch_size, seed=s.seed, verbose=0, augment=s.probe_augment,
            **({} if s.probe_learning_rate is None else {"learning_rate": s.probe_learning_rate}),
        )  # fmt: skip
        metrics = {f"val_{layer}": float(acc) for layer, acc in scores.items()}
        metrics[self.probe_objective.name] = self.probe_objective.value(scores)
        record = {
            "trial_id": trial.trial_id,
            "hyperparameters": search_values(values),
            "augment": dataclasses.asdict(augment),
            "epochs": epochs,
            "initial_epoch": initial_epoch,
            "continued_from": parent,
            "resumed_from_epoch": resumed_from,
            "metrics": metrics,
            "objective": self.probe_objective.name,
        }
        _write_json(trial_dir / RESULT_JSON, record)
        _write_hparams(trial_dir / "hparams", trial.trial_id, search_values(values), metrics, epochs)
        if not self.keep_backups:
            shutil.rmtree(run_dir / "backup", ignore_errors=True)
        return metrics

    def _run_dir_of(self, trial_id: str) -> pathlib.Path:
        return pathlib.Path(self.project_dir) / f"trial_{trial_id}" / RUN_DIR

    # The tuner saves nothing per epoch itself: run_training checkpoints into trial_<id>/run.
    def save_model(self, trial_id, model, step=0):
        pass

    def load_model(self, trial):
        from keras_oneimage.checkpoints import load_checkpoint

        return load_checkpoint(self._run_dir_of(trial.trial_id))[0]


def _adopt_parent_checkpoint(run_dir: pathlib.Path, parent_run: pathlib.Path | None) -> int:
    """Seed ``run_dir`` with the parent's resume state (first attempt only); return the epoch training resumes at.

    A retried trial keeps its own state (it resumes after its own last completed epoch). Without a usable parent
    checkpoint the trial trains from scratch for its whole budget.
    """
    own = run_dir / "backup"
    if parent_run is not None and not own.exists() and (parent_run / "backup").is_dir():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(parent_run / "backup", own)
        if (parent_run / "history.csv").exists():
            shutil.copy2(parent_run / "history.csv", run_dir / "history.csv")
    return _backup_epoch(own)


def _backup_epoch(backup_dir: pathlib.Path) -> int:
    """Epochs completed according to a BackupAndRestore directory (0 when there is none)."""
    meta = backup_dir / "training_metadata.json"
    try:
        return max(int(json.loads(meta.read_text()).get("epoch", 0)), 0)  # Keras records epochs completed
    except (OSError, ValueError, TypeError):
        return 0


def _write_json(path: pathlib.Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _write_hparams(logdir: pathlib.Path, trial_id: str, values: Mapping[str, Any], metrics: Mapping[str, float],
                   step: int) -> None:
    """A TensorBoard HParams session for the trial: its hyper-parameters and its probe scores."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams_api

    with tf.summary.create_file_writer(str(logdir)).as_default():
        hparams_api.hparams(dict(values), trial_id=str(trial_id))
        for name, value in metrics.items():
            tf.summary.scalar(name, float(value), step=int(step))


# ------------------------------------------------------------------------------------------------------- result
@dataclasses.dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
      best_hyperparameters: the best trial's search-space values (``{name: value}``; fixed ones included).
      best_score: its objective value (validation probe accuracy).
      best_trial_id: its Keras Tuner trial id; its checkpoint is ``project_dir/trial_<id>/run/model.keras``.
      objective: the objective metric name (``val_conv2``, ``val_mean_conv1_conv2``, ...).
      trials: one dict per trial in start order: ``trial_id``, ``status``, ``score``, ``metrics``,
        ``hyperparameters``, ``epochs``, ``continued_from``, ``message`` (first line of a failure).
      trained: ids of the trials run by this call (empty when a finished search is rerun).
      space: the resolved search space.
      project_dir: where the tuner keeps its state.
    """

    best_hyperparameters: dict[str, Any]
    best_score: float
    best_trial_id: str
    objective: str
    trials: list[dict[str, Any]]
    trained: list[str]
    space: dict[str, Spec]
    project_dir: str
    settings: _Settings = dataclasses.field(repr=False)
    tuner: Any = dataclasses.field(default=None, repr=False)
    refit_epochs: int | None = None

    @property
    def best_augment(self):
        """The best trial's :class:`~keras_oneimage.data.augment.AugmentConfig`."""
        return augment_from_values(self.best_hyperparameters, self.settings.base_augment)

    def best_model(self):
        """The best trial's trained method model (from its ``model.keras``)."""
        from keras_oneimage.checkpoints import load_checkpoint

        return load_checkpoint(pathlib.Path(self.project_dir) / f"trial_{self.best_trial_id}" / RUN_DIR)[0]

    def refit(self, epochs: int | None = None, *, steps_per_epoch: int | None = None,
              output_dir: str | os.PathLike | None = None, seed: int | None = None, verbose: str | int = "auto"):
        """Retrain the best configuration for longer; return the trained method model.

        ``epochs`` defaults to ``tune(refit_epochs=)``, else 5x the search's epochs. Everything else (method,
        image, size, batch, widths, seed) is the search's. With ``output_dir`` the refit checkpoints and resumes.
        """
        s = self.settings
        epochs = int(epochs if epochs is not None else self.refit_epochs or 5 * s.epochs)
        return train_method(
            list(s.images), method=s.method, augment=self.best_augment, image_size=s.image_size,
            batch_size=s.batch_size, epochs=epochs, steps_per_epoch=int(steps_per_epoch or s.steps_per_epoch),
            seed=s.seed if seed is None else int(seed), widths=s.widths, variant=s.variant, output_dir=output_dir,
            verbose=verbose, method_options=s.method_options, precision=s.precision,
        )  # fmt: skip

    def table(self) -> str:
        """The per-trial summary (also printed by :func:`tune`)."""
        return format_trials(self.trials, self.objective, list(self.space), self.best_trial_id)

    def __str__(self) -> str:
        return self.table()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}" if (value == 0 or 1e-3 <= abs(value) < 1e4) else f"{value:.1e}"
    return str(value)


def format_trials(trials: Sequence[Mapping[str, Any]], objective: str, names: Sequence[str],
                  best_trial_id: str | None = None) -> str:
    """A plain-text table: one row per trial, its epochs, hyper-parameters and objective."""
    header = ["trial", "status", "epochs", *names, objective]
    rows = []
    for t in trials:
        epochs = t.get("epochs")
        if t.get("continued_from") is not None:
            epochs = f"{t.get('initial_epoch')}->{epochs} (from {t['continued_from']})"
        mark = "*" if t["trial_id"] == best_trial_id else ""
        score = t.get("score")
        rows.append([f"{t['trial_id']}{mark}", str(t["status"]).lower(), _fmt(epochs),
                     *(_fmt(t["hyperparameters"].get(n)) for n in names),
                     "-" if score is None else f"{score:.4f}"])  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"trial {t['trial_id']} {str(t['status']).lower()}: {t['message']}" for t in trials
              if t.get("message") and t["status"] != "COMPLETED"]  # fmt: skip
    return "\n".join(lines)


def _last_line(message: str | None) -> str | None:
    """The exception line of a failed trial's traceback, without Keras Tuner's FailedTrialError prefix."""
    lines = (message or "").strip().splitlines()
    if not lines:
        return None
    return re.sub(r"^keras_tuner(\.src)?\.errors\.FailedTrialError: ", "", lines[-1])


def _trial_rows(tuner: AugmentationTuner) -> list[dict[str, Any]]:
    oracle = tuner.oracle
    order = list(dict.fromkeys([*oracle.start_order, *sorted(oracle.trials)]))
    rows = []
    for trial_id in order:
        trial = oracle.trials[trial_id]
        values = dict(trial.hyperparameters.values)
        metrics = {}
        for name in trial.metrics.metrics:
            best = trial.metrics.get_last_value(name)
            if best is not None:
                metrics[name] = float(best)
        rows.append({
            "trial_id": trial_id,
            "status": str(trial.status),
            "score": None if trial.score is None else float(trial.score),
            "metrics": metrics,
            "hyperparameters": search_values(values),
            "epochs": int(values.get("tuner/epochs", tuner.settings.epochs)),
            "initial_epoch": int(values.get("tuner/initial_epoch", 0)),
            "continued_from": values.get("tuner/trial_id"),
            "message": _last_line(trial.message),
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------- public API
def tune(
    image: Any = None,
    method: str = "rotnet",
    *,
    objective: str = "conv2",
    dataset: Any = "cifar10",
    max_trials: int | None = 10,
    algorithm: str = "bayesian",
    directory: str | os.PathLike = "tuning",
    project_name: str | None = None,
    seed: int = 0,
    image_size: int = 32,
    epochs: int = 2,
    steps_per_epoch: int = 100,
    batch_size: int = 64,
    max_per_class: int | None = None,
    val_fraction: float = 0.1,
    search_space: Mapping[str, Any] | None = None,
    augment: Any = None,
    probe_epochs: int = 10,
    probe_batch_size: int = 192,
    refit_epochs: int | None = None,
    widths: Sequence[int] | None = None,
    variant: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    hyperband_factor: int = 3,
    hyperband_iterations: int = 1,
    keep_backups: bool | None = None,
    overwrite: bool = False,
    verbose: int = 1,
    precision: str = "float32",
    probe_augment: bool = True,
    probe_learning_rate: float | None = None,
) -> TuneResult:
    """Search the augmentation recipe with Keras Tuner; each trial is scored by val-split linear probes.

    Args:
      image: source image(s), as for :func:`keras_oneimage.fit` (``None``: the embedded default photograph).
      method: the self-supervised method each trial trains (``"rotnet"``, ...).
      objective: ``"conv2"`` (that layer's val probe accuracy) or ``"mean:conv1,conv2"``; maximised.
      dataset: the labelled set (``"cifar10"``, a class-folder tree, or a ``LabelledData``); only its
        ``train`` (to fit the probes) and ``val`` (to score them) splits are used.
      max_trials: trials to run in total across reruns (Bayesian/random). For Hyperband an upper bound (``None``:
        run ``hyperband_iterations`` full Hyperband iterations).
      algorithm: ``"bayesian"``, ``"hyperband"`` or ``"random"``.
      directory, project_name: where the search lives (default name ``<method>_<algorithm>_<objective>``). A rerun
        with the same pair resumes; it must use the same settings (else :class:`InputError`), except
        ``max_trials``, which may grow. ``overwrite=True`` starts afresh.
      seed: seeds the tuner, every trial's weights and patch stream (the same for all trials, so trials differ by
        their augmentation only), the val split and the probes.
      image_size, epochs, steps_per_epoch, batch_size: each trial's training (Hyperband: ``epochs`` is the
        largest budget, ``max_epochs``).
      max_per_class, val_fraction: subsample the labelled set; share of train held out as val.
      search_space: overrides of :data:`DEFAULT_SEARCH_SPACE` (see :func:`resolve_search_space`).
      augment: base recipe the searched parameters modify (paper defaults when ``None``).
      probe_epochs, probe_batch_size: the probe training per trial (the paper's full protocol is 36 epochs).
      refit_epochs: default epochs of :meth:`TuneResult.refit`.
      widths, variant: AlexNet widths (small ones for quick runs) and variant.
      method_options: passed to the method class (e.g. ``{"head_widths": (256,)}``).
      hyperband_factor, hyperband_iterations: Hyperband's reduction factor and number of iterations.
      keep_backups: keep each trial's resume state after it completes (default: only for Hyperband, whose
        promoted trials continue from it).
      verbose: 0 silent, 1 Keras Tuner's per-trial report and the summary table, 2 also training progress.
      precision: each trial's training precision, as `fit`'s (``"auto"``: bf16 on AMX CPUs).
      probe_augment: the trial probes' protocol (``False``: cached taps, the trunk runs once per image; see
        :func:`keras_oneimage.probes.probe`).
      probe_learning_rate: the trial probes' SGD rate (default: the probe module's, the paper's 0.01).

    Returns:
      A :class:`TuneResult`.
    """
    from keras_oneimage import api
    from keras_oneimage.data.augment import AugmentConfig
    from keras_oneimage.data.images import load_images
    from keras_oneimage.data.labelled import LabelledData, load_labelled
    from keras_oneimage.methods import registry
    from keras_oneimage.precision import resolve_precision
    from keras_oneimage.models.alexnet import AlexNet

    # 1. Validate everything before anything is trained or written.
    precision = resolve_precision(precision)  # once: "auto" names the policy every trial and the record use
    if algorithm not in ALGORITHMS:
        raise InputError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    if algorithm == "bayesian":
        try:
            import scipy  # noqa: F401  (Keras Tuner's Gaussian process needs both)
            import sklearn  # noqa: F401
        except ImportError:
            raise InputError("the bayesian search needs scipy and scikit-learn (pip install 'keras-tuner[bayesian]'); "
                             "or use algorithm='random' or 'hyperband'") from None
    probe_objective = ProbeObjective.parse(objective)
    if max_trials is not None:
        max_trials = api._positive_int("max_trials", max_trials)
    elif algorithm != "hyperband":
        raise InputError(f"max_trials is required for the {algorithm} search")
    image_size = api._positive_int("image_size", image_size)
    epochs = api._positive_int("epochs", epochs)
    steps_per_epoch = api._positive_int("steps_per_epoch", steps_per_epoch)
    batch_size = api._positive_int("batch_size", batch_size)
    probe_epochs = api._positive_int("probe_epochs", probe_epochs)
    probe_batch_size = api._positive_int("probe_batch_size", probe_batch_size)
    if refit_epochs is not None:
        refit_epochs = api._positive_int("refit_epochs", refit_epochs)
    seed = validation.seed(seed)
    if probe_learning_rate is not None:
        probe_learning_rate = validation.positive_finite("probe_learning_rate", probe_learning_rate)
    if algorithm == "hyperband":
        if isinstance(hyperband_factor, bool) or not isinstance(hyperband_factor, int) or hyperband_factor < 2:
            raise InputError(f"hyperband_factor must be an integer >= 2, got {hyperband_factor!r}")
        hyperband_iterations = api._positive_int("hyperband_iterations", hyperband_iterations)
    if verbose not in (0, 1, 2):
        raise InputError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    space = resolve_search_space(search_space)
    if augment is None:
        augment = AugmentConfig()
    elif isinstance(augment, Mapping):
        augment = AugmentConfig(**augment)
    elif not isinstance(augment, AugmentConfig):
        raise InputError(f"augment must be an AugmentConfig or a dict, got {type(augment).__name__}")
    method_cls = registry.get(method)
    variant = api._variant_for(image_size, variant)
    if widths is not None:
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
            raise InputError(f"widths must be five positive integers, got {widths!r}")
        widths = tuple(int(w) for w in widths)
    method_options = dict(method_options or {})
    images = load_images(image if image is not None else api.default_image_path())
    for i, img in enumerate(images):
        if min(img.shape[:2]) < image_size:
            raise InputError(f"source image {i} is {img.shape[1]}x{img.shape[0]} px, smaller than the "
                             f"{image_size} px patch; use a larger image or a smaller image_size")  # fmt: skip
    try:  # fail on bad method options / widths now, not inside every trial
        backbone_kwargs = dict(getattr(method_cls, "backbone_options", {}))
        if widths is not None:
            backbone_kwargs["widths"] = widths
        trunk_size = method_cls.trunk_input_size(image_size)
        method_cls(backbone=AlexNet(variant=variant, image_size=trunk_size, **backbone_kwargs), **method_options)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad method_options or widths for {method!r}: {exc}") from None
    data = dataset if isinstance(dataset, LabelledData) else load_labelled(
        dataset, val_fraction=val_fraction, seed=seed, max_per_class=max_per_class)  # fmt: skip
    if data.val_size == 0:
        raise InputError("the labelled set has an empty validation split; use val_fraction > 0")
    if data.train_size == 0:
        raise InputError("the labelled set has no training examples")

    if project_name is None:
        project_name = f"{method_cls.method_name}_{algorithm}_{probe_objective.name[len('val_'):]}"
    if not isinstance(project_name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", project_name):
        raise InputError(f"project_name must be letters, digits, '.', '_' or '-', got {project_name!r}")
    project_dir = pathlib.Path(directory) / project_name
    if overwrite and project_dir.exists():
        shutil.rmtree(project_dir)
    record = {
        "method": method_cls.method_name,
        "algorithm": algorithm,
        "objective": probe_objective.spec,
        "image_sha256": api._image_digest(images),
        "dataset": _dataset_identity(dataset, data),
        "max_per_class": max_per_class,
        "val_fraction": val_fraction,
        "seed": seed,
        "image_size": image_size,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "widths": list(widths) if widths is not None else None,
        "variant": variant,
        "method_options": method_options,
        "base_augment": dataclasses.asdict(augment),
        "search_space": space_description(space),
        "probe_epochs": probe_epochs,
        "probe_batch_size": probe_batch_size,
        **({"precision": precision} if precision != "float32" else {}),
        **({} if probe_augment else {"probe_augment": False}),
        **({} if probe_learning_rate is None else {"probe_learning_rate": float(probe_learning_rate)}),
        **({"hyperband_factor": hyperband_factor, "hyperband_iterations": hyperband_iterations}
           if algorithm == "hyperband" else {}),
    }  # fmt: skip
    _check_project(project_dir, record)

    # 2. The tuner: resumes from project_dir when it holds a search.
    settings = _Settings(
        images=tuple(images), method=method, image_size=image_size, batch_size=batch_size, epochs=epochs,
        steps_per_epoch=steps_per_epoch, seed=seed, widths=widths, variant=variant, probe_epochs=probe_epochs,
        probe_batch_size=probe_batch_size, method_options=method_options, base_augment=augment,
        precision=precision, probe_augment=bool(probe_augment),
        probe_learning_rate=None if probe_learning_rate is None else float(probe_learning_rate),
    )  # fmt: skip
    kt_objective = keras_tuner.Objective(probe_objective.name, direction="max")
    common = dict(objective=kt_objective, hyperparameters=hyperparameters_for(space), seed=seed,
                  tune_new_entries=False, allow_new_entries=False)  # fmt: skip
    if algorithm == "bayesian":
        oracle = keras_tuner.oracles.BayesianOptimizationOracle(
            max_trials=max_trials, num_initial_points=max(2, min(3 * len(space), max_trials // 3)), **common)
    elif algorithm == "random":
        oracle = keras_tuner.oracles.RandomSearchOracle(max_trials=max_trials, **common)
    else:
        oracle = keras_tuner.oracles.HyperbandOracle(
            max_epochs=epochs, factor=hyperband_factor, hyperband_iterations=hyperband_iterations, **common)
        oracle.max_trials = max_trials  # an upper bound; Keras Tuner's Oracle stops creating trials there
    project_dir.mkdir(parents=True, exist_ok=True)
    tuner = AugmentationTuner(
        oracle, settings=settings, data=data, objective=probe_objective,
        keep_backups=(algorithm == "hyperband") if keep_backups is None else bool(keep_backups),
        directory=str(directory), project_name=project_name, overwrite=False,
    )  # fmt: skip
    _write_json(project_dir / TUNING_JSON, record)
    tuner.search(verbose=verbose)

    # 3. The result.
    rows = _trial_rows(tuner)
    completed = [r for r in rows if r["status"] == "COMPLETED" and r["score"] is not None]
    if not completed:
        reasons = "; ".join(sorted({r["message"] for r in rows if r.get("message")})) or "none ran"
        raise RuntimeError(f"no trial of {project_dir} completed ({reasons})")
    # Highest score; ties go to the larger budget (Hyperband), then to the earlier trial, so reruns agree.
    best = max(completed, key=lambda r: (r["score"], r["epochs"], -rows.index(r)))
    result = TuneResult(
        best_hyperparameters=dict(best["hyperparameters"]),
        best_score=float(best["score"]),
        best_trial_id=best["trial_id"],
        objective=probe_objective.name,
        trials=rows,
        trained=list(tuner.trained),
        space=space,
        project_dir=str(project_dir),
        settings=settings,
        tuner=tuner,
        refit_epochs=refit_epochs,
    )
    if verbose:
        print(f"\n{len(rows)} trials in {project_dir} ({len(result.trained)} run now); objective {result.objective} "
              f"(validation split, maximised)")  # fmt: skip
        print(result.table())
    return result


def _dataset_identity(dataset: Any, data) -> str:
    if isinstance(dataset, (str, os.PathLike)):
        return str(dataset)
    return f"{data.source or type(dataset).__name__}:{data.train_size}/{data.val_size}/{data.test_size}"


def _check_project(project_dir: pathlib.Path, record: Mapping[str, Any]) -> None:
    """Refuse to resume a project that was started with other settings (its trials would not be comparable)."""
    path = project_dir / TUNING_JSON
    if not path.exists():
        if (project_dir / "oracle.json").exists():
            raise InputError(f"{project_dir} holds a Keras Tuner project not made by keras_oneimage.tune; "
                             "use another project_name or overwrite=True")  # fmt: skip
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    current = json.loads(json.dumps(record, default=str))
    for key in sorted(set(previous) | set(current)):
        if previous.get(key) != current.get(key):
            raise InputError(
                f"{project_dir} holds a search with a different {key} ({previous.get(key)!r} vs "
                f"{current.get(key)!r}); use another project_name (or overwrite=True) to start afresh"
            )


__all__ = (
    "AugmentationTuner", "Boolean", "Choice", "DEFAULT_SEARCH_SPACE", "Fixed", "Float", "PARAMETERS",
    "ProbeObjective", "SUGGESTED_EXTRAS", "TuneResult", "augment_from_values", "format_trials",
    "hyperparameters_for", "parse_search_space", "resolve_search_space", "train_method", "tune",
)  # fmt: skip
