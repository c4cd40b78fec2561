"""`keras-oneimage demo` (``make demo``): train RotNet on one photograph offline and draw what it learned, in one PNG.

The picture has four parts: the source image and a batch of the synthetic patches it became (the augmentation of
Asano et al. 2020, §3, at work), the training curve (loss, and rotation accuracy against chance at 0.25), the
conv1 filters before and after training, and linear probes of the trained trunk against the same trunk untrained
(its weights at the start of training) on a small labelled set drawn from the same photograph (:func:`shapes_set`).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from keras_oneimage.errors import InputError

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar")
PICTURE = "demo.png"
CHECKPOINT = "model.keras"


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` made: the picture, the checkpoint, and the numbers drawn in the picture."""

    picture: pathlib.Path
    checkpoint: pathlib.Path
    curve: dict[str, list[float]]  # per-step "loss" and "rotation_accuracy"
    probe: dict[str, dict[str, float]]  # {"trained" | "random": {layer: test accuracy}}
    chance: float  # the probe's chance level (1 / number of classes)
    conv1_before: np.ndarray  # conv1 kernel (k, k, 3, N) when training started
    conv1_after: np.ndarray  # and when it ended


def shapes_set(image, *, n_train: int = 80, n_test: int = 40, size: int = 32, seed: int = 0):
    """A small labelled set made from ``image``: which shape (:data:`SHAPES`) is drawn on a patch of it.

    Each example is a random crop of the image (at a random scale, resized to ``size`` pixels) with one outlined or
    filled shape of random colour, size, position and rotation drawn over it, anti-aliased. Telling the shapes
    apart takes edges and their arrangement, the structure early conv layers are meant to pick up, while the
    photographic background keeps the task from being solved by colour alone. ``n_train``/``n_test`` are per
    class. Returns a :class:`~keras_oneimage.data.labelled.LabelledData` (no val split).
    """
    from PIL import Image, ImageDraw

    from keras_oneimage.data.images import load_image
    from keras_oneimage.data.labelled import from_arrays

    photo = load_image(image)
    if min(photo.shape[:2]) < size:
        raise InputError(f"the image is smaller than {size} px; shapes_set needs a larger one")
    rng = np.random.default_rng(seed)
    up = 4  # draw at 4x and downsample: smooth edges, as in a photograph
    canvas = size * up

    def example(label: int) -> np.ndarray:
        side = int(rng.integers(size, min(photo.shape[:2]) // 2 + 1)) if min(photo.shape[:2]) >= 2 * size else size
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        background = Image.fromarray(photo[y : y + side, x : x + side]).resize((canvas, canvas), Image.BILINEAR)
        layer = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(layer)
        r = canvas * rng.uniform(0.22, 0.38)
        cx, cy = canvas / 2 + rng.uniform(-0.12, 0.12, size=2) * canvas
        angle = rng.uniform(0, 2 * np.pi)
        width = max(up, int(canvas * rng.uniform(0.06, 0.1)))
        name = SHAPES[label]

        def polygon(n: int, radius: float = r, turn: float = angle) -> list[tuple[float, float]]:
            return [(cx + radius * np.cos(turn + 2 * np.pi * k / n), cy + radius * np.sin(turn + 2 * np.pi * k / n))
                    for k in range(n)]

        if name == "disc":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        elif name == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=width)
        elif name == "square":
            draw.polygon(polygon(4), fill=255)
        elif name == "triangle":
            draw.polygon(polygon(3), fill=255)
        elif name in ("cross", "bar"):
            for turn in (angle, angle + np.pi / 2) if name == "cross" else (angle,):
                dx, dy = r * np.cos(turn), r * np.sin(turn)
                draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=width)
        colour = Image.new("RGB", (canvas, canvas), tuple(int(c) for c in rng.integers(0, 256, size=3)))
        background.paste(colour, (0, 0), layer)
        return np.asarray(background.resize((size, size), Image.BOX))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(SHAPES)), n)
        return np.stack([example(int(label)) for label in labels]), labels

    (train_x, train_y), (test_x, test_y) = split(n_train), split(n_test)
    return from_arrays(train_x, train_y, test_x, test_y, val_fraction=0.0, seed=seed, class_names=SHAPES)


def _step_values(history: Sequence[float]) -> list[float]:
    """Per-step values from Keras's running means within an epoch (step k: (k+1)·m_k − k·m_{k−1})."""
    out, previous = [], 0.0
    for k, mean in enumerate(history):
        out.append((k + 1) * mean - k * previous)
        previous = mean
    return out


