"""AlexNet trunk: shapes of both variants, taps, Sobel front end, serialisation, mixed precision."""
import numpy as np
import pytest
import tensorflow as tf

import keras
from keras_oneimage.errors import InputError
from keras_oneimage.models import AlexNet, Sobel
from keras_oneimage.models.alexnet import ALEXNET_WIDTHS

TINY = (8, 16, 24, 24, 16)


def _batch(n, size, seed=0):
    return tf.random.stateless_uniform((n, size, size, 3), seed=(seed, 7))


@pytest.mark.parametrize(
    "variant, size, widths, expected",
    [
        ("cifar", 32, ALEXNET_WIDTHS,
         {"conv1": (32, 32, 96), "conv2": (16, 16, 256), "conv3": (8, 8, 384), "conv4": (8, 8, 384),
          "conv5": (8, 8, 256), "output": (4, 4, 256)}),
        ("cifar", 64, TINY,
         {"conv1": (32, 32, 8), "conv2": (16, 16, 16), "conv3": (8, 8, 24), "conv4": (8, 8, 24),
          "conv5": (8, 8, 16), "output": (4, 4, 16)}),
        ("imagenet", 224, TINY,
         {"conv1": (55, 55, 8), "conv2": (27, 27, 16), "conv3": (13, 13, 24), "conv4": (13, 13, 24),
          "conv5": (13, 13, 16), "output": (6, 6, 16)}),
    ],
)
def test_shapes_of_both_variants(variant, size, widths, expected):
    model = AlexNet(variant, size, widths=widths)
    assert model.feature_shapes() == expected
    x = _batch(2, size)
    assert tuple(model(x).shape) == (2, *expected["output"])
    taps = model.features(x, layers=AlexNet.TAPS)
    assert list(taps) == list(AlexNet.TAPS)
    for name, tensor in taps.items():
        assert tuple(tensor.shape) == (2, *expected[name]), name
        assert float(tf.reduce_min(tensor)) >= 0.0  # post-ReLU


def test_feature_shapes_at_another_side_keep_the_trunks_own_stride():
    """A "cifar" trunk built for 64 px has conv1 stride 2; fed 32 px it still halves, and feature_shapes says so."""
    model = AlexNet("cifar", 64, widths=TINY)
    taps = model.features(_batch(1, 32), layers=AlexNet.TAPS)
    shapes = model.feature_shapes(32)
    assert shapes["conv1"] == (16, 16, TINY[0])
    assert {name: tuple(t.shape[1:]) for name, t in taps.items()} == {n: shapes[n] for n in AlexNet.TAPS}


def test_default_widths_are_the_papers():
    model = AlexNet("imagenet", 224)
    assert model.widths == (96, 256, 384, 384, 256)
    assert model.get_layer("conv1").kernel_size == 11 and model.get_layer("conv1").strides == 4


def test_features_subset_order_and_consistency_with_call():
    model = AlexNet("cifar", 32, widths=TINY)
    x = _batch(3, 32)
    taps = model.features(x, layers=("conv5", "conv2"))
    assert list(taps) == ["conv5", "conv2"]
    # the pooled conv5 tap is exactly what call() returns
    np.testing.assert_allclose(model.pool5(taps["conv5"]).numpy(), model(x, training=False).numpy(), atol=1e-6)
    single = model.features(x, layers="conv2")
    np.testing.assert_allclose(single["conv2"].numpy(), taps["conv2"].numpy(), atol=1e-6)
    with pytest.raises(InputError, match="conv6"):
        model.features(x, layers=("conv1", "conv6"))


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match="variant"):
        AlexNet("vgg", 64)
    with pytest.raises(InputError, match="widths"):
        AlexNet("cifar", 64, widths=(8, 8, 8))
    with pytest.raises(InputError, match="too small"):
        AlexNet("imagenet", 32)


