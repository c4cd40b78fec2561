"""ResNet-18 trunk and the trunk registry: tap shapes of both stems, the parameter count, save/load, and the
consumers (RotNet, probes, the probe callback, export, checkpoints, filter plots) on a ResNet."""
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage.data.labelled import from_arrays
from keras_oneimage.errors import InputError
from keras_oneimage.models import AlexNet, ResNet18, available_trunks, build_trunk, trunk_name
from keras_oneimage.models.registry import default_variant, trunk_class

TINY = (8, 16, 16, 16)  # stage widths small enough for a 2-core CPU


def _batch(n, size, seed=0):
    return tf.random.stateless_uniform((n, size, size, 3), seed=(seed, 11))


def tiny_resnet(variant="cifar", image_size=32, seed=0, **options):
    """A small ResNet-18 with non-trivial BatchNorm statistics (so inference-mode BN matters for parity)."""
    keras.utils.set_random_seed(seed)
    model = ResNet18(variant, image_size, widths=TINY, **options)
    model.build()
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.3, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
    return model


# ------------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "variant, size, expected",
    [
        # cifar stem: 3x3/1, no max-pool; stages 2-4 halve the map.
        ("cifar", 32, {"stem": (32, 32, 8), "stage1": (32, 32, 8), "stage2": (16, 16, 16),
                       "stage3": (8, 8, 16), "stage4": (4, 4, 16), "output": (1, 1, 16)}),
        # imagenet stem: 7x7/2 (128 → 64), max-pool 3/2 (→ 32), then 32, 16, 8, 4.
        ("imagenet", 128, {"stem": (64, 64, 8), "stage1": (32, 32, 8), "stage2": (16, 16, 16),
                           "stage3": (8, 8, 16), "stage4": (4, 4, 16), "output": (1, 1, 16)}),
        # odd sides: every stride-2 layer gives ceil(n / 2), so shortcut and residual agree (75 → 38 → 19 …).
        ("imagenet", 75, {"stem": (38, 38, 8), "stage1": (19, 19, 8), "stage2": (10, 10, 16),
                          "stage3": (5, 5, 16), "stage4": (3, 3, 16), "output": (1, 1, 16)}),
    ],
)
def test_every_tap_has_the_shape_feature_shapes_promises(variant, size, expected):
    model = ResNet18(variant, size, widths=TINY)
    assert model.feature_shapes() == expected
    x = _batch(2, size)
    taps = model.features(x, layers=ResNet18.TAPS)
    assert list(taps) == list(ResNet18.TAPS)
    for name, tensor in taps.items():
        assert tuple(tensor.shape) == (2, *expected[name]), name
        assert tensor.dtype == tf.float32
        assert float(tf.reduce_min(tensor)) >= 0.0  # post-ReLU: zero padding in the probes is -inf padding
    out = model(x)
    assert tuple(out.shape) == (2, *expected["output"])
    # call() is the global average pool of the stage4 tap
    np.testing.assert_allclose(out.numpy()[:, 0, 0], taps["stage4"].numpy().mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_full_width_feature_shapes_at_224px_are_he_et_al_table_1():
    shapes = ResNet18("imagenet", 224).feature_shapes()  # conv1 112, conv2_x 56, conv3_x 28, conv4_x 14, conv5_x 7
    assert shapes == {"stem": (112, 112, 64), "stage1": (56, 56, 64), "stage2": (28, 28, 128),
                      "stage3": (14, 14, 256), "stage4": (7, 7, 512), "output": (1, 1, 512)}


def test_features_stop_at_the_deepest_tap_and_keep_the_requested_order():
    model = tiny_resnet()
    x = _batch(3, 32)
    taps = model.features(x, layers=("stage2", "stem"))
    assert list(taps) == ["stage2", "stem"]
    single = model.features(x, layers="stage2")
    np.testing.assert_allclose(single["stage2"].numpy(), taps["stage2"].numpy(), atol=1e-6)
    with pytest.raises(InputError, match="stage5"):
        model.features(x, layers=("stem", "stage5"))
    with pytest.raises(InputError, match="conv1"):
        model.features(x, layers="conv1")  # AlexNet's names are not a ResNet's


# ---------------------------------------------------------------------------------------------- parameter count
def resnet18_trunk_parameters(stem_kernel: int, in_channels: int = 3) -> int:
    """Trainable parameters of ResNet-18 without its fc layer, counted from He et al. (2016), Table 1.

    Convolutions have no bias (BatchNorm follows each); every BatchNorm has a scale and a shift per channel; the
    first block of stages 2-4 has a 1x1 projection shortcut with its BatchNorm (option B, as torchvision).
    """
    def conv(k, cin, cout):
        return k * k * cin * cout

    def bn(c):
        return 2 * c

    total = conv(stem_kernel, in_channels, 64) + bn(64)
    cin = 64
    for width, first_stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            total += conv(3, cin, width) + bn(width) + conv(3, width, width) + bn(width)
            if block == 0 and (first_stride != 1 or cin != width):
                total += conv(1, cin, width) + bn(width)
            cin = width
    return total


def test_full_width_parameter_count_is_torchvisions_resnet18_without_fc():
    # torchvision's resnet18 has 11,689,512 parameters; its fc layer (512 → 1000, with bias) has 513,000.
    assert resnet18_trunk_parameters(7) == 11_689_512 - (512 * 1000 + 1000) == 11_176_512
    for variant, stem_kernel in (("imagenet", 7), ("cifar", 3)):
        model = ResNet18(variant, 64)
        model.build()
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        assert trainable == resnet18_trunk_parameters(stem_kernel), variant
        # the only other weights are the BatchNorm moving mean and variance: one pair per BN channel
        frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
        assert frozen == trainable - sum(int(np.prod(w.shape)) for w in model.trainable_weights if len(w.shape) == 4)


def test_sobel_front_end_feeds_the_stem_two_channels():
    model = ResNet18("cifar", 32, sobel=True, widths=TINY)
    model(_batch(1, 32))
    assert model.input_channels == 2
    assert tuple(model.get_layer("stem").conv.kernel.shape) == (3, 3, 2, TINY[0])
    assert all(v is not model.sobel_layer.kernel for v in model.trainable_variables)


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match="variant"):
        ResNet18("vgg", 64)
    with pytest.raises(InputError, match="widths"):
        ResNet18("cifar", 64, widths=(8, 8, 8))
    with pytest.raises(InputError, match="image_size"):
        ResNet18("cifar", 0)


