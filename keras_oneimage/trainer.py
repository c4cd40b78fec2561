"""One training core: validate a run, build its method and trunk, pick its patch stream, resume and train.

`keras_oneimage.fit`, every `keras_oneimage.tune` trial (and tune's up-front check of the method options), the
command line and the experiments all train through here, so a run is checked the same way everywhere and the trunk
is built in one place, :func:`build_trunk`. A method only declares what it needs from the trunk (its input size,
``trunk_input_size``, and its options, ``backbone_options``) and, if it has one, its own dataset
(``make_dataset``): a new method is one class and one registry line, nothing here changes.

The flow: :func:`prepare_run` checks every value and loads the source images into a :class:`Run` (nothing is built
or written yet); :func:`train` builds the method, records the run (``run.json``, for `fit`), picks the patch stream
(continued where a resumed run left it) and hands over to :func:`keras_oneimage.training.run_training`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

from keras_oneimage import files, validation
from keras_oneimage.data.recipe import AugmentConfig
from keras_oneimage.errors import InputError

#: The embedded default source image: a photograph shipped inside matplotlib, so `fit()` works offline with no data.
DEFAULT_IMAGE_NAME = "grace_hopper.jpg"

#: The smallest input each AlexNet variant's layers accept (below it a pooled map becomes empty).
MIN_IMAGE_SIZE = {"cifar": 16, "imagenet": 63}

#: The record of a `fit` run in its output_dir; a rerun must match its identity keys (``RUN_IDENTITY``).
RUN_JSON = "run.json"
RUN_IDENTITY = ("method", "image_sha256", "image_size", "variant", "trunk")
#: What a ``run.json`` written before a key existed meant by its absence (runs before trunks were selectable
#: trained an AlexNet), so those runs still resume.
RUN_IDENTITY_DEFAULTS = {"trunk": "alexnet"}


# ------------------------------------------------------------------------------------------------ source images
def default_image_path() -> str:
    """Path of the embedded default source image (matplotlib's sample photograph of Grace Hopper, 512x600)."""
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data(DEFAULT_IMAGE_NAME, asfileobj=False))


def source_images(image: Any, *, image_size: int, max_pixels: int | None = None) -> list[np.ndarray]:
    """The decoded source image(s) of a run (``None``: the default photograph), each at least one patch wide."""
    from keras_oneimage.data.images import load_images

    load_kwargs = {} if max_pixels is None else {"max_pixels": int(max_pixels)}
    images = load_images(image if image is not None else default_image_path(), **load_kwargs)
    for i, img in enumerate(images):
        if min(img.shape[:2]) < image_size:
            raise InputError(
                f"source image {i} is {img.shape[1]}x{img.shape[0]} px, smaller than the {image_size} px patch; "
                "use a larger image or a smaller image_size"
            )
    return images


def images_sha256(images: Sequence[np.ndarray]) -> list[str]:
    """The sha256 of each decoded image's pixels: a run's (and a search's) identity, whatever file it came from."""
    return [files.bytes_sha256(img) for img in images]


def augment_config(augment: Any = None, strength: float | None = None) -> AugmentConfig:
    """``augment`` (an AugmentConfig, a dict of its fields, or None for the paper's) scaled by ``strength``."""
    if augment is None:
        augment = AugmentConfig()
    elif isinstance(augment, Mapping):
        augment = AugmentConfig(**augment)
    elif not isinstance(augment, AugmentConfig):
        raise InputError(f"augment must be an AugmentConfig or a dict, got {type(augment).__name__}")
    return augment if strength is None else augment.scaled(strength)


# -------------------------------------------------------------------------------------------------------- trunk
def variant_for(image_size: int, variant: str | None, trunk_size: int | None = None, trunk: str = "alexnet") -> str:
    """The stem variant for ``image_size`` px patches and a check of the trunk's minimum input.

    ``trunk_size`` is what the trunk sees (the method's ``trunk_input_size``; the patch itself by default), and the
    default variant follows it (``"imagenet"`` from 128 px): Jigsaw's tiles of a 128-221 px patch are too small
    for the ImageNet stem, so they get the CIFAR one.
    """
    from keras_oneimage.models.registry import default_variant

    trunk_size = image_size if trunk_size is None else trunk_size
    if variant is None:
        variant = default_variant(trunk_size)
    if variant not in MIN_IMAGE_SIZE:
        raise InputError(f"unknown {trunk} variant {variant!r}; choose 'cifar' or 'imagenet'")
    if trunk != "alexnet":  # global pooling ends the ResNet: any input of a few pixels gives non-empty taps
        return variant
    if trunk_size < MIN_IMAGE_SIZE[variant]:
        what = f"image_size {image_size}" if trunk_size == image_size else \
            f"the trunk input of {trunk_size} px (from image_size {image_size})"
        raise InputError(f"{what} is too small for the {variant} AlexNet (minimum {MIN_IMAGE_SIZE[variant]})")
    return variant


