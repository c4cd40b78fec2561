"""RotNet: exact rotations, registry wiring, serialisation, and that it learns on a photograph."""
import numpy as np
import pytest
import tensorflow as tf

import keras
from keras_oneimage.errors import InputError
from keras_oneimage.methods import registry
from keras_oneimage.methods.rotnet import RotNet, rotate_batch
from keras_oneimage.models import AlexNet
from keras_oneimage.models.heads import CIFAR_HEAD, IMAGENET_HEAD

TINY = (8, 16, 24, 24, 16)


def test_rotate_batch_is_exact_and_labelled_in_order():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    rotated, labels = rotate_batch(tf.constant(x))
    rotated, labels = rotated.numpy(), labels.numpy()
    assert rotated.shape == (8, 4, 4, 3)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2, 3, 3])
    for k in range(4):
        for i in range(2):
            # numpy's rot90 over the spatial axes is counter-clockwise, like tf.image.rot90.
            np.testing.assert_array_equal(rotated[2 * k + i], np.rot90(x[i], k, axes=(0, 1)))
    # the four copies of a patch are pairwise different (no accidental identity rotations)
    assert not np.array_equal(rotated[0], rotated[2]) and not np.array_equal(rotated[2], rotated[4])


def test_registry_and_head_defaults():
    assert registry.get("RotNet") is RotNet
    assert "rotnet" in registry.available()
    assert RotNet(AlexNet("cifar", 32, widths=TINY)).head_widths == CIFAR_HEAD
    assert RotNet(AlexNet("imagenet", 224, widths=TINY)).head_widths == IMAGENET_HEAD
    with pytest.raises(InputError, match="head_widths"):
        RotNet(AlexNet("cifar", 32, widths=TINY), head_widths=(8, 0))


def test_logits_are_float32_and_model_round_trips(tmp_path):
    model = RotNet(AlexNet("cifar", 32, widths=TINY), head_widths=(16,))
    x = tf.random.stateless_uniform((3, 32, 32, 3), seed=(1, 2))
    model(x, training=True)  # moves the BatchNorm statistics away from their initial values
    logits = model(x, training=False)
    assert logits.shape == (3, 4) and logits.dtype == tf.float32
    model.save(tmp_path / "rot.keras")
    loaded = keras.saving.load_model(tmp_path / "rot.keras")
    assert isinstance(loaded, RotNet) and loaded.head_widths == (16,)
    np.testing.assert_allclose(loaded(x, training=False).numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_rotnet_learns_rotations_on_a_photo(photo_path):
    from keras_oneimage.data.images import load_image
    from keras_oneimage.data.synthetic import patch_dataset

    keras.utils.set_random_seed(0)
    data = patch_dataset([load_image(photo_path)], image_size=32, batch_size=16, seed=0)
    model = RotNet(AlexNet("cifar", 32, widths=(16, 32, 48, 48, 32)), head_widths=(128, 128))
    model.compile(optimizer=model.default_optimizer())
    history = model.fit(data, epochs=3, steps_per_epoch=40, verbose=0, shuffle=False).history
    assert history["loss"][-1] < history["loss"][0] - 0.1, history
    assert history["rotation_accuracy"][-1] > 0.5, history  # chance is 0.25
    scores = model.evaluate(data, steps=4, verbose=0, return_dict=True)
    assert set(scores) == {"loss", "rotation_accuracy"}
    assert scores["rotation_accuracy"] > 0.4, scores


def test_precision_resolution_and_scope():
    from keras_oneimage.precision import precision_scope, resolve_precision

    assert resolve_precision("float32") == "float32"
    assert resolve_precision("auto") in ("float32", "mixed_bfloat16")
    with pytest.raises(InputError, match="precision"):
        resolve_precision("bf16")
    with precision_scope("mixed_bfloat16") as policy:
        assert policy == keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize(
    "flags, onednn, expected",
    [
        ({"avx2", "fma"}, "1", "float32"),  # no bf16 units: bf16 would be emulated
        ({"avx512f", "avx512_bf16"}, "1", "mixed_bfloat16"),  # AMD Zen 4, Intel Cooper Lake
        ({"avx512f", "amx_bf16", "amx_tile"}, "1", "mixed_bfloat16"),  # Intel Sapphire Rapids
        ({"amx_bf16"}, "0", "float32"),  # oneDNN off: TF's own kernels have no bf16 fast path
    ],
)
def test_auto_precision_follows_the_cpus_bf16_units(monkeypatch, flags, onednn, expected):
    from keras_oneimage import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn)
    assert precision.resolve_precision("auto") == expected
    assert precision.resolve_precision("float32") == "float32"  # an explicit choice is never overridden


def test_mixed_bfloat16_rotnet_learns_and_its_outputs_stay_float32(tmp_path, photo_path):
    from keras_oneimage.data.images import load_image
    from keras_oneimage.data.synthetic import patch_dataset
    from keras_oneimage.export.savedmodel import export
    from keras_oneimage.precision import precision_scope

    keras.utils.set_random_seed(0)
    data = patch_dataset([load_image(photo_path)], image_size=32, batch_size=16, seed=0)
    with precision_scope("mixed_bfloat16"):
        model = RotNet(AlexNet("cifar", 32, widths=(16, 32, 48, 48, 32)), head_widths=(128, 128))
    assert model.head.get_layer("fc1").compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.weights)  # float32 master weights
    model.compile(optimizer=model.default_optimizer())
    history = model.fit(data, epochs=2, steps_per_epoch=25, verbose=0, shuffle=False).history
    assert np.isfinite(history["loss"]).all()
    assert history["loss"][-1] < history["loss"][0] - 0.05, history

    x = tf.random.stateless_uniform((2, 32, 32, 3), seed=(3, 4))
    assert model(x, training=False).dtype == tf.float32  # logits
    taps = model.backbone.features(x, layers=("conv1", "conv5"))
    assert all(t.dtype == tf.float32 for t in taps.values())
    version = export(model, tmp_path / "export", layers=("conv1", "conv5"))
    served = tf.saved_model.load(str(version)).signatures["serving_default"](images=x)
    assert {k: v.dtype for k, v in served.items()} == {"conv1": tf.float32, "conv5": tf.float32}
    # the same bf16 computation, up to bf16 rounding (the SavedModel graph fuses ops differently)
    diff = np.abs(served["conv5"].numpy() - taps["conv5"].numpy())
    assert diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())