# ------------------------------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("variant, size, sobel", [("cifar", 32, True), ("imagenet", 64, False)])
def test_model_keras_round_trip_reproduces_every_tap(tmp_path, variant, size, sobel):
    model = ResNet18(variant, size, sobel=sobel, widths=TINY, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    x = _batch(4, size, seed=3)
    model(x, training=True)  # moves the BatchNorm statistics away from their initial values
    expected = model.features(x, layers=ResNet18.TAPS)
    model.save(tmp_path / "resnet.keras")
    loaded = keras.saving.load_model(tmp_path / "resnet.keras")
    assert isinstance(loaded, ResNet18)
    assert loaded.get_config() == model.get_config()
    got = loaded.features(x, layers=ResNet18.TAPS)
    for name in ResNet18.TAPS:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), rtol=1e-5, atol=1e-5)


def test_mixed_bfloat16_resnet_gives_float32_taps_and_float32_weights():
    from keras_oneimage.precision import precision_scope

    with precision_scope("mixed_bfloat16"):
        model = ResNet18("cifar", 32, widths=TINY)
    x = _batch(2, 32)
    assert model(x).dtype == tf.bfloat16
    assert model.get_layer("stage3").blocks[0].conv2.kernel.dtype == "float32"
    taps = model.features(x, layers=("stem", "stage4"))
    assert all(t.dtype == tf.float32 for t in taps.values())


