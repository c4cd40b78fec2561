"""Every bad or odd input, through the API and the CLI, for fit, probe, export, serve and tune.

The contract (docs/robustness.md): a bad input is an ``InputError`` from the API and, from the CLI, exactly one
line on stderr (``keras-oneimage COMMAND: error: ...``) with exit status 2, never a traceback, and nothing
half-written (no output_dir after a rejected fit, no version directory after a rejected export, no --output file
after a rejected probe). Legitimate odd inputs (16-bit, CMYK, RGBA, gray, GIF, EXIF, a non-UTF-8 file name) train.

The image loader itself (pixel values, EXIF orientations, arrays and tensors) is tested in tests/test_images.py;
this file checks that every command routes each case to the same clear outcome. Training here uses a test-only
method with an 8-channel AlexNet so that the few fits that run take seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest

from keras_oneimage import api, cli
from keras_oneimage import tuning as tuning_module
from keras_oneimage.data.images import load_image
from keras_oneimage.errors import InputError
from keras_oneimage.methods import registry
from keras_oneimage.methods.rotnet import RotNet
from tests import bad_inputs

TINY = "tiny_corpus_rotnet"
PROG = "keras-oneimage"


@keras.saving.register_keras_serializable(package="keras_oneimage_tests")
class TinyCorpusRotNet(RotNet):
    """RotNet on an 8-channel AlexNet with an 8-wide head: the whole fit path, in a few seconds."""

    backbone_options = {"widths": (8, 8, 8, 8, 8)}

    def __init__(self, backbone, head_widths=(8,), **kwargs):
        super().__init__(backbone, head_widths=head_widths, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def tiny_method():
    registry.register(TINY)(TinyCorpusRotNet)
    yield TINY
    registry._REGISTRY.pop(TINY, None)


# ------------------------------------------------------------------------------------------------------ helpers
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([PROG, *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_cli_error(rc: int, err: str, command: str, fragment: str) -> None:
    """Exit 2, exactly one line on stderr, from the right command, naming the problem."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG} {command}: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    assert fragment.lower() in lines[0].lower(), (fragment, err)


def assert_api_error(info: pytest.ExceptionInfo, fragment: str) -> None:
    message = str(info.value)
    assert isinstance(info.value, InputError)
    assert "\n" not in message.strip(), message
    assert fragment.lower() in message.lower(), (fragment, message)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_inputs.make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def good_image(tmp_path_factory) -> str:
    from PIL import Image

    path = tmp_path_factory.mktemp("good") / "good.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


def _fit_kwargs(**overrides):
    kwargs = dict(method=TINY, image_size=16, batch_size=2, epochs=1, steps_per_epoch=1, verbose=0)
    kwargs.update(overrides)
    return kwargs


def _fit_flags(**overrides) -> list[str]:
    values = dict(method=TINY, image_size=16, batch_size=2, epochs=1, steps_per_epoch=1)
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


# ================================================================================================ fit: image files
ERROR_FILES = sorted(bad_inputs.HINTS)
LEGIT_FILES = ["plain_jpeg", "non_utf8_name", "exif_rotated", "cmyk_jpeg", "animated_gif", "png_16bit",
               "rgba_png", "gray_png", "gray_jpeg", "palette_bmp", "rgb_bmp", "float_tiff"]


def test_corpus_names_match(corpus):
    assert {n for n, (_, e) in corpus.items() if e == "error"} == set(ERROR_FILES)
    assert {n for n, (_, e) in corpus.items() if e == "ok"} == set(LEGIT_FILES)


@pytest.mark.parametrize("name", ERROR_FILES)
def test_fit_rejects_bad_image_file_api(corpus, tmp_path, name):
    path = corpus[name][0]
    out = tmp_path / "run"
    with pytest.raises(InputError) as info:
        api.fit(path, output_dir=out, **_fit_kwargs())
    assert_api_error(info, bad_inputs.HINTS[name])
    assert os.path.basename(path) in str(info.value)
    assert not out.exists(), "a rejected fit must not create its output_dir"


@pytest.mark.parametrize("name", ERROR_FILES)
def test_fit_rejects_bad_image_file_cli(corpus, tmp_path, capsys, name):
    path = corpus[name][0]
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "fit", f"--image={path}", f"--output_dir={out}", *_fit_flags())
    assert_cli_error(rc, err, "fit", bad_inputs.HINTS[name])
    assert not out.exists()


def test_bad_file_with_a_non_utf8_name_is_reported_readably(corpus, tmp_path, capsys):
    """The message of a bad file whose name is not UTF-8 still prints (escaped), on one line."""
    name = os.path.join(os.fsencode(tmp_path), b"notes_\xff.jpg")
    with open(name, "wb") as f:
        f.write(b"plain text, not a picture\n")
    path = os.fsdecode(name)
    with pytest.raises(InputError) as info:
        load_image(path)
    assert "\\xff" in str(info.value)
    str(info.value).encode("utf-8")  # printable: no lone surrogates
    rc, _, err = run_cli(capsys, "fit", f"--image={path}", f"--output_dir={tmp_path / 'o'}", *_fit_flags())
    assert_cli_error(rc, err, "fit", "\\xff")


