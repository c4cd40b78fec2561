"""The user-facing functions. They are thin: they validate input, then wire the modules below together."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from keras_oneimage import __version__, validation
from keras_oneimage.errors import InputError

#: The embedded default source image: a photograph shipped inside matplotlib, so `fit()` works offline with no data.
DEFAULT_IMAGE_NAME = "grace_hopper.jpg"


def default_image_path() -> str:
    """Path of the embedded default source image (matplotlib's sample photograph of Grace Hopper, 512x600)."""
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data(DEFAULT_IMAGE_NAME, asfileobj=False))


_positive_int = validation.positive_int  # kept: tuning.py and older callers use api._positive_int


def _image_digest(images: Sequence[Any]) -> list[str]:
    return [hashlib.sha256(memoryview(img).tobytes()).hexdigest() for img in images]


def _write_json_atomic(path: pathlib.Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


MIN_IMAGE_SIZE = {"cifar": 16, "imagenet": 63}


def _variant_for(image_size: int, variant: str | None) -> str:
    if variant is None:
        variant = "imagenet" if image_size >= 128 else "cifar"
    if variant not in MIN_IMAGE_SIZE:
        raise InputError(f"unknown AlexNet variant {variant!r}; choose 'cifar' or 'imagenet'")
    if image_size < MIN_IMAGE_SIZE[variant]:
        raise InputError(
            f"image_size {image_size} is too small for the {variant} AlexNet (minimum {MIN_IMAGE_SIZE[variant]})"
        )
    return variant


def _prepare_output_dir(output_dir: str | os.PathLike | None, run_info: dict[str, Any], *,
                        write: bool = True) -> pathlib.Path | None:
    """Create `output_dir` (after all input was validated) and record the run; refuse a dir of another run.

    ``write=False`` (a non-chief worker of a multi-worker run) only checks: the chief writes ``run.json``.
    """
    if output_dir is None:
        return None
    out = pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {str(out)!r} exists and is not a directory")
    run_file = out / "run.json"
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {run_file}: {exc}") from None
        for key in ("method", "image_sha256", "image_size", "variant"):
            if previous.get(key) != run_info.get(key):
                raise InputError(
                    f"output_dir {str(out)!r} holds a run with a different {key} "
                    f"({previous.get(key)!r} vs {run_info.get(key)!r}); use another output_dir to start afresh"
                )
    try:
        out.mkdir(parents=True, exist_ok=True)
        if write:
            _write_json_atomic(run_file, run_info)
    except OSError as exc:
        raise InputError(f"cannot write to output_dir {str(out)!r}: {exc.strerror or exc}") from None
    return out


def fit(
    image: Any = None,
    method: str = "rotnet",
    *,
    image_size: int = 64,
    batch_size: int = 64,
    epochs: int = 10,
    steps_per_epoch: int = 100,
    seed: int = 0,
    augment: Any = None,
    strength: float | None = None,
    variant: str | None = None,
    output_dir: str | os.PathLike | None = None,
    callbacks: Sequence[Any] | None = None,
    optimizer: Any = None,
    max_pixels: int | None = None,
    verbose: str | int = "auto",
    strategy: Any = None,
    lr_scaling: str = "none",
    reference_batch: int = 256,
    precision: str = "float32",
    max_minutes: float | None = None,
    **method_options: Any,
):
    """Train a self-supervised method on patches of one (or N) source image(s); return the trained method model.

    Args:
      image: a path, a list of paths (N source images), a numpy array or a tensor. ``None`` uses an embedded
        default photograph (offline). Paper §3 uses a single image.
      method: a registered method name: ``"rotnet"``, ``"deepcluster"`` or ``"bigan"``.
      image_size: patch side in pixels (32/64 on CPU; the paper uses 224).
      batch_size: the global batch of source patches per step.
      epochs, steps_per_epoch: training length; an epoch is ``steps_per_epoch`` batches of fresh patches.
      seed: seeds the patch stream and the weights; the same seed gives the same run.
      augment: an :class:`~keras_oneimage.data.augment.AugmentConfig` (paper defaults when ``None``).
      strength: if given, scales every augmentation (``augment.scaled(strength)``); 1 = paper defaults.
      variant: AlexNet variant, ``"cifar"`` (32/64 px) or ``"imagenet"`` (224 px); chosen from image_size if None.
      output_dir: where checkpoints (``model.keras``), TensorBoard logs, ``history.csv`` and the conv1 filter PNG
        go. Rerunning with the same ``output_dir`` resumes after the last completed epoch.
      callbacks: extra Keras callbacks (e.g. :class:`~keras_oneimage.probes.callback.ProbeCallback`).
      optimizer: a Keras optimizer; the method's default when ``None``.
      max_pixels: decompression-bomb guard for source images (declared width × height).
      strategy: ``None`` (one device, or the ``tf.distribute`` strategy in scope), a ``tf.distribute.Strategy``,
        or ``"mirrored"`` / ``"multiworker"`` (cluster from ``TF_CONFIG``) / ``"tpu"`` (see
        :func:`keras_oneimage.distribute.resolve_strategy` and ``docs/distributed.md``). ``batch_size`` stays
        the global batch; each replica gets ``batch_size / replicas`` patches of its own.
      lr_scaling: ``"none"`` (default: the learning rate does not depend on the batch), ``"linear"`` or
        ``"sqrt"``: multiply the optimizer's rate(s) by ``batch_size / reference_batch`` (or its square root).
      reference_batch: the global batch the base learning rate is meant for (256, Goyal et al. 2017).
      precision: Keras dtype policy for the models: ``"float32"``, ``"mixed_bfloat16"``, ``"mixed_float16"``, or
        ``"auto"`` (``mixed_bfloat16`` on a CPU with AMX-BF16, else float32; 2.8x faster RotNet training at 64 px
        on such a CPU, docs/performance.md). Weights, taps and exports stay float32.
      max_minutes: a wall-clock budget: stop after the batch running when it runs out (that epoch is saved and
        counted as done). ``epochs`` stays the upper bound.
      **method_options: passed to the method class (e.g. ``num_clusters`` for DeepCluster).

    Returns:
      The trained method model; ``model.backbone`` is the AlexNet trunk.
    """
    import keras

    from keras_oneimage.data.augment import AugmentConfig
    from keras_oneimage.data.images import load_images
    from keras_oneimage.methods import registry
    from keras_oneimage.methods.base import FitContext

    import tensorflow as tf

    from keras_oneimage import distribute as distribute_lib

    # 1. Validate everything before anything is created on disk. The strategy first: a MultiWorkerMirroredStrategy
    # must exist before TensorFlow runs anything.
    strategy = distribute_lib.resolve_strategy(strategy)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    image_size = _positive_int("image_size", image_size)
    batch_size = _positive_int("batch_size", batch_size)
    if strategy is not None:
        distribute_lib.per_replica_batch_size(batch_size, strategy)
    lr_factor = distribute_lib.learning_rate_factor(batch_size, lr_scaling, reference_batch)
    epochs = _positive_int("epochs", epochs)
    steps_per_epoch = _positive_int("steps_per_epoch", steps_per_epoch)
    if max_minutes is not None:
        from keras_oneimage.training import TimeBudget

        callbacks = [*(callbacks or []), TimeBudget(max_minutes)]  # InputError on a bad value
    seed = validation.seed(seed)
    if output_dir is not None:
        output_dir = validation.utf8_path("output_dir", output_dir)
    method_cls = registry.get(method)
    variant = _variant_for(image_size, variant)
    if augment is None:
        augment = AugmentConfig()
    elif isinstance(augment, Mapping):
        augment = AugmentConfig(**augment)
    if strength is not None:
        augment = augment.scaled(float(strength))
    load_kwargs = {} if max_pixels is None else {"max_pixels": int(max_pixels)}
    images = load_images(image if image is not None else default_image_path(), **load_kwargs)
    for i, img in enumerate(images):
        if min(img.shape[:2]) < image_size:
            raise InputError(
                f"source image {i} is {img.shape[1]}x{img.shape[0]} px, smaller than the {image_size} px patch; "
                "use a larger image or a smaller image_size"
            )

    run_info = {
        "method": method_cls.method_name,
        "image_size": image_size,
        "batch_size": batch_size,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "seed": seed,
        "variant": variant,
        "augment": dataclasses.asdict(augment),
        "method_options": method_options,
        "image_sha256": _image_digest(images),
        "image_source": [str(p) for p in (image if isinstance(image, (list, tuple)) else [image])]
        if image is None or isinstance(image, (str, os.PathLike, list, tuple))
        else ["<array>"],
        "package_version": __version__,
    }
    if image is None:
        run_info["image_source"] = [default_image_path()]
    run_info["distribute"] = {
        "strategy": type(distribute_lib.current_strategy(strategy)).__name__,
        "replicas": distribute_lib.num_replicas(strategy),
        "lr_scaling": lr_scaling,
        "reference_batch": reference_batch,
    }

    # 2. Build the model and the data.
    from keras_oneimage.precision import precision_scope, resolve_precision
    from keras_oneimage.models.alexnet import AlexNet

    resolve_precision(precision)  # validate before anything is written

    keras.utils.set_random_seed(seed)
    # Under a strategy everything (weights, DeepCluster's pool, optimizer slots) is created in its scope.
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope, precision_scope(precision) as policy:
        backbone = AlexNet(variant=variant, image_size=method_cls.trunk_input_size(image_size),
                           **getattr(method_cls, "backbone_options", {}))
        model = method_cls(backbone=backbone, **method_options)
    run_info["precision"] = policy
    validation.check_step_memory(batch_size, _bytes_per_patch(backbone, image_size, method_cls),
                                 f"{method_cls.method_name} on {image_size}x{image_size} px patches")
    chief = distribute_lib.is_chief(strategy)
    found = _DirectoryState(output_dir) if output_dir is not None and chief else None
    out = _prepare_output_dir(output_dir, run_info, write=chief)
    context = FitContext(
        images=images,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        augment=augment,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        output_dir=distribute_lib.write_dir(out, strategy),  # a non-chief worker's scratch folder
    )
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    try:
        with scope:
            _fit_in_scope(model, context, strategy, optimizer, lr_factor, out, callbacks, verbose)
    except InputError:
        # Refused before training (e.g. a backup this method cannot resume): leave output_dir as it was found,
        # so that the run it holds can still be resumed by the command that made it.
        if found is not None:
            found.restore()
        raise
    return model


def _bytes_per_patch(backbone, image_size: int, method_cls) -> int:
    """A lower bound of the memory one patch of the batch needs in a training step (float32).

    The patch itself and, for each trunk pass (``views_per_patch``), every tap's activations, which must all be
    alive when the backward pass starts. Their gradients, the layers between taps, heads and optimizer state only
    add to it, so a batch refused on this estimate cannot run.
    """
    activations = 0
    feature_shapes = getattr(backbone, "feature_shapes", None)
    if feature_shapes is not None:
        activations = sum(int(np.prod(shape)) for tap, shape in feature_shapes(image_size).items() if tap != "output")
    per_view = image_size * image_size * 3 + activations
    return 4 * per_view * max(1, int(getattr(method_cls, "views_per_patch", 1)))


class _DirectoryState:
    """What `fit` found in ``output_dir`` (its top-level entries and ``run.json``), to put back after a refusal."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = pathlib.Path(output_dir)
        self.existed = self.path.is_dir()
        self.entries = set(os.listdir(self.path)) if self.existed else set()
        run_file = self.path / "run.json"
        self.run_json = run_file.read_bytes() if self.existed and run_file.is_file() else None

    def restore(self) -> None:
        import shutil

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
            run_file = self.path / "run.json"
            if self.run_json is not None and (not run_file.is_file() or run_file.read_bytes() != self.run_json):
                tmp = run_file.with_name(".run.json.tmp")
                tmp.write_bytes(self.run_json)
                os.replace(tmp, run_file)
        except OSError:
            pass  # best effort: the refusal's own message matters more


def _fit_in_scope(model, context, strategy, optimizer, lr_factor, out, callbacks, verbose) -> None:
    """The dataset, compile and training of `fit`, run inside the strategy's scope (if any)."""
    from keras_oneimage import distribute as distribute_lib
    from keras_oneimage.data.synthetic import patch_dataset
    from keras_oneimage.training import completed_epochs, run_training

    images, image_size, batch_size, augment, seed = (
        context.images, context.image_size, context.batch_size, context.augment, context.seed)
    epochs, steps_per_epoch = context.epochs, context.steps_per_epoch
    make_dataset = getattr(model, "make_dataset", None)
    if make_dataset is not None:
        dataset = make_dataset(context)
    else:
        # A resumed run continues the patch stream where the committed epochs left it.
        start_step = completed_epochs(out) * steps_per_epoch
        if strategy is not None:  # one seeded shard per worker, per-replica batches (docs/distributed.md)
            dataset = distribute_lib.distribute_patches(images, image_size=image_size, batch_size=batch_size,
                                                        augment=augment, seed=seed, strategy=strategy,
                                                        start_step=start_step)
        else:
            dataset = patch_dataset(images, image_size=image_size, batch_size=batch_size, augment=augment,
                                    seed=seed, start_step=start_step)
    if optimizer is not None or lr_factor != 1.0:
        optimizer = distribute_lib.optimizer_in_scope(optimizer, strategy)
        model.compile(optimizer=optimizer if optimizer is not None else model.default_optimizer())
        distribute_lib.scale_learning_rates(model, lr_factor)
    run_training(
        model,
        dataset,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        output_dir=None if out is None else str(out),
        callbacks=list(callbacks or []),
        context=context,
        verbose=verbose,
    )
    return model


def load_trained(checkpoint: str | os.PathLike):
    """Load a method model from ``model.keras`` or from a `fit` output_dir holding one."""
    from keras_oneimage.checkpoints import load_checkpoint

    return load_checkpoint(checkpoint)[0]


def probe(
    model_or_checkpoint: Any,
    dataset: Any = "cifar10",
    *,
    layers: Sequence[str] = ("conv1", "conv2", "conv3", "conv4", "conv5"),
    knn: bool = False,
    max_per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **probe_options: Any,
) -> dict[str, float]:
    """Per-layer linear-probe accuracy (paper §4) of a trained trunk on a labelled set.

    Args:
      model_or_checkpoint: a method model, an AlexNet, a ``model.keras`` path or a `fit` output_dir.
      dataset: ``"cifar10"`` (local copy or TFDS), a class-folder tree with ``train/`` and ``test/``, or a
        :class:`~keras_oneimage.data.labelled.LabelledData`.
      layers: taps to probe; all are trained in one pass over the data.
      knn: also run the cosine kNN (k=20) probe; its results are keyed ``knn_<layer>``.
      max_per_class: subsample each class (quick runs).
      **probe_options: ``epochs``, ``batch_size``, ``learning_rate``, ``split`` ("val" or "test"), ...

    Returns:
      ``{layer: top-1 accuracy in [0, 1]}`` (plus ``knn_<layer>`` entries when ``knn``).
    """
    from keras_oneimage.checkpoints import backbone_of
    from keras_oneimage.data.labelled import LabelledData, load_labelled
    from keras_oneimage.probes import knn_probe
    from keras_oneimage.probes import probe as linear_probe

    backbone = backbone_of(model_or_checkpoint)
    data = (
        dataset
        if isinstance(dataset, LabelledData)
        else load_labelled(dataset, val_fraction=val_fraction, seed=seed, max_per_class=max_per_class)
    )
    import tensorflow as tf

    try:
        results = linear_probe(backbone, data, layers=layers, seed=seed, **probe_options)
        if knn:
            split = probe_options.get("split", "test")
            knn_results = knn_probe(backbone, data, layers=layers, split=split)
            results.update({f"knn_{layer}": acc for layer, acc in knn_results.items()})
    except tf.errors.InvalidArgumentError as exc:  # a file of the labelled set that does not decode
        raise InputError(f"cannot read the labelled dataset {data.source or dataset!r}: {_tf_error_line(exc)}") \
            from None
    return results


def _tf_error_line(exc: Exception) -> str:
    """The informative line of a TensorFlow runtime error (not "Graph execution error:" or a node trace)."""
    from keras_oneimage.data.labelled import BAD_IMAGE_MESSAGE, TOO_LARGE_MESSAGE

    text = str(getattr(exc, "message", exc))
    for ours in (BAD_IMAGE_MESSAGE, TOO_LARGE_MESSAGE):
        if ours in text:  # our assertion: "... not a JPEG ... image:] [path]"
            tail = text.split(ours, 1)[1].strip().lstrip("]").strip().lstrip("[")
            return f"{ours} {tail.split(']', 1)[0]}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Graph execution error", "Detected at node", "File ", "[["))
              and "Traceback" not in ln]
    return (useful or lines or [type(exc).__name__])[-1][:300]
