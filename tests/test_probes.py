"""Linear probes, kNN and the probe callback on tiny AlexNets and synthetic labelled sets."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage.data.labelled import from_arrays
from keras_oneimage.errors import InputError
from keras_oneimage.models import AlexNet
from keras_oneimage.probes import ProbeCallback, knn_predict, knn_probe, pooling_for, pooling_table, probe, probe_splits, probe_val
from keras_oneimage.probes.linear import TAPS, step_schedule

TINY = (8, 8, 8, 8, 8)  # AlexNet widths small enough for a 2-core CPU


class CountingAlexNet(AlexNet):
    """AlexNet that counts its ``features`` forward passes in a variable (so graph-mode calls count too)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.passes = tf.Variable(0, trainable=False, dtype=tf.int64)

    def features(self, x, layers=("conv1", "conv2"), training=False, dtype="float32"):
        self.passes.assign_add(1)
        return super().features(x, layers=layers, training=training, dtype=dtype)


def tiny_alexnet(cls=AlexNet, image_size=32, seed=0):
    keras.utils.set_random_seed(seed)
    net = cls(variant="cifar", image_size=image_size, widths=TINY)
    net.build()
    return net


def colour_set(n_train=60, n_test=30, size=32, seed=0):
    """Three classes that differ in mean colour, plus noise: linearly separable at every layer."""
    rng = np.random.default_rng(seed)

    def draw(n):
        y = np.arange(n) % 3
        x = 0.25 + 0.5 * np.eye(3)[y][:, None, None, :] + rng.normal(0, 0.1, (n, size, size, 3))
        return np.clip(x, 0, 1).astype(np.float32), y

    return from_arrays(*draw(n_train), *draw(n_test), val_fraction=0.2, seed=seed)


def grating_set(n_train=200, n_test=100, size=32, seed=0, noise=0.2, contrast=0.2):
    """Horizontal (class 0) vs vertical (class 1) sine gratings: random frequency and phase, Gaussian noise."""
    rng = np.random.default_rng(seed)
    coords = np.arange(size)

    def draw(n):
        y = rng.integers(0, 2, n)
        images = []
        for label in y:
            wave = np.sin(2 * np.pi * rng.uniform(2, 6) * coords / size + rng.uniform(0, 2 * np.pi))
            grating = np.tile(wave[:, None], (1, size)) if label == 0 else np.tile(wave[None, :], (size, 1))
            gray = 0.5 + contrast * grating + rng.normal(0, noise, (size, size))
            images.append(np.repeat(gray[..., None], 3, axis=-1))
        return np.clip(np.stack(images), 0, 1).astype(np.float32), y

    return from_arrays(*draw(n_train), *draw(n_test), val_fraction=0.0)