def build_trunk(method_cls: type, image_size: int, *, variant: str, widths: Sequence[int] | None = None,
                trunk: str = "alexnet", method_options: Mapping[str, Any] | None = None):
    """The trunk ``method_cls`` trains on ``image_size`` px patches: the one place a trunk is built.

    ``trunk`` names it in :mod:`keras_oneimage.models.registry` (``"alexnet"``, ``"resnet18"``). Its input size is
    the method's ``trunk_input_size(image_size)`` and its options the method's ``trunk_options(method_options)``
    (DeepCluster's Sobel filter, unless ``sobel=False``), with ``widths`` (small ones for quick runs) on top.
    """
    from keras_oneimage.models import registry

    options = method_cls.trunk_options(method_options)
    if widths is not None:
        options["widths"] = tuple(widths)
    return registry.build_trunk(trunk, variant=variant, image_size=method_cls.trunk_input_size(image_size), **options)


# ---------------------------------------------------------------------------------------------------------- run
@dataclasses.dataclass(frozen=True)
class Run:
    """A checked training run: what :func:`train` needs besides where to write and how to distribute.

    ``seed`` seeds the weights, ``stream_seed`` the patch stream (the same by default; a Hyperband continuation
    draws a fresh stretch of patches). ``precision`` is the resolved Keras policy name.
    """

    method: type
    images: tuple
    image_size: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    seed: int
    stream_seed: int
    augment: AugmentConfig
    variant: str
    widths: tuple[int, ...] | None = None
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    precision: str = "float32"
    trunk: str = "alexnet"

    def context(self, output_dir: str | os.PathLike | None):
        """The :class:`~keras_oneimage.methods.base.FitContext` a method's callbacks and dataset see."""
        from keras_oneimage.methods.base import FitContext

        return FitContext(images=list(self.images), image_size=self.image_size, batch_size=self.batch_size,
                          seed=self.stream_seed, augment=self.augment, steps_per_epoch=self.steps_per_epoch,
                          epochs=self.epochs, output_dir=None if output_dir is None else str(output_dir))


def prepare_run(image: Any = None, method: str = "rotnet", *, image_size: int = 64, batch_size: int = 64,
                epochs: int = 10, steps_per_epoch: int = 100, seed: int = 0, stream_seed: int | None = None,
                augment: Any = None, strength: float | None = None, variant: str | None = None,
                widths: Sequence[int] | None = None, method_options: Mapping[str, Any] | None = None,
                precision: str = "float32", max_pixels: int | None = None, trunk: str | None = None) -> Run:
    """Check every value of a run and load its source images; raises :class:`InputError` before anything is built.

    ``image``: anything :func:`~keras_oneimage.data.images.load_images` accepts (``None``: the default photograph).
    """
    from keras_oneimage.methods import registry
    from keras_oneimage.precision import resolve_precision

    image_size = validation.positive_int("image_size", image_size)
    batch_size = validation.positive_int("batch_size", batch_size)
    epochs = validation.positive_int("epochs", epochs)
    steps_per_epoch = validation.positive_int("steps_per_epoch", steps_per_epoch)
    seed = validation.seed(seed)
    stream_seed = seed if stream_seed is None else validation.seed(stream_seed, "stream_seed")
    from keras_oneimage.models.registry import DEFAULT_TRUNK, available_trunks

    method_cls = registry.get(method)
    trunk = DEFAULT_TRUNK if trunk is None else str(trunk).lower()
    if trunk not in available_trunks():
        raise InputError(f"unknown trunk {trunk!r}; choose one of {', '.join(available_trunks())}")
    variant = variant_for(image_size, variant, method_cls.trunk_input_size(image_size), trunk)
    if widths is not None:
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
            raise InputError(f"widths must be a sequence of positive integers, got {widths!r}")
        widths = tuple(validation.positive_int("widths", w) for w in widths)
    if method_options is not None and not isinstance(method_options, Mapping):
        raise InputError(f"method_options must be a dict, got {type(method_options).__name__}")
    augment = augment_config(augment, strength)
    images = source_images(image, image_size=image_size, max_pixels=max_pixels)
    return Run(method=method_cls, images=tuple(images), image_size=image_size, batch_size=batch_size, epochs=epochs,
               steps_per_epoch=steps_per_epoch, seed=seed, stream_seed=stream_seed, augment=augment,
               variant=variant, widths=widths, method_options=dict(method_options or {}),
               precision=resolve_precision(precision), trunk=trunk)


