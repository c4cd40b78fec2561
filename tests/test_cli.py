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


def test_fit_passes_method_options_as_literals(monkeypatch, capsys, tmp_path):
    from keras_oneimage import api

    seen = {}
    monkeypatch.setattr(api, "fit", lambda *args, **kwargs: seen.update(kwargs))
    rc, _, err = _run(["fit", "--method=deepcluster", f"--output_dir={tmp_path}", "--method_option", "sobel=False",
                       "--method_option", "num_clusters=200", "--method_option", "head_widths=(64, 64)"], capsys)
    assert rc == 0, err
    assert seen["method"] == "deepcluster"
    assert seen["sobel"] is False and seen["num_clusters"] == 200 and seen["head_widths"] == (64, 64)


def test_fit_refuses_malformed_method_options(monkeypatch, capsys, tmp_path):
    from keras_oneimage import api

    monkeypatch.setattr(api, "fit", lambda *args, **kwargs: 0)
    for bad, message in ((["--method_option", "sobel"], "NAME=VALUE"),
                         (["--method_option", "2x=1"], "NAME=VALUE"),
                         (["--method_option", "k=1", "--method_option", "k=2"], "twice")):
        rc, _, err = _run(["fit", f"--output_dir={tmp_path}", *bad], capsys)
        assert rc == 2 and message in err, (bad, err)
