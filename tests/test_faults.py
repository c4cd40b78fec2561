"""Faults during training: kill -9 at any point, a NaN loss, a full disk. Nothing saved is ever lost or corrupted.

Guarantees (docs/robustness.md):

* after ``kill -9`` at any instant, rerunning the same command resumes after the last completed epoch, with that
  epoch's exact weights; ``history.csv`` then lists every epoch exactly once; ``model.keras`` always loads;
* a NaN/inf loss stops training with one line naming the epoch and step, a non-zero exit status, and the last good
  epoch's ``model.keras`` and backup intact;
* a failed write (disk full) is one clear line, leaves every file of the last completed epoch intact and no
  temporary file, and the run resumes once there is space.

The kill tests run ``keras-oneimage fit`` in a real process (a test-only 8-channel method keeps epochs short) and
record a fingerprint of the weights at the start of each run and at the end of every epoch, so that a resume from
the wrong state (a later epoch's weights under an earlier epoch number, or fresh weights) is caught.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_oneimage import api, cli
from keras_oneimage.methods import registry
from keras_oneimage.methods.rotnet import RotNet, rotation_loss

TINY = "tiny_faults_rotnet"
NAN = "nan_faults_rotnet"
PROG = "keras-oneimage"

# The test-only method, identical in this process and in the `keras-oneimage fit` subprocesses.
_TINY_SOURCE = '''
@keras.saving.register_keras_serializable(package="keras_oneimage_tests")
class TinyFaultsRotNet(RotNet):
    """RotNet on an 8-channel AlexNet with an 8-wide head."""

    backbone_options = {"widths": (8, 8, 8, 8, 8)}

    def __init__(self, backbone, head_widths=(8,), **kwargs):
        super().__init__(backbone, head_widths=head_widths, **kwargs)


def fingerprint(model):
    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()[:16]


class Fingerprints(keras.callbacks.Callback):
    """Records 'FAULTS start <weights>' when training starts (after any restore), 'FAULTS begin <epoch> <weights>'
    at the first epoch a run trains and 'FAULTS end <epoch> <weights>' after every epoch."""

    def __init__(self, sink=print):
        super().__init__()
        self.sink, self.started = sink, False

    def on_train_begin(self, logs=None):
        self.sink(f"FAULTS start 0 {fingerprint(self.model)}")

    def on_epoch_begin(self, epoch, logs=None):
        if not self.started:
            self.started = True
            self.sink(f"FAULTS begin {epoch} {fingerprint(self.model)}")

    def on_epoch_end(self, epoch, logs=None):
        self.sink(f"FAULTS end {epoch} {fingerprint(self.model)}")
'''
exec(_TINY_SOURCE)  # defines TinyFaultsRotNet, fingerprint, Fingerprints here

_SCRIPT = r'''
import hashlib, os, signal, sys
from keras_oneimage import cli
cli._import_tensorflow_quietly()
import keras
import numpy as np
from keras_oneimage import api
from keras_oneimage.methods.registry import register
from keras_oneimage.methods.rotnet import RotNet
''' + _TINY_SOURCE + r'''
register("tiny_faults_rotnet")(TinyFaultsRotNet)
_fit = api.fit
def fit(*args, **kwargs):
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Fingerprints(lambda line: print("\n" + line, flush=True))]
    return _fit(*args, **kwargs)
api.fit = fit

# FAULTS_KILL="model_keras:N": SIGKILL while the N-th model.keras is half written (before its atomic rename).
# FAULTS_KILL="backup_commit:N": SIGKILL right after the N-th backup's new weights replaced the latest ones,
# before the metadata that commits them is written.
what, _, count = os.environ.get("FAULTS_KILL", "").partition(":")
if what:
    seen = [0]
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(dst))
        if (what, name) in (("model_keras", "model.keras"), ("backup_commit", "latest.weights.h5")):
            seen[0] += 1
            if seen[0] == int(count):
                if what == "model_keras":
                    with open(src, "r+b") as f:
                        f.truncate(os.path.getsize(src) // 2)
                else:
                    real_replace(src, dst, *args, **kwargs)
                print("FAULTS killing", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
# FAULTS_NO_SPACE_CHECK=1: skip the free-space checks, so that a full disk fails at the write itself.
if os.environ.get("FAULTS_NO_SPACE_CHECK"):
    from keras_oneimage import training
    training.ensure_free_space = lambda *args, **kwargs: None
sys.exit(cli.main(["keras-oneimage", *sys.argv[1:]]))
'''


@pytest.fixture(scope="module", autouse=True)
def registered_methods():
    registry.register(TINY)(TinyFaultsRotNet)
    registry.register(NAN)(NanFaultsRotNet)
    yield
    for name in (TINY, NAN):
        registry._REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    return str(path)


def fit_args(image: str, out: pathlib.Path, epochs: int, steps: int, method: str = TINY) -> list[str]:
    return ["fit", f"--method={method}", f"--image={image}", "--image_size=32", "--batch_size=4",
            f"--epochs={epochs}", f"--steps_per_epoch={steps}", f"--output_dir={out}"]


def start(args: list[str], log: pathlib.Path, kill: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FAULTS_KILL", None)
    if kill:
        env["FAULTS_KILL"] = kill
    # stdout to a file, not a pipe: Keras's progress bars must never block the process on a full pipe
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=str(log.parent))


def wait(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the training subprocess did not finish in time")


def events(text: str) -> list[tuple[str, int, str]]:
    """The ('start'|'begin'|'end', epoch, fingerprint) records of one run, in order."""
    return [(m[1], int(m[2]), m[3]) for m in re.finditer(r"FAULTS (start|begin|end) (\d+) (\w+)$", text, re.M)]


def rerun_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str, list[tuple[str, int, str]]]:
    """Rerun the same command in this process (cheaper than a subprocess), recording fingerprints."""
    lines: list[str] = []
    real_fit = api.fit

    def fit(*a, **k):
        k["callbacks"] = [*(k.get("callbacks") or []), Fingerprints(lines.append)]
        return real_fit(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(api, "fit", fit)
        rc = cli.main([PROG, *args])
    err = capsys.readouterr().err
    return rc, err, events("\n".join(lines))


def history_rows(out: pathlib.Path) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def backup_epoch(out: pathlib.Path) -> int | None:
    try:
        return json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return None


def load_fingerprint(path: pathlib.Path) -> str:
    """model.keras must load; returns its weights' fingerprint."""
    try:
        return fingerprint(api.load_trained(path))
    except Exception:
        import shutil

        from keras_oneimage.checkpoints import import_registered_classes

        shutil.copy(path, path.with_name("unloadable.keras.copy"))  # kept in pytest's tmp dir for a post-mortem
        import_registered_classes()
        keras.saving.load_model(path, compile=False)  # raises Keras's full message
        raise