def test_special_files_are_refused_without_reading_them(tmp_path, capsys):
    """A FIFO would block a reader forever and /dev/zero never ends: both are refused up front."""
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)

    def unblock():  # only matters if the loader (wrongly) opens the FIFO: the test then fails instead of hanging
        with open(fifo, "wb") as w:
            w.write(b"\xff\xd8\xff")

    opener = threading.Thread(target=unblock, daemon=True)
    opener.start()
    try:
        for path in (str(fifo), "/dev/zero"):
            with pytest.raises(InputError) as info:
                load_image(path)
            assert_api_error(info, "not a regular file")
        rc, _, err = run_cli(capsys, "fit", "--image=/dev/zero", f"--output_dir={tmp_path / 'o'}", *_fit_flags())
        assert_cli_error(rc, err, "fit", "not a regular file")
        assert not (tmp_path / "o").exists()
    finally:
        if opener.is_alive():
            with open(fifo, "rb") as r:  # release the writer
                r.read()


def test_file_far_larger_than_max_pixels_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(9 * 1000 + (1 << 20))  # sparse: 1 MiB + 9 kB of zeros, never read
    with pytest.raises(InputError) as info:
        load_image(big, max_pixels=1000)
    assert_api_error(info, "max_pixels=1,000")


def _sha(image: np.ndarray) -> str:
    return hashlib.sha256(memoryview(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> pathlib.Path:
    """One tiny fit on all the legitimate odd images at once; its output_dir serves the probe/export cases too."""
    out = tmp_path_factory.mktemp("trained") / "run"
    api.fit([corpus[name][0] for name in LEGIT_FILES], output_dir=out, **_fit_kwargs())
    return out


def test_legitimate_odd_images_train_api(corpus, trained):
    """16-bit, CMYK, RGBA, gray, GIF, EXIF, non-UTF-8 name, palette BMP: they train (the `trained` fit)."""
    run = json.loads((trained / "run.json").read_text())
    # fit trained on exactly what the loader returns (whose pixels tests/test_images.py checks)
    assert run["image_sha256"] == [_sha(load_image(corpus[name][0])) for name in LEGIT_FILES]
    assert len((trained / "history.csv").read_text().splitlines()) == 2  # header + the one epoch
    model = api.load_trained(trained)
    assert np.isfinite(model.predict(np.zeros((1, 16, 16, 3), np.float32), verbose=0)).all()
    shapes = {name: load_image(corpus[name][0]).shape for name in LEGIT_FILES}
    assert shapes.pop("exif_rotated") == (40, 24, 3)  # upright: EXIF orientation 6 applied
    assert set(shapes.values()) == {(24, 40, 3)}


def test_legitimate_odd_images_train_cli(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    images = [f"--image={corpus[name][0]}" for name in LEGIT_FILES]
    rc, stdout, err = run_cli(capsys, "fit", *images, f"--output_dir={out}", *_fit_flags())
    assert rc == 0, err
    assert "Traceback" not in err
    assert (out / "model.keras").is_file()
    assert len(json.loads((out / "run.json").read_text())["image_sha256"]) == len(LEGIT_FILES)


# ================================================================================================ fit: bad values
# (CLI flags, API keyword arguments, fragment of the message)
FIT_VALUES = [
    ("negative_beta", ["--min_area=-1"], {"augment": {"min_area": -1}}, "min_area"),
    ("nan_beta", ["--min_area=nan"], {"augment": {"min_area": float("nan")}}, "finite"),
    ("gamma_above_1", ["--aspect=1.5"], {"augment": {"aspect": 1.5}}, "aspect"),
    ("flip_prob_2", ["--flip_prob=2"], {"augment": {"flip_prob": 2}}, "flip_prob"),
    ("rotation_400", ["--max_rotation=400"], {"augment": {"max_rotation": 400}}, "max_rotation"),
    ("negative_strength", ["--strength=-1"], {"strength": -1.0}, "strength"),
    ("unknown_method", ["--method=simclr"], {"method": "simclr"}, "unknown method"),
    ("image_size_too_small", ["--image_size=8"], {"image_size": 8}, "too small"),
    ("imagenet_too_small", ["--image_size=32", "--variant=imagenet"], {"image_size": 32, "variant": "imagenet"},
     "too small"),
    ("unknown_variant", ["--variant=vgg"], {"variant": "vgg"}, "variant"),
    ("zero_batch", ["--batch_size=0"], {"batch_size": 0}, "batch_size"),
    ("zero_epochs", ["--epochs=0"], {"epochs": 0}, "epochs"),
    ("zero_steps", ["--steps_per_epoch=0"], {"steps_per_epoch": 0}, "steps_per_epoch"),
    ("zero_max_pixels", ["--max_pixels=0"], {"max_pixels": 0}, "max_pixels"),
    ("max_pixels_below_image", ["--max_pixels=100"], {"max_pixels": 100}, "max_pixels=100"),
    ("patch_larger_than_image", ["--image_size=64"], {"image_size": 64}, "smaller than"),
]


@pytest.mark.parametrize("flags_, kwargs, fragment", [c[1:] for c in FIT_VALUES], ids=[c[0] for c in FIT_VALUES])
def test_fit_rejects_bad_values_api(good_image, tmp_path, flags_, kwargs, fragment):
    out = tmp_path / "run"
    with pytest.raises(InputError) as info:
        api.fit(good_image, output_dir=out, **_fit_kwargs(**kwargs))
    assert_api_error(info, fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags_, fragment",
    [c[1:2] + c[3:] for c in FIT_VALUES]
    + [(["--epochs=three"], "epochs"), (["--no_such_flag=1"], "no_such_flag"), (["stray"], "unexpected argument"),
       (["--image="], "empty image path")],
    ids=[c[0] for c in FIT_VALUES] + ["epochs_not_a_number", "unknown_flag", "positional_argument", "empty_path"],
)
def test_fit_rejects_bad_values_cli(good_image, tmp_path, capsys, flags_, fragment):
    out = tmp_path / "run"
    base = {k: v for k, v in dict(method=TINY, image_size=16, batch_size=2, epochs=1, steps_per_epoch=1).items()
            if not any(f.startswith(f"--{k}=") for f in flags_)}
    rc, _, err = run_cli(capsys, "fit", f"--image={good_image}", f"--output_dir={out}",
                         *[f"--{k}={v}" for k, v in base.items()], *flags_)
    assert_cli_error(rc, err, "fit", fragment)
    assert not out.exists()


def test_fit_rejects_unusable_output_dirs(good_image, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, fragment in ((a_file, "not a directory"), (a_file / "run", "cannot write")):
        with pytest.raises(InputError) as info:
            api.fit(good_image, output_dir=out, **_fit_kwargs())
        assert_api_error(info, fragment)
        rc, _, err = run_cli(capsys, "fit", f"--image={good_image}", f"--output_dir={out}", *_fit_flags())
        assert_cli_error(rc, err, "fit", fragment)
    assert a_file.read_text() == "x"


def test_fit_refuses_an_output_dir_of_another_run(good_image, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = {"method": "bigan", "image_sha256": ["0" * 64], "image_size": 16, "variant": "cifar"}
    (out / "run.json").write_text(json.dumps(other))
    with pytest.raises(InputError) as info:
        api.fit(good_image, output_dir=out, **_fit_kwargs())
    assert_api_error(info, "different method")
    rc, _, err = run_cli(capsys, "fit", f"--image={good_image}", f"--output_dir={out}", *_fit_flags())
    assert_cli_error(rc, err, "fit", "different method")
    assert json.loads((out / "run.json").read_text()) == other
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


# ====================================================================================== probe / export / serve
@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, trained, corpus) -> dict[str, str]:
    """Bad checkpoints, datasets and serving base paths, beside a good labelled tree."""
    from PIL import Image

    root = tmp_path_factory.mktemp("artefacts")
    paths: dict[str, str] = {}

    def tree(name: str) -> pathlib.Path:
        base = root / name
        for split in ("train", "test"):
            for label, colour in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
                folder = base / split / label
                folder.mkdir(parents=True)
                for i in range(2):
                    Image.new("RGB", (16, 16), tuple(c + 10 * i for c in colour)).save(folder / f"{i}.png")
        return base

    paths["dataset"] = str(tree("dataset"))
    bad = tree("dataset_bad_image")
    (bad / "test" / "red" / "1.png").write_bytes(b"this is not a picture")
    paths["dataset_bad_image"] = str(bad)
    no_splits = root / "no_splits" / "red"
    no_splits.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(no_splits / "0.png")
    paths["dataset_without_train_test"] = str(no_splits.parent)

    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.keras").write_bytes(np.random.default_rng(1).bytes(4096))
    paths["corrupt_checkpoint"] = str(corrupt / "model.keras")
    truncated = root / "truncated.keras"
    data = (trained / "model.keras").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    paths["truncated_checkpoint"] = str(truncated)
    (root / "empty_run").mkdir()
    paths["dir_without_checkpoint"] = str(root / "empty_run")
    paths["missing_checkpoint"] = str(root / "nope" / "model.keras")
    paths["image_as_checkpoint"] = corpus["plain_jpeg"][0]

    (root / "serve_empty").mkdir()
    paths["serve_no_versions"] = str(root / "serve_empty")
    for sub in ("v1", ".tmp-0123", "latest"):  # nothing numeric: a killed export leaves only .tmp-*
        (root / "serve_non_numeric" / sub).mkdir(parents=True)
    (root / "serve_non_numeric" / "latest" / "saved_model.pb").write_bytes(b"")
    paths["serve_non_numeric"] = str(root / "serve_non_numeric")
    (root / "serve_broken" / "1").mkdir(parents=True)
    (root / "serve_broken" / "1" / "saved_model.pb").write_bytes(b"\x00junk")
    paths["serve_broken_version"] = str(root / "serve_broken")
    paths["serve_missing"] = str(root / "no_such_models")
    paths["a_file"] = corpus["plain_jpeg"][0]
    return paths


# ------------------------------------------------------------------------------------------------------ probe
CHECKPOINT_CASES = [
    ("missing_checkpoint", "no checkpoint"),
    ("dir_without_checkpoint", "no checkpoint"),
    ("corrupt_checkpoint", "not a keras"),
    ("truncated_checkpoint", "not a keras"),
    ("image_as_checkpoint", "not a keras"),
]
# (case id, CLI flags, API call options, fragment); "{x}" is filled from the artefacts
PROBE_CASES = [
    *[(name, [f"--checkpoint={{{name}}}"], {"model_or_checkpoint": f"{{{name}}}"}, frag)
      for name, frag in CHECKPOINT_CASES],
    ("dataset_without_train_test", ["--dataset={dataset_without_train_test}"],
     {"dataset": "{dataset_without_train_test}"}, "missing train/ and test/"),
    ("dataset_missing", ["--dataset={dataset}/nope"], {"dataset": "{dataset}/nope"}, "neither"),
    ("dataset_is_an_image", ["--dataset={a_file}"], {"dataset": "{a_file}"}, "archive"),
    ("dataset_with_a_bad_image", ["--dataset={dataset_bad_image}"], {"dataset": "{dataset_bad_image}"},
     "not a jpeg, png, gif, bmp or webp image: {dataset_bad_image}/test/red/1.png"),
    ("unknown_tap", ["--layers=conv9"], {"layers": ["conv9"]}, "conv9"),
    ("no_tap", ["--layers=,"], {"layers": []}, "layer"),
    ("zero_epochs", ["--epochs=0"], {"epochs": 0}, "epochs"),
    ("zero_batch", ["--batch_size=0"], {"batch_size": 0}, "batch_size"),
    ("zero_max_per_class", ["--max_per_class=0"], {"max_per_class": 0}, "max_per_class"),
    ("negative_learning_rate", ["--learning_rate=-1"], {"learning_rate": -1.0}, "learning_rate"),
    ("unknown_protocol", ["--protocol=imagenet"], {"protocol": "imagenet"}, "unknown probe protocol"),
]


def _fill(value, artefacts):
    if isinstance(value, str):
        return value.format(**artefacts)
    if isinstance(value, list):
        return [_fill(v, artefacts) for v in value]
    return value


def _probe_defaults(trained, artefacts):
    return {"model_or_checkpoint": str(trained), "dataset": artefacts["dataset"], "layers": ["conv1"],
            "epochs": 1, "batch_size": 4}


@pytest.mark.parametrize("flags_, options, fragment", [c[1:] for c in PROBE_CASES], ids=[c[0] for c in PROBE_CASES])
def test_probe_rejects_bad_input_api(trained, artefacts, flags_, options, fragment):
    kwargs = {**_probe_defaults(trained, artefacts), **{k: _fill(v, artefacts) for k, v in options.items()}}
    with pytest.raises(InputError) as info:
        api.probe(kwargs.pop("model_or_checkpoint"), kwargs.pop("dataset"), **kwargs)
    assert_api_error(info, _fill(fragment, artefacts))


@pytest.mark.parametrize(
    "flags_, fragment",
    [(c[1], c[3]) for c in PROBE_CASES]
    + [(["--split=train"], "split"), (["--checkpoint="], "--checkpoint is required"),
       (["--output={dataset}/no_such_dir/acc.json"], "--output")],
    ids=[c[0] for c in PROBE_CASES] + ["bad_split", "no_checkpoint_flag", "output_in_missing_dir"],
)
def test_probe_rejects_bad_input_cli(trained, artefacts, capsys, flags_, fragment):
    flags_ = _fill(flags_, artefacts)
    given = {f.split("=", 1)[0] for f in flags_}
    defaults = [f for f in (f"--checkpoint={trained}", f"--dataset={artefacts['dataset']}", "--layers=conv1",
                            "--epochs=1", "--batch_size=4") if f.split("=", 1)[0] not in given]
    rc, out, err = run_cli(capsys, "probe", *defaults, *flags_)
    assert_cli_error(rc, err, "probe", _fill(fragment, artefacts))
    assert "%" not in out, "no accuracy may be reported"
    assert not os.path.exists(os.path.join(artefacts["dataset"], "no_such_dir"))


# ----------------------------------------------------------------------------------------------------- export
EXPORT_CASES = [
    *[(name, [f"--checkpoint={{{name}}}"], {"model_or_backbone": f"{{{name}}}"}, frag)
      for name, frag in CHECKPOINT_CASES],
    ("unknown_tap", ["--layers=conv1,conv9"], {"layers": ["conv1", "conv9"]}, "conv9"),
    ("no_tap", ["--layers="], {"layers": []}, "at least one"),
    ("duplicate_tap", ["--layers=conv1,conv1"], {"layers": ["conv1", "conv1"]}, "duplicates"),
]


def _versions(base: pathlib.Path) -> list[str]:
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


@pytest.mark.parametrize("flags_, options, fragment", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_export_rejects_bad_input_api(trained, artefacts, tmp_path, flags_, options, fragment):
    from keras_oneimage.export import export

    kwargs = {"model_or_backbone": str(trained), "layers": ["conv1"],
              **{k: _fill(v, artefacts) for k, v in options.items()}}
    base = tmp_path / "models" / "m"
    with pytest.raises(InputError) as info:
        export(kwargs.pop("model_or_backbone"), base, **kwargs)
    assert_api_error(info, fragment)
    assert not (tmp_path / "models").exists(), "a rejected export must leave no version (nor its base dir)"


@pytest.mark.parametrize(
    "flags_, fragment",
    [(c[1], c[3]) for c in EXPORT_CASES]
    + [(["--name="], "--name is required"), (["--name=a/b"], "plain name"), (["--name=.."], "plain name"),
       (["--base_dir={a_file}"], "not a directory")],
    ids=[c[0] for c in EXPORT_CASES] + ["no_name", "name_with_slash", "name_dotdot", "base_dir_is_a_file"],
)
def test_export_rejects_bad_input_cli(trained, artefacts, tmp_path, capsys, flags_, fragment):
    flags_ = _fill(flags_, artefacts)
    given = {f.split("=", 1)[0] for f in flags_}
    defaults = [f for f in (f"--checkpoint={trained}", "--name=m", f"--base_dir={tmp_path / 'models'}",
                            "--layers=conv1") if f.split("=", 1)[0] not in given]
    rc, out, err = run_cli(capsys, "export", *defaults, *flags_)
    assert_cli_error(rc, err, "export", fragment)
    assert out == ""
    assert _versions(tmp_path / "models") == []


# --------------------------------------------------------------------------------------------------- finetune
def test_finetune_cli_trains_with_frozen_layers_and_writes_its_outputs(trained, artefacts, tmp_path, capsys):
    import json

    import keras

    from keras_oneimage.checkpoints import backbone_of, load_checkpoint

    rc, out, err = run_cli(capsys, "finetune", f"--source={trained}", f"--dataset={artefacts['dataset']}",
                           "--epochs=2", "--batch_size=4", f"--output={tmp_path / 'r.json'}",
                           f"--save={tmp_path / 'clf.keras'}")
    assert rc == 0, err
    assert "test accuracy" in out and "frozen conv1,conv2" in out
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["frozen"] == ["conv1", "conv2"] and summary["epochs_run"] == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    source = backbone_of(load_checkpoint(trained)[0])
    tuned = keras.saving.load_model(tmp_path / "clf.keras").backbone
    for tap in ("conv1", "conv2"):  # frozen: bit-identical to the source
        np.testing.assert_array_equal(getattr(tuned, tap).conv.kernel.numpy(), getattr(source, tap).conv.kernel.numpy())
    assert not np.array_equal(tuned.conv3.conv.kernel.numpy(), source.conv3.conv.kernel.numpy())


@pytest.mark.parametrize(
    "flags_, fragment",
    [*[([f"--source={{{name}}}"], frag) for name, frag in CHECKPOINT_CASES],
     (["--source="], "--source is required"),
     (["--freeze=conv1,conv9"], "conv9"),
     (["--epochs=0"], "epochs"),
     (["--max_minutes=0"], "max_minutes"),
     (["--dataset={dataset}/nope"], "neither"),
     (["--output={dataset}/no_such_dir/r.json"], "--output"),
     (["--save={dataset}/clf.h5"], ".keras")],
    ids=[c[0] for c in CHECKPOINT_CASES] + ["no_source", "unknown_tap", "zero_epochs", "zero_minutes",
                                            "dataset_missing", "output_in_missing_dir", "save_not_keras"],
)
def test_finetune_rejects_bad_input_cli(trained, artefacts, capsys, flags_, fragment):
    flags_ = _fill(flags_, artefacts)
    given = {f.split("=", 1)[0] for f in flags_}
    defaults = [f for f in (f"--source={trained}", f"--dataset={artefacts['dataset']}", "--epochs=1",
                            "--batch_size=4") if f.split("=", 1)[0] not in given]
    rc, out, err = run_cli(capsys, "finetune", *defaults, *flags_)
    assert_cli_error(rc, err, "finetune", _fill(fragment, artefacts))
    assert "accuracy" not in out


# ------------------------------------------------------------------------------------------------------ serve
SERVE_CASES = [
    ("base_path_missing", ["--model_base_path={serve_missing}"], {"model_base_path": "{serve_missing}"},
     "not a directory"),
    ("base_path_is_a_file", ["--model_base_path={a_file}"], {"model_base_path": "{a_file}"}, "not a directory"),
    ("no_versions", [], {}, "nothing to serve"),
    ("only_non_numeric_dirs", ["--model_base_path={serve_non_numeric}"], {"model_base_path": "{serve_non_numeric}"},
     "nothing to serve"),
    ("broken_version", ["--model_base_path={serve_broken_version}"], {"model_base_path": "{serve_broken_version}"},
     "version 1 does not load"),
    ("port_out_of_range", ["--port=70000"], {"port": 70000}, "port"),
    ("zero_max_batch", ["--max_batch_size=0"], {"max_batch_size": 0}, "max_batch_size"),
    ("model_name_with_colon", ["--model_name=a:b"], {"model_name": "a:b"}, "model name"),
]


@pytest.fixture
def no_listen(monkeypatch):
    """If a bad input were accepted, fail instead of serving forever."""
    import uvicorn

    def refuse(self, *args, **kwargs):
        raise AssertionError("the server started on input it should have refused")

    monkeypatch.setattr(uvicorn.Server, "run", refuse)


@pytest.mark.parametrize("flags_, options, fragment", [c[1:] for c in SERVE_CASES], ids=[c[0] for c in SERVE_CASES])
def test_serve_rejects_bad_input_api(artefacts, no_listen, flags_, options, fragment):
    from keras_oneimage.serve import serve

    kwargs = {"model_base_path": artefacts["serve_no_versions"], "port": 0,
              **{k: _fill(v, artefacts) for k, v in options.items()}}
    with pytest.raises(InputError) as info:
        serve(kwargs.pop("model_base_path"), **kwargs)
    assert_api_error(info, fragment)


@pytest.mark.parametrize(
    "flags_, fragment",
    [(c[1], c[3]) for c in SERVE_CASES] + [(["--port=-1"], "port"), (["--model_base_path="], "required")],
    ids=[c[0] for c in SERVE_CASES] + ["negative_port", "no_base_path"],
)
def test_serve_rejects_bad_input_cli(artefacts, no_listen, capsys, flags_, fragment):
    flags_ = _fill(flags_, artefacts)
    given = {f.split("=", 1)[0] for f in flags_}
    defaults = [f for f in (f"--model_base_path={artefacts['serve_no_versions']}", "--port=0")
                if f.split("=", 1)[0] not in given]
    rc, out, err = run_cli(capsys, "serve", *defaults, *flags_)
    assert_cli_error(rc, err, "serve", fragment)
    assert out == ""


def test_serve_without_require_version_waits_for_one(artefacts, monkeypatch):
    """TF Serving's behaviour stays available: require_version=False serves an empty base path (404s)."""
    import uvicorn

    from keras_oneimage.serve import serve

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config.app))
    serve(artefacts["serve_no_versions"], port=0, require_version=False, poll_seconds=0)
    assert len(started) == 1 and started[0].state.manager.current is None


# ------------------------------------------------------------------------------------------------------- tune
TUNE_CASES = [
    ("missing_image", ["--image={serve_missing}/x.jpg"], {"image": "{serve_missing}/x.jpg"}, "no such file"),
    ("text_as_image", ["--image={text_as_jpg}"], {"image": "{text_as_jpg}"}, "not"),
    ("unknown_method", ["--method=simclr"], {"method": "simclr"}, "unknown method"),
    ("zero_trials", ["--max_trials=0"], {"max_trials": 0}, "max_trials"),
    ("zero_batch", ["--batch_size=0"], {"batch_size": 0}, "batch_size"),
    ("image_size_too_small", ["--image_size=8"], {"image_size": 8}, "too small"),
    ("dataset_without_train_test", ["--dataset={dataset_without_train_test}"],
     {"dataset": "{dataset_without_train_test}"}, "missing train/ and test/"),
    ("unknown_objective_tap", ["--objective=conv9"], {"objective": "conv9"}, "conv9"),
]


@pytest.fixture
def tuning(artefacts, corpus):
    return tuning_module, {**artefacts, "text_as_jpg": corpus["text_as_jpg"][0]}


def _tune_defaults(good_image, artefacts, tmp_path):
    # Small enough that an input wrongly accepted finishes quickly (and then fails the test).
    return {"image": good_image, "method": TINY, "dataset": artefacts["dataset"], "objective": "conv1",
            "max_trials": 1, "epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "image_size": 16,
            "max_per_class": 1, "directory": str(tmp_path / "tuning")}


@pytest.mark.parametrize("flags_, options, fragment", [c[1:] for c in TUNE_CASES], ids=[c[0] for c in TUNE_CASES])
def test_tune_rejects_bad_input_api(tuning, good_image, tmp_path, flags_, options, fragment):
    module, values = tuning
    kwargs = {**_tune_defaults(good_image, values, tmp_path), **{k: _fill(v, values) for k, v in options.items()}}
    with pytest.raises(InputError) as info:
        module.tune(kwargs.pop("image"), **kwargs)
    assert_api_error(info, fragment)


@pytest.mark.parametrize(
    "flags_, fragment",
    [(c[1], c[3]) for c in TUNE_CASES] + [(["--algorithm=grid"], "algorithm")],
    ids=[c[0] for c in TUNE_CASES] + ["unknown_algorithm"],
)
def test_tune_rejects_bad_input_cli(tuning, good_image, tmp_path, capsys, flags_, fragment):
    _, values = tuning
    flags_ = _fill(flags_, values)
    given = {f.split("=", 1)[0] for f in flags_}
    defaults = [f"--{k}={v}" for k, v in _tune_defaults(good_image, values, tmp_path).items()
                if f"--{k}" not in given]
    rc, _, err = run_cli(capsys, "tune", *defaults, *flags_)
    assert_cli_error(rc, err, "tune", fragment)


# --------------------------------------------------------------------------------------- a real process, once
def test_real_process_prints_exactly_one_line(artefacts, tmp_path):
    """No TensorFlow start-up chatter and no traceback around the error line in a real `keras-oneimage` run."""
    proc = subprocess.run(
        [sys.executable, "-m", "keras_oneimage.cli", "export", f"--checkpoint={artefacts['corrupt_checkpoint']}",
         "--name=m", f"--base_dir={tmp_path / 'models'}"],
        capture_output=True, text=True, timeout=180,
        env={k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_ONEIMAGE_DEBUG")},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"{PROG} export: error: cannot load checkpoint {artefacts['corrupt_checkpoint']!r}: not a Keras .keras "
        "archive (a zip file); corrupt, truncated or not a checkpoint"
    ]
    assert not (tmp_path / "models").exists()


# =============================================================================== issue 17: the remaining holes
def _listing(root: pathlib.Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of its bytes ("dir" for folders): equal listings = untouched."""
    if not root.exists():
        return {}
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.mark.parametrize("seed", [-1, 2**64], ids=["negative", "two_to_the_64"])
def test_fit_refuses_a_seed_out_of_range(good_image, tmp_path, capsys, seed):
    """Case 2: these were "internal error: ValueError: Seed must be between 0 and 2**32 - 1" (exit 1)."""
    out = tmp_path / "run"
    with pytest.raises(InputError) as info:
        api.fit(good_image, output_dir=out, **_fit_kwargs(seed=seed))
    assert_api_error(info, "seed must be an integer in [0, 2**32 - 1]")
    rc, _, err = run_cli(capsys, "fit", f"--image={good_image}", f"--output_dir={out}", *_fit_flags(seed=seed))
    assert_cli_error(rc, err, "fit", "seed must be an integer in [0, 2**32 - 1]")
    assert not out.exists()


def test_fit_refuses_a_batch_above_tensorflows_int32_before_writing(good_image, tmp_path, capsys):
    """Case 2: --batch_size=2147483648 was an internal error that left logs/ and run.json behind."""
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "fit", f"--image={good_image}", f"--output_dir={out}",
                         *_fit_flags(batch_size=2**31))
    assert_cli_error(rc, err, "fit", "above 2**31 - 1")
    assert not out.exists()


def test_fit_refuses_output_dirs_that_are_not_utf8_or_not_paths(good_image, tmp_path, capsys):
    """Case 2: a non-UTF-8 output_dir was an internal error from TensorBoard, after run.json was written."""
    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"run_\xff"))
    with pytest.raises(InputError) as info:
        api.fit(good_image, output_dir=out, **_fit_kwargs())
    assert_api_error(info, "not valid utf-8")
    assert "\\xff" in str(info.value)
    rc, _, err = run_cli(capsys, "fit", f"--image={good_image}", f"--output_dir={out}", *_fit_flags())
    assert_cli_error(rc, err, "fit", "not valid utf-8")
    assert os.listdir(tmp_path) == [], "nothing may be created"
    with pytest.raises(InputError) as info:  # was a TypeError from pathlib
        api.fit(good_image, output_dir=12345, **_fit_kwargs())
    assert_api_error(info, "output_dir must be a path")
    assert not os.path.exists("12345")


def test_export_refuses_a_name_that_is_not_utf8(trained, tmp_path, capsys):
    """Case 2: export --name with a non-UTF-8 byte was an internal error that left an empty base dir."""
    from keras_oneimage.export import export

    name = os.fsdecode(b"m_\xff")
    rc, out, err = run_cli(capsys, "export", f"--checkpoint={trained}", f"--name={name}",
                           f"--base_dir={tmp_path / 'models'}", "--layers=conv1")
    assert_cli_error(rc, err, "export", "--name 'm_\\xff' is not valid utf-8")
    assert out == ""
    with pytest.raises(InputError) as info:
        export(str(trained), os.path.join(tmp_path / "models", name), layers=["conv1"])
    assert_api_error(info, "base_dir")
    assert not (tmp_path / "models").exists()


def test_fit_refuses_a_batch_that_cannot_fit_in_memory_with_the_estimate(good_image, tmp_path, capsys,
                                                                         monkeypatch):
    """Case 3: --batch_size=10000000 failed after 50 s with ResourceExhaustedError and left run.json behind."""
    from keras_oneimage import validation

    monkeypatch.setattr(validation, "physical_memory_bytes", lambda: 8 * 2**30)  # the same on every machine
    out = tmp_path / "run"
    with pytest.raises(InputError) as info:
        api.fit(good_image, output_dir=out, **_fit_kwargs(batch_size=10_000_000))
    assert_api_error(info, "needs at least")
    message = str(info.value)
    assert "batch_size=10,000,000" in message and "8.0 GiB" in message and "use a batch_size of at most" in message
    rc, _, err = run_cli(capsys, "fit", f"--image={good_image}", f"--output_dir={out}",
                         *_fit_flags(batch_size=10_000_000))
    assert_cli_error(rc, err, "fit", "GiB of memory per training step")
    assert not out.exists()
    api.fit(good_image, output_dir=out, **_fit_kwargs(batch_size=4))  # an ordinary batch still trains


def test_probe_clamps_a_huge_batch_to_the_data(trained, artefacts, capsys, monkeypatch):
    """Case 4: probe --batch_size=1000000000 on 8 images ran CPU-bound for minutes; the batch is now the data."""
    from keras_oneimage.data import pipelines

    seen = []
    real = pipelines.train_pipeline

    def spy(ds, size, num_examples, batch_size, seed):
        seen.append((num_examples, batch_size))
        return real(ds, size, num_examples, batch_size, seed)

    monkeypatch.setattr(pipelines, "train_pipeline", spy)
    rc, out, err = run_cli(capsys, "probe", f"--checkpoint={trained}", f"--dataset={artefacts['dataset']}",
                           "--layers=conv1", "--epochs=1", "--batch_size=1000000000")
    assert rc == 0, err
    assert "conv1" in out
    assert len(seen) == 1 and seen[0][1] <= 4, seen  # 2 classes x 2 images in test/, fewer in train/


def test_refused_fit_leaves_a_run_dir_without_run_json_exactly_as_found(trained, tmp_path, capsys):
    """Case 5: fit --method=deepcluster on a rotnet run without run.json was refused but wrote run.json first,
    so the rotnet run could not be resumed any more."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "run.json").unlink()
    before = _listing(run)
    images = [f"--image={p}" for p in json.loads((trained / "run.json").read_text())["image_source"]]
    rc, _, err = run_cli(capsys, "fit", *images, f"--output_dir={run}",
                         *_fit_flags(method="deepcluster", epochs=2))
    assert_cli_error(rc, err, "fit", "cannot resume")
    assert _listing(run) == before, "a refused command must leave the directory exactly as it found it"
    rc, _, err = run_cli(capsys, "fit", *images, f"--output_dir={run}", *_fit_flags(epochs=2))
    assert rc == 0, err  # the original run resumes: epoch 1 is trained on top of the saved epoch 0
    assert [row.split(",")[0] for row in (run / "history.csv").read_text().splitlines()[1:]] == ["0", "1"]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_learning_rates_are_refused_everywhere(trained, artefacts, good_image, tmp_path, capsys, value):
    """Case 9: probe --learning_rate=inf trained to a NaN loss and reported 50 %."""
    from keras_oneimage.transfer import finetune

    rate = float(value)
    for command, flags_ in (("probe", [f"--checkpoint={trained}", "--layers=conv1"]),
                            ("finetune", [f"--source={trained}"])):
        rc, out, err = run_cli(capsys, command, *flags_, f"--dataset={artefacts['dataset']}", "--epochs=1",
                               "--batch_size=4", f"--learning_rate={value}")
        assert_cli_error(rc, err, command, "learning_rate")
        assert "%" not in out
    with pytest.raises(InputError) as info:
        api.probe(str(trained), artefacts["dataset"], layers=["conv1"], epochs=1, learning_rate=rate)
    assert_api_error(info, "learning_rate must be a")
    with pytest.raises(InputError) as info:
        finetune(str(trained), artefacts["dataset"], epochs=1, learning_rate=rate)
    assert_api_error(info, "learning_rate must be a finite")
    kwargs = _tune_defaults(good_image, artefacts, tmp_path)
    with pytest.raises(InputError) as info:
        tuning_module.tune(kwargs.pop("image"), **kwargs, probe_learning_rate=rate)
    assert_api_error(info, "probe_learning_rate must be a")


def test_a_dataset_with_one_class_is_refused(trained, tmp_path, capsys):
    """Case 10: a class-folder tree with one class scored 100 %."""
    from PIL import Image

    from keras_oneimage.data.labelled import from_arrays

    for split in ("train", "test"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "one" / split / "cat" / f"{i}.png")
    rc, out, err = run_cli(capsys, "probe", f"--checkpoint={trained}", f"--dataset={tmp_path / 'one'}",
                           "--layers=conv1", "--epochs=1", "--batch_size=4")
    assert_cli_error(rc, err, "probe", "needs at least 2 classes")
    assert "%" not in out
    with pytest.raises(InputError) as info:
        api.probe(str(trained), str(tmp_path / "one"), layers=["conv1"], epochs=1)
    assert_api_error(info, "1 class folder ('cat')")
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(InputError) as info:
        from_arrays(images, np.zeros(4, int), images, np.zeros(4, int))
    assert_api_error(info, "at least 2 classes")


def test_an_oversized_image_in_a_dataset_is_named_with_the_limit(trained, artefacts, tmp_path, capsys):
    """Case 11: a 60000x60000 PNG gave TF's cut message "PNG size too large for int: 60000 by 60", no file."""
    import shutil

    root = tmp_path / "dataset"
    shutil.copytree(artefacts["dataset"], root)
    big = root / "train" / "red" / "huge.png"
    big.write_bytes(bad_inputs.bomb_png(60_000, 60_000))
    rc, out, err = run_cli(capsys, "probe", f"--checkpoint={trained}", f"--dataset={root}", "--layers=conv1",
                           "--epochs=1", "--batch_size=4")
    assert_cli_error(rc, err, "probe", f"above max_pixels=100,000,000 declared pixels): {big}")
    with pytest.raises(InputError) as info:
        api.probe(str(trained), str(root), layers=["conv1"], epochs=1, batch_size=4)
    assert_api_error(info, str(big))


def test_symlink_loops_are_named_as_such(trained, tmp_path, capsys):
    """Case 12: a symlink loop was reported as "no such file" (the image case is in the corpus: symlink_loop)."""
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    rc, _, err = run_cli(capsys, "probe", f"--checkpoint={trained}", f"--dataset={loop}", "--layers=conv1",
                         "--epochs=1")
    assert_cli_error(rc, err, "probe", "symlink loop")
    dangling = tmp_path / "dangling.jpg"
    os.symlink(tmp_path / "gone.jpg", dangling)
    with pytest.raises(InputError) as info:
        load_image(dangling)
    assert_api_error(info, "broken symbolic link")
