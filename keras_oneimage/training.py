"""One Keras ``fit`` loop for every method: callbacks, atomic checkpoints, resume, divergence guard.

With an ``output_dir`` the run is resumable: rerunning with the same directory continues after the last completed
epoch (`TrainingBackup`'s state in ``output_dir/backup``). Each completed epoch appends a row to
``history.csv``, replaces ``model.keras`` atomically and redraws ``conv1_filters.png``; TensorBoard logs go to
``output_dir/logs``. A non-finite loss stops training and raises `NonFiniteLossError`, leaving the last good
checkpoint in place.

Nothing here pins a device or a strategy: create the model under a ``tf.distribute`` strategy's scope and
`run_training` trains it under that strategy (``model.distribute_strategy``; ``keras_oneimage.fit(strategy=...)``
does this, see ``docs/distributed.md``). With several replicas, BatchNorm moving statistics are averaged over the
replicas at every epoch end. On a multi-worker run only the chief writes into ``output_dir``; the other workers
write the same files into ``output_dir/.workertemp_<task_id>`` (removed at the end) and every worker restores from
the chief's ``backup/``, which must therefore be on storage all workers share.
"""
from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import math
import os
import pathlib
import shutil
import tempfile
import time
import warnings
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_oneimage import distribute, files
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
    """Stops training at the first batch whose logged loss (or any logged metric) is NaN/inf; records where.

    A worker that stopped alone would leave the others waiting in the next all-reduce, so under a multi-worker
    strategy the decision must be the same on every worker: the batch logs are means over all replicas there (see
    `_vector_logs`), hence equal everywhere, and at each epoch end the workers also agree explicitly (one
    collective), in case a method logs a worker-local value.
    """

    def __init__(self, strategy: tf.distribute.Strategy | None = None):
        super().__init__()
        self.failure: str | None = None
        self.failed_epoch: int | None = None
        self._epoch = 0
        self._multi_worker = strategy is not None and distribute.is_multi_worker(strategy)
        self._strategy = strategy

    def on_train_begin(self, logs=None):
        self.failure = None
        self.failed_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _fail(self, message: str) -> None:
        self.failure = message
        self.failed_epoch = self._epoch
        self.model.stop_training = True

    def _check(self, logs, where: str) -> None:
        if self.failure is not None:
            return
        for key, value in (logs or {}).items():
            number = _finite_number(value)
            if number is not None and not math.isfinite(number):
                epochs = self.params.get("epochs") if self.params else None
                of = f"/{epochs}" if epochs else ""
                self._fail(f"{key} became {number} at epoch {self._epoch + 1}{of}, {where}")
                return

    def on_train_batch_end(self, batch, logs=None):
        steps = self.params.get("steps") if self.params else None
        self._check(logs, f"step {batch + 1}" + (f"/{steps}" if steps else ""))

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, "epoch end")
        # Every worker takes part in this collective at every epoch end, whatever it saw.
        if self._multi_worker and distribute.any_worker(self.failure is not None, self._strategy) \
                and self.failure is None:
            self._fail(f"another worker's loss became non-finite in epoch {epoch + 1}")