def build_method(run: Run):
    """The untrained method model of ``run`` (its trunk from :func:`build_trunk`), under the run's precision.

    Call it inside a ``tf.distribute`` strategy's scope to create the weights there.
    """
    from keras_oneimage.precision import precision_scope

    with precision_scope(run.precision):
        backbone = build_trunk(run.method, run.image_size, variant=run.variant, widths=run.widths, trunk=run.trunk,
                               method_options=run.method_options)
        return run.method(backbone=backbone, **run.method_options)


def check_method(run: Run) -> None:
    """Build the run's method once, so that bad ``method_options`` or ``widths`` fail now, not in every trial."""
    try:
        build_method(run)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad method_options or widths for {run.method.method_name!r}: {exc}") from None


def bytes_per_patch(run: Run, backbone) -> int:
    """A lower bound of the memory one patch of the batch needs in a training step (float32).

    For each trunk pass (``views_per_patch``), its input and every tap's activations, which must all be
    alive when the backward pass starts. Their gradients, the layers between taps, heads and optimizer state only
    add to it, so a batch refused on this estimate cannot run.
    """
    trunk_size = run.method.trunk_input_size(run.image_size)
    activations = 0
    feature_shapes = getattr(backbone, "feature_shapes", None)
    if feature_shapes is not None:
        activations = sum(int(np.prod(shape)) for tap, shape in feature_shapes(trunk_size).items() if tap != "output")
    per_view = trunk_size * trunk_size * 3 + activations
    return 4 * per_view * max(1, int(getattr(run.method, "views_per_patch", 1)))


# -------------------------------------------------------------------------------------------- the run's record
def run_record(run: Run, image: Any, **extra: Any) -> dict[str, Any]:
    """What ``run.json`` records: the run's settings, the source images' sha256, the package version, ``extra``."""
    from keras_oneimage import __version__

    if image is None:
        sources = [default_image_path()]
    elif isinstance(image, (str, os.PathLike, list, tuple)):
        sources = [str(p) for p in (image if isinstance(image, (list, tuple)) else [image])]
    else:
        sources = ["<array>"]
    return {
        "method": run.method.method_name, "image_size": run.image_size, "batch_size": run.batch_size,
        "epochs": run.epochs, "steps_per_epoch": run.steps_per_epoch, "seed": run.seed, "variant": run.variant,
        "trunk": run.trunk,
        "augment": dataclasses.asdict(run.augment), "method_options": dict(run.method_options),
        "image_sha256": images_sha256(run.images), "image_source": sources, "package_version": __version__,
        "precision": run.precision, **extra,
    }  # fmt: skip


def prepare_output_dir(output_dir: str | os.PathLike | None, record: Mapping[str, Any], *,
                       write: bool = True) -> pathlib.Path | None:
    """Create ``output_dir`` (after all input was checked) and record the run; refuse a dir of another run.

    ``write=False`` (a non-chief worker of a multi-worker run) only checks: the chief writes ``run.json``.
    """
    if output_dir is None:
        return None
    out = pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {str(out)!r} exists and is not a directory")
    run_file = out / RUN_JSON
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {run_file}: {exc}") from None
        for key in RUN_IDENTITY:
            if previous.get(key, RUN_IDENTITY_DEFAULTS.get(key)) != record.get(key):
                raise InputError(
                    f"output_dir {str(out)!r} holds a run with a different {key} "
                    f"({previous.get(key)!r} vs {record.get(key)!r}); use another output_dir to start afresh"
                )
    try:
        out.mkdir(parents=True, exist_ok=True)
        if write:
            files.write_json_atomic(run_file, record)
    except OSError as exc:
        raise InputError(f"cannot write to output_dir {str(out)!r}: {exc.strerror or exc}") from None
    return out


class DirectoryState:
    """What a run found in ``output_dir`` (its top-level entries and ``run.json``), to put back after a refusal."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = pathlib.Path(output_dir)
        self.existed = self.path.is_dir()
        self.entries = set(os.listdir(self.path)) if self.existed else set()
        run_file = self.path / RUN_JSON
        self.run_json = run_file.read_bytes() if self.existed and run_file.is_file() else None

    def restore(self) -> None:
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            for name in set(os.listdir(self.path)) - self.entries:
                path = self.path / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            run_file = self.path / RUN_JSON
            if self.run_json is not None and (not run_file.is_file() or run_file.read_bytes() != self.run_json):
                tmp = run_file.with_name(f".{RUN_JSON}.tmp")
                tmp.write_bytes(self.run_json)
                os.replace(tmp, run_file)
        except OSError:
            pass  # best effort: the refusal's own message matters more


# -------------------------------------------------------------------------------------------------------- train
def patch_stream(model, run: Run, context, output_dir: pathlib.Path | None, strategy=None):
    """The method's own dataset (``make_dataset``), else the seeded patch stream, continued after a resume."""
    from keras_oneimage import distribute as distribute_lib
    from keras_oneimage.data.synthetic import patch_dataset
    from keras_oneimage.training import completed_epochs

    make_dataset = getattr(model, "make_dataset", None)
    if make_dataset is not None:
        return make_dataset(context)
    # A resumed run continues the patch stream where the committed epochs left it.
    start_step = completed_epochs(output_dir) * run.steps_per_epoch
    options = dict(image_size=run.image_size, batch_size=run.batch_size, augment=run.augment, seed=run.stream_seed,
                   start_step=start_step)
    if strategy is not None:  # one seeded shard per worker, per-replica batches (docs/distributed.md)
        return distribute_lib.distribute_patches(list(run.images), strategy=strategy, **options)
    return patch_dataset(list(run.images), **options)


