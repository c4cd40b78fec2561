"""One Keras ``fit`` loop for every method: callbacks, atomic checkpoints, resume, divergence guard.

With an ``output_dir`` the run is resumable: rerunning with the same directory continues after the last completed
epoch (``keras.callbacks.BackupAndRestore`` state in ``output_dir/backup``). Each completed epoch appends a row to
``history.csv``, replaces ``model.keras`` atomically and redraws ``conv1_filters.png``; TensorBoard logs go to
``output_dir/logs``. A non-finite loss stops training and raises `NonFiniteLossError`, leaving the last good
checkpoint in place. Nothing here pins a device or a strategy: build and compile the model under a
``tf.distribute`` strategy scope and call `run_training` there.
"""
from __future__ import annotations

import csv
import io
import math
import os
import pathlib
import tempfile
import warnings
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_oneimage.errors import InputError, NonFiniteLossError

BACKUP_DIR = "backup"
LOGS_DIR = "logs"
HISTORY_CSV = "history.csv"
CHECKPOINT = "model.keras"
_UMASK = os.umask(0)
os.umask(_UMASK)
FILTERS_PNG = "conv1_filters.png"


def configure_threads(intra_op: int | None = None, inter_op: int | None = None) -> bool:
    """Set TensorFlow's intra-/inter-op thread pools (0 = TF's choice). Call before TF runs anything.

    Returns True if applied; False (with a warning) if TF was already initialised with other values.
    """
    for name, value in (("intra_op", intra_op), ("inter_op", inter_op)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"{name} threads must be a non-negative integer, got {value!r}")
    threading = tf.config.threading
    try:
        if intra_op is not None:
            threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op is not None:
            threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        current = (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())
        wanted = (current[0] if intra_op is None else intra_op, current[1] if inter_op is None else inter_op)
        if current != wanted:
            warnings.warn(f"TensorFlow is already initialised with threads {current}; cannot switch to {wanted}")
            return False
    return True


def _finite_number(value: Any) -> float | None:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(arr) if arr.ndim == 0 else None


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the first batch whose logged loss (or any logged metric) is NaN/inf; records where."""

    def __init__(self):
        super().__init__()
        self.failure: str | None = None
        self.failed_epoch: int | None = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.failure = None
        self.failed_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _check(self, logs, where: str) -> None:
        if self.failure is not None:
            return
        for key, value in (logs or {}).items():
            number = _finite_number(value)
            if number is not None and not math.isfinite(number):
                epochs = self.params.get("epochs") if self.params else None
                of = f"/{epochs}" if epochs else ""
                self.failure = f"{key} became {number} at epoch {self._epoch + 1}{of}, {where}"
                self.failed_epoch = self._epoch
                self.model.stop_training = True
                return

    def on_train_batch_end(self, batch, logs=None):
        steps = self.params.get("steps") if self.params else None
        self._check(logs, f"step {batch + 1}" + (f"/{steps}" if steps else ""))

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, "epoch end")


class _GuardedBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that never backs up a diverged epoch; its restore is triggered by `_RestoreFirst`."""

    def __init__(self, backup_dir: str, guard: NonFiniteGuard):
        # delete_checkpoint=False: a finished run can be extended by rerunning with more epochs.
        super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)
        self.guard = guard

    def on_train_begin(self, logs=None):  # restored earlier, by _RestoreFirst
        pass

    def restore(self, logs=None):
        super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.failure is None:
            super().on_epoch_end(epoch, logs)