def stale_temporaries(out: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in [*out.glob(".*"), *(out / "backup").glob(".*"),
                                                    *(out / "backup").glob("*.tmp")])


def check_chain(runs: list[list[tuple[str, int, str]]]) -> dict[int, str]:
    """Every run begins with the exact weights the previous runs ended that epoch with; returns epoch → weights."""
    ended: dict[int, str] = {}
    for i, run in enumerate(runs):
        begins = [(e, f) for kind, e, f in run if kind == "begin"]
        assert len(begins) == 1, f"run {i} did not start training: {run}"
        epoch, weights = begins[0]
        if epoch > 0:
            assert weights == ended[epoch - 1], (
                f"run {i} resumed at epoch {epoch} with weights {weights}, but epoch {epoch - 1} ended with "
                f"{ended[epoch - 1]}: it restored the wrong state")
        for kind, e, f in run:
            if kind == "end":
                ended[e] = f
    return ended


# ================================================================================================= kill -9
def test_kill_9_at_any_point_then_rerun_resumes_exactly_without_gap_or_repeat(image, tmp_path, monkeypatch, capsys):
    """Three real `keras-oneimage fit` processes killed with SIGKILL (mid-epoch; while model.keras is half
    written; between the backup's new weights and the metadata that commits them), then the same command to the
    end: each run resumes after the last completed epoch with exactly its weights, and nothing is corrupted."""
    out = tmp_path / "run"
    args = fit_args(image, out, epochs=6, steps=10)
    runs: list[list[tuple[str, int, str]]] = []

    # 1. SIGKILL from outside, as soon as an epoch is backed up: the process is then in the next epoch.
    proc = start(args, tmp_path / "1.log")
    deadline = time.monotonic() + 240
    while (backup_epoch(out) or 0) < 1:
        assert proc.poll() is None, "training ended before it was killed:\n" + (tmp_path / "1.log").read_text()
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert wait(proc) == -signal.SIGKILL
    runs.append(events((tmp_path / "1.log").read_text()))
    done = backup_epoch(out)
    rows = history_rows(out)
    assert 1 <= done <= 3 and [int(r["epoch"]) for r in rows][:done] == list(range(done))
    assert len(rows) - 1 <= done <= len(rows)  # the CSV may be one epoch ahead of the backup, never behind
    assert load_fingerprint(out / "model.keras") in {f for kind, _, f in runs[-1] if kind == "end"}
    completed_rows = rows[:done]

    # 2. Resumed, and killed while its 2nd model.keras is half written (before the atomic rename).
    proc = start(args, tmp_path / "2.log", kill="model_keras:2")
    assert wait(proc) == -signal.SIGKILL, (tmp_path / "2.log").read_text()[-3000:]
    runs.append(events((tmp_path / "2.log").read_text()))
    assert runs[-1][1][:2] == ("begin", done), "resumed after the last completed epoch"
    ended = check_chain(runs)
    assert load_fingerprint(out / "model.keras") == ended[done], "model.keras is still the complete previous epoch"
    assert any(p.name.startswith(".model-") for p in out.iterdir()), "the half-written temporary file is there"
    assert backup_epoch(out) == done + 1
    done += 1

    # 3. Resumed, and killed after the backup's new weights replaced the latest ones but before the metadata that
    #    commits them: the next run must notice the mismatch and restore the previous, consistent state.
    proc = start(args, tmp_path / "3.log", kill="backup_commit:1")
    assert wait(proc) == -signal.SIGKILL, (tmp_path / "3.log").read_text()[-3000:]
    runs.append(events((tmp_path / "3.log").read_text()))
    assert runs[-1][1][:2] == ("begin", done)
    load_fingerprint(out / "model.keras")

    # 4. The same command again, to the end.
    rc, err, last = rerun_in_process(args, monkeypatch, capsys)
    runs.append(last)
    assert rc == 0, err
    assert last[1][:2] == ("begin", done), "the half-committed epoch is trained again"
    ended = check_chain(runs)
    rows = history_rows(out)
    assert [int(r["epoch"]) for r in rows] == list(range(6)), "every epoch exactly once, in order"
    assert rows[: len(completed_rows)] == completed_rows, "completed epochs' metrics are kept as they were"
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert load_fingerprint(out / "model.keras") == ended[5]
    assert backup_epoch(out) == 6
    assert stale_temporaries(out) == [], "the rerun removed what the killed writes left behind"


