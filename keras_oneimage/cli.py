"""`keras-oneimage fit|probe|export|finetune|serve|tune|demo`: the command line, on absl flags.

Bad input (a missing file, a bad flag value, …) prints one line on stderr and exits with status 2, never a
traceback. Each command has its own flag set; `keras-oneimage COMMAND --help` lists it.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from keras_oneimage import validation  # noqa: E402
from keras_oneimage.errors import InputError, NonFiniteLossError  # noqa: E402

PROG = "keras-oneimage"


class UsageError(Exception):
    """Bad command line (exit 2)."""


#: The AugmentConfig fields `fit` takes as flags (their meaning and valid range are read from augment.RANGES).
AUGMENT_FLAGS = ("min_area", "aspect", "max_rotation", "flip_prob")


def _augment_flags(fv: flags.FlagValues) -> None:
    import dataclasses

    from keras_oneimage.data.recipe import RANGES, AugmentConfig  # no TensorFlow: --help stays instant

    flags.DEFINE_float("strength", None, "Scale every augmentation (1 = paper defaults, 0 = none).", flag_values=fv)
    paper = {f.name: f.default for f in dataclasses.fields(AugmentConfig)}
    for name in AUGMENT_FLAGS:
        valid = RANGES[name]
        flags.DEFINE_float(name, None, f"{valid.doc}; valid: {valid.interval()} (paper: {paper[name]:g}).", flag_values=fv)


def _augment_from_flags(fv: flags.FlagValues):
    from keras_oneimage.data.recipe import AugmentConfig

    return AugmentConfig(**{name: getattr(fv, name) for name in AUGMENT_FLAGS if getattr(fv, name) is not None})


def _trunk_flag(fv: flags.FlagValues) -> None:
    # A string, checked by the training core against the trunk registry (importing it here would load TensorFlow
    # for --help).
    flags.DEFINE_string("trunk", "alexnet", "The trunk to train: alexnet (the paper's) or resnet18.", flag_values=fv)


def _methods_help() -> str:
    from keras_oneimage.methods import registry  # no TensorFlow: the built-in methods are listed by name

    return f"Self-supervised method: {', '.join(registry.available())}."


def _check_output_file(flag: str, value: str | None) -> None:
    """A ``--flag`` naming a file to write must be a file path in an existing directory (checked up front)."""
    if value:
        parent = os.path.dirname(os.path.abspath(value))
        if os.path.isdir(value) or not os.path.isdir(parent):
            raise UsageError(f"--{flag}={value!r}: expected a file path in an existing directory")


def _split_list(value: str | None) -> list[str]:
    return [] if not value else [v.strip() for v in value.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------------------- fit
def _fit_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string(
        "image", None, "Source image path (repeat for N images). Default: an embedded photograph.", flag_values=fv
    )
    flags.DEFINE_string("method", "rotnet", _methods_help(), flag_values=fv)
    flags.DEFINE_integer("image_size", 64, "Patch side in pixels.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Global batch size.", flag_values=fv)
    flags.DEFINE_integer("epochs", 10, "Epochs.", flag_values=fv)
    flags.DEFINE_integer("steps_per_epoch", 100, "Steps per epoch.", flag_values=fv)
    flags.DEFINE_float("max_minutes", None, "Wall-clock budget: stop after this many minutes (--epochs stays "
                       "the upper bound); the last epoch is saved as usual.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed (patches and weights).", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where checkpoints and logs go (default: runs/<method>).", flag_values=fv)
    flags.DEFINE_string("variant", None, "Stem: cifar or imagenet (default: from the trunk's input size).", flag_values=fv)
    _trunk_flag(fv)
    flags.DEFINE_integer("max_pixels", None, "Refuse source images with more declared pixels.", flag_values=fv)
    flags.DEFINE_enum("strategy", None, ["mirrored", "multiworker", "tpu"],
                      "tf.distribute strategy (default: one device). See docs/distributed.md.", flag_values=fv)
    flags.DEFINE_enum("lr_scaling", "none", ["none", "linear", "sqrt"],
                      "Scale the learning rate with batch_size / reference_batch.", flag_values=fv)
    flags.DEFINE_integer("reference_batch", 256, "The batch the base learning rate is meant for.", flag_values=fv)
    flags.DEFINE_enum("precision", "float32", ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
                      "Compute precision ('auto': bf16 on CPUs with AMX or AVX512-BF16, 1.6-2.8x faster; docs/performance.md).",
                      flag_values=fv)
    flags.DEFINE_multi_string(
        "method_option", None, "A method's own option as NAME=VALUE (repeat for several), passed to fit() as a "
        "keyword: e.g. num_clusters=200 or sobel=False for deepcluster. VALUE is read as a Python literal "
        "(number, True/False, tuple), else kept as text.", flag_values=fv)
    _augment_flags(fv)


def _method_options(pairs: Sequence[str] | None) -> dict:
    """``["num_clusters=200", "sobel=False"]`` → ``{"num_clusters": 200, "sobel": False}`` (UsageError if malformed)."""
    import ast

    options = {}
    for pair in pairs or ():
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(f"--method_option={pair!r}: expected NAME=VALUE, e.g. num_clusters=200")
        if name in options:
            raise UsageError(f"--method_option {name} is given twice")
        try:
            options[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[name] = text.strip()
    return options


def _fit(fv: flags.FlagValues) -> int:
    from keras_oneimage import api

    images = fv.image or None
    if images is not None and len(images) == 1:
        images = images[0]
    output_dir = fv.output_dir or os.path.join("runs", fv.method)
    api.fit(
        images,
        method=fv.method,
        image_size=fv.image_size,
        batch_size=fv.batch_size,
        epochs=fv.epochs,
        steps_per_epoch=fv.steps_per_epoch,
        seed=fv.seed,
        augment=_augment_from_flags(fv),
        strength=fv.strength,
        variant=fv.variant,
        trunk=fv.trunk,
        output_dir=output_dir,
        max_pixels=fv.max_pixels,
        strategy=fv.strategy,
        lr_scaling=fv.lr_scaling,
        reference_batch=fv.reference_batch,
        precision=fv.precision,
        max_minutes=fv.max_minutes,
        **_method_options(fv.method_option),
    )
    print(f"trained model saved in {output_dir}/model.keras; conv1 filters in {output_dir}/conv1_filters.png")
    return 0


# --------------------------------------------------------------------------------------------------------- probe
def _probe_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "A model.keras file or a fit output_dir.", flag_values=fv)
    flags.DEFINE_string("dataset", "cifar10", "'cifar10' or a class-folder tree with train/ and test/.", flag_values=fv)
    flags.DEFINE_string("layers", None, "Comma-separated taps to probe (default: every tap of the trunk, conv1-conv5 of "
                        "an AlexNet, stem,stage1-stage4 of a ResNet-18).", flag_values=fv)
    flags.DEFINE_string("protocol", "cifar", "Probe protocol: 'cifar' (the trunk's input size, "
                      "taps pooled to ~9k dims), 'coarse' (~1k dims), 'paper' (the authors' 224 px protocol: fixed "
                      "pools, random-resized crops; see docs/probes.md).", flag_values=fv)
    flags.DEFINE_integer("epochs", 36, "Probe training epochs (paper: 36).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 192, "Probe batch size (paper: 192).", flag_values=fv)
    flags.DEFINE_float("learning_rate", None, "Probe SGD learning rate (default: the probe module's).", flag_values=fv)
    flags.DEFINE_enum("split", "test", ["val", "test"], "Split to report accuracy on.", flag_values=fv)
    flags.DEFINE_integer("max_per_class", None, "Subsample each class (quick runs).", flag_values=fv)
    flags.DEFINE_bool("augment", True, "The paper's augmented probe; --noaugment trains the probes on cached "
                      "taps (the trunk runs once per image: much faster, no augmentation).", flag_values=fv)
    flags.DEFINE_bool("knn", False, "Also run the cosine kNN (k=20) probe.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
    flags.DEFINE_string("output", None, "Also write the results as JSON to this file.", flag_values=fv)


def _probe(fv: flags.FlagValues) -> int:
    import json

    from keras_oneimage import api

    if not fv.checkpoint:
        raise UsageError("--checkpoint is required")
    if fv.layers is not None and not _split_list(fv.layers):
        raise UsageError("--layers must name at least one tap, e.g. --layers=conv1,conv2")
    _check_output_file("output", fv.output)  # before the probes run, not after
    options = {"epochs": fv.epochs, "batch_size": fv.batch_size, "split": fv.split, "augment": fv.augment,
               "protocol": fv.protocol}
    if fv.learning_rate is not None:
        options["learning_rate"] = fv.learning_rate
    results = api.probe(
        fv.checkpoint,
        fv.dataset,
        layers=None if fv.layers is None else _split_list(fv.layers),
        knn=fv.knn,
        max_per_class=fv.max_per_class,
        seed=fv.seed,
        **options,
    )
    for layer, acc in results.items():
        print(f"{layer:10s} {100 * acc:6.2f}%")
    if fv.output:
        with open(fv.output, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


# -------------------------------------------------------------------------------------------------------- export
def _export_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "A model.keras file or a fit output_dir.", flag_values=fv)
    flags.DEFINE_string("layers", None, "Comma-separated taps the SavedModel returns (default: the trunk's first two, "
                        "conv1,conv2 of an AlexNet).", flag_values=fv)
    flags.DEFINE_string("name", None, "Model name: the export goes to <base_dir>/<name>/<version>.", flag_values=fv)
    flags.DEFINE_string("base_dir", "exported_models", "Where exported models live.", flag_values=fv)


def _export(fv: flags.FlagValues) -> int:
    from keras_oneimage.export import export

    if not fv.checkpoint:
        raise UsageError("--checkpoint is required")
    if not fv.name:
        raise UsageError("--name is required")
    if os.sep in fv.name or fv.name in (".", ".."):
        raise UsageError(f"--name must be a plain name, got {fv.name!r}")
    validation.utf8_path("--name", fv.name)  # before the base dir is created
    version_dir = export(fv.checkpoint, os.path.join(fv.base_dir, fv.name), layers=None if fv.layers is None else _split_list(fv.layers))
    print(f"exported {fv.layers or 'the first two taps'} to {version_dir}")
    return 0


# ------------------------------------------------------------------------------------------------------ finetune
def _finetune_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("source", None, "Where the frozen layers come from: a model.keras, a fit output_dir, an "
                        "exported model (base dir or version dir), or 'random'.", flag_values=fv)
    flags.DEFINE_string("dataset", "cifar10", "'cifar10' or a class-folder tree with train/ and test/.", flag_values=fv)
    flags.DEFINE_string("freeze", None, "Comma-separated taps kept frozen ('' trains everything; default: the "
                        "trunk's early layers, conv1,conv2 of an AlexNet, stem,stage1 of a ResNet-18).",
                        flag_values=fv)
    flags.DEFINE_string("trunk", None, "Architecture of a --source=random trunk: alexnet (default) or resnet18; "
                        "other sources bring their own.", flag_values=fv)
    flags.DEFINE_integer("epochs", 10, "Training epochs (cosine learning-rate decay over all of them).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 128, "Batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", 0.01, "SGD learning rate (momentum 0.9).", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "Input side (default: the source trunk's).", flag_values=fv)
    flags.DEFINE_integer("max_per_class", None, "Subsample each class (quick runs).", flag_values=fv)
    flags.DEFINE_float("max_minutes", None, "Wall-clock budget: stop training after this many minutes.",
                       flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
    flags.DEFINE_enum("front_end", "alexnet", ["alexnet", "scattering"], "In place of the early layers: the "
                      "source's own (any trunk), or a fixed scattering transform (J=2, L=8; needs "
                      "keras-oneimage[scattering]) with the rest of the same AlexNet trained on it (paper Table 4).",
                      flag_values=fv)
    flags.DEFINE_string("output", None, "Write the result summary (accuracies, history) as JSON here.",
                        flag_values=fv)
    flags.DEFINE_string("save", None, "Save the trained classifier as a .keras file here.", flag_values=fv)


def _finetune(fv: flags.FlagValues) -> int:
    import json

    from keras_oneimage.transfer import finetune
    from keras_oneimage.training import TimeBudget

    if not fv.source:
        raise UsageError("--source is required (a checkpoint, an exported model, or 'random')")
    for flag in ("output", "save"):  # checked before training, not after
        _check_output_file(flag, getattr(fv, flag))
    if fv.save and not fv.save.endswith(".keras"):
        raise UsageError(f"--save={fv.save!r}: the file name must end in .keras")
    callbacks = [TimeBudget(fv.max_minutes)] if fv.max_minutes is not None else None
    result = finetune(
        fv.source,
        fv.dataset,
        freeze=None if fv.freeze is None else _split_list(fv.freeze),
        epochs=fv.epochs,
        batch_size=fv.batch_size,
        learning_rate=fv.learning_rate,
        image_size=fv.image_size,
        max_per_class=fv.max_per_class,
        seed=fv.seed,
        callbacks=callbacks,
        verbose=2,
        front_end=fv.front_end,
        trunk=fv.trunk,
    )
    val = "n/a" if result.val_accuracy is None else f"{100 * result.val_accuracy:.2f}%"
    print(f"frozen {','.join(result.frozen) or 'nothing'} from {result.source}: "
          f"test accuracy {100 * result.test_accuracy:.2f}%, val {val}, {result.epochs_run} epochs, "
          f"{result.images_seen:,} images seen")
    if fv.output:
        with open(fv.output, "w") as fh:
            json.dump(result.as_dict(), fh, indent=2)
    if fv.save:
        result.model.save(fv.save)
    return 0


# --------------------------------------------------------------------------------------------------------- serve
def _serve_flags(fv: flags.FlagValues) -> None:
    from keras_oneimage.serve import limits, server  # no TensorFlow import: cheap enough for --help

    flags.DEFINE_string("model_base_path", None, "exported_models/<name> (holds numbered versions).", flag_values=fv)
    flags.DEFINE_string("model_name", None, "Name in the URL (default: the base path's last part).", flag_values=fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind.", flag_values=fv)
    flags.DEFINE_integer("port", 8501, "Port (TF Serving's REST default is 8501).", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("max_batch_size", 8, "Server-side batching: most images per model call.", flag_values=fv)
    flags.DEFINE_integer("grpc_port", 0, "Also serve TF Serving's gRPC API on this port (TF Serving's default is "
                         "8500); 0: no gRPC.", lower_bound=0, upper_bound=65535, flag_values=fv)
    for name, default, help_text in (
        ("max_instances", limits.DEFAULT_MAX_INSTANCES, "Most instances (images) per predict request (413 beyond)."),
        ("max_pixels", limits.DEFAULT_MAX_PIXELS, "Most pixels (height x width) per image (413 beyond)."),
        ("max_output_elements", limits.DEFAULT_MAX_OUTPUT_ELEMENTS, "Most output values per request (413 beyond)."),
        ("max_body_bytes", server.DEFAULT_MAX_BODY_BYTES, "Most bytes per request body or gRPC message."),
    ):
        flags.DEFINE_integer(name, default, help_text, lower_bound=1, flag_values=fv)
    flags.DEFINE_float("header_timeout", server.DEFAULT_HEADER_TIMEOUT,
                       "Seconds a connection may take to send a request's headers.", lower_bound=0.001, flag_values=fv)
    flags.DEFINE_float("body_timeout", server.DEFAULT_BODY_TIMEOUT,
                       "Seconds a request may take to send its body (408 beyond).", lower_bound=0.001, flag_values=fv)

def _serve(fv: flags.FlagValues) -> int:
    from keras_oneimage.serve import serve

    if not fv.model_base_path:
        raise UsageError("--model_base_path is required")
    serve(
        fv.model_base_path,
        host=fv.host,
        port=fv.port,
        model_name=fv.model_name,
        max_batch_size=fv.max_batch_size,
        grpc_port=fv.grpc_port or None,
        max_instances=fv.max_instances,
        max_pixels=fv.max_pixels,
        max_output_elements=fv.max_output_elements,
        max_body_bytes=fv.max_body_bytes,
        header_timeout=fv.header_timeout,
        body_timeout=fv.body_timeout,
    )
    return 0


# ---------------------------------------------------------------------------------------------------------- tune
def _tune_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("image", None, "Source image path (repeat for N). Default: embedded photo.", flag_values=fv)
    flags.DEFINE_string("method", "rotnet", _methods_help(), flag_values=fv)
    flags.DEFINE_string("dataset", "cifar10", "Labelled set to score on (its validation split).", flag_values=fv)
    flags.DEFINE_string("objective", "conv2", "Probe layer to maximise, or 'mean:conv1,conv2'.", flag_values=fv)
    flags.DEFINE_enum("algorithm", "bayesian", ["bayesian", "hyperband", "random"], "Search algorithm.", flag_values=fv)
    flags.DEFINE_integer("max_trials", 10, "Trials (bayesian/random).", flag_values=fv)
    flags.DEFINE_string("directory", "tuning", "Tuner directory (rerun to resume).", flag_values=fv)
    flags.DEFINE_string("project_name", None, "Tuner project name (default: from method).", flag_values=fv)
    flags.DEFINE_integer("image_size", 32, "Patch side in pixels.", flag_values=fv)
    flags.DEFINE_integer("epochs", 2, "Training epochs per trial (hyperband: the maximum).", flag_values=fv)
    flags.DEFINE_integer("steps_per_epoch", 100, "Steps per epoch.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Batch size.", flag_values=fv)
    flags.DEFINE_integer("max_per_class", None, "Subsample each class of the labelled set.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
    _trunk_flag(fv)


def _tune(fv: flags.FlagValues) -> int:
    from keras_oneimage.tuning import tune

    images = fv.image or None
    if images is not None and len(images) == 1:
        images = images[0]
    result = tune(
        images,
        method=fv.method,
        objective=fv.objective,
        dataset=fv.dataset,
        max_trials=fv.max_trials,
        algorithm=fv.algorithm,
        directory=fv.directory,
        project_name=fv.project_name,
        image_size=fv.image_size,
        epochs=fv.epochs,
        steps_per_epoch=fv.steps_per_epoch,
        batch_size=fv.batch_size,
        max_per_class=fv.max_per_class,
        seed=fv.seed,
        trunk=fv.trunk,
    )
    print(f"best hyperparameters: {result.best_hyperparameters}")
    return 0


# ---------------------------------------------------------------------------------------------------------- demo
def _demo_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("output_dir", "demo_output", "Where model.keras and demo.png go.", flag_values=fv)
    flags.DEFINE_string("image", None, "Source image (default: the embedded photograph).", flag_values=fv)
    flags.DEFINE_integer("image_size", 32, "Patch side in pixels.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Patches per step.", flag_values=fv)
    flags.DEFINE_integer("epochs", 3, "Epochs.", flag_values=fv)
    flags.DEFINE_integer("steps_per_epoch", 40, "Steps per epoch.", flag_values=fv)
    flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
                      "Compute precision (as for fit).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)


def _demo(fv: flags.FlagValues) -> int:
    from keras_oneimage.demo import run_demo

    result = run_demo(fv.output_dir, image=fv.image, image_size=fv.image_size, batch_size=fv.batch_size,
                      epochs=fv.epochs, steps_per_epoch=fv.steps_per_epoch, precision=fv.precision, seed=fv.seed)
    pairs = ", ".join(f"{layer} {100 * result.probe['random'][layer]:.0f}% -> {100 * acc:.0f}%"
                      for layer, acc in result.probe["trained"].items())
    print(f"probe accuracy, untrained -> trained trunk (chance {100 * result.chance:.0f}%): {pairs}")
    print(f"trained model: {result.checkpoint}")
    print(f"the picture: {result.picture}")
    return 0


# -------------------------------------------------------------------------------------------------------- invert
def _invert_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("image", None, "Image to reconstruct (default: the embedded photograph).", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "The trunk: a model.keras file, a fit output_dir, or an exported model "
                        "(version or base dir).", flag_values=fv)
    flags.DEFINE_bool("random", False, "Invert through an untrained trunk (He-normal from --seed) instead.",
                      flag_values=fv)
    flags.DEFINE_string("layer", "conv2", "Tap whose features are inverted: conv1 ... conv5.", flag_values=fv)
    flags.DEFINE_string("output", "inversion.png", "Where the reconstruction is written (PNG).", flag_values=fv)
    flags.DEFINE_integer("steps", 300, "Gradient steps on the pixels.", flag_values=fv)
    flags.DEFINE_integer("size", None, "Side of the square reconstruction (default: the trunk's input size; "
                         "32 for --random).", flag_values=fv)
    flags.DEFINE_float("tv_weight", None, "Weight of the total-variation prior (default: per layer).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the starting noise (and of a --random trunk).", flag_values=fv)


def _invert(fv: flags.FlagValues) -> int:
    from keras_oneimage import api
    from keras_oneimage.applications.inversion import invert_features, save_png

    if bool(fv.checkpoint) == bool(fv.random):
        raise UsageError("give exactly one trunk: --checkpoint PATH or --random")
    if not fv.output.lower().endswith(".png"):
        raise UsageError(f"--output={fv.output!r}: the file name must end in .png")
    _check_output_file("output", fv.output)
    image, record = invert_features("random" if fv.random else fv.checkpoint, fv.image or api.default_image_path(),
                                    fv.layer, steps=fv.steps, seed=fv.seed, size=fv.size, tv_weight=fv.tv_weight)
    save_png(image, fv.output)
    print(f"{fv.layer} inversion ({record.trunk}, {record.steps} steps): PSNR {record.psnr:.2f} dB, feature loss "
          f"{record.initial_feature_loss:.3g} -> {record.feature_loss:.3g}")
    print(fv.output)
    return 0


COMMANDS: dict[str, tuple[str, Callable[[flags.FlagValues], None], Callable[[flags.FlagValues], int]]] = {
    "fit": ("train a self-supervised method on one image", _fit_flags, _fit),
    "probe": ("per-layer linear-probe accuracy of a trained trunk", _probe_flags, _probe),
    "export": ("export frozen early layers as a TF Serving SavedModel", _export_flags, _export),
    "finetune": ("train a classifier on a labelled set with early layers frozen (paper Table 4)",
                 _finetune_flags, _finetune),
    "serve": ("serve an exported model over TF Serving's REST API (and gRPC with --grpc_port)", _serve_flags, _serve),
    "tune": ("Keras Tuner search over augmentation strength, scored by probes", _tune_flags, _tune),
    "demo": ("train on one photograph and draw what was learned (make demo)", _demo_flags, _demo),
    "invert": ("reconstruct an image from its conv1/conv2 features (feature inversion)", _invert_flags, _invert),
}


def _usage() -> str:
    lines = [f"usage: {PROG} COMMAND [--flag=value ...]", "", "commands:"]
    lines += [f"  {name:8s} {help_}" for name, (help_, _, _) in COMMANDS.items()]
    lines.append(f"\n`{PROG} COMMAND --help` lists a command's flags.")
    return "\n".join(lines)


def _import_tensorflow_quietly() -> None:
    """Import TF and discover devices with fd 2 silenced: TF 2.21's C++ start-up logs ignore TF_CPP_MIN_LOG_LEVEL.

    Python exceptions still propagate; only the C++ INFO/ERROR chatter at start-up (oneDNN notice, missing CUDA
    driver on CPU machines) is dropped. Set KERAS_ONEIMAGE_DEBUG=1 to see it.
    """
    if "tensorflow" in sys.modules or os.environ.get("KERAS_ONEIMAGE_DEBUG"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: Sequence[str]) -> int:
    """Run the command line `argv` (argv[0] is the program name); return the exit status."""
    argv = list(argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    if command not in COMMANDS:
        print(f"{PROG}: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _, define, execute = COMMANDS[command]
    fv = flags.FlagValues()
    define(fv)
    rest = argv[2:]
    if any(a in ("-h", "--help", "-help") for a in rest):
        print(f"usage: {PROG} {command} [--flag=value ...]\n\n{fv.get_help()}")
        return 0
    try:
        leftover = fv([f"{PROG} {command}"] + rest)
        if len(leftover) > 1:
            raise UsageError(f"unexpected argument {leftover[1]!r}")
        _import_tensorflow_quietly()
        return execute(fv)
    except (flags.Error, UsageError, InputError) as exc:
        print(f"{PROG} {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"{PROG} {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG} {command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, the traceback on request
        if os.environ.get("KERAS_ONEIMAGE_DEBUG"):
            raise
        print(
            f"{PROG} {command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(set KERAS_ONEIMAGE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