# ------------------------------------------------------------------------------------------------------ registry
def test_registry_builds_each_trunk_with_the_package_variant_rule():
    assert available_trunks() == ("alexnet", "resnet18")
    assert default_variant(127) == "cifar" and default_variant(128) == "imagenet"
    alex = build_trunk(image_size=32, widths=(4, 4, 4, 4, 4))
    assert isinstance(alex, AlexNet) and alex.variant == "cifar"
    res = build_trunk("ResNet18", image_size=128, widths=TINY, sobel=True)
    assert isinstance(res, ResNet18) and res.variant == "imagenet" and res.sobel
    assert build_trunk("resnet18", variant="cifar", image_size=128, widths=TINY).variant == "cifar"
    assert trunk_name(res) == "resnet18" and trunk_name(alex) == "alexnet"
    assert trunk_class("resnet18") is ResNet18


def test_registry_errors_name_the_known_trunks():
    with pytest.raises(InputError, match="unknown trunk 'vgg16'; choose one of: alexnet, resnet18"):
        build_trunk("vgg16")
    with pytest.raises(InputError, match="resnet18"):
        build_trunk("resnet18", image_size=32, depth=50)  # not an option of the trunk
    with pytest.raises(InputError, match="image_size"):
        build_trunk("resnet18", image_size=-1)
    with pytest.raises(InputError, match="not a registered trunk"):
        trunk_name(keras.Sequential([keras.layers.Dense(1)]))


# ----------------------------------------------------------------------------------------------------- consumers
def test_rotnet_trains_a_tiny_resnet():
    from keras_oneimage.methods.rotnet import RotNet

    keras.utils.set_random_seed(0)
    model = RotNet(build_trunk("resnet18", image_size=32, widths=TINY), head_widths=(16,))
    model.compile(optimizer=model.default_optimizer(), jit_compile=False)  # XLA compile time: not the question
    patches = tf.data.Dataset.from_tensors(_batch(8, 32, seed=5)).repeat()
    model(_batch(1, 32))  # builds trunk and head
    variables = list(model.backbone.trainable_variables)
    before = [v.numpy().copy() for v in variables]
    history = model.fit(patches, epochs=1, steps_per_epoch=3, verbose=0)
    assert all(math.isfinite(v) for v in history.history["loss"])
    changed = [v.path for v, old in zip(variables, before) if not np.array_equal(v.numpy(), old)]
    for tap in ResNet18.TAPS:  # the gradient reached every stage, the stem included
        assert any(f"/{tap}/" in path for path in changed), tap


def test_deepcluster_and_bigan_build_their_heads_on_the_resnet_output():
    from keras_oneimage.methods.bigan import BiGAN
    from keras_oneimage.methods.deepcluster import DeepCluster

    sobel_trunk = build_trunk("resnet18", image_size=32, widths=TINY, **DeepCluster.backbone_options)
    deepcluster = DeepCluster(sobel_trunk, num_clusters=4, pool_size=8, head_widths=(8,))
    deepcluster.build()
    assert tuple(deepcluster(_batch(2, 32)).shape) == (2, 4)
    bigan = BiGAN(build_trunk("resnet18", image_size=32, widths=TINY), latent_dim=5)
    bigan.build()
    assert tuple(bigan.encode(_batch(2, 32)).shape) == (2, 5)


def _colour_set(n_train=48, n_test=24, size=32, seed=0):
    """Three classes that differ in mean colour plus noise: linearly separable at every tap."""
    rng = np.random.default_rng(seed)

    def draw(n):
        y = np.arange(n) % 3
        x = 0.25 + 0.5 * np.eye(3)[y][:, None, None, :] + rng.normal(0, 0.1, (n, size, size, 3))
        return np.clip(x, 0, 1).astype(np.float32), y

    return from_arrays(*draw(n_train), *draw(n_test), val_fraction=0.25, seed=seed)


def test_linear_probe_reads_every_resnet_tap_by_default():
    from keras_oneimage.probes import pooling_table, probe

    model = tiny_resnet()
    scores = probe(model, _colour_set(), epochs=4, batch_size=16, learning_rate=0.05, verbose=0, augment=False)
    assert list(scores) == list(ResNet18.TAPS)
    assert all(acc >= 0.9 for acc in scores.values()), scores
    # taps without a fixed window are pooled to the window nearest the dimension budget, as AlexNet's
    table = pooling_table(model)
    assert list(table) == list(ResNet18.TAPS)
    assert all(spec.output_shape[-1] == model.feature_shapes()[tap][-1] for tap, spec in table.items())
    with pytest.raises(InputError, match="stem, stage1"):
        probe(model, _colour_set(), layers=("conv1",), verbose=0)