# ======================================================================== states a crash or a bad disk leaves
@pytest.fixture(scope="module")
def finished_run(image, tmp_path_factory):
    """A completed 2-epoch run and the weights fingerprint at the end of each epoch."""
    out = tmp_path_factory.mktemp("finished") / "run"
    lines: list[str] = []
    api.fit(image, method=TINY, image_size=32, batch_size=4, epochs=2, steps_per_epoch=1, output_dir=out,
            verbose=0, callbacks=[Fingerprints(lines.append)])
    ended = {e: f for kind, e, f in events("\n".join(lines)) if kind == "end"}
    return out, ended


def test_a_resumed_run_sees_the_same_patches_as_an_uninterrupted_one(finished_run, image, tmp_path):
    """1 epoch, stop, rerun to 2 epochs: the patch stream continues at step 1 (not step 0), so the weights end
    bit-identical to the uninterrupted 2-epoch run's."""
    _, uninterrupted = finished_run
    out = tmp_path / "run"
    api.fit(image, method=TINY, image_size=32, batch_size=4, epochs=1, steps_per_epoch=1, output_dir=out, verbose=0)
    lines: list[str] = []
    api.fit(image, method=TINY, image_size=32, batch_size=4, epochs=2, steps_per_epoch=1, output_dir=out,
            verbose=0, callbacks=[Fingerprints(lines.append)])
    ended = {e: f for kind, e, f in events("\n".join(lines)) if kind == "end"}
    assert list(ended) == [1]
    assert ended[1] == uninterrupted[1]


