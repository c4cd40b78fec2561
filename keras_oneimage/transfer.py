"""Fine-tune a classifier on top of a trunk's frozen early layers (Asano et al., ICLR 2020, Table 4).

The paper's fine-tuning experiment asks whether the conv1-conv2 learned from a single image are as good a start
as supervised ones when the rest of the network is trained on a labelled set: it copies conv1-2 from a trunk,
freezes them, trains conv3-5 and the classifier from scratch, and reports the top-1 accuracy.
:func:`finetune` does exactly that on any :class:`~keras_oneimage.data.labelled.LabelledData` (CIFAR-10 at CPU
scale), for any registered trunk (``keras_oneimage.models.registry``):

* the "early layers" are read from the trunk (:meth:`~keras_oneimage.models.trunk.Trunk.early_taps`, its first two
  taps): ``conv1``, ``conv2`` of the AlexNet; the ``stem`` and ``stage1`` of ResNet-18, the analogue of conv1-2
  (everything before the first downsampling stage). A tap's layers are those the trunk's forward path runs from
  the previous tap up to it (:meth:`~keras_oneimage.models.trunk.Trunk.tap_layers`);
* the classifier is the same trunk (built from the source trunk's config, so the same architecture, variant,
  widths, Sobel front end and normalisation) plus an MLP head on the flattened output of ``call`` (the AlexNet's
  pooled conv5 map, the ResNet's global average pool of stage4);
* the taps in ``init`` (default: the frozen ones) get the source trunk's weights; every other layer is freshly
  initialised (seeded). The source model itself is never modified;
* the taps in ``freeze`` are not trainable: their convolution kernels, BatchNorm scales and shifts stay as copied,
  and their BatchNorms run in inference mode (moving statistics used, never updated), so after training they are
  bit-identical to the source;
* SGD with momentum and weight decay, cosine-decayed learning rate, the probes' train-time augmentation (pad-crop
  and flip), top-1 accuracy on ``test`` (and on ``val`` when there is one).

A source is a method model, a backbone, a ``model.keras`` checkpoint or a ``fit`` output dir, an exported
SavedModel (a version dir, or a base dir whose highest version is used), or ``None`` / ``"random"`` for a
randomly initialised trunk (``trunk=`` names its architecture).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.checkpoints import backbone_of
from keras_oneimage.data.labelled import LabelledData, load_labelled
from keras_oneimage.data.pipelines import eval_pipeline, train_pipeline
from keras_oneimage.errors import InputError
from keras_oneimage.models.alexnet import AlexNet
from keras_oneimage.models.classifier import AlexNetClassifier
from keras_oneimage.models.heads import check_head_widths
from keras_oneimage.models.registry import DEFAULT_TRUNK, available_trunks, build_trunk, trunk_class, trunk_name
from keras_oneimage.models.trunk import Trunk

#: What sits in place of the early layers: the source trunk's own ("alexnet", the name of the paper's case, for
#: every trunk), or a fixed scattering replacing an AlexNet's conv1-2 (models/scattering.py).
FRONT_ENDS = ("alexnet", "scattering")
EXPORT_METADATA = "keras_oneimage.json"


# ------------------------------------------------------------------------------------------------------ result
@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` trained and how well it does (accuracies are top-1 in ``[0, 1]``)."""

    test_accuracy: float
    val_accuracy: float | None  # None when the data has no val split
    history: dict[str, list[float]]  # per epoch: loss, accuracy
    model: AlexNetClassifier  # the trained classifier (any trunk); model.backbone is its trunk
    frozen: tuple[str, ...]
    initialised: tuple[str, ...]  # layers whose weights came from the source
    source: str  # "random", "checkpoint:<path>", "export:<path>", or the source object's class name
    image_size: int
    epochs_run: int
    images_seen: int  # labelled training images processed (counting repeats over epochs)
    front_end: str = "alexnet"  # one of FRONT_ENDS
    trunk: str = "alexnet"  # the registry name of the trunk's architecture

    @property
    def backbone(self) -> Trunk:
        """The fine-tuned trunk (its frozen layers are the source's)."""
        return self.model.backbone

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary (everything but the model)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        out["frozen"], out["initialised"] = list(self.frozen), list(self.initialised)
        out["variant"], out["widths"] = self.backbone.variant, list(self.backbone.widths)
        out["head_widths"] = list(self.model.head_widths)
        out["trainable_params"] = int(sum(np.prod(v.shape) for v in self.model.trainable_variables))
        out["total_params"] = int(sum(np.prod(v.shape) for v in self.model.variables))
        return out


