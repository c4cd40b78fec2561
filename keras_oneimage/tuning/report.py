"""What a search found: the per-trial rows read back from Keras Tuner's oracle, the summary table, the result."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

from keras_oneimage.tuning.space import Spec, augment_from_values, search_values
from keras_oneimage.tuning.tuner import RUN_DIR, AugmentationTuner, TrialSettings


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
    settings: TrialSettings = dataclasses.field(repr=False)
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
        return s.train(self.best_augment, epochs=epochs, seed=seed, steps_per_epoch=steps_per_epoch,
                       output_dir=output_dir, verbose=verbose)

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


def trial_rows(tuner: AugmentationTuner) -> list[dict[str, Any]]:
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
