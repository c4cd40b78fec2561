"""export(): versioned SavedModels of the frozen trunk, their signatures, metadata, atomicity and TFLite."""
import io
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_oneimage.errors import InputError
from keras_oneimage.export import METADATA_FILE, SIGNATURES, export, find_min_size, numeric_versions
from keras_oneimage.export import savedmodel
from keras_oneimage.models.alexnet import AlexNet

TINY = (6, 8, 8, 8, 6)  # conv widths small enough for quick tests


def tiny_alexnet(variant="cifar", image_size=32, seed=0) -> AlexNet:
    """A small AlexNet with non-trivial BatchNorm statistics (so inference-mode BN matters for parity)."""
    keras.utils.set_random_seed(seed)
    model = AlexNet(variant, image_size=image_size, widths=TINY)
    model.build()
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.5, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.3, shape).astype("float32"))
    return model


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_alexnet()
    base = tmp_path_factory.mktemp("exports") / "tiny"
    version_dir = export(model, base, layers=("conv1", "conv2"), metadata={"probe": {"conv1": 0.42}})
    return model, base, version_dir, tf.saved_model.load(str(version_dir))


def test_layout_is_tf_serving_versioned(exported):
    _, base, version_dir, _ = exported
    assert version_dir == base / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables").is_dir()
    assert [p.name for p in base.iterdir()] == ["1"]  # no temp dir left behind


def test_reload_reproduces_in_memory_features(exported):
    model, _, _, loaded = exported
    rng = np.random.default_rng(1)
    images = rng.random((3, 24, 29, 3), dtype=np.float32)  # non-square, not the training size
    got = loaded.signatures["serving_default"](images=tf.constant(images))
    want = model.features(images, layers=("conv1", "conv2"), training=False)
    assert sorted(got) == ["conv1", "conv2"]
    for name in ("conv1", "conv2"):
        assert got[name].dtype == tf.float32
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name].numpy(), keras.ops.convert_to_numpy(want[name]), atol=1e-5, rtol=0)
    assert float(tf.reduce_max(got["conv2"])) > 0  # not a degenerate all-zero map


