"""Named probe protocols: the paper's fixed pooling and transforms, the coarse protocol, and their errors."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage.data.labelled import from_arrays
from keras_oneimage.data.pipelines import eval_pipeline, resized_crop_pipeline
from keras_oneimage.errors import InputError
from keras_oneimage.models import AlexNet
from keras_oneimage.probes import probe_splits
from keras_oneimage.probes.linear import pooling_for, protocol_pooling, step_schedule, tap_shapes
from keras_oneimage.probes.protocols import PAPER_POOLING, PROTOCOLS, ProbeProtocol, get_protocol

TINY = (8, 8, 8, 8, 8)


def _dims(variant, size, protocol):
    net = AlexNet(variant, size)
    pools = protocol_pooling(get_protocol(protocol), tap_shapes(net, AlexNet.TAPS, size))
    return {layer: spec.dims for layer, spec in pools.items()}, pools


def test_paper_protocol_pools_to_the_papers_dimensions_at_224px():
    dims, pools = _dims("imagenet", 224, "paper")
    assert dims == {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216}
    assert {k: (p.size, p.stride, p.padding) for k, p in pools.items()} == PAPER_POOLING
    net = AlexNet("imagenet", 224, widths=TINY)
    taps = net.features(tf.zeros((1, 224, 224, 3)), layers=AlexNet.TAPS)
    for layer, spec in pools.items():  # the Keras layers produce the shape the spec claims
        y = taps[layer]
        for pool in spec.layers(layer):
            y = pool(y)
        assert tuple(y.shape[1:3]) == spec.output_shape[:2]


def test_paper_protocol_settings_match_the_authors_probe_code():
    paper = PROTOCOLS["paper"]
    assert (paper.epochs, paper.decay_epochs, paper.batch_size) == (36, (10, 20, 30), 192)
    assert (paper.learning_rate, paper.momentum, paper.weight_decay) == (0.01, 0.9, 1e-5)
    assert (paper.image_size, paper.eval_resize, paper.train_transform) == (224, 256, "resized_crop_flip")
    schedule = step_schedule(0.01, 36, paper.decay_epochs)
    assert [schedule(e) for e in (0, 9, 10, 19, 20, 30, 35)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-5, 1e-5])


def test_coarse_protocol_pools_every_tap_near_1k_dims_and_cifar_near_9k():
    coarse, _ = _dims("cifar", 32, "coarse")
    fine, _ = _dims("cifar", 32, "cifar")
    for layer in AlexNet.TAPS:
        assert coarse[layer] < fine[layer]
        assert abs(np.log(coarse[layer] / 1024)) <= abs(np.log(fine[layer] / 1024))
    assert coarse["conv1"] == 3 * 3 * 96  # a 3x3 grid of conv1's 96 channels
    assert fine == {k: pooling_for(s).dims for k, s in AlexNet("cifar", 32).feature_shapes(32).items() if k != "output"}


def test_fixed_pooling_too_large_for_a_small_map_is_an_input_error():
    with pytest.raises(InputError, match="too large"):  # the paper pools conv2 4/4: a 3x3 map has no window
        protocol_pooling(get_protocol("paper"), {"conv2": (3, 3, 256)})


def test_eval_transform_resizes_then_centre_crops():
    # A 4x4 checkerboard of distinct values: the centre crop of the 8x8 resize must equal its middle.
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1).repeat(3, -1) / 16
    ds = tf.data.Dataset.from_tensor_slices((image[None], np.zeros(1, np.int32)))
    (cropped, _), = eval_pipeline(ds, 4, 1, resize=8).unbatch().as_numpy_iterator()
    full = tf.image.resize(image, [8, 8], antialias=True).numpy()
    np.testing.assert_allclose(cropped, full[2:6, 2:6], atol=1e-6)


def test_resized_crop_pipeline_is_seeded_varied_and_in_range():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (6, 32, 32, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(6, dtype=np.int32)))

    def epoch(seed):
        return list(resized_crop_pipeline(ds, 48, 6, 6, seed).unbatch().as_numpy_iterator())

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert all(x.shape == (48, 48, 3) and 0 <= x.min() and x.max() <= 1 for x, _ in a)
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, b))  # same seed, same crops
    assert not all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, c))  # another seed, other crops
    # Crops, not resizes: no output equals the plain resize of its source image.
    by_label = {int(lbl): x for x, lbl in a}
    for label, crop in by_label.items():
        plain = tf.image.resize(images[label], [48, 48]).numpy()
        assert not np.allclose(crop, plain, atol=1e-3)


def _two_colour_set(size=32, n=40):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = np.clip(0.3 + 0.4 * y[:, None, None, None] + rng.normal(0, 0.05, (n, size, size, 3)), 0, 1)
    return from_arrays(x.astype(np.float32), y, x[:20].astype(np.float32), y[:20], val_fraction=0.25)


@pytest.mark.parametrize("augment", [True, False])
def test_paper_protocol_probes_a_cifar_sized_set_at_224px(augment):
    keras.utils.set_random_seed(0)
    net = AlexNet("imagenet", 224, widths=TINY)
    net.build()
    scores = probe_splits(net, _two_colour_set(), ("test",), layers=("conv1", "conv2"), protocol="paper",
                          epochs=3, batch_size=10, learning_rate=0.05, verbose=0, augment=augment)["test"]
    assert scores["conv1"] > 0.9 and scores["conv2"] > 0.9  # bright vs dark: every layer separates them


def test_protocol_sets_defaults_and_explicit_arguments_win():
    keras.utils.set_random_seed(0)
    net = AlexNet("cifar", 32, widths=TINY)
    net.build()
    data = _two_colour_set()
    custom = ProbeProtocol("custom", target_dims=64, epochs=2, batch_size=10, learning_rate=0.05)
    a = probe_splits(net, data, ("test",), layers=("conv1",), protocol=custom, verbose=0, augment=False)
    b = probe_splits(net, data, ("test",), layers=("conv1",), protocol="cifar", target_dims=64, epochs=2,
                     batch_size=10, learning_rate=0.05, verbose=0, augment=False)
    assert a == b


def test_unknown_protocol_is_an_input_error_naming_the_choices():
    with pytest.raises(InputError, match="paper"):
        get_protocol("imagenet")
    net = AlexNet("cifar", 32, widths=TINY)
    with pytest.raises(InputError, match="unknown probe protocol"):
        probe_splits(net, _two_colour_set(), ("test",), protocol="nope", verbose=0)