def restored_weights(image: str, out: pathlib.Path) -> tuple[str, list[int]]:
    """Rerun with epochs=1: nothing trains when epoch 1 is restored; returns (restored weights, epochs trained)."""
    lines: list[str] = []
    history = api.fit(image, method=TINY, image_size=32, batch_size=4, epochs=1, steps_per_epoch=1,
                      output_dir=out, verbose=0, callbacks=[Fingerprints(lines.append)]).history
    return events("\n".join(lines))[0][2], list(history.epoch)


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BACKUP_DAMAGE = {
    # Keras's own BackupAndRestore writes these in place: a kill mid-write leaves them empty or truncated
    "empty_metadata": lambda b: (b / "training_metadata.json").write_text(""),
    "truncated_weights": lambda b: _truncate(b / "latest.weights.h5"),
    # newer weights under older metadata (a kill between the two writes)
    "weights_ahead_of_metadata": lambda b: (b / "training_metadata.json").write_bytes(
        (b / "training_metadata.json.bkp").read_bytes()),
}


@pytest.mark.parametrize("damage", sorted(BACKUP_DAMAGE))
def test_damaged_latest_backup_falls_back_to_the_previous_epoch(finished_run, image, tmp_path, damage):
    import shutil

    source, ended = finished_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    BACKUP_DAMAGE[damage](out / "backup")
    from keras_oneimage.training import completed_epochs

    assert completed_epochs(out) == 1, "the patch stream resumes where the restored epoch left it"
    weights, trained = restored_weights(image, out)
    assert weights == ended[0] and trained == [], "epoch 1 restored, with exactly its weights"
    assert backup_epoch(out) == 1  # the latest state was repaired from the previous one