def test_uint8_and_bytes_signatures_match_float(exported):
    model, _, _, loaded = exported
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (2, 20, 22, 3), dtype=np.uint8)
    want = model.features(u8.astype("float32") / 255.0, layers=("conv1", "conv2"))
    from_u8 = loaded.signatures["serving_uint8"](images=tf.constant(u8))
    from_png = loaded.signatures["serving_bytes"](image_bytes=tf.constant([png_bytes(u8[0]), png_bytes(u8[1])]))
    for name in ("conv1", "conv2"):
        ref = keras.ops.convert_to_numpy(want[name])
        np.testing.assert_allclose(from_u8[name].numpy(), ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(from_png[name].numpy(), ref, atol=1e-5, rtol=0)


def test_bytes_signature_rejects_mixed_sizes_and_garbage(exported):
    _, _, _, loaded = exported
    a = np.zeros((20, 20, 3), np.uint8)
    b = np.zeros((16, 20, 3), np.uint8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="same height and width"):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([png_bytes(a), png_bytes(b)]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image file format"):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([b"not an image"]))


def test_signature_names_inputs_and_output_shapes(exported):
    _, _, _, loaded = exported
    assert set(SIGNATURES) <= set(loaded.signatures)
    expected_inputs = {
        "serving_default": ("images", tf.float32, [None, None, None, 3]),
        "serving_uint8": ("images", tf.uint8, [None, None, None, 3]),
        "serving_bytes": ("image_bytes", tf.string, [None]),
    }
    for sig_name, (input_name, dtype, shape) in expected_inputs.items():
        fn = loaded.signatures[sig_name]
        _, kwargs = fn.structured_input_signature
        assert list(kwargs) == [input_name]
        assert kwargs[input_name].dtype == dtype
        assert kwargs[input_name].shape.as_list() == shape
        outputs = fn.structured_outputs
        assert sorted(outputs) == ["conv1", "conv2"]
        assert outputs["conv1"].shape.as_list() == [None, None, None, TINY[0]]
        assert outputs["conv2"].shape.as_list() == [None, None, None, TINY[1]]
        assert all(t.dtype == tf.float32 for t in outputs.values())


def test_weights_are_frozen_in_the_export_only(exported):
    model, _, _, loaded = exported
    assert len(loaded.variables) > 0
    assert list(loaded.trainable_variables) == []
    assert not any(v.trainable for v in loaded.variables)
    assert model.trainable and len(model.trainable_variables) > 0  # the caller's model is left as it was


def test_metadata_records_what_and_how(exported):
    model, _, version_dir, _ = exported
    info = json.loads((version_dir / METADATA_FILE).read_text())
    import keras_oneimage

    assert info["package_version"] == keras_oneimage.__version__
    assert info["layers"] == ["conv1", "conv2"]
    assert info["min_size"] == find_min_size(model, ("conv1", "conv2"))
    assert info["input"]["serving_default"]["dtype"] == "float32"
    assert info["input"]["serving_bytes"]["name"] == "image_bytes"
    assert info["outputs"]["conv2"]["channels"] == TINY[1]
    assert info["outputs"]["conv1"]["shape_at"]["32"] == list(model.feature_shapes(32)["conv1"])
    assert info["variant"] == "cifar" and info["training_image_size"] == 32
    assert info["probe"] == {"conv1": 0.42}


def test_next_export_gets_the_next_version(tmp_path):
    model = tiny_alexnet()
    base = tmp_path / "m"
    (base / "7").mkdir(parents=True)  # an existing version number (content irrelevant for numbering)
    (base / "notes").mkdir()
    first = export(model, base, layers="conv1")
    second = export(model, base, layers=("conv1",))
    assert (first.name, second.name) == ("8", "9")
    assert numeric_versions(base) == [7, 8, 9]


def test_too_small_images_get_a_clear_error(tmp_path):
    model = tiny_alexnet(variant="imagenet", image_size=64)
    layers = ("conv1", "conv2")
    min_size = find_min_size(model, layers)
    # Independent check by graph shape inference (find_min_size reads the model's shape arithmetic): min_size is
    # the first side with non-empty maps. Tracing runs no kernel, so too small an input cannot crash the process.
    traced = tf.function(lambda x: model.features(x, layers=layers), autograph=False)

    def smallest_side(size):
        try:
            outputs = traced.get_concrete_function(tf.TensorSpec((1, size, size, 3), tf.float32)).structured_outputs
        except ValueError:  # a negative output size during shape inference
            return 0
        return min(min(outputs[n].shape[1:3]) for n in layers)

    assert smallest_side(min_size) >= 1 and smallest_side(min_size - 1) < 1
    loaded = tf.saved_model.load(str(export(model, tmp_path / "m", layers=layers)))
    fn = loaded.signatures["serving_default"]
    out = fn(images=tf.zeros((1, min_size, min_size + 3, 3)))
    assert min(out["conv2"].shape[1:3]) >= 1
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"at least {min_size}x{min_size} pixels"):
        fn(images=tf.zeros((1, min_size - 1, 64, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"at least {min_size}x{min_size} pixels"):
        fn(images=tf.zeros((1, 64, min_size - 1, 3)))


def test_failed_export_leaves_no_version_and_no_temp(tmp_path, monkeypatch):
    model = tiny_alexnet()
    base = tmp_path / "m"
    export(model, base, layers="conv1")
    real_save = tf.saved_model.save
    seen = []

    def save_then_fail(obj, export_dir, *args, **kwargs):
        real_save(obj, export_dir, *args, **kwargs)  # a complete-looking SavedModel in the temp dir...
        seen.append(pathlib.Path(export_dir))
        raise OSError("disk full (simulated)")  # ...and then the export fails

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export(model, base, layers="conv1")
    assert seen and seen[0].parent == base and not seen[0].name.isdigit()
    assert sorted(p.name for p in base.iterdir()) == ["1"]  # only the earlier good version
    assert model.trainable and all(v.trainable for v in model.trainable_variables)


def test_failed_metadata_write_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_alexnet()
    base = tmp_path / "m"

    def boom(*args, **kwargs):
        raise RuntimeError("rename failed (simulated)")

    monkeypatch.setattr(savedmodel.os, "rename", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export(model, base, layers="conv1")
    assert list(base.iterdir()) == []


@keras.saving.register_keras_serializable(package="keras_oneimage_tests")
class _Wrapper(keras.Model):
    """A stand-in method model: holds the trunk as ``.backbone`` like RotNet & co."""

    method_name = "wrapper"

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, x, training=None):
        return self.backbone(x, training=training)

    def get_config(self):
        return {**super().get_config(), "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config):
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def test_export_from_method_model_and_checkpoint(tmp_path):
    backbone = tiny_alexnet(seed=3)
    method = _Wrapper(backbone)
    method(np.zeros((1, 32, 32, 3), "float32"))
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    method.save(out_dir / "model.keras")
    (out_dir / "run.json").write_text(json.dumps({"method": "wrapper", "image_sha256": ["ab" * 32], "epochs": 3}))

    from_model = export(method, tmp_path / "a", layers="conv2")
    from_ckpt = export(out_dir, tmp_path / "b", layers="conv2")  # a fit output_dir holding model.keras
    info = json.loads((from_ckpt / METADATA_FILE).read_text())
    assert info["method"] == "wrapper"
    assert info["source_image_sha256"] == ["ab" * 32]
    assert info["training"]["epochs"] == 3
    assert len(info["checkpoint_sha256"]) == 64
    assert json.loads((from_model / METADATA_FILE).read_text())["method"] == "wrapper"

    images = np.random.default_rng(4).random((2, 32, 32, 3), dtype=np.float32)
    want = keras.ops.convert_to_numpy(backbone.features(images, layers="conv2")["conv2"])
    for version_dir in (from_model, from_ckpt):
        got = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=tf.constant(images))
        assert list(got) == ["conv2"]
        np.testing.assert_allclose(got["conv2"].numpy(), want, atol=1e-5, rtol=0)


def test_export_from_a_rotnet_checkpoint(tmp_path):
    from keras_oneimage.methods.rotnet import RotNet

    backbone = tiny_alexnet(seed=5)
    method = RotNet(backbone, head_widths=(8,))
    method(np.zeros((1, 32, 32, 3), "float32"))
    method.save(tmp_path / "model.keras")
    version_dir = export(tmp_path / "model.keras", tmp_path / "m", layers=("conv1",))
    assert json.loads((version_dir / METADATA_FILE).read_text())["method"] == "rotnet"
    images = np.random.default_rng(6).random((2, 32, 32, 3), dtype=np.float32)
    got = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=tf.constant(images))["conv1"]
    want = keras.ops.convert_to_numpy(backbone.features(images, layers="conv1")["conv1"])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": ("conv9",)}, "unknown layer"),
        ({"layers": ()}, "at least one"),
        ({"layers": ("conv1", "conv1")}, "duplicates"),
        ({"metadata": {"x": object()}}, "JSON"),
        ({"metadata": ["not", "a", "mapping"]}, "mapping"),
        ({"min_size": 0}, "min_size"),
    ],
)
def test_bad_arguments_raise_input_error(tmp_path, kwargs, message):
    model = tiny_alexnet()
    with pytest.raises(InputError, match=message):
        export(model, tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists() or numeric_versions(tmp_path / "m") == []


def test_bad_sources_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="no checkpoint"):
        export(tmp_path / "missing.keras", tmp_path / "m")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot load checkpoint"):
        export(broken, tmp_path / "m")
    with pytest.raises(InputError, match="cannot export"):
        export(keras.layers.Dense(3), tmp_path / "m")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        export(tiny_alexnet(), tmp_path / "file")


def test_saved_model_cli_lists_the_signatures(exported):
    _, _, version_dir, _ = exported
    # The module behind TensorFlow's `saved_model_cli` script: present wherever tensorflow is, so no skip.
    result = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir", str(version_dir), "--all"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("signature_def['serving_default']", "signature_def['serving_uint8']",
                 "signature_def['serving_bytes']", "inputs['images']", "inputs['image_bytes']", "outputs['conv2']"):
        assert text in result.stdout


def test_tflite_converts_serving_default(exported):
    model, _, version_dir, _ = exported
    converter = tf.lite.TFLiteConverter.from_saved_model(str(version_dir), signature_keys=["serving_default"])
    flatbuffer = converter.convert()
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    runner = interpreter.get_signature_runner("serving_default")
    images = np.random.default_rng(5).random((1, 32, 32, 3), dtype=np.float32)
    got = runner(images=images)
    want = model.features(images, layers=("conv1", "conv2"))
    for name in ("conv1", "conv2"):
        np.testing.assert_allclose(got[name], keras.ops.convert_to_numpy(want[name]), atol=1e-4, rtol=0)