def train(run: Run, *, output_dir: str | os.PathLike | None = None, record: Mapping[str, Any] | None = None,
          strategy: Any = None, optimizer: Any = None, lr_factor: float = 1.0,
          callbacks: Sequence[Any] | None = None, verbose: str | int = "auto"):
    """Build ``run``'s method and train it; return the trained method model.

    With ``output_dir`` the run checkpoints every epoch and a rerun resumes after the last completed epoch. With a
    ``record`` (`fit`) the directory must hold no other run, gets ``run.json``, and is put back as it was found
    when the run is refused before training. ``strategy``: a resolved ``tf.distribute`` strategy or None;
    ``optimizer`` (default: the method's) has its learning rate(s) multiplied by ``lr_factor``.
    """
    import keras

    from keras_oneimage import distribute as distribute_lib
    from keras_oneimage.training import run_training

    keras.utils.set_random_seed(run.seed)
    # Under a strategy everything (weights, DeepCluster's pool, optimizer slots) is created in its scope.
    scope = strategy.scope if strategy is not None else contextlib.nullcontext
    with scope():
        model = build_method(run)
    validation.check_step_memory(run.batch_size, bytes_per_patch(run, model.backbone),
                                 f"{run.method.method_name} on {run.image_size}x{run.image_size} px patches")
    found = None
    out = None if output_dir is None else pathlib.Path(output_dir)
    if record is not None and out is not None:
        chief = distribute_lib.is_chief(strategy)
        found = DirectoryState(out) if chief else None
        out = prepare_output_dir(out, record, write=chief)
    context = run.context(distribute_lib.write_dir(out, strategy))  # a non-chief worker's scratch folder
    try:
        with scope():
            dataset = patch_stream(model, run, context, out, strategy)
            if optimizer is not None or lr_factor != 1.0:
                optimizer = distribute_lib.optimizer_in_scope(optimizer, strategy)
                model.compile(optimizer=optimizer if optimizer is not None else model.default_optimizer())
                distribute_lib.scale_learning_rates(model, lr_factor)
            run_training(model, dataset, epochs=run.epochs, steps_per_epoch=run.steps_per_epoch,
                         output_dir=None if out is None else str(out), callbacks=list(callbacks or []),
                         context=context, verbose=verbose)
    except InputError:
        # Refused before training (e.g. a backup this method cannot resume): leave output_dir as it was found,
        # so that the run it holds can still be resumed by the command that made it.
        if found is not None:
            found.restore()
        raise
    return model


def train_method(images: Any, *, method: str = "rotnet", augment: Any = None, image_size: int = 32,
                 batch_size: int = 64, epochs: int = 2, steps_per_epoch: int = 100, seed: int = 0,
                 stream_seed: int | None = None, widths: Sequence[int] | None = None, variant: str | None = None,
                 output_dir: str | os.PathLike | None = None, callbacks: Sequence[Any] | None = None,
                 verbose: str | int = 0, method_options: Mapping[str, Any] | None = None,
                 precision: str = "float32", trunk: str | None = None):
    """Check and train one run in one call, without a ``run.json`` (a tuning trial, a refit, an experiment).

    ``images``: anything :func:`~keras_oneimage.data.images.load_images` accepts (decoded arrays are cheapest).
    ``seed`` seeds the weights; ``stream_seed`` (default ``seed``) the patch stream. With ``output_dir`` the run
    checkpoints every epoch and a rerun resumes after the last completed epoch. Returns the trained method model.
    """
    run = prepare_run(images, method, image_size=image_size, batch_size=batch_size, epochs=epochs,
                      steps_per_epoch=steps_per_epoch, seed=seed, stream_seed=stream_seed, augment=augment,
                      variant=variant, widths=widths, method_options=method_options, precision=precision,
                      trunk=trunk)
    return train(run, output_dir=output_dir, callbacks=callbacks, verbose=verbose)