def test_paper_protocol_pools_resnet_taps_to_its_dimension_budget():
    from keras_oneimage.probes.linear import protocol_pooling, tap_shapes
    from keras_oneimage.probes.protocols import get_protocol

    model = ResNet18("imagenet", 224)
    specs = protocol_pooling(get_protocol("paper"), tap_shapes(model, ResNet18.TAPS, 224))
    for tap, spec in specs.items():
        assert abs(math.log(spec.dims / 9216)) <= math.log(1.5), (tap, spec)


def test_probe_callback_logs_every_resnet_tap(tmp_path):
    from keras_oneimage.probes import ProbeCallback

    class Method(keras.Model):
        def __init__(self, backbone):
            super().__init__()
            self.backbone, self.head = backbone, keras.layers.Dense(1)

        def call(self, x, training=False):
            return self.head(keras.ops.reshape(self.backbone(x, training=training), (-1, TINY[-1])))

    model = Method(tiny_resnet())
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((4, 32, 32, 3), np.float32)
    callback = ProbeCallback(_colour_set(n_train=24, n_test=6), kind="knn", batch_size=16)
    history = model.fit(x, np.zeros(4), epochs=1, verbose=0, callbacks=[callback])
    assert callback.layers == ResNet18.TAPS
    for tap in ResNet18.TAPS:
        assert 0.0 <= history.history[f"knn_{tap}"][0] <= 1.0


def test_export_up_to_stage1_serves_the_trunk_tap(tmp_path):
    from keras_oneimage.export import METADATA_FILE, export
    from keras_oneimage.export.savedmodel import _check_layers

    model = tiny_resnet()
    assert _check_layers(model, None) == ("stem", "stage1")  # the default: the trunk's first two taps
    version_dir = export(model, tmp_path / "resnet", layers=("stage1",))
    loaded = tf.saved_model.load(str(version_dir))
    images = np.random.default_rng(1).random((2, 40, 36, 3), dtype=np.float32)  # not the training size
    got = loaded.signatures["serving_default"](images=tf.constant(images))
    want = model.features(images, layers="stage1")["stage1"].numpy()
    assert sorted(got) == ["stage1"]
    np.testing.assert_allclose(got["stage1"].numpy(), want, atol=1e-5, rtol=0)
    assert float(want.max()) > 0.0
    info = json.loads((version_dir / METADATA_FILE).read_text())
    assert info["trunk"] == "resnet18" and info["backbone"] == "ResNet18" and info["variant"] == "cifar"
    rebuilt = trunk_class(info["trunk"]).from_config(info["trunk_config"])
    assert rebuilt.get_config() == model.get_config()


def test_checkpoint_of_a_resnet_method_loads_and_plots_its_stem(tmp_path):
    from keras_oneimage.checkpoints import backbone_of, load_checkpoint
    from keras_oneimage.methods.rotnet import RotNet
    from keras_oneimage.plots import conv1_filter_mosaic

    model = RotNet(tiny_resnet(), head_widths=(8,))
    x = _batch(2, 32)
    model(x)
    model.save(tmp_path / "model.keras")
    loaded, _ = load_checkpoint(tmp_path)
    trunk = backbone_of(loaded)
    assert isinstance(trunk, ResNet18)
    np.testing.assert_allclose(trunk.features(x, layers="stage4")["stage4"].numpy(),
                               model.backbone.features(x, layers="stage4")["stage4"].numpy(), atol=1e-5)
    mosaic = conv1_filter_mosaic(loaded)  # the stem's 3x3 filters stand in for AlexNet's conv1
    assert mosaic.ndim == 3 and mosaic.shape[-1] == 3 and float(np.std(mosaic)) > 0