# ------------------------------------------------------------------------------------------------- public API
def finetune(
    exported_or_backbone: Any,
    dataset: LabelledData | str | os.PathLike,
    *,
    freeze: str | Iterable[str] | None = None,
    init: str | Iterable[str] | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    learning_rate: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    image_size: int | None = None,
    max_per_class: int | None = None,
    head_widths: Sequence[int] | None = None,
    dropout: float = 0.5,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    verbose: int | str = 0,
    front_end: str = "alexnet",
    trunk: str | None = None,
) -> FinetuneResult:
    """Train a classifier on ``dataset`` with ``freeze`` taps copied from a trunk and frozen.

    Args:
      exported_or_backbone: where the early layers come from: a method model (its ``.backbone``), a trunk
        (:class:`AlexNet`, :class:`~keras_oneimage.models.resnet.ResNet18`), a ``model.keras`` checkpoint or a
        ``fit`` output dir, an exported SavedModel version dir (or its base dir: the highest version), or
        ``None`` / ``"random"`` for a random trunk.
      dataset: a :class:`LabelledData`, or a name/path for :func:`load_labelled` (e.g. ``"cifar10"``).
      freeze: taps of the source's trunk whose weights stay fixed (BatchNorm in inference mode); ``None``: its
        early layers (``trunk.early_taps()``: conv1-conv2 of an AlexNet, stem-stage1 of a ResNet-18); ``()``
        trains everything.
      init: taps copied from the source (default: the frozen ones; the others start from a seeded random init).
        ``init=("conv1", "conv2"), freeze=()`` fine-tunes everything from the source's conv1-2.
      epochs, batch_size, learning_rate, momentum, weight_decay: SGD with a cosine-decayed rate over all steps.
      seed: seeds the new weights (through ``keras.utils.set_random_seed``), shuffling, augmentation and dropout.
      image_size: side the images are resized to (default: the source trunk's, else the data's, else 32).
      max_per_class: with a dataset name/path, keep at most this many images per class (quick runs).
      head_widths: hidden widths of the classifier head (default 1024-1024, 4096-4096 for the imagenet variant).
      dropout: dropout rate before each hidden layer of the head (AlexNet's 0.5; 0 for none).
      callbacks: extra Keras callbacks for ``fit`` (e.g. a time budget that sets ``model.stop_training``).
      verbose: Keras verbosity.
      front_end: ``"alexnet"`` (conv1-2 of the AlexNet, as above) or ``"scattering"``: a fixed scattering
        transform (J=2, L=8; :mod:`keras_oneimage.models.scattering`) replaces conv1-2 and the rest of the same
        AlexNet trains on it (the scattering row of Table 4). The source then only sets the architecture (and
        may supply conv3-5 named in ``init``); conv1/conv2 in ``freeze`` / ``init`` are the scattering, which is
        always frozen; its standardisation is estimated on the training images before training. Needs kymatio
        and an AlexNet source.
      trunk: the architecture (``"alexnet"``, ``"resnet18"``; default alexnet) of a random source; with any other
        source, ``None`` or the source's own trunk name.

    Returns:
      A :class:`FinetuneResult` (test and val accuracy, history, the trained classifier).

    Raises:
      InputError: a tap the trunk does not have in ``freeze`` / ``init`` (the message lists the trunk's taps), an
        unusable source or dataset, a bad number.
    """
    epochs = validation.positive_int("epochs", epochs)
    batch_size = validation.positive_int("batch_size", batch_size)
    seed = validation.seed(seed)
    learning_rate = _number("learning_rate", learning_rate, low=0.0, low_open=True)
    momentum = _number("momentum", momentum, low=0.0, high=1.0)
    weight_decay = _number("weight_decay", weight_decay, low=0.0)
    dropout = _number("dropout", dropout, low=0.0, high=1.0)
    if image_size is not None:
        image_size = validation.positive_int("image_size", image_size)
    if head_widths is not None:
        head_widths = check_head_widths(head_widths)
    callbacks = list(callbacks or [])
    if not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise InputError("callbacks must be keras.callbacks.Callback instances")
    if front_end not in FRONT_ENDS:
        raise InputError(f"unknown front_end {front_end!r}; choose one of: {', '.join(FRONT_ENDS)}")
    if front_end == "scattering":
        from keras_oneimage.models import scattering

        scattering.require_kymatio()  # before loading any data

    # The source decides the architecture, hence which taps exist: every tap check comes after it, before the data.
    source, source_name, exported_layers = resolve_source(exported_or_backbone)
    architecture = _architecture(source, trunk)
    taps_of = trunk_class(architecture)
    freeze = _check_taps("freeze", taps_of.early_taps() if freeze is None else freeze, taps_of, architecture)
    init = freeze if init is None else _check_taps("init", init, taps_of, architecture)
    if front_end == "scattering" and not issubclass(taps_of, AlexNet):
        raise InputError(f"the scattering front end replaces an AlexNet's conv1-2; the source is a {architecture}")
    if source is None:
        init = ()  # a random trunk: nothing to copy
    elif exported_layers is not None:
        missing = [name for name in init if name not in exported_layers]
        if missing:
            raise InputError(
                f"the export holds layers {list(exported_layers)} only; cannot initialise {missing} from it "
                "(export those layers too, or pass the model.keras checkpoint)"
            )
    data = _as_labelled(dataset, max_per_class)
    size = image_size or (source.image_size if source is not None else None) or _data_image_size(data) or 32

    # The new classifier: a fresh trunk of the source's architecture, then the source's weights for `init`.
    keras.utils.set_random_seed(seed)
    if source is None:
        target = build_trunk(architecture, image_size=size)  # the package's variant rule: imagenet from 128 px
    else:
        target = type(source).from_config(source.get_config())
    if front_end == "scattering":
        target = scattering.ScatteringAlexNet.replacing_conv1_2(target, image_size=size)
        init = tuple(name for name in init if name in target.TAPS)
        freeze = ("scattering", *(name for name in freeze if name in target.TAPS))
    model = AlexNetClassifier(target, data.num_classes, head_widths=head_widths, dropout=dropout, seed=seed)
    try:
        model.build((None, size, size, 3))
    except (ValueError, InputError) as exc:
        raise InputError(f"image_size {size} does not fit this {architecture}: {exc}") from None
    for name in init:
        copy_layer(source, target, name)
    for name in freeze:
        for layer in _layers_of(target, name):
            layer.trainable = False
    if front_end == "scattering":
        scattering.adapt_on(target, data.train, size, batch_size)

    steps_per_epoch = math.ceil(data.train_size / batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, epochs * steps_per_epoch))
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=momentum, weight_decay=weight_decay or None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=False,
    )
    counter = _ImageCounter(data.train_size, batch_size)
    train = train_pipeline(data.train, size, data.train_size, batch_size, seed)
    history = model.fit(train, epochs=epochs, verbose=verbose, callbacks=[counter, *callbacks], shuffle=False)

    def accuracy(split: str) -> float:
        scores = model.evaluate(eval_pipeline(data.split(split), size, batch_size), verbose=0, return_dict=True)
        return float(scores["accuracy"])

    return FinetuneResult(
        test_accuracy=accuracy("test"),
        val_accuracy=accuracy("val") if data.val_size else None,
        history={k: [float(v) for v in vals] for k, vals in history.history.items()},
        model=model,
        frozen=freeze,
        initialised=tuple(init),
        source=source_name,
        image_size=size,
        epochs_run=len(history.epoch),
        images_seen=counter.images,
        front_end=front_end,
        trunk=architecture,
    )


