"""Feature inversion (Mahendran & Vedaldi 2015) on a tiny trunk: it converges, reconstructs, smooths, reproduces."""
import numpy as np
import pytest
from PIL import Image

from keras_oneimage import cli
from keras_oneimage.applications import inversion
from keras_oneimage.applications.inversion import invert_features, random_trunk
from keras_oneimage.errors import InputError
from keras_oneimage.models.alexnet import AlexNet

SIZE = 24  # the photo is 96+ px; 24 px keeps each step a few milliseconds


@pytest.fixture(scope="module")
def tiny_trunk():
    return random_trunk(AlexNet(image_size=32, widths=(12, 16, 8, 8, 8)), seed=3)


def test_feature_loss_falls_by_a_large_factor(tiny_trunk, photo_path):
    _, record = invert_features(tiny_trunk, photo_path, "conv2", steps=80, size=SIZE, verbose=0)
    assert record.feature_loss < record.initial_feature_loss / 10
    assert record.layer == "conv2" and record.steps == 80 and record.size == SIZE


def test_conv1_reconstruction_beats_noise_and_grey(tiny_trunk, photo_path):
    image, record = invert_features(tiny_trunk, photo_path, "conv1", steps=80, size=SIZE, verbose=0)
    target = inversion.square_image(photo_path, SIZE)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert record.psnr == pytest.approx(inversion.psnr(image, target))
    noise = np.random.default_rng(0).uniform(0, 1, target.shape)
    grey = np.full_like(target, 0.5)
    assert record.psnr > inversion.psnr(noise, target) + 6
    assert record.psnr > inversion.psnr(grey, target) + 6


def test_larger_tv_weight_gives_a_smoother_image(tiny_trunk, photo_path):
    _, rough = invert_features(tiny_trunk, photo_path, "conv2", steps=40, size=SIZE, tv_weight=0.0, verbose=0)
    _, smooth = invert_features(tiny_trunk, photo_path, "conv2", steps=40, size=SIZE, tv_weight=3.0, verbose=0)
    assert smooth.total_variation < 0.7 * rough.total_variation


def test_same_seed_same_reconstruction_other_seed_other(tiny_trunk, photo_path):
    a, ra = invert_features(tiny_trunk, photo_path, "conv1", steps=10, size=SIZE, seed=5, verbose=0)
    b, rb = invert_features(tiny_trunk, photo_path, "conv1", steps=10, size=SIZE, seed=5, verbose=0)
    c, _ = invert_features(tiny_trunk, photo_path, "conv1", steps=10, size=SIZE, seed=6, verbose=0)
    np.testing.assert_array_equal(a, b)
    assert ra == rb
    assert not np.array_equal(a, c)


def test_random_trunk_is_seeded_and_leaves_global_state_alone():
    import keras

    keras.utils.set_random_seed(0)
    expected = np.random.random()
    keras.utils.set_random_seed(0)
    a = random_trunk(AlexNet(image_size=32, widths=(4, 4, 4, 4, 4)), seed=1)
    assert np.random.random() == expected
    b = random_trunk(AlexNet(image_size=32, widths=(4, 4, 4, 4, 4)), seed=1)
    c = random_trunk(AlexNet(image_size=32, widths=(4, 4, 4, 4, 4)), seed=2)
    np.testing.assert_array_equal(a.conv1.conv.kernel.numpy(), b.conv1.conv.kernel.numpy())
    assert not np.array_equal(a.conv1.conv.kernel.numpy(), c.conv1.conv.kernel.numpy())


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": "conv9"}, "unknown layer"),
    ({"layer": "conv1", "steps": 0}, "steps"),
    ({"layer": "conv1", "tv_weight": -1.0}, "tv_weight"),
    ({"layer": "conv1", "seed": -1}, "seed"),
])
def test_bad_arguments_are_refused(tiny_trunk, photo_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        invert_features(tiny_trunk, photo_path, size=SIZE, verbose=0, **kwargs)


def test_image_smaller_than_the_size_is_refused(tiny_trunk):
    small = np.zeros((16, 20, 3), np.uint8)
    with pytest.raises(InputError, match="image too small.*16 px"):
        invert_features(tiny_trunk, small, "conv1", size=SIZE, verbose=0)


def test_size_whose_map_is_too_small_names_the_smallest(photo_path):
    imagenet = random_trunk(AlexNet("imagenet", image_size=224, widths=(4, 4, 4, 4, 4)))
    with pytest.raises(InputError, match=r"image too small: at 32 px the conv2 map.*use size >= \d+"):
        invert_features(imagenet, photo_path, "conv2", size=32, verbose=0)


def test_unknown_trunk_path_is_refused(tmp_path, photo_path):
    with pytest.raises(InputError, match="no trunk"):
        invert_features(str(tmp_path / "missing"), photo_path, "conv1", verbose=0)


def test_cli_writes_the_png_and_prints_psnr(tiny_trunk, photo_path, tmp_path, capsys):
    checkpoint = tmp_path / "model.keras"
    tiny_trunk.save(checkpoint)
    out = tmp_path / "inv.png"
    rc = cli.main(["keras-oneimage", "invert", f"--image={photo_path}", f"--checkpoint={checkpoint}",
                   "--layer=conv1", "--steps=5", f"--size={SIZE}", f"--output={out}"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "PSNR" in printed and str(out) in printed
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (SIZE, SIZE)


def test_cli_needs_exactly_one_trunk(tmp_path, capsys):
    for flags in ([], ["--random", f"--checkpoint={tmp_path}"]):
        assert cli.main(["keras-oneimage", "invert", f"--output={tmp_path / 'x.png'}", *flags]) == 2
        assert "--checkpoint PATH or --random" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_an_exported_trunk_inverts_like_the_trunk_itself(tiny_trunk, photo_path, tmp_path):
    from keras_oneimage.export import export

    version_dir = export(tiny_trunk, tmp_path / "exported", layers=("conv1",))
    direct, _ = invert_features(tiny_trunk, photo_path, "conv1", steps=5, size=SIZE, verbose=0)
    via_export, record = invert_features(str(version_dir.parent), photo_path, "conv1", steps=5, size=SIZE, verbose=0)
    assert record.trunk.startswith("export:")
    np.testing.assert_allclose(via_export, direct, atol=1e-5)