def test_input_is_normalised_inside():
    model = AlexNet("cifar", 32, widths=TINY, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = tf.fill((1, 32, 32, 3), 0.75)
    np.testing.assert_allclose(model.preprocess(x).numpy(), 1.0, atol=1e-6)


def test_sobel_layer_gradients_and_frozen_weights():
    size = 8
    ramp = np.tile(np.arange(size, dtype=np.float32)[None, :, None], (size, 1, 3)) * 0.1  # grows along x
    out = Sobel()(ramp[None]).numpy()[0]
    assert out.shape == (size, size, 2)
    # interior: Keras convolutions correlate, so the x response is 4 * (left - right) = -0.8; no y gradient.
    np.testing.assert_allclose(out[1:-1, 1:-1, 0], -0.8, atol=1e-5)
    np.testing.assert_allclose(out[1:-1, 1:-1, 1], 0.0, atol=1e-5)

    model = AlexNet("cifar", 32, sobel=True, widths=TINY)
    model(_batch(1, 32))
    assert model.input_channels == 2
    assert tuple(model.get_layer("conv1").conv.kernel.shape) == (5, 5, 2, TINY[0])
    trainable = {id(v) for v in model.trainable_variables}
    assert id(model.sobel_layer.kernel) not in trainable
    assert any(v is model.sobel_layer.kernel for v in model.non_trainable_variables)


@pytest.mark.parametrize("sobel", [False, True])
def test_model_keras_round_trip_reproduces_outputs(tmp_path, sobel):
    model = AlexNet("cifar", 32, sobel=sobel, widths=TINY, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    x = _batch(4, 32, seed=3)
    model(x, training=True)  # updates the BatchNorm moving statistics
    expected = model.features(x, layers=AlexNet.TAPS)
    model.save(tmp_path / "alexnet.keras")
    loaded = keras.saving.load_model(tmp_path / "alexnet.keras")
    assert isinstance(loaded, AlexNet)
    assert loaded.get_config() == model.get_config()
    got = loaded.features(x, layers=AlexNet.TAPS)
    for name in AlexNet.TAPS:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), rtol=1e-5, atol=1e-5)


def test_mixed_bfloat16_taps_are_float32_on_request():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = AlexNet("cifar", 32, sobel=True, widths=TINY)
        x = _batch(2, 32)
        assert model(x).dtype == tf.bfloat16
        assert model.get_layer("conv1").conv.kernel.dtype == "float32"
        taps = model.features(x, layers=("conv1", "conv3"))
        assert all(t.dtype == tf.float32 for t in taps.values())
        assert model.features(x, layers="conv2", dtype=None)["conv2"].dtype == tf.bfloat16
        assert float(tf.reduce_max(taps["conv3"])) > 0.0
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("shape", [(4, 5, 5, 6), (7, 6), (1, 1, 1, 3)])
def test_fused_batchnorm_matches_keras_batchnorm(shape):
    from keras_oneimage.models.alexnet import FusedBatchNormalization

    x = tf.constant(np.random.default_rng(0).normal(1.0, 3.0, shape), tf.float32)
    weights = tf.constant(np.arange(np.prod(shape)).reshape(shape) % 5, tf.float32)
    results = []
    for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
        layer = cls(momentum=0.9, epsilon=1e-5)
        layer.build(shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, shape[-1]))
        layer.beta.assign(np.linspace(-1.0, 1.0, shape[-1]))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * weights)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance, layer(x, training=False)])
    for name, expected, got in zip(["y", "dx", "dgamma", "dbeta", "mean", "var", "inference"], *results):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5, err_msg=name)


def test_alexnet_built_under_a_policy_keeps_it_through_save_and_load(tmp_path):
    from keras_oneimage.precision import precision_scope

    with precision_scope("mixed_bfloat16"):
        model = AlexNet("cifar", 32, widths=TINY)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    x = _batch(2, 32)
    assert model(x).dtype == tf.bfloat16
    model.save(tmp_path / "bf16.keras")
    loaded = keras.saving.load_model(tmp_path / "bf16.keras")
    assert loaded.get_layer("conv3").conv.compute_dtype == "bfloat16"
    assert loaded.get_layer("conv3").conv.kernel.dtype == "float32"
    got, expected = loaded.features(x, layers="conv5"), model.features(x, layers="conv5")
    assert got["conv5"].dtype == tf.float32
    np.testing.assert_allclose(got["conv5"].numpy(), expected["conv5"].numpy(), rtol=1e-2, atol=1e-2)
