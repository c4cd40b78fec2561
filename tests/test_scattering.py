"""The fixed scattering front end of Table 4's scattering row (keras_oneimage.models.scattering)."""
import sys

import keras
import numpy as np
import pytest

from keras_oneimage import cli
from keras_oneimage.data.labelled import from_arrays
from keras_oneimage.errors import InputError
from keras_oneimage.models import scattering
from keras_oneimage.models.alexnet import AlexNet
from keras_oneimage.models.classifier import AlexNetClassifier
from keras_oneimage.models.scattering import ScatteringAlexNet, ScatteringFrontEnd
from keras_oneimage.transfer import finetune

try:
    scattering.require_kymatio()
    HAVE_KYMATIO = True
except InputError:
    HAVE_KYMATIO = False
# Every test but the missing-kymatio one needs it; the `test` extra installs it, so CI runs them all.
needs_kymatio = pytest.mark.skipif(not HAVE_KYMATIO, reason="needs kymatio: pip install keras-oneimage[scattering]")

WIDTHS = (8, 8, 8, 8, 8)
FAST = {"epochs": 2, "batch_size": 16, "learning_rate": 0.05, "head_widths": (16,), "verbose": 0}


def images(n=2, side=32, seed=0):
    return np.random.default_rng(seed).random((n, side, side, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def front():
    layer = ScatteringFrontEnd()
    layer.build((None, 32, 32, 3))
    return layer


@pytest.fixture(scope="module")
def toy():
    """Horizontal vs vertical stripes (random phase, period 6 px) under noise, 32 px: what scattering sees well.

    Not the colour task of test_transfer.py: with the pad-and-crop augmentation, the jump from a saturated colour
    to the black padding is a huge order-1 response that tells the colours apart in training images only.
    """
    rng = np.random.default_rng(0)

    def make(n):
        y = np.arange(n) % 2
        u = np.arange(32, dtype=np.float32)
        waves = 0.5 + 0.3 * np.sin(2 * np.pi * u[None, :] / 6 + rng.random((n, 1)) * 2 * np.pi)  # (n, 32)
        x = np.where(y[:, None, None] == 0, waves[:, :, None], waves[:, None, :])  # along rows or along columns
        x = x[..., None] + rng.normal(0.0, 0.05, (n, 32, 32, 3))
        return np.clip(x, 0.0, 1.0).astype(np.float32), y

    (xtr, ytr), (xte, yte) = make(64), make(32)
    return from_arrays(xtr, ytr, xte, yte, val_fraction=0.0)


@needs_kymatio
def test_output_is_channels_last_with_81_paths_per_colour_in_colour_blocks(front):
    x = images()
    y = front(x).numpy()
    assert y.shape == (2, 8, 8, 3 * 81) and y.dtype == np.float32
    assert scattering.paths_per_channel(2, 8) == 81
    # Each colour is scattered on its own: permuting the colours permutes the 81-channel blocks, bit for bit.
    swapped = front(x[..., ::-1]).numpy().reshape(2, 8, 8, 3, 81)
    np.testing.assert_array_equal(swapped, y.reshape(2, 8, 8, 3, 81)[..., ::-1, :])
    assert front.compute_output_shape((None, 64, 64, 3)) == (None, 16, 16, 243)
    assert not front.trainable_weights and [w.name for w in front.non_trainable_weights] == ["mean", "std"]


@needs_kymatio
@pytest.mark.parametrize("shift, axis", [(4, 2), (-4, 2), (4, 1)])
def test_a_shift_by_2_to_the_J_pixels_shifts_every_path_by_one_position(front, shift, axis):
    # Zero within 5 px of the border: kymatio's reflect padding then adds zeros only, its circular convolutions
    # see the padded image on a torus, and the shift commutes with every step (filtering, modulus, subsampling).
    x = np.zeros((2, 32, 32, 3), np.float32)
    x[:, 10:22, 10:22] = images(2, 12, seed=1)
    y = front(x).numpy()
    moved = front(np.roll(x, shift, axis=axis)).numpy()
    step = shift // 4
    expected = np.roll(y, step, axis=axis)
    keep = [slice(None)] * 4
    keep[axis] = slice(1, None) if step > 0 else slice(None, -1)  # the wrapped-around row is outside the image
    keep = tuple(keep)
    scale = np.abs(y).max(axis=(0, 1, 2))  # per path: order-2 paths are ~100x smaller than order 0
    np.testing.assert_array_less(np.abs(moved[keep] - expected[keep]).max(axis=(0, 1, 2)), 1e-5 * scale + 1e-9)
    assert np.abs(moved[keep] - y[keep]).max() > 1e-2  # the output did move


@needs_kymatio
def test_adapt_standardises_each_channel_and_log_evens_out_the_orders():
    x = images(8, seed=2)
    for log in (False, True):
        layer = ScatteringFrontEnd(log=log)
        assert layer.adapt([(x[:5], None), (x[5:], None)], max_images=7) == 7  # stops inside the second batch
        y = layer(x[:7]).numpy().reshape(-1, 243)
        np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-3)
        np.testing.assert_allclose(y.std(0), 1.0, atol=1e-3)
        orders = layer.std.numpy().reshape(3, 81)
        spread = orders[:, 0].mean() / orders[:, 17:].mean()  # order 0 against order 2, before standardising
        assert spread > 10 if not log else spread < 10
    with pytest.raises(InputError, match="at least one image"):
        ScatteringFrontEnd().adapt([])


@needs_kymatio
def test_the_trunk_matches_conv3s_side_and_round_trips_through_model_keras(tmp_path):
    for variant, side, pools, conv3 in (("cifar", 32, 0, 8), ("cifar", 64, 1, 8), ("imagenet", 224, 2, 13)):
        trunk = ScatteringAlexNet(variant, side, widths=WIDTHS)
        shapes = trunk.feature_shapes()
        assert len(trunk.fit_pools) == pools and shapes["conv3"][:2] == (conv3, conv3), variant
        assert shapes == {k: v for k, v in
                          {**AlexNet(variant, side, widths=WIDTHS).feature_shapes(),
                           "scattering": (side // 4, side // 4, 243)}.items() if k not in ("conv1", "conv2")}
    with pytest.raises(InputError, match="cannot be pooled"):
        ScatteringAlexNet("cifar", 96, widths=WIDTHS)  # 24 px → 12 → 6, never conv3's 8
    keras.utils.set_random_seed(0)
    trunk = ScatteringAlexNet("cifar", 32, widths=WIDTHS, log=True)
    model = AlexNetClassifier(trunk, 3, head_widths=(8,))
    model.build((None, 32, 32, 3))
    trunk.scattering.adapt([images(4)])
    x = images(3, seed=5)
    path = tmp_path / "scattering.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.backbone, ScatteringAlexNet) and loaded.backbone.scattering.log
    np.testing.assert_array_equal(loaded.backbone.scattering.std.numpy(), trunk.scattering.std.numpy())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


@needs_kymatio
def test_finetune_with_the_scattering_front_end_leaves_it_unchanged_and_learns(toy):
    class Snapshot(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.before = {v.path: v.numpy().copy() for v in self.model.backbone.weights}

        def on_train_end(self, logs=None):
            self.after = {v.path: v.numpy().copy() for v in self.model.backbone.weights}

    source = AlexNet(widths=WIDTHS, image_size=32)
    source.build()
    snap = Snapshot()
    result = finetune(source, toy, front_end="scattering", init=("conv1", "conv2"), callbacks=[snap],
                      **{**FAST, "epochs": 6})
    trunk = result.backbone
    assert isinstance(trunk, ScatteringAlexNet) and result.front_end == "scattering"
    assert result.frozen == ("scattering",) and result.initialised == ()
    assert result.as_dict()["front_end"] == "scattering" and trunk.widths == WIDTHS
    front_ids = {id(v) for v in trunk.scattering.weights}
    assert front_ids and not front_ids & {id(v) for v in result.model.trainable_variables}
    assert not np.all(trunk.scattering.std.numpy() == 1.0)  # adapted on the training images before training
    for path, before in snap.before.items():
        if "/scattering/" in path:
            np.testing.assert_array_equal(snap.after[path], before, err_msg=path)
        elif path.endswith("kernel"):
            assert not np.array_equal(snap.after[path], before), f"{path} did not train"
    assert result.test_accuracy >= 0.85  # chance is 0.5


@needs_kymatio
def test_finetune_refuses_a_bad_front_end_and_a_conv3_that_cannot_be_copied(toy):
    with pytest.raises(InputError, match="front_end"):
        finetune("random", toy, front_end="wavelets", **FAST)
    source = AlexNet(widths=WIDTHS, image_size=32)
    source.build()
    with pytest.raises(InputError, match="conv3 of the source does not match"):  # 243 channels in, not 8
        finetune(source, toy, front_end="scattering", init=("conv3",), **FAST)


def test_missing_kymatio_is_a_clear_input_error(toy, monkeypatch):
    monkeypatch.setitem(sys.modules, scattering.KYMATIO_MODULE, None)  # makes its import fail
    with pytest.raises(InputError, match=r"pip install keras-oneimage\[scattering\]"):
        finetune("random", toy, front_end="scattering", **FAST)
    with pytest.raises(InputError, match="needs kymatio"):
        ScatteringFrontEnd()


@needs_kymatio
def test_finetune_cli_front_end_scattering(toy, tmp_path, capsys):
    import json

    from PIL import Image

    for split in ("train", "test"):
        for label, colour in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), tuple(c + 10 * i for c in colour)).save(folder / f"{i}.png")
    rc = cli.main(["keras-oneimage", "finetune", "--source=random", f"--dataset={tmp_path / 'data'}",
                   "--front_end=scattering", "--epochs=1", "--batch_size=4", "--image_size=32",
                   f"--output={tmp_path / 'r.json'}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "frozen scattering from random" in out
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["front_end"] == "scattering" and summary["frozen"] == ["scattering"]
    rc = cli.main(["keras-oneimage", "finetune", "--source=random", f"--dataset={tmp_path / 'data'}",
                   "--front_end=wavelets"])
    assert rc != 0 and "front_end" in capsys.readouterr().err
