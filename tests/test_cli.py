"""The command line: bad input gets one line on stderr and exit status 2, never a traceback or a half output."""
import os
import pathlib
import subprocess
import sys

import pytest

from keras_oneimage import cli
from tests import bad_inputs


def _run(argv, capsys):
    rc = cli.main(["keras-oneimage", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_inputs.make_corpus(tmp_path_factory.mktemp("corpus"))


def test_usage_without_command_exits_2(capsys):
    rc, _, err = _run([], capsys)
    assert rc == 2
    assert "usage:" in err


def test_unknown_command_exits_2(capsys):
    rc, _, err = _run(["frobnicate"], capsys)
    assert rc == 2
    assert "unknown command" in err


@pytest.mark.parametrize(
    "flag, fragment",
    [
        ("--epochs=0", "epochs"),
        ("--batch_size=0", "batch_size"),
        ("--method=simclr", "unknown method"),
        ("--image_size=8", "too small"),
        ("--min_area=-0.1", "min_area"),
        ("--aspect=1.5", "aspect"),
        ("--epochs=three", "epochs"),
        ("--no_such_flag=1", "no_such_flag"),
    ],
)
def test_bad_flag_values_exit_2(flag, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = _run(["fit", flag, f"--output_dir={out}"], capsys)
    assert rc == 2, err
    assert fragment in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists(), "nothing may be written for bad input"


def test_bad_files_exit_2_and_leave_nothing(corpus, tmp_path, capsys):
    bad = {name: path for name, (path, expected) in corpus.items() if expected == "error"}
    assert len(bad) >= 6
    for name, path in bad.items():
        out = tmp_path / f"run_{name}"
        rc, _, err = _run(["fit", f"--image={path}", f"--output_dir={out}", "--image_size=32"], capsys)
        assert rc == 2, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err
        assert not out.exists(), name


def test_image_smaller_than_patch_exits_2(tmp_path, capsys):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(small)
    rc, _, err = _run(["fit", f"--image={small}", "--image_size=64", f"--output_dir={tmp_path / 'o'}"], capsys)
    assert rc == 2
    assert "smaller than" in err


def test_subprocess_error_has_no_traceback(tmp_path):
    missing = tmp_path / "nope.jpg"
    proc = subprocess.run(
        [sys.executable, "-m", "keras_oneimage.cli", "fit", f"--image={missing}", f"--output_dir={tmp_path / 'o'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nope.jpg" in proc.stderr