def resolve_source(source: Any) -> tuple[Trunk | None, str, tuple[str, ...] | None]:
    """(trunk or None for random, a description, the exported layers for a SavedModel else None)."""
    if source is None or (isinstance(source, str) and source.lower() == "random"):
        return None, "random", None
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        version_dir = _export_version_dir(path)
        if version_dir is not None:
            trunk, layers = backbone_from_export(version_dir)
            return trunk, f"export:{version_dir}", layers
        return _registered_trunk(backbone_of(path), path), f"checkpoint:{path}", None
    return _registered_trunk(backbone_of(source), source), type(source).__name__, None


def backbone_from_export(version_dir: str | os.PathLike) -> tuple[Trunk, tuple[str, ...]]:
    """Rebuild the trunk of an exported SavedModel; return it and the layers the export serves.

    The export saves every variable of the trunk under its Keras path (``alexnet/conv1/conv/kernel``), and its
    ``keras_oneimage.json`` records the trunk's registry name and full config (``trunk``, ``trunk_config``): any
    registered trunk is rebuilt from them. An older export without them can only be an AlexNet, rebuilt from the
    recorded variant, Sobel flag and training image size, with the widths read off the kernel shapes. The rebuilt
    trunk is checked against the export's ``serving_default`` on a random image, so a trunk that cannot be rebuilt
    faithfully (e.g. an old export's custom input normalisation, which lives only in the graph) is refused.
    """
    version_dir = pathlib.Path(version_dir)
    try:
        meta = json.loads((version_dir / EXPORT_METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{version_dir} has no readable {EXPORT_METADATA}: {exc}") from None
    layers = tuple(meta.get("layers") or ())
    try:
        loaded = tf.saved_model.load(str(version_dir))
    except Exception as exc:  # TF raises many error types for broken SavedModels
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot load the SavedModel in {version_dir}: {first}") from None
    saved = {}
    for var in getattr(loaded, "variables", ()):
        name = var.name.split(":")[0]
        saved[name.split("/", 1)[1] if "/" in name else name] = var  # drop the trunk's own name
    trunk = _trunk_from_metadata(meta, saved, version_dir)
    size = trunk.image_size
    trunk.build()
    for weight in trunk.weights:
        key = weight.path.split("/", 1)[1]
        if key not in saved or tuple(saved[key].shape) != tuple(weight.shape):
            raise InputError(f"{version_dir}: no saved variable matching {key} {tuple(weight.shape)}")
        weight.assign(saved[key].numpy())
    # Parity: the rebuilt trunk must reproduce what the export computes.
    x = np.random.default_rng(0).random((2, size, size, 3), dtype=np.float32)
    want = loaded.signatures["serving_default"](images=tf.constant(x))
    got = trunk.features(x, layers=layers, training=False)
    for name in layers:
        w, g = want[name].numpy(), keras.ops.convert_to_numpy(got[name])
        if w.shape != g.shape or not np.allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max()))):
            raise InputError(
                f"the trunk rebuilt from {version_dir} does not reproduce its {name} (a custom input normalisation?); "
                "fine-tune from the model.keras checkpoint instead"
            )
    return trunk, layers