class _SyncStatistics(keras.callbacks.Callback):
    """At every epoch end (before probes, checkpoints and backups), average the replicas' BatchNorm statistics."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy
        self._sync = None

    def on_train_begin(self, logs=None):
        self._sync = distribute.SyncReplicaStatistics(self.model, self.strategy)

    def on_epoch_end(self, epoch, logs=None):
        self._sync()


@dataclasses.dataclass(frozen=True)
class BackupFiles:
    """The files of a backup directory: the latest (weights, metadata) pair and the previous one (``*.bkp``).

    The names are those ``keras.callbacks.BackupAndRestore`` uses, so a backup written by a release that still
    used that callback resumes. The metadata is the commit record: ``{"epoch": epochs completed, "batch": 0,
    "weights_sha256": ...}``.
    """

    directory: str

    @property
    def weights(self) -> str:
        return os.path.join(self.directory, "latest.weights.h5")

    @property
    def metadata(self) -> str:
        return os.path.join(self.directory, "training_metadata.json")

    @property
    def prev_weights(self) -> str:
        return f"{self.weights}.bkp"

    @property
    def prev_metadata(self) -> str:
        return f"{self.metadata}.bkp"

    def committed_epoch(self) -> int:
        """Epochs of the state a restore loads: the latest committed pair, else the previous one (0: none)."""
        for weights, metadata, prev in ((self.weights, self.metadata, self.prev_metadata),
                                        (self.prev_weights, self.prev_metadata, None)):
            try:
                return max(0, committed_epoch(weights, metadata, prev) or 0)
            except OSError:
                continue
        return 0  # nothing usable: the restore stops the run with its own message


class TrainingBackup(keras.callbacks.Callback):
    """Kill-safe resume state: after every good epoch, the weights (with the optimizer's state) and the epoch.

    `restore` runs before ``fit`` (which is then given ``initial_epoch``), so every callback sees the restored model.
    Restores from ``backup_dir`` and backs up into ``write_dir`` (default: the same). On a multi-worker run every
    worker restores from the chief's ``backup_dir`` while only the chief writes there; the other workers write
    into their scratch folder, and their restore never modifies the chief's files. A diverged epoch (``guard``)
    is never backed up.
    """

    def __init__(self, backup_dir: str, guard: NonFiniteGuard, write_dir: str | None = None):
        super().__init__()
        self.guard = guard
        self.read = BackupFiles(str(backup_dir))
        self.write = BackupFiles(str(write_dir or backup_dir))

    @property
    def read_dir(self) -> str:
        return self.read.directory

    def _load(self, weights: str, metadata: str, prev_metadata: str | None) -> int:
        """Load a committed (weights, metadata) pair (`committed_epoch`); return its epoch (0: nothing committed).

        A damaged pair raises OSError, so the caller falls back to the previous state instead of resuming a later
        epoch's weights, or fresh ones, under an earlier epoch number.
        """
        epoch = committed_epoch(weights, metadata, prev_metadata)
        if epoch is None:
            return 0  # a fresh start
        # Keras warns (on stderr) about every mismatched object before it gives up on a backup of another model;
        # a refused resume must print its one line only, so the warnings are replayed only when the load succeeds.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if self.model.optimizer is not None and not self.model.optimizer.built:
                    self.model.optimizer.build(self.model.trainable_variables)  # its slots are in the file
                self.model.load_weights(weights)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - h5py/Keras raise several types for unreadable weight files
                raise OSError(f"cannot load {weights} ({type(exc).__name__}: {exc})") from None
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return epoch

    def restore(self) -> int:
        """Load the latest committed state (else the previous one); return the epoch training resumes at."""
        files_ = self.read
        try:
            return self._load(files_.weights, files_.metadata, files_.prev_metadata)
        except OSError:
            if not os.path.exists(files_.prev_weights):
                raise
        if self.read == self.write:  # repair the latest state from the previous one, then load it
            _copy_atomic(files_.prev_weights, files_.weights)
            if os.path.exists(files_.prev_metadata):
                _copy_atomic(files_.prev_metadata, files_.metadata)
            elif os.path.exists(files_.metadata):
                os.remove(files_.metadata)
            return self._load(files_.weights, files_.metadata, files_.prev_metadata)
        # The chief's latest state is unreadable: load its previous one, read-only.
        return self._load(files_.prev_weights, files_.prev_metadata, None)

    def save(self, epoch: int) -> None:
        """Back up the model as having completed ``epoch`` epochs, atomically: a kill at any instant leaves a
        loadable (weights, metadata) pair.

        The new weights go to a temporary file; the current pair is copied (each file atomically) to ``*.bkp``;
        then the weights and last the metadata, which records the weights' sha256, are renamed into place.

        The weights are serialised in memory and written with plain file I/O: h5py writing straight to a full
        disk fails half-way and leaves HDF5 holding a broken open file, which crashed the interpreter at exit
        (SIGSEGV). Here a full disk is an ordinary OSError at the write, and free space is checked first.
        """
        out = self.write
        os.makedirs(out.directory, exist_ok=True)
        pending = os.path.join(out.directory, ".pending.weights.h5")
        data = weights_h5_bytes(self.model)
        copies = len(data) if os.path.exists(out.weights) else 0
        ensure_free_space(out.directory, len(data) + copies, "the backup")
        try:
            _write_bytes(pending, data)
        except BaseException as exc:
            if os.path.exists(pending):  # e.g. a full disk: leave no partial file behind
                os.remove(pending)
            if isinstance(exc, OSError) and not exc.filename:  # file.write() names no file: say which one
                raise OSError(exc.errno, exc.strerror, pending) from exc
            raise
        if os.path.exists(out.metadata) and os.path.exists(out.weights):
            _copy_atomic(out.weights, out.prev_weights)
            _copy_atomic(out.metadata, out.prev_metadata)
        os.replace(pending, out.weights)
        files.write_json_atomic(out.metadata, {"epoch": int(epoch), "batch": 0,
                                               "weights_sha256": files.bytes_sha256(data)})

    def peek(self) -> tuple[float, float]:
        """(1 if backed-up weights exist else 0, the recorded epoch or -1) of ``backup_dir``, without loading."""
        try:
            with open(self.read.metadata) as f:
                epoch = float(json.loads(f.read())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            epoch = -1.0
        return float(os.path.exists(self.read.weights)), epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.failure is None:
            self.save(epoch + 1)


class TimeBudget(keras.callbacks.Callback):
    """Stop training once ``minutes`` of wall-clock time have passed since ``on_train_begin``.

    It stops after the batch running at the deadline; that epoch then ends as usual (history, checkpoint and
    backup are written), so a budgeted run is a normal, resumable run. ``steps`` counts the batches trained.
    """

    def __init__(self, minutes: float):
        super().__init__()
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0:
            raise InputError(f"max_minutes must be a positive number, got {minutes!r}")
        self.minutes = float(minutes)
        self.steps = 0
        self.start: float | None = None

    def on_train_begin(self, logs=None):
        self.start = time.monotonic()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if time.monotonic() - self.start >= 60.0 * self.minutes:
            self.model.stop_training = True


def committed_epoch(weights: str, metadata: str, prev_metadata: str | None = None) -> int | None:
    """The epoch a backup (weights, metadata) pair committed; None when nothing was committed (a fresh start).

    The metadata is the commit record and must name the weights' sha256. An unreadable metadata file, missing
    weights, weights that do not match (a kill mid-backup), or weights without metadata beside an earlier
    commit raise OSError: the pair is damaged and the previous one is the state to resume.
    """
    if not os.path.exists(metadata):
        if os.path.exists(weights) and prev_metadata is not None and os.path.exists(prev_metadata):
            raise OSError(f"{metadata} is missing")
        return None
    try:
        with open(metadata) as f:
            recorded = json.loads(f.read())
        epoch = int(recorded["epoch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(f"unreadable {metadata} ({type(exc).__name__}: {exc})") from None
    if not os.path.exists(weights):
        raise OSError(f"{weights} is missing")
    expected = recorded.get("weights_sha256")
    if expected is not None and files.file_sha256(weights) != expected:
        raise OSError(f"{weights} does not match {metadata} (an interrupted backup)")
    return epoch


def completed_epochs(output_dir: str | os.PathLike | None) -> int:
    """Epochs of the state a rerun in ``output_dir`` resumes from (0 for a fresh run).

    The same decision as the restore: the latest committed backup, else the previous one when the latest is
    damaged. `fit` starts the patch stream at ``completed_epochs * steps_per_epoch`` so that a resumed run sees
    the same patches as an uninterrupted one.
    """
    if output_dir is None:
        return 0
    return BackupFiles(str(pathlib.Path(output_dir) / BACKUP_DIR)).committed_epoch()


def _weights_fingerprint(model: keras.Model) -> float:
    return float(sum(np.sum(np.asarray(w, dtype=np.float64)) for w in model.get_weights()))


def restore_backup(backup: TrainingBackup, model: keras.Model, strategy: tf.distribute.Strategy | None = None) -> int:
    """Restore ``model`` from ``backup`` before training; return the epoch training resumes at.

    On a multi-worker run it then checks (a collective, on every worker) that all workers restored the same epoch
    and weights, which fails when ``output_dir`` is not on storage every worker sees.
    """
    backup.set_model(model)
    multi_worker = strategy is not None and distribute.is_multi_worker(strategy)
    disagree = (f"the workers see different training states in {backup.read_dir}; on a multi-worker run "
                "output_dir must be on storage all workers share")
    # Loading can create variables, a collective under MultiWorkerMirroredStrategy: first make sure every worker
    # sees the same backup, so that all of them load it or none does.
    if multi_worker and not distribute.workers_agree(backup.peek(), strategy):
        raise InputError(disagree)
    try:
        epoch = backup.restore()
    except OSError as exc:  # neither the latest nor the previous backed-up state loads
        raise InputError(
            f"cannot resume from {backup.read_dir}: {exc}; delete that folder (or use another output_dir) to start "
            "the run again"
        ) from None
    if multi_worker and not distribute.workers_agree([epoch, _weights_fingerprint(model)], strategy):
        raise InputError(disagree)
    return epoch


def _copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    tmp = f"{os.fspath(dst)}.tmp"
    try:
        shutil.copyfile(src, tmp)
    except BaseException:
        if os.path.exists(tmp):  # a full disk: no partial copy left behind
            os.remove(tmp)
        raise
    os.replace(tmp, dst)


def _write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def weights_h5_bytes(model: keras.Model) -> bytes:
    """The bytes ``model.save_weights("x.weights.h5")`` would write, produced in memory (h5py never touches disk).

    Uses Keras's own writer (``saving_lib.H5IOStore`` on a ``BytesIO``, as ``save_weights`` does on a path). A
    Keras release that moved it fails here with an ImportError/AttributeError, loudly.
    """
    from keras.src.saving import saving_lib

    buf = io.BytesIO()
    store = saving_lib.H5IOStore(buf, mode="w")
    try:
        saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                               visited_saveables=set())
    finally:
        store.close()
    return buf.getvalue()


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes an unprivileged write may still use on the file system holding ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def ensure_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """Raise ``OSError(ENOSPC)`` before writing ``what`` when the disk has less than ``needed`` bytes (+ margin).

    The margin (10 % of the write, plus 1 MiB for the small files and file-system overhead) makes the check
    hold even though the files of an epoch differ a little in size from the previous ones.
    """
    needed = int(needed * 1.1) + (1 << 20)
    try:
        free = free_bytes(directory)
    except OSError:
        return  # cannot tell (e.g. the directory is gone): the write itself reports the problem
    if free < needed:
        raise OSError(errno.ENOSPC, f"not enough free space for {what}: about {_mib(needed)} needed, "
                      f"{_mib(free)} free", str(directory))


#: Temporary files of the atomic writes above and below; a killed run can leave them, the next run deletes them.
_STALE_PATTERNS = (f".{pathlib.Path(CHECKPOINT).stem}-*.keras", f".{HISTORY_CSV}-*.tmp",
                   f".{pathlib.Path(FILTERS_PNG).stem}-*.png", f"{BACKUP_DIR}/.pending.weights.h5",
                   f"{BACKUP_DIR}/*.tmp")


def _remove_stale_temporaries(directory: pathlib.Path) -> None:
    for pattern in _STALE_PATTERNS:
        for path in directory.glob(pattern):
            try:
                path.unlink()
            except OSError:
                pass


def _write_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
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


def _roll_back_to_committed(out: pathlib.Path, where: pathlib.Path | None) -> int:
    """After a failed write: make ``history.csv`` (and, with no committed epoch, ``model.keras``) match the backup.

    The backup is the commit record: an epoch whose backup was not written is redone by the rerun. Its row in
    ``history.csv`` (written first at the epoch end) is dropped now, and a ``model.keras`` written by an epoch that
    never committed is removed when no epoch committed at all; otherwise ``history.csv`` listed an epoch 0 with
    no resumable state behind it. Best effort: on a full disk even the rewrite can fail, and the rerun drops the
    rows anyway. Returns the number of committed epochs.
    """
    done = completed_epochs(out)
    if where is None:
        return done
    history = where / HISTORY_CSV
    try:
        if done == 0:
            for name in (HISTORY_CSV, CHECKPOINT, FILTERS_PNG):
                (where / name).unlink(missing_ok=True)
        elif history.exists():
            with open(history, newline="") as f:
                reader = csv.DictReader(f)
                fields, rows = reader.fieldnames or ["epoch"], list(reader)
            kept = [r for r in rows if _int_or(r.get("epoch"), -1) < done]
            if len(kept) != len(rows):
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows(kept)
                _write_atomic(history, buf.getvalue())
    except OSError:
        pass
    _remove_stale_temporaries(where)
    return done


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


def _variables_bytes(model: keras.Model) -> int:
    variables = list(model.weights)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


class _FreeSpaceCheck(keras.callbacks.Callback):
    """Before an epoch's files are written, check the disk can hold them all: otherwise none of them is written.

    An epoch end writes ``model.keras`` (through a temporary copy), the backup weights and a copy of the previous
    backup. Their sizes are taken from the previous save (the model's variables when there is none yet). At
    ``on_train_begin`` a disk that cannot hold even one epoch's files refuses the run before it trains
    (`InputError`: nothing written); later, the epoch end fails with ``OSError(ENOSPC)`` before writing anything,
    and the files of the last completed epoch stay as they were.
    """

    def __init__(self, output_dir: pathlib.Path, backup_dir: str, guard: NonFiniteGuard):
        super().__init__()
        self.output_dir = output_dir
        self.backup_dir = backup_dir
        self.guard = guard

    def needed(self) -> int:
        estimate = _variables_bytes(self.model)

        def size(path) -> int:
            try:
                return os.path.getsize(path)
            except OSError:
                return estimate

        model_bytes = size(self.output_dir / CHECKPOINT)
        latest = pathlib.Path(BackupFiles(self.backup_dir).weights)
        backup_bytes = size(latest)
        # model.keras goes through a temporary file beside the old one; the backup writes its new weights and
        # copies the previous ones to *.bkp before renaming; the first epoch adds both files to the disk.
        return model_bytes + backup_bytes * (2 if latest.exists() else 1)

    def on_train_begin(self, logs=None):
        try:
            ensure_free_space(self.output_dir, self.needed(), "one epoch's checkpoint and backup")
        except OSError as exc:
            raise InputError(f"cannot train in output_dir {str(self.output_dir)!r}: {exc.strerror}; free some space "
                             "or use another output_dir") from None

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.failure is None:
            ensure_free_space(self.output_dir, self.needed(), f"epoch {epoch + 1}'s checkpoint and backup")


def _ensure_built(model: keras.Model, dataset) -> None:
    """Create every weight before `fit` (the backup loads into a built model) with one zero-batch call."""
    if model.built:
        return
    spec = getattr(dataset, "element_spec", None)
    # A distributed dataset's spec is a PerReplicaSpec (or a tuple of them): take its first tensor spec.
    flat = [s for s in tf.nest.flatten(spec, expand_composites=True) if isinstance(s, tf.TensorSpec)]
    spec = flat[0] if flat else None
    shape = list(spec.shape) if spec is not None and spec.shape.rank == 4 else [None, None, None, 3]
    size = getattr(getattr(model, "backbone", model), "image_size", None)
    shape = [1] + [d if d is not None else size for d in shape[1:3]] + [shape[3] or 3]
    if None in shape:
        raise InputError("cannot infer the patch shape from the dataset; build the model before run_training")
    model(tf.zeros(shape, dtype=spec.dtype if spec is not None else tf.float32), training=False)


def _vector_logs(train_step):
    """``train_step`` with its scalar logs reshaped to ``(1,)``, for a multi-worker strategy.

    Keras 3 reduces the step's logs across workers with ``strategy.reduce(MEAN, value, axis=0)``, which fails on
    scalars ("Invalid reduction dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388). On a
    ``(1,)`` value it returns the scalar mean over all replicas, so every worker logs the same numbers.
    """

    def step(data):
        logs = train_step(data)

        def as_vector(value):
            value = tf.convert_to_tensor(value)
            return tf.reshape(value, [1]) if value.shape.rank == 0 else value

        return tf.nest.map_structure(as_vector, logs)

    return step


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
    # The strategy the model was created under (TensorFlow's default one when none): the default optimizer and
    # any weight not built yet must be created in its scope.
    strategy = method_model.distribute_strategy
    with strategy.scope():
        if not getattr(method_model, "compiled", False) or method_model.optimizer is None:
            method_model.compile(optimizer=method_model.default_optimizer())
        _ensure_built(method_model, dataset)
        # Create the optimizer's slots now, on every worker alike: under MultiWorkerMirroredStrategy creating a
        # variable is a collective (worker 0 broadcasts the initial value), so it must not happen only where a
        # backup is restored (the restore builds the optimizer when it loads one).
        if method_model.optimizer is not None and not method_model.optimizer.built:
            method_model.optimizer.build(method_model.trainable_variables)

    vector_logs = distribute.is_multi_worker(strategy) and "train_step" not in vars(method_model)
    if vector_logs:
        method_model.train_step = _vector_logs(method_model.train_step)
    guard = NonFiniteGuard(strategy)
    head: list[keras.callbacks.Callback] = []
    tail: list[keras.callbacks.Callback] = []
    out = scratch = backup = None
    if output_dir is not None:
        out = pathlib.Path(output_dir)
        # Multi-worker: only the chief writes into output_dir; the others write the same files into their
        # scratch folder (deleted at the end) and restore from the chief's backup.
        where = pathlib.Path(distribute.write_dir(out, strategy))
        if where != out:
            scratch = where
            shutil.rmtree(scratch, ignore_errors=True)  # left over by a crashed run
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output_dir {str(where)!r}: {exc.strerror or exc}") from None
        backup = TrainingBackup(str(out / BACKUP_DIR), guard, write_dir=str(where / BACKUP_DIR))
        tail += [
            _FreeSpaceCheck(where, str(where / BACKUP_DIR), guard),  # before any of the epoch's files is written
            HistoryCSV(where / HISTORY_CSV, guard),
            EpochCheckpoint(where, guard),
            keras.callbacks.TensorBoard(log_dir=str(where / LOGS_DIR), write_graph=False, profile_batch=0),
            backup,  # last, so a crash mid-epoch-end never records an epoch whose outputs were not written
        ]
    method_cbs = method_model.method_callbacks(context) if hasattr(method_model, "method_callbacks") else []
    if strategy.num_replicas_in_sync > 1:
        head.append(_SyncStatistics(strategy))  # before the user's callbacks (a probe) and the checkpoints
    all_callbacks = [*head, guard, *(callbacks or []), *method_cbs, *tail]

    try:
        initial_epoch = 0
        if backup is not None:
            # Restored before fit, so that every callback's on_train_begin sees the restored model.
            with strategy.scope():
                initial_epoch = restore_backup(backup, method_model, strategy)
            # Stale temporaries are deleted only once the restore succeeded: a refused run leaves the directory as
            # it was.
            _remove_stale_temporaries(where)
        history = method_model.fit(
            dataset,
            initial_epoch=initial_epoch,
            epochs=int(epochs),
            steps_per_epoch=int(steps_per_epoch),
            callbacks=all_callbacks,
            verbose=verbose,
            shuffle=False,  # patch streams are already random; silences Keras's tf.data shuffle warning
        )
    except OSError as exc:  # disk full, output_dir gone or unwritable: one clear line; what was saved is intact
        if out is None:
            raise
        where_ = f": {exc.filename}" if exc.filename else ""
        done = _roll_back_to_committed(out, where if scratch is None else None)
        kept = (f"the files of the last completed epoch ({done}) are intact: rerun the same command to resume"
                if done else "no epoch was completed, so nothing of it was kept: rerun the same command to start")
        raise OSError(
            exc.errno,
            f"cannot write the training output in {str(out)!r} ({exc.strerror or exc}{where_}); {kept} once it "
            "can write there",
        ) from exc
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if vector_logs:
            del method_model.train_step
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
