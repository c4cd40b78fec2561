"""Fine-tuning on top of frozen early layers (keras_oneimage.transfer, paper Table 4)."""
import json

import numpy as np
import keras
import pytest

from keras_oneimage import trainer
from keras_oneimage.data.labelled import from_arrays
from keras_oneimage.errors import InputError
from keras_oneimage.export import export
from keras_oneimage.methods.rotnet import RotNet
from keras_oneimage.models.alexnet import AlexNet
from keras_oneimage.models.classifier import AlexNetClassifier
from keras_oneimage.models.resnet import ResNet18
from keras_oneimage.transfer import finetune
from tests.test_resnet import TINY as RESNET_WIDTHS, tiny_resnet

WIDTHS = (8, 8, 8, 8, 8)
FAST = {"epochs": 2, "batch_size": 16, "learning_rate": 0.05, "head_widths": (16,), "verbose": 0}


def tiny_trunk(seed: int, **kw) -> AlexNet:
    """A built tiny AlexNet whose BatchNorm statistics and affine terms are far from their defaults."""
    keras.utils.set_random_seed(seed)
    trunk = AlexNet(widths=WIDTHS, image_size=32, **kw)
    trunk.build()
    rng = np.random.default_rng(seed)
    for layer in trunk._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            for var, (loc, scale) in zip(
                (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
                ((1.0, 0.2), (0.1, 0.2), (0.0, 0.3), (1.5, 0.3)),
            ):
                var.assign(np.abs(rng.normal(loc, scale, var.shape)).astype("float32"))
    return trunk


@pytest.fixture(scope="module")
def toy():
    """Two classes told apart by colour (red vs blue) under noise: any working classifier gets them right."""
    rng = np.random.default_rng(0)

    def make(n):
        y = np.arange(n) % 2
        x = rng.random((n, 32, 32, 3)).astype(np.float32) * 0.5
        x[y == 0, :, :, 0] += 0.5
        x[y == 1, :, :, 2] += 0.5
        return x, y

    (xtr, ytr), (xte, yte) = make(80), make(40)
    return from_arrays(xtr, ytr, xte, yte, val_fraction=0.1)


class Snapshot(keras.callbacks.Callback):
    """The trunk's variables (by path) when training starts and when it ends."""

    def on_train_begin(self, logs=None):
        self.before = {v.path: v.numpy().copy() for v in self.model.backbone.weights}

    def on_train_end(self, logs=None):
        self.after = {v.path: v.numpy().copy() for v in self.model.backbone.weights}


def tap_of(path: str, taps=AlexNet.TAPS) -> str:
    """The tap a variable path belongs to (``alexnet/conv3/bn/gamma`` → ``conv3``; ``resnet18/stage2/...`` →
    ``stage2`` with ``ResNet18.TAPS``)."""
    return next(part for part in path.split("/") if part in taps)


def tap_weights(trunk, name):
    """``{"conv/kernel": ..., "bn/gamma": ..., ...}`` of one tap."""
    return {v.path.split(f"{name}/", 1)[1]: v.numpy() for v in getattr(trunk, name).weights}


def test_frozen_layers_stay_bit_identical_the_rest_trains_and_it_learns(toy):
    source = RotNet(tiny_trunk(1), head_widths=(8,))
    source(np.zeros((1, 32, 32, 3), np.float32))
    original = {name: tap_weights(source.backbone, name) for name in AlexNet.TAPS}
    snap = Snapshot()
    result = finetune(source, toy, freeze=("conv2", "conv1"), callbacks=[snap], **FAST)

    assert result.frozen == ("conv1", "conv2") and result.initialised == ("conv1", "conv2")
    assert result.epochs_run == 2 and result.images_seen == 2 * toy.train_size
    trunk = result.backbone
    assert trunk is not source.backbone
    trainable = {id(v) for v in result.model.trainable_variables}
    for name in ("conv1", "conv2"):
        weights = tap_weights(trunk, name)
        assert set(weights) == {"conv/kernel", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance"}
        for key, value in weights.items():
            np.testing.assert_array_equal(value, original[name][key])  # copied from the source, bit for bit
        assert not any(id(v) in trainable for v in getattr(trunk, name).weights)
    for path, before in snap.before.items():
        frozen = tap_of(path) in ("conv1", "conv2")
        if frozen:
            np.testing.assert_array_equal(snap.after[path], before, err_msg=path)
        elif path.endswith(("kernel", "moving_mean", "moving_variance")):
            assert not np.array_equal(snap.after[path], before), f"{path} did not train"
    x = np.random.default_rng(2).random((8, 32, 32, 3), dtype=np.float32)
    in_training = trunk.features(x, layers=("conv2", "conv3"), training=True)
    in_inference = trunk.features(x, layers=("conv2", "conv3"), training=False)
    # frozen BatchNorm uses its moving statistics even in a training-mode call; a trainable one uses the batch's
    np.testing.assert_array_equal(in_training["conv2"].numpy(), in_inference["conv2"].numpy())
    assert not np.allclose(in_training["conv3"].numpy(), in_inference["conv3"].numpy(), atol=1e-3)
    for name in AlexNet.TAPS:  # the source model is left alone
        for key, value in tap_weights(source.backbone, name).items():
            np.testing.assert_array_equal(value, original[name][key])
    assert result.test_accuracy >= 0.85  # chance is 0.5
    assert result.val_accuracy is not None and len(result.history["loss"]) == 2


def test_nothing_frozen_trains_every_layer_and_init_copies_without_freezing(toy, tmp_path):
    source = tiny_trunk(2)
    snap = Snapshot()
    result = finetune(source, toy, freeze=(), init=("conv1",), callbacks=[snap], **FAST)
    assert result.frozen == () and result.initialised == ("conv1",)
    start_conv1 = {k.split("conv1/", 1)[1]: v for k, v in snap.before.items() if tap_of(k) == "conv1"}
    for key, value in tap_weights(source, "conv1").items():
        np.testing.assert_array_equal(start_conv1[key], value)  # started from the source ...
    for path, before in snap.before.items():
        if path.endswith("kernel"):
            assert not np.array_equal(snap.after[path], before), f"{path} did not train"  # ... and trained
    assert not np.array_equal(snap.before[next(p for p in snap.before if "conv2/conv" in p)],
                              tap_weights(source, "conv2")["conv/kernel"])  # conv2 was not copied
    # The classifier round-trips through model.keras.
    path = tmp_path / "classifier.keras"
    result.model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, AlexNetClassifier)
    x = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-5)