def copy_layer(source: Trunk, target: Any, name: str) -> None:
    """Assign the weights of tap ``name`` (conv kernels, BN scales, shifts and moving statistics) from source."""
    if not source.built:
        source.build()
    src = [w for layer in _layers_of(source, name) for w in layer.weights]
    dst = [w for layer in _layers_of(target, name) for w in layer.weights]
    pairs = list(zip(src, dst))
    if len(src) != len(dst) or any(tuple(a.shape) != tuple(b.shape) for a, b in pairs):
        raise InputError(f"layer {name} of the source does not match the classifier's trunk")
    for a, b in pairs:
        b.assign(a.numpy())


# ---------------------------------------------------------------------------------------------------- helpers
class _ImageCounter(keras.callbacks.Callback):
    """Counts the labelled images the training has processed (the last batch of an epoch may be short)."""

    def __init__(self, train_size: int, batch_size: int):
        super().__init__()
        self.train_size, self.batch_size = train_size, batch_size
        self.images = 0
        self._batch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._batch = 0

    def on_train_batch_end(self, batch, logs=None):
        self.images += max(0, min(self.batch_size, self.train_size - self._batch * self.batch_size))
        self._batch += 1


def _registered_trunk(backbone: Any, given: Any) -> Trunk:
    if not isinstance(backbone, Trunk):
        raise InputError(f"fine-tuning needs a registered trunk ({', '.join(available_trunks())}); "
                         f"{type(given).__name__} has a {type(backbone).__name__}")
    trunk_name(backbone)  # InputError for a Trunk subclass the registry cannot name
    if not backbone.built:
        backbone.build()
    return backbone


