"""Figures: files are written, decode, and show something (not a constant image)."""
import numpy as np
import pytest
import tensorflow as tf
from matplotlib import image as mpimg

from keras_oneimage.errors import InputError
from keras_oneimage.methods.rotnet import RotNet
from keras_oneimage.models import AlexNet
from keras_oneimage.plots import (
    conv1_filter_comparison,
    conv1_filter_grid,
    image_grid,
    layer_accuracy_plot,
    sobel_effective_filters,
)

TINY = (12, 8, 8, 8, 8)


def _read_nonconstant(path):
    assert path.is_file() and path.stat().st_size > 0
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 10 and pixels.shape[1] > 10
    assert float(pixels[..., :3].std()) > 0.01, "image is (nearly) constant"
    return pixels


@pytest.mark.parametrize("sobel", [False, True])
def test_conv1_filter_grid(tmp_path, sobel):
    model = RotNet(AlexNet("cifar", 32, sobel=sobel, widths=TINY), head_widths=(8,))
    with pytest.raises(InputError, match="not built"):
        conv1_filter_grid(model, tmp_path / "early.png")
    model(tf.zeros((1, 32, 32, 3)))
    path = conv1_filter_grid(model, tmp_path / "sub" / "filters.png", title="conv1")
    assert path == tmp_path / "sub" / "filters.png"
    _read_nonconstant(path)
    assert [p.name for p in path.parent.iterdir()] == ["filters.png"]  # no temporary file left


def test_sobel_effective_filters_match_the_network():
    """The composed filter applied to a grayscale image equals Sobel→conv1 (pre-BatchNorm) in the interior."""
    model = AlexNet("cifar", 32, sobel=True, widths=TINY)
    model(tf.zeros((1, 32, 32, 3)))
    conv = model.get_layer("conv1").conv
    kernel = conv.kernel.numpy()
    rng = np.random.default_rng(0)
    gray = rng.random((20, 20)).astype(np.float32)
    rgb = np.repeat(gray[None, :, :, None], 3, axis=-1)
    network = conv(model.sobel_layer(rgb)).numpy()[0]  # (20, 20, N), 'same' padding
    effective = sobel_effective_filters(kernel)  # (N, 7, 7)
    assert effective.shape == (TINY[0], 7, 7)
    k = effective.shape[1]
    for f in range(3):
        for y in range(k // 2, 20 - k // 2):
            for x in range(k // 2, 20 - k // 2):
                window = gray[y - k // 2 : y + k // 2 + 1, x - k // 2 : x + k // 2 + 1]
                assert np.sum(window * effective[f]) == pytest.approx(network[y, x, f], abs=1e-4)


def test_image_grid_uint8_and_float(tmp_path):
    rng = np.random.default_rng(1)
    _read_nonconstant(image_grid(rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), tmp_path / "a.png"))
    _read_nonconstant(image_grid(tf.random.uniform((4, 8, 8, 1)), tmp_path / "b.png", title="samples"))
    with pytest.raises(InputError, match="image_grid"):
        image_grid(np.zeros((4, 8)), tmp_path / "c.png")
    with pytest.raises(InputError, match="image_grid"):
        image_grid(np.zeros((0, 8, 8, 3)), tmp_path / "c.png")


def test_layer_accuracy_plot(tmp_path):
    results = {
        "random": {"conv1": 0.20, "conv2": 0.18, "conv3": 0.15},
        "rotnet (1 image)": {"conv3": 0.31, "conv1": 0.35, "conv2": 0.38},
    }
    _read_nonconstant(layer_accuracy_plot(results, tmp_path / "acc.png", title="linear probes"))
    with pytest.raises(InputError, match="non-empty"):
        layer_accuracy_plot({}, tmp_path / "empty.png")


def test_conv1_filter_comparison_shows_each_model(tmp_path):
    rgb = AlexNet("cifar", 32, widths=TINY)
    sobel = AlexNet("cifar", 32, sobel=True, widths=TINY)
    for m in (rgb, sobel):
        m(tf.zeros((1, 32, 32, 3)))
    one = _read_nonconstant(conv1_filter_comparison({"rgb": rgb}, tmp_path / "one.png"))
    two = _read_nonconstant(conv1_filter_comparison({"rgb": rgb, "sobel": sobel}, tmp_path / "two.png"))
    assert two.shape[1] > 1.5 * one.shape[1]  # a panel per model, side by side
    # more panels than ncols wrap into rows: three models in rows of two are two panels wide and two high
    three = _read_nonconstant(conv1_filter_comparison({"a": rgb, "b": sobel, "c": rgb}, tmp_path / "three.png",
                                                      ncols=2))
    assert three.shape[1] < 1.2 * two.shape[1] and three.shape[0] > 1.5 * two.shape[0]
    with pytest.raises(ValueError):
        conv1_filter_comparison({}, tmp_path / "none.png")


def test_demo_figure_rejects_missing_parts(tmp_path):
    from keras_oneimage.plots import demo_figure

    kernel = np.random.default_rng(0).normal(size=(5, 5, 3, 8))
    parts = dict(source=np.zeros((40, 40, 3), np.uint8), patches=np.zeros((4, 8, 8, 3)), steps_per_epoch=2,
                 filters_before=kernel, filters_after=kernel + 0.1, chance=0.25)
    with pytest.raises(InputError, match="loss"):
        demo_figure(tmp_path / "a.png", curve={"loss": [1.0, 0.5], "rotation_accuracy": [0.5]},
                    probe={"random": {"conv1": 0.3}}, **parts)
    with pytest.raises(InputError, match="probe"):
        demo_figure(tmp_path / "b.png", curve={"loss": [1.0], "rotation_accuracy": [0.5]}, probe={}, **parts)
    path = demo_figure(tmp_path / "c.png", curve={"loss": [1.0, 0.5], "rotation_accuracy": [0.3, 0.6]},
                       probe={"random": {"conv1": 0.3}, "trained": {"conv1": 0.4}}, **parts)
    _read_nonconstant(path)
