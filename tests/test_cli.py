"""The command line's dispatch. Bad input per command is covered by tests/test_input_corpus.py."""
from keras_oneimage import cli


def _run(argv, capsys):
    rc = cli.main(["keras-oneimage", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_usage_without_command_exits_2(capsys):
    rc, _, err = _run([], capsys)
    assert rc == 2
    assert "usage:" in err


def test_unknown_command_exits_2(capsys):
    rc, _, err = _run(["frobnicate"], capsys)
    assert rc == 2
    assert "unknown command" in err


def test_every_command_has_help(capsys):
    for command, must_mention in {"fit": "--image_size", "probe": "--checkpoint", "export": "--layers",
                                  "serve": "--model_base_path", "tune": "--max_trials",
                                  "finetune": "--freeze", "demo": "--steps_per_epoch",
                                  "invert": "--tv_weight"}.items():
        rc, out, _ = _run([command, "--help"], capsys)
        assert rc == 0, command
        assert must_mention.lstrip("-") in out, command


def test_fit_precision_is_validated_before_anything_is_written(tmp_path, capsys):
    from keras_oneimage import api
    from keras_oneimage.errors import InputError
    import pytest

    with pytest.raises(InputError, match="precision"):
        api.fit(None, precision="float8", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
