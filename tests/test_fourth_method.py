"""A fourth method is one class and one ``@register`` line: it trains through `fit`, `tune` and the CLI.

The method below lives only in this file; no module of the package knows it. It also sets its trunk's input size
(``trunk_input_size``: the trunk sees the central half of each patch), which every entry point must honour.
"""
import csv
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage import api, cli, tuning
from keras_oneimage.data.labelled import from_arrays
from keras_oneimage.methods import registry
from keras_oneimage.methods.base import SelfSupervisedMethod, unpack_patches

NAME = "test_flipnet"
WIDTHS = (8, 16, 16, 16, 8)
SMALL = dict(image_size=32, batch_size=4, epochs=1, steps_per_epoch=2)


@registry.register(NAME)
@keras.saving.register_keras_serializable(package="keras_oneimage_tests")
class FlipNet(SelfSupervisedMethod):
    """Tell a patch from its mirror image, looking at its central half only."""

    backbone_options = {"widths": WIDTHS}

    def __init__(self, backbone, **kwargs):
        super().__init__(backbone, **kwargs)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(2, name="flip_logits")

    @classmethod
    def trunk_input_size(cls, image_size: int) -> int:
        return image_size // 2

    def call(self, x, training=None):
        size = self.backbone.image_size
        start = (x.shape[1] - size) // 2
        centre = x[:, start:start + size, start:start + size, :]
        return self.head(self.pool(self.backbone(centre, training=training)))

    def train_step(self, data):
        patches = unpack_patches(data)
        images = tf.concat([patches, tf.reverse(patches, axis=[2])], axis=0)
        labels = tf.concat([tf.zeros(tf.shape(patches)[:1], tf.int32), tf.ones(tf.shape(patches)[:1], tf.int32)], 0)
        with tf.GradientTape() as tape:
            logits = self(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
            scaled = self.scaled_loss(loss)
        self.minimize(scaled, tape)
        return {"loss": loss}


@pytest.fixture(scope="module", autouse=True)
def registered():
    yield
    registry._REGISTRY.pop(NAME, None)  # other test modules see only the package's own methods


def _assert_flipnet(model):
    """A FlipNet on a 16 px trunk (half the 32 px patch) of the method's widths."""
    assert isinstance(model, FlipNet)
    assert model.backbone.image_size == 16 and tuple(model.backbone.widths) == WIDTHS


def _epochs_in_history(run_dir) -> list[str]:
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    return [r["epoch"] for r in rows]


def test_fit_trains_the_method_and_resumes_it(tmp_path, photo_path):
    out = tmp_path / "run"
    model = api.fit(str(photo_path), method=NAME, output_dir=out, verbose=0, **SMALL)
    _assert_flipnet(model)
    assert int(model.optimizer.iterations) == 2  # one epoch of two steps
    assert json.loads((out / "run.json").read_text())["method"] == NAME
    assert _epochs_in_history(out) == ["0"]
    again = api.fit(str(photo_path), method=NAME, output_dir=out, verbose=0, **dict(SMALL, epochs=2))
    assert int(again.optimizer.iterations) == 4  # epoch 0 restored with its optimizer state, epoch 1 trained
    assert _epochs_in_history(out) == ["0", "1"]
    saved = api.load_trained(out)
    _assert_flipnet(saved)
    np.testing.assert_array_equal(saved.head.kernel, again.head.kernel)


def test_tune_trains_the_method_in_every_trial(tmp_path, photo_path):
    rng = np.random.default_rng(0)
    y = np.arange(12) % 2
    x = np.clip(0.3 + 0.4 * y[:, None, None, None] + rng.normal(0, 0.1, (12, 32, 32, 3)), 0, 1).astype(np.float32)
    data = from_arrays(x, y, x[:4], y[:4], val_fraction=0.5, seed=0)
    result = tuning.tune(str(photo_path), method=NAME, dataset=data, max_trials=1, algorithm="random",
                         directory=tmp_path, objective="conv1", probe_epochs=1, probe_batch_size=8, verbose=0,
                         search_space={"min_area": tuning.Fixed(0.01)}, **SMALL)
    assert [t["status"] for t in result.trials] == ["COMPLETED"]
    assert 0.0 <= result.best_score <= 1.0
    _assert_flipnet(result.best_model())
    assert _epochs_in_history(pathlib.Path(result.project_dir) / f"trial_{result.best_trial_id}" / "run") == ["0"]


def test_the_cli_trains_the_method(tmp_path, photo_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["keras-oneimage", "fit", f"--image={photo_path}", f"--method={NAME}", f"--output_dir={out}",
                   *(f"--{k}={v}" for k, v in SMALL.items())])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["method"] == NAME
    _assert_flipnet(api.load_trained(out))
    assert _epochs_in_history(out) == ["0"]