def test_sources_from_a_checkpoint_dir_an_export_and_random(tmp_path):
    x = np.random.default_rng(4).random((4, 32, 32, 3), dtype=np.float32)  # what is checked here is the copy
    few = from_arrays(x, np.arange(4) % 2, x, np.arange(4) % 2, val_fraction=0.0)
    method = RotNet(tiny_trunk(3), head_widths=(8,))
    method(np.zeros((1, 32, 32, 3), np.float32))
    (tmp_path / "run").mkdir()
    method.save(tmp_path / "run" / "model.keras")  # a fit output dir holds its model.keras
    from_checkpoint = finetune(tmp_path / "run", few, **{**FAST, "epochs": 1})
    assert from_checkpoint.source.startswith("checkpoint:")

    base = tmp_path / "exported"
    export(method, base, layers=("conv1", "conv2"))
    from_export = finetune(base, few, **{**FAST, "epochs": 1})  # the base dir: its highest version
    assert from_export.source.endswith("exported/1")
    for result in (from_checkpoint, from_export):
        for name in ("conv1", "conv2"):
            for key, value in tap_weights(method.backbone, name).items():
                np.testing.assert_array_equal(tap_weights(result.backbone, name)[key], value)
    with pytest.raises(InputError, match="holds layers"):
        finetune(base / "1", few, freeze=("conv1", "conv3"), **FAST)

    odd = tiny_trunk(4, mean=(0.1, 0.2, 0.3))  # a custom normalisation: the export records it in trunk_config
    version = export(odd, tmp_path / "odd", layers=("conv1",))
    rebuilt = finetune(version, few, freeze=("conv1",), **{**FAST, "epochs": 1})
    assert rebuilt.backbone.mean == (0.1, 0.2, 0.3)
    # An export written before trunk_config existed: rebuilt as a default AlexNet, which the parity check refuses.
    meta_path = version / "keras_oneimage.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("trunk_config")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="does not reproduce"):
        finetune(version, few, freeze=("conv1",), **FAST)

    random = finetune("random", few, **{**FAST, "epochs": 1, "image_size": 32})
    assert random.source == "random" and random.initialised == () and random.frozen == ("conv1", "conv2")
    assert random.backbone.widths == (96, 256, 384, 384, 256)