class _RestoreFirst(keras.callbacks.Callback):
    """First in the list: restore weights/epoch before any other callback's ``on_train_begin`` sees the model."""

    def __init__(self, backup: _GuardedBackup):
        super().__init__()
        self.backup = backup

    def set_model(self, model):
        super().set_model(model)
        self.backup.set_model(model)

    def on_train_begin(self, logs=None):
        self.backup.restore(logs)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class HistoryCSV(keras.callbacks.Callback):
    """``history.csv`` with one row per completed epoch (0-based ``epoch`` column, as Keras's CSVLogger).

    On resume, rows of epochs that are about to be rerun are dropped, so every epoch appears exactly once.
    """

    def __init__(self, path: str | os.PathLike, guard: NonFiniteGuard | None = None):
        super().__init__()
        self.path = pathlib.Path(path)
        self.guard = guard
        self.rows: list[dict[str, str]] = []
        self._first_epoch = True

    def on_train_begin(self, logs=None):
        self.rows = []
        self._first_epoch = True
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self._first_epoch = False
            self.rows = [r for r in self.rows if _int_or(r.get("epoch"), -1) < epoch]

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.failure is not None:
            return
        row = {"epoch": str(epoch)}
        for key, value in (logs or {}).items():
            number = _finite_number(value)
            row[key] = repr(number) if number is not None else str(value)
        self.rows.append(row)
        fields = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        _write_atomic(self.path, buf.getvalue())


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def save_model_atomic(model: keras.Model, path: str | os.PathLike) -> pathlib.Path:
    """``model.save(path)`` through a temporary ``.keras`` file in the same directory and ``os.replace``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".keras")
    os.close(fd)
    try:
        model.save(tmp, overwrite=True)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class EpochCheckpoint(keras.callbacks.Callback):
    """After every good epoch: ``model.keras`` (atomic) and ``conv1_filters.png``; the PNG again at the end."""

    def __init__(self, output_dir: str | os.PathLike, guard: NonFiniteGuard | None = None, filters: bool = True):
        super().__init__()
        self.output_dir = pathlib.Path(output_dir)
        self.guard = guard
        self.filters = filters

    def _ok(self) -> bool:
        return self.guard is None or self.guard.failure is None

    def _plot(self, title: str) -> None:
        if not self.filters:
            return
        from keras_oneimage.plots import conv1_filter_grid

        try:
            conv1_filter_grid(self.model, self.output_dir / FILTERS_PNG, title=title)
        except InputError:  # a model without an AlexNet conv1: nothing to draw
            self.filters = False

    def on_epoch_end(self, epoch, logs=None):
        if self._ok():
            save_model_atomic(self.model, self.output_dir / CHECKPOINT)
            self._plot(f"conv1 after epoch {epoch + 1}")

    def on_train_end(self, logs=None):
        if self._ok() and not (self.output_dir / FILTERS_PNG).exists():
            self._plot("conv1")


def _ensure_built(model: keras.Model, dataset) -> None:
    """Create every weight before `fit` (BackupAndRestore loads into a built model) with one zero-batch call."""
    if model.built:
        return
    spec = getattr(dataset, "element_spec", None)
    while isinstance(spec, (tuple, list)):
        spec = spec[0]
    shape = list(spec.shape) if spec is not None and spec.shape.rank == 4 else [None, None, None, 3]
    size = getattr(getattr(model, "backbone", model), "image_size", None)
    shape = [1] + [d if d is not None else size for d in shape[1:3]] + [shape[3] or 3]
    if None in shape:
        raise InputError("cannot infer the patch shape from the dataset; build the model before run_training")
    model(tf.zeros(shape, dtype=spec.dtype if spec is not None else tf.float32), training=False)


def run_training(
    method_model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    epochs: int,
    steps_per_epoch: int,
    output_dir: str | os.PathLike | None = None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    context: Any = None,
    verbose: str | int = "auto",
) -> keras.callbacks.History:
    """Train ``method_model`` on ``dataset`` for ``epochs`` x ``steps_per_epoch`` batches; return the History.

    Compiles with ``method_model.default_optimizer()`` if the model is not compiled yet. Adds
    ``method_model.method_callbacks(context)`` (when it has them) after ``callbacks``. With ``output_dir``:
    resume, ``history.csv``, ``model.keras``, TensorBoard ``logs/`` and ``conv1_filters.png`` (see module doc).
    Raises `NonFiniteLossError` if the loss becomes NaN/inf (the last good ``model.keras`` is kept).
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not getattr(method_model, "compiled", False) or method_model.optimizer is None:
        method_model.compile(optimizer=method_model.default_optimizer())

    _ensure_built(method_model, dataset)

    guard = NonFiniteGuard()
    head: list[keras.callbacks.Callback] = []
    tail: list[keras.callbacks.Callback] = []
    out = None
    if output_dir is not None:
        out = pathlib.Path(output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output_dir {str(out)!r}: {exc.strerror or exc}") from None
        backup = _GuardedBackup(str(out / BACKUP_DIR), guard)
        head.append(_RestoreFirst(backup))
        tail += [
            HistoryCSV(out / HISTORY_CSV, guard),
            EpochCheckpoint(out, guard),
            keras.callbacks.TensorBoard(log_dir=str(out / LOGS_DIR), write_graph=False, profile_batch=0),
            backup,  # last, so a crash mid-epoch-end never records an epoch whose outputs were not written
        ]
    method_cbs = method_model.method_callbacks(context) if hasattr(method_model, "method_callbacks") else []
    all_callbacks = [*head, guard, *(callbacks or []), *method_cbs, *tail]

    try:
        history = method_model.fit(
            dataset,
            epochs=int(epochs),
            steps_per_epoch=int(steps_per_epoch),
            callbacks=all_callbacks,
            verbose=verbose,
            shuffle=False,  # patch streams are already random; silences Keras's tf.data shuffle warning
        )
    finally:
        # BackupAndRestore leaves the resumed epoch on the model; a later fit() of the same model must not inherit it.
        if getattr(method_model, "_initial_epoch", None) is not None:
            method_model._initial_epoch = None
    if guard.failure is not None:
        if out is not None and (out / CHECKPOINT).exists():
            last = guard.failed_epoch or 0
            kept = f"{out / CHECKPOINT} holds " + (f"epoch {last}, the last good one" if last else "an earlier good run")
        else:
            kept = "no checkpoint was written"
        raise NonFiniteLossError(
            f"training stopped: {guard.failure}; {kept}. Try a lower learning rate.", history
        )
    return history
