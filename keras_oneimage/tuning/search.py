""":func:`tune`: check a search's settings, make (or resume) its Keras Tuner project, run it, return the result."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
from typing import Any, Mapping, Sequence

import keras_tuner

from keras_oneimage import files, trainer, validation
from keras_oneimage.errors import InputError
from keras_oneimage.tuning.objective import ProbeObjective
from keras_oneimage.tuning.report import TuneResult, trial_rows
from keras_oneimage.tuning.space import hyperparameters_for, resolve_search_space, space_description
from keras_oneimage.tuning.tuner import AugmentationTuner, TrialSettings

ALGORITHMS = ("bayesian", "hyperband", "random")
TUNING_JSON = "keras_oneimage_tuning.json"


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
    trunk: str = "alexnet",
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
      precision: each trial's training precision, as `fit`'s (``"auto"``: bf16 on CPUs with AMX or AVX512-BF16).
      probe_augment: the trial probes' protocol (``False``: cached taps, the trunk runs once per image; see
        :func:`keras_oneimage.probes.probe`).
      probe_learning_rate: the trial probes' SGD rate (default: the probe module's, the paper's 0.01).
      trunk: the trunk every trial trains (``"alexnet"`` or ``"resnet18"``); ``objective`` names its taps
        (``"stage1"``, ... for a ResNet-18).

    Returns:
      A :class:`TuneResult`.
    """
    from keras_oneimage.data.labelled import LabelledData, load_labelled

    # 1. Check everything before anything is trained or written.
    from keras_oneimage.models.registry import trunk_class

    search = _SearchSettings.check(
        algorithm=algorithm, objective=objective, taps=tuple(trunk_class(trunk).TAPS), max_trials=max_trials, refit_epochs=refit_epochs,
        hyperband_factor=hyperband_factor, hyperband_iterations=hyperband_iterations, verbose=verbose,
    )  # fmt: skip
    space = resolve_search_space(search_space)
    # The trials' run, checked (and its method built once) by the training core: every trial trains through it.
    run = trainer.prepare_run(image, method, image_size=image_size, batch_size=batch_size, epochs=epochs,
                              steps_per_epoch=steps_per_epoch, seed=seed, augment=augment, variant=variant,
                              widths=widths, method_options=method_options, precision=precision, trunk=trunk)
    trainer.check_method(run)
    settings = TrialSettings(
        images=run.images, method=method, image_size=run.image_size, batch_size=run.batch_size, epochs=run.epochs,
        steps_per_epoch=run.steps_per_epoch, seed=run.seed, widths=run.widths, variant=run.variant, trunk=run.trunk,
        probe_epochs=validation.positive_int("probe_epochs", probe_epochs),
        probe_batch_size=validation.positive_int("probe_batch_size", probe_batch_size),
        method_options=dict(run.method_options), base_augment=run.augment, precision=run.precision,
        probe_augment=bool(probe_augment),
        probe_learning_rate=None if probe_learning_rate is None
        else validation.positive_finite("probe_learning_rate", probe_learning_rate),
    )  # fmt: skip
    data = dataset if isinstance(dataset, LabelledData) else load_labelled(
        dataset, val_fraction=val_fraction, seed=run.seed, max_per_class=max_per_class)  # fmt: skip
    if data.val_size == 0:
        raise InputError("the labelled set has an empty validation split; use val_fraction > 0")
    if data.train_size == 0:
        raise InputError("the labelled set has no training examples")

    if project_name is None:
        project_name = f"{run.method.method_name}_{search.algorithm}_{search.objective.name[len('val_'):]}"
    if not isinstance(project_name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", project_name):
        raise InputError(f"project_name must be letters, digits, '.', '_' or '-', got {project_name!r}")
    project_dir = pathlib.Path(directory) / project_name
    if overwrite and project_dir.exists():
        shutil.rmtree(project_dir)
    record = _record(search, settings, run, space, data=data, dataset=dataset, max_per_class=max_per_class,
                     val_fraction=val_fraction)
    _check_project(project_dir, record)

    # 2. The tuner: resumes from project_dir when it holds a search.
    project_dir.mkdir(parents=True, exist_ok=True)
    tuner = AugmentationTuner(
        search.oracle(space, epochs=run.epochs, seed=run.seed), settings=settings, data=data,
        objective=search.objective,
        keep_backups=(search.algorithm == "hyperband") if keep_backups is None else bool(keep_backups),
        directory=str(directory), project_name=project_name, overwrite=False,
    )  # fmt: skip
    files.write_json_atomic(project_dir / TUNING_JSON, record)
    tuner.search(verbose=search.verbose)

    # 3. The result.
    rows = trial_rows(tuner)
    completed = [r for r in rows if r["status"] == "COMPLETED" and r["score"] is not None]
    if not completed:
        reasons = "; ".join(sorted({r["message"] for r in rows if r.get("message")})) or "none ran"
        raise RuntimeError(f"no trial of {project_dir} completed ({reasons})")
    # Highest score; ties go to the larger budget (Hyperband), then to the earlier trial, so reruns agree.
    best = max(completed, key=lambda r: (r["score"], r["epochs"], -rows.index(r)))
    result = TuneResult(
        best_hyperparameters=dict(best["hyperparameters"]), best_score=float(best["score"]),
        best_trial_id=best["trial_id"], objective=search.objective.name, trials=rows, trained=list(tuner.trained),
        space=space, project_dir=str(project_dir), settings=settings, tuner=tuner,
        refit_epochs=search.refit_epochs,
    )  # fmt: skip
    if search.verbose:
        print(f"\n{len(rows)} trials in {project_dir} ({len(result.trained)} run now); objective {result.objective} "
              f"(validation split, maximised)")  # fmt: skip
        print(result.table())
    return result


@dataclasses.dataclass(frozen=True)
class _SearchSettings:
    """How the search itself runs (the algorithm and its budget), as opposed to what each trial trains."""

    algorithm: str
    objective: ProbeObjective
    max_trials: int | None
    refit_epochs: int | None
    hyperband_factor: int
    hyperband_iterations: int
    verbose: int

    @classmethod
    def check(cls, *, algorithm, objective, taps, max_trials, refit_epochs, hyperband_factor, hyperband_iterations,
              verbose) -> "_SearchSettings":
        if algorithm not in ALGORITHMS:
            raise InputError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
        if algorithm == "bayesian":
            try:
                import scipy  # noqa: F401  (Keras Tuner's Gaussian process needs both)
                import sklearn  # noqa: F401
            except ImportError:
                raise InputError("the bayesian search needs scipy and scikit-learn (pip install "
                                 "'keras-tuner[bayesian]'); or use algorithm='random' or 'hyperband'") from None
        probe_objective = ProbeObjective.parse(objective, taps)
        if max_trials is not None:
            max_trials = validation.positive_int("max_trials", max_trials)
        elif algorithm != "hyperband":
            raise InputError(f"max_trials is required for the {algorithm} search")
        if refit_epochs is not None:
            refit_epochs = validation.positive_int("refit_epochs", refit_epochs)
        if algorithm == "hyperband":
            if isinstance(hyperband_factor, bool) or not isinstance(hyperband_factor, int) or hyperband_factor < 2:
                raise InputError(f"hyperband_factor must be an integer >= 2, got {hyperband_factor!r}")
            hyperband_iterations = validation.positive_int("hyperband_iterations", hyperband_iterations)
        if verbose not in (0, 1, 2):
            raise InputError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        return cls(algorithm, probe_objective, max_trials, refit_epochs, hyperband_factor, hyperband_iterations,
                   verbose)

    def oracle(self, space, *, epochs: int, seed: int) -> keras_tuner.Oracle:
        """The Keras Tuner oracle of this algorithm over ``space``, maximising the probe objective."""
        common = dict(objective=keras_tuner.Objective(self.objective.name, direction="max"),
                      hyperparameters=hyperparameters_for(space), seed=seed, tune_new_entries=False,
                      allow_new_entries=False)  # fmt: skip
        if self.algorithm == "bayesian":
            return keras_tuner.oracles.BayesianOptimizationOracle(
                max_trials=self.max_trials, num_initial_points=max(2, min(3 * len(space), self.max_trials // 3)),
                **common)  # fmt: skip
        if self.algorithm == "random":
            return keras_tuner.oracles.RandomSearchOracle(max_trials=self.max_trials, **common)
        oracle = keras_tuner.oracles.HyperbandOracle(max_epochs=epochs, factor=self.hyperband_factor,
                                                     hyperband_iterations=self.hyperband_iterations, **common)
        oracle.max_trials = self.max_trials  # an upper bound; Keras Tuner's Oracle stops creating trials there
        return oracle


def _record(search: _SearchSettings, settings: TrialSettings, run: trainer.Run, space, *, data, dataset,
            max_per_class, val_fraction) -> dict[str, Any]:
    """The settings a rerun must match (``keras_oneimage_tuning.json``); the keys are those of earlier releases."""
    return {
        "method": run.method.method_name,
        "algorithm": search.algorithm,
        "objective": search.objective.spec,
        "image_sha256": trainer.images_sha256(run.images),
        "dataset": _dataset_identity(dataset, data),
        "max_per_class": max_per_class,
        "val_fraction": val_fraction,
        "seed": run.seed,
        "image_size": run.image_size,
        "epochs": run.epochs,
        "steps_per_epoch": run.steps_per_epoch,
        "batch_size": run.batch_size,
        "widths": list(run.widths) if run.widths is not None else None,
        "variant": run.variant,
        "method_options": dict(run.method_options),
        "base_augment": dataclasses.asdict(run.augment),
        "search_space": space_description(space),
        "probe_epochs": settings.probe_epochs,
        "probe_batch_size": settings.probe_batch_size,
        **({"precision": run.precision} if run.precision != "float32" else {}),
        **({"trunk": run.trunk} if run.trunk != "alexnet" else {}),  # projects made before trunks stay valid
        **({} if settings.probe_augment else {"probe_augment": False}),
        **({} if settings.probe_learning_rate is None else {"probe_learning_rate": settings.probe_learning_rate}),
        **({"hyperband_factor": search.hyperband_factor, "hyperband_iterations": search.hyperband_iterations}
           if search.algorithm == "hyperband" else {}),
    }  # fmt: skip


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