@pytest.mark.parametrize(
    "source, data_kind, options, message",
    [
        ("trunk", "toy", {"freeze": ("conv1", "conv6")}, "unknown layer"),
        ("trunk", "toy", {"freeze": "fc1"}, "unknown layer"),
        ("trunk", "toy", {"freeze": ("conv1", "conv1")}, "duplicates"),
        ("trunk", "toy", {"init": ("pool1",)}, "unknown layer"),
        ("trunk", "toy", {"freeze": 3}, "layer name"),
        ("trunk", "toy", {"trunk": "resnet18"}, "the source's trunk is alexnet"),
        ("trunk", "toy", {"trunk": "vgg16"}, "unknown trunk"),
        ("trunk", 42, {}, "LabelledData"),
        ("trunk", "missing_path", {}, "neither 'cifar10' nor an existing path"),
        ("trunk", "one_class", {}, "at least 2"),
        ("trunk", "toy", {"max_per_class": 5}, "max_per_class"),
        ("trunk", "toy", {"epochs": 0}, "epochs"),
        ("trunk", "toy", {"learning_rate": -1.0}, "learning_rate"),
        ("trunk", "toy", {"dropout": 1.0}, "dropout"),
        ("trunk", "toy", {"head_widths": (0,)}, "head_widths"),
        (3, "toy", {}, "expected a method model"),
        ("no_checkpoint", "toy", {}, "no checkpoint"),
    ],
)
def test_bad_inputs_raise_input_error(toy, tmp_path, source, data_kind, options, message):
    if source == "trunk":
        source = tiny_trunk(5)
    elif source == "no_checkpoint":
        source = tmp_path / "nothing_here"
    if data_kind == "toy":
        data = toy
    elif data_kind == "missing_path":
        data = str(tmp_path / "no_such_dataset")
    elif data_kind == "one_class":
        x = np.zeros((4, 32, 32, 3), np.float32)
        with pytest.raises(InputError, match=message):  # from_arrays itself now refuses one class (issue 17)
            data = from_arrays(x, np.zeros(4, int), x, np.zeros(4, int))
        return
    else:
        data = data_kind
    with pytest.raises(InputError, match=message):
        finetune(source, data, **{**FAST, **options})


# ------------------------------------------------------------------------------------------------------- ResNet-18
@pytest.fixture(scope="module")
def resnet_run(photo_path, tmp_path_factory):
    """A tiny ResNet-18 RotNet trained a few steps by the training core (as ``fit``); its output dir."""
    out = tmp_path_factory.mktemp("resnet_rotnet") / "run"
    run = trainer.prepare_run(str(photo_path), "rotnet", image_size=32, batch_size=8, epochs=1, steps_per_epoch=3,
                              widths=RESNET_WIDTHS, trunk="resnet18")
    trainer.train(run, output_dir=out, verbose=0)
    return out


