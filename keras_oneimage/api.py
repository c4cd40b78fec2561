"""The user-facing functions: a thin façade. Training goes through :mod:`keras_oneimage.trainer`, probing through
:mod:`keras_oneimage.probes`; these functions only check what is theirs and wire the parts together."""
from __future__ import annotations

import os
from typing import Any, Sequence

from keras_oneimage import validation
from keras_oneimage.errors import InputError
from keras_oneimage.trainer import DEFAULT_IMAGE_NAME, default_image_path  # noqa: F401  (public names, kept here)


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
    trunk: str = "alexnet",
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
      method: a registered method name: ``"rotnet"``, ``"deepcluster"``, ``"bigan"`` or ``"jigsaw"``
        (:func:`keras_oneimage.methods.registry.available`).
      image_size: patch side in pixels (32/64 on CPU; the paper uses 224).
      batch_size: the global batch of source patches per step.
      epochs, steps_per_epoch: training length; an epoch is ``steps_per_epoch`` batches of fresh patches.
      seed: seeds the patch stream and the weights; the same seed gives the same run.
      augment: an :class:`~keras_oneimage.data.augment.AugmentConfig` (paper defaults when ``None``).
      strength: if given, scales every augmentation (``augment.scaled(strength)``); 1 = paper defaults.
      variant: the stem, ``"cifar"`` (32/64 px) or ``"imagenet"`` (from 128 px); chosen from the trunk's input size
        if None.
      trunk: ``"alexnet"`` (the paper's) or ``"resnet18"`` (:func:`keras_oneimage.models.registry.available_trunks`).
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
        ``"auto"`` (``mixed_bfloat16`` on a CPU with AMX-BF16 or AVX512-BF16, else float32; 2.8x faster RotNet training at 64 px
        on such a CPU, docs/performance.md). Weights, taps and exports stay float32.
      max_minutes: a wall-clock budget: stop after the batch running when it runs out (that epoch is saved and
        counted as done). ``epochs`` stays the upper bound.
      **method_options: passed to the method class (e.g. ``num_clusters`` for DeepCluster); one that names a
        trunk option of the method (DeepCluster's ``sobel``) also sets how the trunk is built.

    Returns:
      The trained method model; ``model.backbone`` is the AlexNet trunk.
    """
    import tensorflow as tf

    from keras_oneimage import distribute as distribute_lib
    from keras_oneimage import trainer

    # Everything is checked before anything is created on disk. The strategy first: a MultiWorkerMirroredStrategy
    # must exist before TensorFlow runs anything.
    strategy = distribute_lib.resolve_strategy(strategy)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    if max_minutes is not None:
        from keras_oneimage.training import TimeBudget

        callbacks = [*(callbacks or []), TimeBudget(max_minutes)]  # InputError on a bad value
    if output_dir is not None:
        output_dir = validation.utf8_path("output_dir", output_dir)
    run = trainer.prepare_run(
        image, method, image_size=image_size, batch_size=batch_size, epochs=epochs,
        steps_per_epoch=steps_per_epoch, seed=seed, augment=augment, strength=strength, variant=variant,
        method_options=method_options, precision=precision, max_pixels=max_pixels, trunk=trunk,
    )  # fmt: skip
    if strategy is not None:
        distribute_lib.per_replica_batch_size(run.batch_size, strategy)
    lr_factor = distribute_lib.learning_rate_factor(run.batch_size, lr_scaling, reference_batch)
    record = trainer.run_record(run, image, distribute={
        "strategy": type(distribute_lib.current_strategy(strategy)).__name__,
        "replicas": distribute_lib.num_replicas(strategy),
        "lr_scaling": lr_scaling,
        "reference_batch": reference_batch,
    })  # fmt: skip
    return trainer.train(run, output_dir=output_dir, record=record, strategy=strategy, optimizer=optimizer,
                         lr_factor=lr_factor, callbacks=callbacks, verbose=verbose)


def load_trained(checkpoint: str | os.PathLike):
    """Load a method model from ``model.keras`` or from a `fit` output_dir holding one."""
    from keras_oneimage.checkpoints import load_checkpoint

    return load_checkpoint(checkpoint)[0]


def probe(
    model_or_checkpoint: Any,
    dataset: Any = "cifar10",
    *,
    layers: Sequence[str] | None = None,
    knn: bool = False,
    max_per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **probe_options: Any,
) -> dict[str, float]:
    """Per-layer linear-probe accuracy (paper §4) of a trained trunk on a labelled set.

    Args:
      model_or_checkpoint: a method model, a trunk (AlexNet, ResNet18), a ``model.keras`` path or a `fit`
        output_dir.
      dataset: ``"cifar10"`` (local copy or TFDS), a class-folder tree with ``train/`` and ``test/``, or a
        :class:`~keras_oneimage.data.labelled.LabelledData`.
      layers: taps to probe (``None``: every tap of the trunk, conv1-conv5 of an AlexNet); all are trained in one
        pass over the data.
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
