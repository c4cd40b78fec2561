"""Keras Tuner search over the augmentation recipe, scored by linear probes on a validation split.

Asano et al. (ICLR 2020, §3 and Table 1) find that what a trunk learns from one image hinges on the augmentation:
crop scale (β), aspect ratio (γ), rotations, flips and colour jitter. :func:`tune` searches that recipe with Keras
Tuner: every trial trains a self-supervised method briefly on the source image(s) with one augmentation setting,
then trains linear probes on the frozen trunk and scores them on the **validation** split of a labelled set
(:func:`~keras_oneimage.probes.linear.probe_val`; the test split is never touched). The objective is one layer's
probe accuracy (``"conv2"``) or the mean over several (``"mean:conv1,conv2"``).

The search space is a plain dict ``{name: spec}``; a spec is :class:`Fixed`, :class:`Float`, :class:`Choice`,
:class:`Boolean`, or ``None`` (drop the parameter: it keeps the base recipe's value). ``search_space=`` overrides
:data:`DEFAULT_SEARCH_SPACE` name by name; :data:`PARAMETERS` lists the names (the AugmentConfig fields, with
their ranges from ``recipe.RANGES``, plus ``strength``, ``flip`` and ``color_jitter``).

The package, one module per concern: :mod:`.space` (the search space), :mod:`.objective` (what is maximised),
:mod:`.tuner` (the Keras Tuner that runs a trial through :mod:`keras_oneimage.trainer`), :mod:`.report` (the trial
table and :class:`TuneResult`) and :mod:`.search` (:func:`tune`).

Each trial lives in ``directory/project_name/trial_<id>/``: ``run/`` is a `fit`-style output directory
(``model.keras``, ``history.csv``, TensorBoard ``logs/``, ``backup/``), ``result.json`` holds the augmentation and
the probe scores, and ``hparams/`` a TensorBoard HParams record (``tensorboard --logdir directory/project_name``).
Rerunning :func:`tune` with the same ``directory`` and ``project_name`` resumes: finished trials are not trained
again, an interrupted trial restarts from its last completed epoch, and a larger ``max_trials`` extends the search.
Hyperband treats training epochs as the budget: a trial promoted to a larger budget continues from its parent
trial's checkpoint and is scored by the probe at the new budget.
"""
from keras_oneimage.trainer import train_method
from keras_oneimage.tuning.objective import ProbeObjective
from keras_oneimage.tuning.report import TuneResult, format_trials
from keras_oneimage.tuning.search import ALGORITHMS, TUNING_JSON, tune
from keras_oneimage.tuning.space import (
    DEFAULT_SEARCH_SPACE, PARAMETERS, SUGGESTED_EXTRAS, Boolean, Choice, Fixed, Float, Parameter, Spec,
    augment_from_values, hyperparameters_for, parse_search_space, resolve_search_space, search_values,
    space_description,
)  # fmt: skip
from keras_oneimage.tuning.tuner import RESULT_JSON, RUN_DIR, AugmentationTuner, TrialSettings

__all__ = (
    "ALGORITHMS", "AugmentationTuner", "Boolean", "Choice", "DEFAULT_SEARCH_SPACE", "Fixed", "Float", "PARAMETERS",
    "Parameter", "ProbeObjective", "RESULT_JSON", "RUN_DIR", "SUGGESTED_EXTRAS", "Spec", "TUNING_JSON",
    "TrialSettings", "TuneResult", "augment_from_values", "format_trials", "hyperparameters_for",
    "parse_search_space", "resolve_search_space", "search_values", "space_description", "train_method", "tune",
)  # fmt: skip
