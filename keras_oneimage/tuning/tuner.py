"""The Keras Tuner that runs a trial: train the method on the source image with the trial's augmentation, score it.

Each trial lives in ``directory/project_name/trial_<id>/``: ``run/`` is a `fit`-style output directory
(``model.keras``, ``history.csv``, TensorBoard ``logs/``, ``backup/``), ``result.json`` holds the augmentation and
the probe scores, and ``hparams/`` a TensorBoard HParams record. Hyperband treats training epochs as the budget: a
trial promoted to a larger budget continues from its parent trial's checkpoint and is scored at the new budget.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Any, Mapping

import keras_tuner

from keras_oneimage import files, trainer
from keras_oneimage.errors import InputError, NonFiniteLossError
from keras_oneimage.tuning.objective import ProbeObjective
from keras_oneimage.tuning.space import augment_from_values, search_values

RESULT_JSON = "result.json"
RUN_DIR = "run"


@dataclasses.dataclass(frozen=True)
class TrialSettings:
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
    trunk: str = "alexnet"

    def train(self, augment, *, epochs: int, seed: int | None = None, stream_seed: int | None = None,
              steps_per_epoch: int | None = None, output_dir=None, verbose: str | int = 0):
        """Train the method with ``augment`` through the one training core; return the trained model."""
        return trainer.train_method(
            list(self.images), method=self.method, augment=augment, image_size=self.image_size,
            batch_size=self.batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch or self.steps_per_epoch,
            seed=self.seed if seed is None else seed, stream_seed=stream_seed, widths=self.widths,
            variant=self.variant, output_dir=output_dir, verbose=verbose, method_options=self.method_options,
            precision=self.precision, trunk=self.trunk,
        )  # fmt: skip

    def probe(self, backbone, data, layers) -> dict[str, float]:
        """The trial's score: linear probes on the validation split (never the test split)."""
        from keras_oneimage.probes import linear

        return linear.probe_val(
            backbone, data, layers=layers, epochs=self.probe_epochs, batch_size=self.probe_batch_size,
            seed=self.seed, verbose=0, augment=self.probe_augment,
            **({} if self.probe_learning_rate is None else {"learning_rate": self.probe_learning_rate}),
        )  # fmt: skip


def stream_seed(seed: int, initial_epoch: int) -> int:
    """A fresh patch stream for a Hyperband continuation (the parent already consumed ``seed``'s stream)."""
    return int(seed) if initial_epoch == 0 else int(seed) + 1_000_003 * int(initial_epoch)


class AugmentationTuner(keras_tuner.Tuner):
    """A Keras Tuner whose trial trains a method on the source image and returns the val probe accuracies.

    ``run_trial`` returns ``{objective.name: value, "val_<layer>": accuracy, ...}``. It honours Hyperband's
    ``tuner/epochs`` (the trial's total epochs), ``tuner/initial_epoch`` and ``tuner/trial_id`` (continue from
    that trial's checkpoint: its ``run/backup`` is copied and training resumes after its last epoch).
    """

    def __init__(self, oracle, *, settings: TrialSettings, data, objective: ProbeObjective, keep_backups: bool,
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
        resumed_from = adopt_parent_checkpoint(run_dir, self.run_dir_of(parent) if parent else None)
        self.trained.append(trial.trial_id)

        import keras

        keras.backend.clear_session()
        try:
            model = s.train(augment, epochs=epochs, stream_seed=stream_seed(s.seed, initial_epoch),
                            output_dir=run_dir, verbose=2 if self.oracle.verbose == 2 else 0)
        except NonFiniteLossError as exc:
            raise keras_tuner.errors.FailedTrialError(str(exc)) from None
        scores = s.probe(model.backbone, self.data, self.probe_objective.layers)
        metrics = {f"val_{layer}": float(acc) for layer, acc in scores.items()}
        metrics[self.probe_objective.name] = self.probe_objective.value(scores)
        files.write_json_atomic(trial_dir / RESULT_JSON, {
            "trial_id": trial.trial_id,
            "hyperparameters": search_values(values),
            "augment": dataclasses.asdict(augment),
            "epochs": epochs,
            "initial_epoch": initial_epoch,
            "continued_from": parent,
            "resumed_from_epoch": resumed_from,
            "metrics": metrics,
            "objective": self.probe_objective.name,
        })  # fmt: skip
        write_hparams(trial_dir / "hparams", trial.trial_id, search_values(values), metrics, epochs)
        if not self.keep_backups:
            shutil.rmtree(run_dir / "backup", ignore_errors=True)
        return metrics

    def run_dir_of(self, trial_id: str) -> pathlib.Path:
        return pathlib.Path(self.project_dir) / f"trial_{trial_id}" / RUN_DIR

    # The tuner saves nothing per epoch itself: the training core checkpoints into trial_<id>/run.
    def save_model(self, trial_id, model, step=0):
        pass

    def load_model(self, trial):
        from keras_oneimage.checkpoints import load_checkpoint

        return load_checkpoint(self.run_dir_of(trial.trial_id))[0]


def adopt_parent_checkpoint(run_dir: pathlib.Path, parent_run: pathlib.Path | None) -> int:
    """Seed ``run_dir`` with the parent's resume state (first attempt only); return the epoch training resumes at.

    A retried trial keeps its own state (it resumes after its own last completed epoch). Without a usable parent
    checkpoint the trial trains from scratch for its whole budget. The epoch is read as the restore reads it
    (`training.completed_epochs`: the committed backup whose weights match their recorded hash).
    """
    from keras_oneimage.training import BACKUP_DIR, HISTORY_CSV, completed_epochs

    own = run_dir / BACKUP_DIR
    if parent_run is not None and not own.exists() and (parent_run / BACKUP_DIR).is_dir():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(parent_run / BACKUP_DIR, own)
        if (parent_run / HISTORY_CSV).exists():
            shutil.copy2(parent_run / HISTORY_CSV, run_dir / HISTORY_CSV)
    return completed_epochs(run_dir)


def write_hparams(logdir: pathlib.Path, trial_id: str, values: Mapping[str, Any], metrics: Mapping[str, float],
                  step: int) -> None:
    """A TensorBoard HParams session for the trial: its hyper-parameters and its probe scores."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams_api

    with tf.summary.create_file_writer(str(logdir)).as_default():
        hparams_api.hparams(dict(values), trial_id=str(trial_id))
        for name, value in metrics.items():
            tf.summary.scalar(name, float(value), step=int(step))