def gabor_bank(kernel=5, filters=8):
    """conv1 kernels: zero-mean Gabors at 4 orientations x 2 phases, the look of a trained conv1."""
    r = np.arange(kernel) - kernel // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    bank = []
    for i in range(filters):
        theta = np.pi * (i // 2) / (filters // 2)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        g = np.cos(2 * np.pi * u / 4 + np.pi / 2 * (i % 2)) * np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
        g = g - g.mean()
        bank.append(g / np.linalg.norm(g))
    return np.repeat(np.stack(bank, -1)[:, :, None, :], 3, axis=2).astype(np.float32) / 3


# ---------------------------------------------------------------------------------------------------------- pooling
def test_pooling_reproduces_the_paper_table_at_224px():
    """The paper's probe code (224 px AlexNet): conv1 6/6 pad 3, conv2 4/4, conv3-4 3/3 pad 1, conv5 2/2."""
    table = pooling_table(AlexNet("imagenet", image_size=224))
    got = {layer: (s.size, s.stride, s.padding, s.dims) for layer, s in table.items()}
    assert got == {
        "conv1": (6, 6, 3, 9600),
        "conv2": (4, 4, 0, 9216),
        "conv3": (3, 3, 1, 9600),
        "conv4": (3, 3, 1, 9600),
        "conv5": (2, 2, 0, 9216),
    }


@pytest.mark.parametrize("image_size", [32, 64])
def test_pooling_specs_match_the_keras_layers(image_size):
    net = AlexNet("cifar", image_size=image_size)
    for layer, spec in pooling_table(net).items():
        x = tf.zeros((1, *spec.input_shape))
        for pool in spec.layers(layer):
            x = pool(x)
        assert tuple(x.shape[1:]) == spec.output_shape
        assert 4096 <= spec.dims <= 16384, f"{layer}: {spec.dims} dims is not 'about 9k'"
        # no non-overlapping pooling of that tap gets closer to 9216 dims on a log scale
        h, w, c = spec.input_shape
        for size in range(1, h + 1):
            for pad in range(size // 2 + 1):
                dims = ((h + 2 * pad - size) // size + 1) * ((w + 2 * pad - size) // size + 1) * c
                assert abs(math.log(dims / 9216)) >= abs(math.log(spec.dims / 9216)) - 1e-12


def test_pooling_rejects_bad_shapes():
    with pytest.raises(InputError):
        pooling_for((0, 4, 8))


# ------------------------------------------------------------------------------------------------------ linear probe
def test_probes_separate_a_linearly_separable_set():
    data = colour_set()
    scores = probe(tiny_alexnet(), data, epochs=3, batch_size=16, learning_rate=0.05, verbose=0)
    assert set(scores) == set(TAPS)
    assert all(acc >= 0.95 for acc in scores.values()), scores


def test_all_probes_share_one_trunk_pass_per_batch():
    data = colour_set(n_train=60, n_test=30)  # train 48 (3 batches of 16), test 30 (2 batches)
    counts = {}
    for layers in (TAPS, ("conv3",)):
        net = tiny_alexnet(CountingAlexNet)
        probe(net, data, layers=layers, epochs=2, batch_size=16, verbose=0)
        counts[len(layers)] = int(net.passes.numpy())
    expected = 2 * math.ceil(data.train_size / 16) + math.ceil(data.test_size / 16)
    assert counts == {5: expected, 1: expected}


def test_trunk_is_frozen_and_results_are_reproducible():
    data = colour_set(n_train=30, n_test=12)
    net = tiny_alexnet()
    before = [w.numpy().copy() for w in net.weights]  # includes BatchNorm moving statistics
    first = probe(net, data, layers=("conv1", "conv5"), epochs=2, batch_size=8, seed=3, verbose=0)
    for old, new in zip(before, net.weights):
        np.testing.assert_array_equal(old, new.numpy())
    second = probe(net, data, layers=("conv1", "conv5"), epochs=2, batch_size=8, seed=3, verbose=0)
    assert first == pytest.approx(second, abs=1e-6)


def oriented_vs_random_conv1(**options) -> dict[str, dict[str, float]]:
    """conv1 probe accuracy on oriented gratings of a tiny AlexNet whose conv1 is Gabors vs random kernels."""
    data = grating_set()
    random_kernel = np.random.default_rng(1).normal(0, math.sqrt(2 / 75), (5, 5, 3, 8)).astype(np.float32)
    scores = {}
    for name, kernel in (("oriented", gabor_bank()), ("random", random_kernel)):
        net = tiny_alexnet()
        net.conv1.conv.kernel.assign(kernel)
        scores[name] = probe(net, data, layers=("conv1",), batch_size=32, learning_rate=0.05, verbose=0, **options)
    return scores


def test_trained_conv1_beats_a_random_conv1_on_orientation():
    """Same tiny AlexNet, conv1 set to oriented Gabors (as a trained conv1 looks) vs random He-normal kernels.

    The classes differ only in the orientation of noisy gratings of random frequency and phase, a low-level
    statistic conv1 should capture. Honest about what is tested: the probe machinery ranks a conv1 with oriented
    filters above a random one; the Gabors are set by hand, not learned.
    """
    scores = oriented_vs_random_conv1(epochs=3)
    assert scores["oriented"]["conv1"] >= 0.85, scores
    assert scores["oriented"]["conv1"] > scores["random"]["conv1"] + 0.1, scores


def test_images_are_resized_to_the_backbone_size():
    data = colour_set(n_train=30, n_test=12, size=20)
    net = tiny_alexnet(CountingAlexNet, image_size=32)
    scores = probe(net, data, layers=("conv2",), epochs=1, batch_size=16, verbose=0)
    assert 0.0 <= scores["conv2"] <= 1.0 and int(net.passes.numpy()) == 2 + 1


def test_probe_val_scores_the_val_split():
    data = colour_set(n_train=30, n_test=12)
    assert set(probe_val(tiny_alexnet(), data, layers=("conv1",), epochs=1, verbose=0)) == {"conv1"}
    with pytest.raises(InputError, match="val"):
        probe_val(tiny_alexnet(), data, split="test")


def test_cached_probes_run_the_trunk_once_per_image_and_still_separate():
    data = colour_set(n_train=60, n_test=30)
    net = tiny_alexnet(CountingAlexNet)
    scores = probe(net, data, epochs=4, batch_size=16, learning_rate=0.05, verbose=0, augment=False)
    assert all(acc >= 0.95 for acc in scores.values()), scores
    # one pass over train (not one per epoch) and one over test
    assert int(net.passes.numpy()) == math.ceil(data.train_size / 16) + math.ceil(data.test_size / 16)
    again = probe(tiny_alexnet(), data, epochs=4, batch_size=16, learning_rate=0.05, verbose=0, augment=False)
    assert scores == pytest.approx(again, abs=1e-6)


def test_cached_probes_rank_an_oriented_conv1_above_a_random_one():
    scores = oriented_vs_random_conv1(epochs=6, augment=False)
    assert scores["oriented"]["conv1"] > scores["random"]["conv1"] + 0.1, scores


def test_probe_splits_trains_once_and_matches_one_probe_per_split():
    data = colour_set(n_train=40, n_test=12)
    options = dict(layers=("conv1", "conv4"), epochs=2, batch_size=8, seed=5, verbose=0)
    net = tiny_alexnet(CountingAlexNet)
    both = probe_splits(net, data, ("val", "test"), **options)
    train_batches = 2 * math.ceil(data.train_size / 8)
    eval_batches = math.ceil(data.size("val") / 8) + math.ceil(data.test_size / 8)
    assert int(net.passes.numpy()) == train_batches + eval_batches  # one training for both splits
    assert both["val"] == pytest.approx(probe(net, data, split="val", **options), abs=1e-6)
    assert both["test"] == pytest.approx(probe(net, data, split="test", **options), abs=1e-6)
    with pytest.raises(InputError, match="split must be 'val' or 'test'"):
        probe_splits(net, data, ("val", "train"), **options)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": ("conv9",)}, "unknown layer"),
        ({"layers": ()}, "at least one"),
        ({"split": "train"}, "split"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
    ],
)
def test_bad_probe_arguments_are_rejected(kwargs, message):
    with pytest.raises(InputError, match=message):
        probe(tiny_alexnet(), colour_set(n_train=9, n_test=3), verbose=0, **kwargs)


def test_empty_val_split_is_rejected():
    x, y = np.zeros((6, 8, 8, 3), np.float32), np.arange(6) % 2
    with pytest.raises(InputError, match="val_fraction"):
        probe(tiny_alexnet(), from_arrays(x, y, x, y, val_fraction=0.0), split="val", verbose=0)


def test_step_schedule_matches_the_paper_at_36_epochs_and_scales():
    paper = step_schedule(0.01, 36)
    assert [paper(e) for e in (0, 9, 10, 19, 20, 29, 30, 35)] == pytest.approx(
        [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    )
    short = step_schedule(0.01, 4)
    # 4 epochs: decays once 10/36 (1.1), 20/36 (2.2) and 30/36 (3.3) of them are done
    assert [short(e) for e in range(4)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-4])


# ---------------------------------------------------------------------------------------------------------- kNN
def _brute_force_knn(net, data, layers, k, temperature):
    """Reference: all pooled, normalised features in memory, full similarity matrix, numpy voting."""
    table = pooling_table(net, layers)

    def embed(ds):
        xs, ys = zip(*ds.as_numpy_iterator())
        feats = net.features(np.stack(xs), layers=layers)
        out = {}
        for layer, spec in table.items():
            f = feats[layer]
            for pool in spec.layers(layer):
                f = pool(f)
            f = np.reshape(f.numpy(), (len(xs), -1))
            out[layer] = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        return out, np.array(ys)

    bank, bank_y = embed(data.train)
    query, _ = embed(data.test)
    preds = {}
    for layer in layers:
        sim = query[layer] @ bank[layer].T
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        scores = np.zeros((len(sim), data.num_classes))
        for i, row in enumerate(top):
            for j in row:
                scores[i, bank_y[j]] += 1.0 if temperature is None else np.exp(sim[i, j] / temperature)
        preds[layer] = scores.argmax(axis=1)
    return preds


@pytest.mark.parametrize("temperature", [0.07, None])
def test_knn_matches_brute_force(temperature):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    data = from_arrays(x[:28], y[:28], x[28:], y[28:], val_fraction=0.0)
    net = tiny_alexnet()
    layers = ("conv1", "conv4")
    # small batches and query chunks so the running top-k is merged across batches and chunks
    preds, labels = knn_predict(
        net, data, layers=layers, k=5, temperature=temperature, batch_size=6, max_query_bytes=4 * 5 * 20000
    )
    reference = _brute_force_knn(net, data, layers, 5, temperature)
    np.testing.assert_array_equal(labels, y[28:])
    for layer in layers:
        np.testing.assert_array_equal(preds[layer], reference[layer])


def test_knn_separates_a_linearly_separable_set():
    scores = knn_probe(tiny_alexnet(), colour_set(), k=5, batch_size=16)
    assert set(scores) == set(TAPS) and all(acc >= 0.95 for acc in scores.values()), scores


def test_knn_shares_one_trunk_pass_per_batch():
    data = colour_set(n_train=60, n_test=30)
    net = tiny_alexnet(CountingAlexNet)
    knn_probe(net, data, batch_size=16)
    assert int(net.passes.numpy()) == math.ceil(data.train_size / 16) + math.ceil(data.test_size / 16)


def test_knn_rejects_bad_arguments():
    data = colour_set(n_train=9, n_test=3)
    with pytest.raises(InputError, match="temperature"):
        knn_probe(tiny_alexnet(), data, temperature=0)
    with pytest.raises(InputError, match="k must"):
        knn_probe(tiny_alexnet(), data, k=0)


# ------------------------------------------------------------------------------------------------------- callback
class TinyMethod(keras.Model):
    """Stands in for a self-supervised method: owns ``backbone``, trains it on a toy regression."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.head(keras.ops.mean(self.backbone(x, training=training), axis=(1, 2)))


def _read_scalars(log_dir):
    out = {}
    for path in tf.io.gfile.glob(f"{log_dir}/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                out[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    return out


def test_callback_logs_probe_accuracy_to_history_csv_and_tensorboard(tmp_path):
    data = colour_set(n_train=30, n_test=6)
    model = TinyMethod(tiny_alexnet())
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    callback = ProbeCallback(data, every=2, layers=("conv1", "conv2"), epochs=1, batch_size=8,
                             log_dir=tmp_path / "tb")  # fmt: skip
    csv = keras.callbacks.CSVLogger(str(tmp_path / "history.csv"))
    history = model.fit(x, np.zeros(8), epochs=2, batch_size=8, verbose=0, callbacks=[callback, csv])

    conv1 = history.history["probe_conv1"]
    assert math.isnan(conv1[0]) and 0.0 <= conv1[1] <= 1.0, "probed after epoch 2 only"
    assert callback.results[2]["conv1"] == pytest.approx(conv1[1])
    header, *rows = (tmp_path / "history.csv").read_text().strip().splitlines()
    assert {"probe_conv1", "probe_conv2"} <= set(header.split(",")) and len(rows) == 2
    scalars = _read_scalars(tmp_path / "tb")
    assert scalars[("probe/conv2", 2)] == pytest.approx(history.history["probe_conv2"][1], abs=1e-6)
    assert ("probe/conv1", 1) not in scalars


def test_knn_callback_and_missing_backbone():
    data = colour_set(n_train=30, n_test=6)
    model = TinyMethod(tiny_alexnet())
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((4, 32, 32, 3), np.float32)
    history = model.fit(x, np.zeros(4), epochs=1, verbose=0,
                        callbacks=[ProbeCallback(data, kind="knn", layers=("conv1",), batch_size=16)])  # fmt: skip
    assert 0.0 <= history.history["knn_conv1"][0] <= 1.0

    plain = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(InputError, match="backbone"):
        plain.fit(x, np.zeros(4), epochs=1, verbose=0, callbacks=[ProbeCallback(data, kind="knn")])
    with pytest.raises(InputError, match="every"):
        ProbeCallback(data, every=0)