def _architecture(source: Trunk | None, requested: str | None) -> str:
    """The registry name of the classifier's trunk: the source's, or ``requested`` (default alexnet) for random."""
    if source is None:
        trunk_class(requested)  # InputError for an unknown name
        return DEFAULT_TRUNK if requested is None else str(requested).lower()
    own = trunk_name(source)
    if requested is not None and trunk_class(requested) is not trunk_class(own):
        raise InputError(f"trunk={requested!r} but the source's trunk is {own}; omit trunk or name the source's")
    return own


def _layers_of(trunk: Any, name: str) -> tuple[keras.layers.Layer, ...]:
    """The layers of tap ``name``: from the trunk's own path (:meth:`Trunk.tap_layers`). The scattering trunk of
    Table 4 is no :class:`Trunk`: each of its taps (and the scattering) is one attribute of that name."""
    return trunk.tap_layers(name) if isinstance(trunk, Trunk) else (getattr(trunk, name),)


def _trunk_from_metadata(meta: dict[str, Any], saved: dict[str, Any], version_dir: pathlib.Path) -> Trunk:
    """An unbuilt trunk of the exported architecture (see :func:`backbone_from_export`)."""
    if meta.get("trunk") and meta.get("trunk_config"):
        try:
            return trunk_class(meta["trunk"]).from_config(meta["trunk_config"])
        except (TypeError, ValueError, InputError) as exc:
            raise InputError(f"{version_dir}: cannot rebuild its {meta['trunk']} trunk from trunk_config: "
                             f"{exc}") from None
    if meta.get("backbone") != "AlexNet":
        raise InputError(f"{version_dir} exports a {meta.get('backbone')!r} trunk without a trunk_config; "
                         "fine-tune from its model.keras checkpoint instead")
    try:
        widths = [int(saved[f"{tap}/conv/kernel"].shape[-1]) for tap in AlexNet.TAPS]
    except KeyError as exc:
        raise InputError(f"{version_dir} does not hold AlexNet weights (no {exc.args[0]!r})") from None
    size = int(meta.get("training_image_size") or 0) or max(32, int(meta.get("min_size") or 0))
    return AlexNet(meta.get("variant") or "cifar", image_size=size, sobel=bool(meta.get("sobel")), widths=widths)


def _export_version_dir(path: pathlib.Path) -> pathlib.Path | None:
    """``path`` if it is an export version dir, its highest version if it is an export base dir, else None."""
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir():
        versions = sorted(
            (int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()),
            reverse=True,
        )
        if versions:
            return path / str(versions[0])
    return None


def _as_labelled(dataset: Any, max_per_class: int | None) -> LabelledData:
    if isinstance(dataset, LabelledData):
        if max_per_class is not None:
            raise InputError("max_per_class applies to a dataset name/path; subsample a LabelledData when loading it")
        data = dataset
    elif isinstance(dataset, (str, os.PathLike)):
        data = load_labelled(dataset, max_per_class=max_per_class)
    else:
        raise InputError(f"dataset must be a LabelledData or a dataset name/path, got {type(dataset).__name__}")
    if data.num_classes < 2:
        raise InputError(f"the labelled data has {data.num_classes} class(es); a classifier needs at least 2")
    if data.train_size == 0 or data.test_size == 0:
        raise InputError(f"the labelled data needs train and test examples (has {data.train_size} / {data.test_size})")
    return data


def _data_image_size(data: LabelledData) -> int | None:
    h, w = data.train.element_spec[0].shape[:2]
    return int(h) if h is not None and h == w else None


def _check_taps(label: str, names: str | Iterable[str], trunk: type[Trunk], architecture: str) -> tuple[str, ...]:
    """The named taps in ``trunk``'s order; none at all is allowed (``freeze=()`` trains everything).

    An unknown name is an InputError that lists the trunk's taps (e.g. conv1 asked of a ResNet-18).
    """
    taps = trunk.TAPS
    names = validation.layer_names(names, taps, f"{label} (taps of the {architecture} trunk)", allow_empty=True)
    return tuple(sorted(names, key=taps.index))


def _number(name: str, value: Any, *, low: float, low_open: bool = False, high: float | None = None) -> float:
    """``value`` as a float in ``[low, high)`` (``(low, high)`` with ``low_open``); InputError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value >= high):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g})" if high is not None else (
            f"> {low:g}" if low_open else f">= {low:g}")
        raise InputError(f"{name} must be {'in ' if high is not None else ''}{bounds}, got {value!r}")
    return float(value)