def test_resnet_checkpoint_finetunes_with_its_stem_and_stage1_frozen(resnet_run, toy):
    source = keras.saving.load_model(resnet_run / "model.keras").backbone
    in_trunk = lambda path: path.split("resnet18/", 1)[1]  # a path below the trunk, whatever model holds it
    original = {in_trunk(v.path): v.numpy().copy() for v in source.weights}
    snap = Snapshot()
    result = finetune(resnet_run, toy, callbacks=[snap], **FAST)  # default freeze: the trunk's early taps

    assert result.trunk == "resnet18" and isinstance(result.backbone, ResNet18)
    assert result.frozen == ResNet18.early_taps() == ("stem", "stage1") and result.initialised == result.frozen
    assert result.as_dict()["trunk"] == "resnet18"
    frozen_paths = [p for p in snap.before if tap_of(p, ResNet18.TAPS) in result.frozen]
    assert any("stage1/block2/conv2" in p for p in frozen_paths)  # every block of stage1, not just its first layer
    for path, before in snap.before.items():
        if tap_of(path, ResNet18.TAPS) in result.frozen:
            np.testing.assert_array_equal(before, original[in_trunk(path)], err_msg=path)  # copied ...
            np.testing.assert_array_equal(snap.after[path], before, err_msg=path)  # ... and never changed
        elif path.endswith(("kernel", "moving_mean", "moving_variance")):
            assert not np.array_equal(snap.after[path], before), f"{path} did not train"
    assert result.history["loss"][-1] < result.history["loss"][0]
    assert result.test_accuracy >= 0.75  # chance is 0.5


def test_resnet_export_and_random_resnet_sources(resnet_run, toy, tmp_path):
    method = keras.saving.load_model(resnet_run / "model.keras")
    version = export(method, tmp_path / "exported", layers=ResNet18.early_taps())
    one_epoch = {**FAST, "epochs": 1}
    from_export = finetune(version, toy, **one_epoch)
    assert from_export.trunk == "resnet18" and from_export.backbone.widths == RESNET_WIDTHS
    for name in ("stem", "stage1"):
        for got, want in zip(from_export.backbone.get_layer(name).weights, method.backbone.get_layer(name).weights):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    with pytest.raises(InputError, match="holds layers"):  # stage2 was not exported
        finetune(version, toy, freeze=("stem", "stage2"), **one_epoch)

    x = np.random.default_rng(6).random((4, 32, 32, 3), dtype=np.float32)
    few = from_arrays(x, np.arange(4) % 2, x, np.arange(4) % 2, val_fraction=0.0)
    random = finetune("random", few, trunk="resnet18", image_size=32, **one_epoch)
    assert random.trunk == "resnet18" and random.initialised == () and random.frozen == ("stem", "stage1")
    assert isinstance(random.backbone, ResNet18) and random.backbone.variant == "cifar"


def test_a_tap_the_resnet_does_not_have_is_refused_listing_its_taps(toy):
    for options in ({"freeze": ("conv1", "conv2")}, {"init": ("stage1", "conv3")}):
        with pytest.raises(InputError, match=r"resnet18 trunk.*choose from stem, stage1, stage2, stage3, stage4"):
            finetune(tiny_resnet(), toy, **FAST, **options)
    with pytest.raises(InputError, match="scattering front end replaces an AlexNet"):
        finetune(tiny_resnet(), toy, front_end="scattering", **FAST)


def test_cli_finetune_takes_a_resnet_checkpoint_and_freezes_its_early_taps(resnet_run, cifar_like_tree, tmp_path,
                                                                          capsys):
    from keras_oneimage import cli

    summary = tmp_path / "summary.json"
    rc = cli.main(["keras-oneimage", "finetune", f"--source={resnet_run}", f"--dataset={cifar_like_tree}",
                   "--epochs=1", "--batch_size=16", f"--output={summary}"])
    assert rc == 0
    out = json.loads(summary.read_text())
    assert out["trunk"] == "resnet18" and out["frozen"] == ["stem", "stage1"] and out["epochs_run"] == 1
    assert "frozen stem,stage1 from checkpoint:" in capsys.readouterr().out
    rc = cli.main(["keras-oneimage", "finetune", f"--source={resnet_run}", f"--dataset={cifar_like_tree}",
                   "--freeze=conv1,conv2"])
    assert rc == 2 and "choose from stem, stage1, stage2, stage3, stage4" in capsys.readouterr().err