def test_unreadable_backup_is_one_clear_error(finished_run, image, tmp_path, capsys):
    import shutil

    source, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    for name in ("latest.weights.h5", "latest.weights.h5.bkp"):
        _truncate(out / "backup" / name)
    before = (out / "model.keras").read_bytes()
    rc = cli.main([PROG, *fit_args(image, out, epochs=3, steps=1)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"{PROG} fit: error: cannot resume from ") and "delete that folder" in lines[0]
    assert (out / "model.keras").read_bytes() == before


# ================================================================================================ NaN loss
@keras.saving.register_keras_serializable(package="keras_oneimage_tests")
class NanFaultsRotNet(TinyFaultsRotNet):
    """The tiny RotNet whose loss turns NaN from optimizer step 3 on (the weights are poisoned from there)."""

    NAN_FROM_STEP = 2  # 0-based optimizer iterations: the 3rd step is epoch 2, step 1 with 2 steps per epoch

    def __init__(self, backbone, **kwargs):
        super().__init__(backbone, **kwargs)
        import tensorflow as tf

        def poisoned(labels, logits):
            bad = self.optimizer.iterations >= self.NAN_FROM_STEP
            return rotation_loss(labels, logits) * tf.where(bad, float("nan"), 1.0)

        self.loss_fn = poisoned


def test_nan_loss_stops_the_cli_with_the_step_and_keeps_the_last_good_epoch(image, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main([PROG, *fit_args(image, out, epochs=3, steps=2, method=NAN)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc not in (0, 2), "a diverged run is a failure, not a usage error"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{PROG} fit: error: training stopped: loss became nan at epoch 2/3, step 1/2"), err
    assert "holds epoch 1" in lines[0]
    good = api.load_trained(out / "model.keras")
    assert all(np.isfinite(w).all() for w in good.get_weights())
    assert [int(r["epoch"]) for r in history_rows(out)] == [0]
    assert backup_epoch(out) == 1
    assert stale_temporaries(out) == []


# ============================================================================================== full disk
def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


@pytest.mark.parametrize("target", ["model.keras", "history.csv", "backup"])
def test_disk_full_is_one_clear_line_and_keeps_the_last_epoch(image, tmp_path, monkeypatch, capsys, target):
    """The 2nd epoch's write of `target` fails with ENOSPC (after writing part of the file, where it can)."""
    out = tmp_path / "run"
    calls = {"n": 0}

    def second_call() -> bool:
        calls["n"] += 1
        return calls["n"] == 2

    def fail(path, partial: bool):
        if partial:  # a partial file, as a real full disk leaves
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 partial")
        raise _enospc(path)

    if target == "model.keras":  # save_model_atomic saves into a temporary .keras file
        real_save = keras.Model.save

        def save(self, filepath, *args, **kwargs):
            if second_call():
                fail(filepath, partial=True)
            return real_save(self, filepath, *args, **kwargs)

        monkeypatch.setattr(keras.Model, "save", save)
    elif target == "backup":  # the backup's weights are serialised in memory, then written by _write_bytes
        from keras_oneimage import training

        real_write = training._write_bytes

        def write_bytes(path, data):
            if second_call():
                fail(path, partial=True)
            return real_write(path, data)

        monkeypatch.setattr(training, "_write_bytes", write_bytes)
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.fspath(dst).endswith("history.csv") and second_call():
                fail(dst, partial=False)
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)

    rc, err, run = rerun_in_process(fit_args(image, out, epochs=3, steps=1), monkeypatch, capsys)
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{PROG} fit: error: cannot write the training output in "), err
    assert "No space left on device" in lines[0] and "rerun the same command" in lines[0]
    assert calls["n"] == 2
    ended = {e: f for kind, e, f in run if kind == "end"}
    assert load_fingerprint(out / "model.keras") in (ended[0], ended[1])  # complete, whichever epoch
    assert backup_epoch(out) == 1
    assert [int(r["epoch"]) for r in history_rows(out)][:1] == [0]
    assert stale_temporaries(out) == [], "no partial or temporary file is left"
    # With space again, the same output_dir resumes from the last completed epoch, with exactly its weights.
    assert restored_weights(image, out) == (ended[0], [])


# ================================================================= full disk: issue 17 (cases 1 and 6)
def test_a_disk_without_room_for_one_epoch_is_refused_before_training(image, tmp_path, monkeypatch, capsys):
    """The free space is checked before training: nothing is trained, nothing is written."""
    from keras_oneimage import training

    monkeypatch.setattr(training, "free_bytes", lambda directory: 100 * 1024)
    out = tmp_path / "run"
    rc = cli.main([PROG, *fit_args(image, out, epochs=2, steps=1)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{PROG} fit: error: cannot train in output_dir ") and "not enough free space" in \
        lines[0] and "0.1 MiB free" in lines[0], lines
    assert not out.exists(), "a refused fit leaves no output_dir"


def test_free_space_is_checked_before_any_file_of_an_epoch_is_written(image, tmp_path, monkeypatch, capsys):
    """Room for epoch 1's files, not for epoch 2's: epoch 2 writes nothing, and the message names epoch 1."""
    from keras_oneimage import training

    real = training._FreeSpaceCheck.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:  # the 2nd epoch: the disk is now nearly full
            monkeypatch.setattr(training, "free_bytes", lambda directory: 1024)
        return real(self, epoch, logs)

    monkeypatch.setattr(training._FreeSpaceCheck, "on_epoch_end", on_epoch_end)
    out = tmp_path / "run"
    rc, err, run = rerun_in_process(fit_args(image, out, epochs=3, steps=1), monkeypatch, capsys)
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "not enough free space for epoch 2's checkpoint and backup" in lines[0], err
    assert "the files of the last completed epoch (1) are intact" in lines[0], err
    ended = {e: f for kind, e, f in run if kind == "end"}
    assert load_fingerprint(out / "model.keras") == ended[0], "epoch 2 wrote no model.keras"
    assert [int(r["epoch"]) for r in history_rows(out)] == [0]
    assert backup_epoch(out) == 1 and stale_temporaries(out) == []


def test_disk_full_before_the_first_epoch_is_saved_keeps_no_epoch_and_says_so(image, tmp_path, monkeypatch,
                                                                              capsys):
    """Case 6: the message said "last completed epoch intact" when none existed, and history.csv listed an
    epoch 0 whose backup was never written."""
    from keras_oneimage import training

    real_write = training._write_bytes

    def write_bytes(path, data):  # the first backup's weights: half written, then ENOSPC
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise _enospc(path)

    monkeypatch.setattr(training, "_write_bytes", write_bytes)
    out = tmp_path / "run"
    rc = cli.main([PROG, *fit_args(image, out, epochs=2, steps=1)])
    monkeypatch.setattr(training, "_write_bytes", real_write)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert "No space left on device" in lines[0] and "no epoch was completed" in lines[0], lines
    assert "intact" not in lines[0]
    assert not (out / "history.csv").exists() and not (out / "model.keras").exists()
    assert backup_epoch(out) is None and stale_temporaries(out) == []
    assert cli.main([PROG, *fit_args(image, out, epochs=2, steps=1)]) == 0  # with space again: a normal run
    assert [int(r["epoch"]) for r in history_rows(out)] == [0, 1]


def _mount_tmpfs(where: pathlib.Path, size: str) -> bool:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def test_a_real_full_disk_is_one_line_and_exit_2_not_a_segfault(image, tmp_path, capsys):
    """Case 1: h5py writing the backup onto a full disk crashed the process (SIGSEGV, 11 lines of traceback).

    A real tmpfs, filled up to leave room for a few files but not for the whole epoch; the free-space checks are
    switched off in the first process so that the write itself hits ENOSPC (the race they cannot close).
    """
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "16M"):
        pytest.skip("`mount -t tmpfs` was refused here (it needs root with mount rights); the ENOSPC paths are also "
                    "tested by injection")
    try:
        out = disk / "run"
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave about 160 KiB: run.json, logs, history, part of the checkpoint
            f.write(b"\0" * (training_free(disk) - 160 * 1024))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "FAULTS_NO_SPACE_CHECK": "1"}
        env.pop("FAULTS_KILL", None)
        args = [sys.executable, "-c", _SCRIPT, *fit_args(image, out, epochs=2, steps=1)]
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
        assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-3000:]
        assert "no epoch was completed" in lines[0]
        # the write that crashed before: the backup's weights (model.keras, ~120 KiB for this model, still fits)
        assert "backup/.pending.weights.h5" in lines[0], lines[0]
        assert stale_temporaries(out) == [] and not (out / "model.keras").exists()
        # With the checks on, the same full disk is refused before training, and the directory stays as it is.
        # (in this process from here: only the crash needed a process of its own)
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        rc = cli.main([PROG, *fit_args(image, out, epochs=2, steps=1)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "not enough free space" in lines[0], lines
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
        filler.unlink()  # space again: the same command trains
        assert cli.main([PROG, *fit_args(image, out, epochs=2, steps=1)]) == 0, capsys.readouterr().err
        assert [int(r["epoch"]) for r in history_rows(out)] == [0, 1] and backup_epoch(out) == 2
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def training_free(directory: pathlib.Path) -> int:
    from keras_oneimage.training import free_bytes

    return free_bytes(directory)
