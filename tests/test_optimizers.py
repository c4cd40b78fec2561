"""keras_oneimage.optimizers.FusedSGD: the same weights as keras.optimizers.SGD, its config, its fall-backs."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage.optimizers import FusedSGD
from keras_oneimage.precision import precision_scope

# XLA may contract a multiply-add into an FMA where Keras's op chain rounds twice: a last-bit difference per step.
TOL = dict(rtol=1e-6, atol=1e-6)


def _small_model():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(3)])


def _train(optimizer_cls, policy="float32", exclude_bias=False, **kwargs):
    """Weights and optimizer slots after 8 steps of `fit` on fixed data (same seed for every optimizer)."""
    with precision_scope(policy):
        keras.utils.set_random_seed(0)
        model = _small_model()
        optimizer = optimizer_cls(**kwargs)
        if exclude_bias:
            optimizer.exclude_from_weight_decay(var_names=["bias"])
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.RandomState(1).randn(64, 8).astype("float32")
        y = np.arange(64) % 3
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    return model, [v.numpy() for v in model.weights], [v.numpy() for v in optimizer.variables]


@pytest.mark.parametrize("kwargs", [
    dict(learning_rate=0.05, momentum=0.9, weight_decay=5e-4),
    dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(learning_rate=0.05, momentum=0.9, weight_decay=5e-2, exclude_bias=True),
    dict(learning_rate=0.1),
    dict(learning_rate=0.1, weight_decay=1e-3),
    dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5), momentum=0.5, weight_decay=1e-3),
], ids=["momentum-wd", "nesterov-wd", "excluded-bias", "plain", "plain-wd", "schedule"])
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_same_weights_as_keras_sgd(kwargs, policy):
    _, ref_w, ref_slots = _train(keras.optimizers.SGD, policy, **kwargs)
    _, w, slots = _train(FusedSGD, policy, **kwargs)
    assert len(w) == len(ref_w) and len(slots) == len(ref_slots)
    for a, b in zip(w + slots, ref_w + ref_slots):
        np.testing.assert_allclose(a, b, **TOL)
    _, start, _ = _train(keras.optimizers.SGD, policy, learning_rate=0.0)
    moved = any(not np.allclose(a, b) for a, b in zip(ref_w, start))
    assert moved  # the comparison is about weights that trained


def test_decay_is_applied_once_and_only_to_included_weights():
    """One step on zero gradients: only the decay acts, ``w * (1 - wd * lr)`` on non-excluded weights."""
    kernel = tf.Variable(np.full((3, 2), 2.0, np.float32), name="kernel")
    bias = tf.Variable(np.full((2,), 2.0, np.float32), name="bias")
    optimizer = FusedSGD(learning_rate=0.5, momentum=0.9, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.apply([tf.zeros((3, 2)), tf.zeros((2,))], [kernel, bias])
    np.testing.assert_allclose(kernel.numpy(), 2.0 - 2.0 * 0.1 * 0.5, rtol=1e-7)
    np.testing.assert_array_equal(bias.numpy(), 2.0)


def test_sparse_gradients_take_keras_code_path():
    """An ``IndexedSlices`` gradient (embedding lookup) falls back to Keras's update, decay included."""
    def run(cls):
        keras.utils.set_random_seed(0)
        emb = keras.Variable(np.random.RandomState(0).randn(10, 4).astype("float32"), name="emb")
        optimizer = cls(learning_rate=0.1, momentum=0.9, weight_decay=0.01)
        for step in range(3):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.gather(emb.value, [1, 3, 3, step]) ** 2)
            grad = tape.gradient(loss, emb.value)
            assert isinstance(grad, tf.IndexedSlices)
            optimizer.apply([grad], [emb])
        return emb.numpy()

    np.testing.assert_allclose(run(FusedSGD), run(keras.optimizers.SGD), **TOL)


def test_config_and_model_keras_round_trip(tmp_path):
    model, weights, slots = _train(FusedSGD, learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    config = model.optimizer.get_config()
    assert config["momentum"] == 0.9 and config["nesterov"] and config["weight_decay"] == 5e-4
    assert isinstance(keras.optimizers.deserialize(keras.optimizers.serialize(model.optimizer)), FusedSGD)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is FusedSGD
    for a, b in zip(loaded.weights, weights):
        np.testing.assert_array_equal(a.numpy(), b)
    for a, b in zip(loaded.optimizer.variables, slots):
        np.testing.assert_array_equal(a.numpy(), b)