def _recorder():
    import keras

    class Recorder(keras.callbacks.Callback):
        """Keeps the trunk's weights at the start of training and every step's loss and rotation accuracy."""

        def __init__(self):
            super().__init__()
            self.initial: list[np.ndarray] | None = None
            self.curve: dict[str, list[float]] = {"loss": [], "rotation_accuracy": []}
            self._epoch: dict[str, list[float]] = {}

        def on_train_begin(self, logs=None):
            self.initial = [np.array(w) for w in self.model.backbone.get_weights()]

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = {key: [] for key in self.curve}

        def on_train_batch_end(self, batch, logs=None):
            for key in self.curve:
                if logs and key in logs:
                    self._epoch[key].append(float(logs[key]))

        def on_epoch_end(self, epoch, logs=None):
            for key, means in self._epoch.items():
                self.curve[key] += _step_values(means)

    return Recorder()


def run_demo(
    output_dir: str | os.PathLike = "demo_output",
    *,
    image: Any = None,
    image_size: int = 32,
    batch_size: int = 32,
    epochs: int = 3,
    steps_per_epoch: int = 40,
    precision: str = "auto",
    seed: int = 0,
    probe_examples: tuple[int, int] = (80, 40),
    probe_epochs: int = 30,
    verbose: str | int = "auto",
) -> DemoResult:
    """Train RotNet on ``image`` (default: the embedded photograph), then save ``model.keras`` and one picture.

    Every run starts afresh (the demo is short; resuming is what ``fit`` is for). ``probe_examples`` is the
    labelled set's (train, test) images per class. Returns a
    :class:`DemoResult`; the picture is ``output_dir/demo.png``.
    """
    import time

    import keras
    import tensorflow as tf

    from keras_oneimage import api
    from keras_oneimage.data.images import load_image
    from keras_oneimage.data.synthetic import patch_dataset
    from keras_oneimage.plots import demo_figure
    from keras_oneimage.probes import probe as linear_probe
    from keras_oneimage.training import save_model_atomic

    out = pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {str(out)!r} exists and is not a directory")
    source = load_image(image if image is not None else api.default_image_path())
    recorder = _recorder()
    start = time.monotonic()

    def say(message: str) -> None:
        if verbose:
            print(f"[{time.monotonic() - start:5.0f} s] {message}", flush=True)

    say(f"[1/3] training RotNet on one {source.shape[1]}x{source.shape[0]} photograph: {epochs} epochs of "
        f"{steps_per_epoch} steps, {batch_size} patches of {image_size} px each ...")
    model = api.fit(source, method="rotnet", image_size=image_size, batch_size=batch_size, epochs=epochs,
                    steps_per_epoch=steps_per_epoch, seed=seed, precision=precision, callbacks=[recorder],
                    verbose=verbose)
    checkpoint = save_model_atomic(model, out / CHECKPOINT)

    say(f"[2/3] linear probes, trained trunk vs the same trunk untrained, on {len(SHAPES)} shapes drawn on "
        "patches of the photograph ...")
    trained = model.backbone
    untrained = trained.__class__.from_config(trained.get_config())
    untrained(np.zeros((1, image_size, image_size, 3), np.float32))
    untrained.set_weights(recorder.initial)
    data = shapes_set(source, n_train=probe_examples[0], n_test=probe_examples[1], size=image_size, seed=seed + 1)
    probe = {}
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # each probe traces its own feature function: TF's retracing notice is no fault here
    try:
        for name, trunk in (("random", untrained), ("trained", trained)):
            keras.utils.set_random_seed(seed)
            probe[name] = linear_probe(trunk, data, layers=("conv1", "conv2"), epochs=probe_epochs, batch_size=64,
                                       augment=False, verbose=0, seed=seed)
    finally:
        logger.setLevel(level)

    say("[3/3] drawing the picture ...")
    patches = next(iter(patch_dataset(source, image_size=image_size, batch_size=32, seed=seed)))
    examples = np.stack([x for x, _ in data.test.take(len(SHAPES) * probe_examples[1]).as_numpy_iterator()])
    labels = np.array([int(y) for _, y in data.test.as_numpy_iterator()])
    shape_examples = np.stack([examples[np.flatnonzero(labels == c)[0]] for c in range(len(SHAPES))])
    before = recorder.initial[_kernel_index(trained)]
    after = np.asarray(trained.get_layer("conv1").conv.kernel)
    picture = demo_figure(
        out / PICTURE,
        source=source,
        patches=np.asarray(patches),
        curve=recorder.curve,
        steps_per_epoch=steps_per_epoch,
        filters_before=before,
        filters_after=after,
        probe=probe,
        chance=1.0 / len(SHAPES),
        probe_examples=shape_examples,
        probe_classes=SHAPES,
    )
    say("done")
    return DemoResult(picture=picture, checkpoint=checkpoint, curve=recorder.curve, probe=probe,
                      chance=1.0 / len(SHAPES), conv1_before=before, conv1_after=after)


def _kernel_index(backbone) -> int:
    """Index of conv1's kernel in ``backbone.get_weights()``."""
    kernel = backbone.get_layer("conv1").conv.kernel
    for i, weight in enumerate(backbone.weights):
        if weight is kernel or getattr(weight, "path", None) == getattr(kernel, "path", ""):
            return i
    raise InputError("cannot find conv1's kernel among the trunk's weights")
