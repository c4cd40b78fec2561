"""Export the frozen early layers of a trained trunk as a TF-Serving-ready, versioned SavedModel.

Layout (TensorFlow Serving's): ``base_dir/<version>/`` with ``saved_model.pb``, ``variables/`` and, beside them,
``keras_oneimage.json`` (what was exported, from what, and how to feed it). The version is the next integer after
the numeric sub-directories already in ``base_dir``, starting at 1. The export is written into a hidden
``base_dir/.tmp-<uuid>`` first and renamed into place, so a server polling ``base_dir`` never sees a half-written
version (TF Serving only considers all-digit directory names).

Signatures (all return a dict ``{layer name: float32 (B, h, w, C)}``, the post-ReLU activations of each tap):

``serving_default``  ``images``: ``float32 (B, H, W, 3)``, RGB in ``[0, 1]``
``serving_uint8``    ``images``: ``uint8 (B, H, W, 3)``, RGB in ``[0, 255]`` (divided by 255 inside)
``serving_bytes``    ``image_bytes``: ``string (B,)``, encoded JPEG / PNG / GIF / BMP files, all of one size

``H`` and ``W`` are free but must be at least ``min_size`` (recorded in the metadata and in the error a smaller
image gets); the trunk normalises its input inside, so the export carries its own preprocessing.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Mapping, Sequence

from keras_oneimage import validation
from keras_oneimage.checkpoints import load_checkpoint
from keras_oneimage.errors import InputError
from keras_oneimage.files import file_sha256

METADATA_FILE = "keras_oneimage.json"
DEFAULT_SIGNATURE = "serving_default"
UINT8_SIGNATURE = "serving_uint8"
BYTES_SIGNATURE = "serving_bytes"
SIGNATURES = (DEFAULT_SIGNATURE, UINT8_SIGNATURE, BYTES_SIGNATURE)
IMAGE_INPUT = "images"
BYTES_INPUT = "image_bytes"
#: Largest side probed when searching for the smallest accepted image (no built-in trunk needs more).
_MAX_PROBE_SIZE = 1024
_VERSION_RE = re.compile(r"^[0-9]+$")
_TMP_PREFIX = ".tmp-"


def numeric_versions(base_dir: str | os.PathLike) -> list[int]:
    """The version numbers (all-digit sub-directory names) under ``base_dir``, ascending; [] if it is missing."""
    base = pathlib.Path(base_dir)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def _run_info_for(checkpoint: pathlib.Path) -> dict[str, Any]:
    """``run.json`` written by ``fit`` beside the checkpoint, if there is a readable one."""
    run_file = checkpoint.parent / "run.json"
    try:
        return json.loads(run_file.read_text())
    except (OSError, ValueError):
        return {}


def _resolve_backbone(model_or_backbone: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(backbone, method model or None, provenance dict) for a model, a backbone, or a checkpoint path."""
    provenance: dict[str, Any] = {}
    model = model_or_backbone
    if isinstance(model_or_backbone, (str, os.PathLike)):
        model, ckpt = load_checkpoint(model_or_backbone)
        provenance["checkpoint"] = str(ckpt.resolve())
        provenance["checkpoint_sha256"] = file_sha256(ckpt)
        run_info = _run_info_for(ckpt)
        if run_info:
            provenance["training"] = run_info
    backbone = getattr(model, "backbone", None)
    method = model if backbone is not None else None
    if backbone is None:
        backbone = model
    if not callable(getattr(backbone, "features", None)):
        raise InputError(
            f"cannot export {type(model).__name__}: expected a method model with a .backbone, a backbone with "
            "a .features(x, layers) method, or a path to a model.keras checkpoint"
        )
    if method is not None:
        provenance.setdefault("method", getattr(method, "method_name", type(method).__name__))
    return backbone, method, provenance


def _check_layers(backbone: Any, layers: Sequence[str] | str | None) -> tuple[str, ...]:
    """The taps to export, checked against the trunk's ``TAPS`` (AlexNet's for a trunk that names none);
    ``None``: the trunk's first two taps (conv1-conv2 of an AlexNet, stem and stage1 of a ResNet-18)."""
    if layers is None:
        layers = tuple(getattr(backbone, "TAPS", ("conv1", "conv2")))[:2]
    taps = getattr(backbone, "TAPS", None)
    if taps is None:
        from keras_oneimage.models.alexnet import AlexNet

        taps = AlexNet.TAPS
    return validation.layer_names(layers, taps)


def output_shapes(backbone: Any, layers: tuple[str, ...], size: int) -> dict[str, tuple[int, int, int]] | None:
    """``{layer: (h, w, c)}`` for a ``size`` x ``size`` input, or None if a requested map would be empty.

    Read from the trunk's own shape arithmetic (``feature_shapes``) when it has one; otherwise found by graph
    shape inference (tracing, no kernel runs): running conv / pool kernels on inputs that are too small can crash
    the process rather than raise.
    """
    if callable(getattr(backbone, "feature_shapes", None)):
        every = backbone.feature_shapes(size)
        shapes = {name: tuple(int(d) for d in every[name]) for name in layers}
    else:
        import tensorflow as tf

        fn = tf.function(lambda x: backbone.features(x, layers=layers, training=False), autograph=False)
        try:
            concrete = fn.get_concrete_function(tf.TensorSpec((1, size, size, 3), tf.float32))
            shapes = {name: tuple(concrete.structured_outputs[name].shape[1:]) for name in layers}
        except Exception:  # TF / Keras raise ValueError for negative output sizes during shape inference
            return None
    if any(d is not None and d < 1 for shape in shapes.values() for d in shape):
        return None
    return shapes


def find_min_size(backbone: Any, layers: Sequence[str]) -> int:
    """The smallest square side for which every requested layer gives a non-empty map (binary search)."""
    layers = tuple(layers)
    hi = next((s for s in (32, 64, 128, 256, 512, _MAX_PROBE_SIZE) if output_shapes(backbone, layers, s)), None)
    if hi is None:
        raise InputError(f"the backbone gives no output for layers {list(layers)} even at {_MAX_PROBE_SIZE} px")
    lo = 0  # invariant: lo fails (or is 0), hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if output_shapes(backbone, layers, mid):
            hi = mid
        else:
            lo = mid
    return hi


def _next_version(base: pathlib.Path) -> int:
    versions = numeric_versions(base)
    return (versions[-1] + 1) if versions else 1


def _json_default(obj: Any) -> Any:
    import dataclasses

    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def build_archive(backbone: Any, layers: tuple[str, ...], min_size: int):
    """A ``keras.export.ExportArchive`` with the three serving signatures over ``backbone.features``, frozen.

    The signatures read non-trainable copies of the trunk's variables (mapped in with a ``keras.StatelessScope``),
    so the SavedModel records every variable as non-trainable (its proto takes the flag from the ``tf.Variable``
    it saves) and the caller's model is never touched. The copies keep the trunk's variable paths as names
    (``alexnet/conv1/conv/kernel``): `keras_oneimage.transfer` rebuilds a trunk from an export by them.
    """
    import keras
    import tensorflow as tf

    if not getattr(backbone, "built", True):
        backbone.build()  # an AlexNet builds for its own image_size; its variables must exist to be copied
    frozen = [(v, tf.Variable(v.value, trainable=False, name=v.path)) for v in backbone.variables]
    archive = keras.export.ExportArchive()
    archive.variables.extend(copy for _, copy in frozen)
    archive.non_trainable_variables.extend(copy for _, copy in frozen)
    size_message = (
        f"images must be at least {min_size}x{min_size} pixels (height x width) for layers "
        f"{','.join(layers)} of this export"
    )

    def features(images):  # float32 (B, H, W, 3) in [0, 1]
        shape = tf.shape(images)
        checks = [
            tf.debugging.assert_greater_equal(shape[1], min_size, message=size_message + "; got height"),
            tf.debugging.assert_greater_equal(shape[2], min_size, message=size_message + "; got width"),
        ]
        with tf.control_dependencies(checks):
            images = tf.identity(images)
        with keras.StatelessScope(state_mapping=frozen):
            out = backbone.features(images, layers=layers, training=False)
        return {name: tf.cast(out[name], tf.float32) for name in layers}

    def serving_default(images):
        return features(images)

    def serving_uint8(images):
        return features(tf.cast(images, tf.float32) / 255.0)

    def serving_bytes(image_bytes):
        tf.debugging.assert_positive(
            tf.size(image_bytes), message="image_bytes must hold at least one encoded image"
        )

        def decode(data):
            return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)

        first_shape = tf.shape(decode(image_bytes[0]))

        def decode_checked(data):
            image = decode(data)
            same = tf.debugging.assert_equal(
                tf.shape(image),
                first_shape,
                message="all images in one serving_bytes request must have the same height and width",
            )
            with tf.control_dependencies([same]):
                return tf.identity(image)

        images = tf.map_fn(
            decode_checked, image_bytes, fn_output_signature=tf.TensorSpec((None, None, 3), tf.uint8)
        )
        return serving_uint8(images)

    image_spec = (None, None, None, 3)
    archive.add_endpoint(
        DEFAULT_SIGNATURE, serving_default, input_signature=[tf.TensorSpec(image_spec, tf.float32, name=IMAGE_INPUT)]
    )
    archive.add_endpoint(
        UINT8_SIGNATURE, serving_uint8, input_signature=[tf.TensorSpec(image_spec, tf.uint8, name=IMAGE_INPUT)]
    )
    archive.add_endpoint(
        BYTES_SIGNATURE, serving_bytes, input_signature=[tf.TensorSpec((None,), tf.string, name=BYTES_INPUT)]
    )
    return archive


def export(
    model_or_backbone: Any,
    base_dir: str | os.PathLike,
    *,
    layers: Sequence[str] | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    min_size: int | None = None,
) -> pathlib.Path:
    """Write the frozen trunk's ``layers`` as SavedModel version ``base_dir/<n+1>/``; return that directory.

    Args:
      model_or_backbone: a method model (its ``.backbone`` is exported), a backbone with ``features``, or a path to
        a ``model.keras`` checkpoint (or a `fit` output_dir holding one; its ``run.json`` goes into the metadata).
      base_dir: the model's base path (what TF Serving's ``--model_base_path`` points at); created if missing.
      layers: the taps to return, e.g. ``("conv1", "conv2")`` or ``("stage1",)``; each becomes a named output of
        every signature. Default: the trunk's first two taps (``backbone.TAPS[:2]``).
      metadata: extra JSON-able facts to record (training config, probe accuracies, ...); they override the
        automatically gathered ones with the same key.
      min_size: smallest accepted image side; found by probing the trunk when ``None``.

    Returns:
      The new version directory, e.g. ``base_dir/3``.
    """
    import keras
    import tensorflow as tf

    import keras_oneimage

    base_dir = validation.utf8_path("base_dir", base_dir)  # SavedModel writes through TF's UTF-8 file system
    backbone, method, provenance = _resolve_backbone(model_or_backbone)
    layers = _check_layers(backbone, layers)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InputError(f"metadata must be a mapping, got {type(metadata).__name__}")
    try:
        extra = _jsonable(dict(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise InputError(f"metadata is not JSON-serialisable: {exc}") from None
    found_min = find_min_size(backbone, layers)
    if min_size is None:
        min_size = found_min
    else:
        min_size = validation.positive_int("min_size", min_size)
        if min_size < found_min:
            raise InputError(f"min_size {min_size} is too small: layers {list(layers)} need at least {found_min} px")

    base = pathlib.Path(base_dir)
    if base.exists() and not base.is_dir():
        raise InputError(f"export base_dir {str(base)!r} exists and is not a directory")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create export base_dir {str(base)!r}: {exc.strerror or exc}") from None

    image_size = int(getattr(backbone, "image_size", 0) or 0) or None
    reference = image_size if image_size and image_size >= min_size else min_size
    shapes = output_shapes(backbone, layers, reference) or {}
    info: dict[str, Any] = {
        "format": "keras_oneimage.export/1",
        "package_version": keras_oneimage.__version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbone": type(backbone).__name__,
        "trunk": _trunk_name(backbone),
        "trunk_config": _jsonable(backbone.get_config()) if _trunk_name(backbone) else None,
        "variant": getattr(backbone, "variant", None),
        "sobel": getattr(backbone, "sobel", None),
        "training_image_size": image_size,
        "layers": list(layers),
        "min_size": min_size,
        "frozen": True,
        "input": {
            DEFAULT_SIGNATURE: {"name": IMAGE_INPUT, "dtype": "float32", "shape": [-1, -1, -1, 3], "range": [0, 1]},
            UINT8_SIGNATURE: {"name": IMAGE_INPUT, "dtype": "uint8", "shape": [-1, -1, -1, 3], "range": [0, 255]},
            BYTES_SIGNATURE: {"name": BYTES_INPUT, "dtype": "string", "shape": [-1], "content": "JPEG/PNG/GIF/BMP"},
        },
        "outputs": {
            name: {"dtype": "float32", "channels": shape[-1], "shape_at": {str(reference): list(shape)}}
            for name, shape in shapes.items()
        },
        "signatures": list(SIGNATURES),
    }
    info.update(_jsonable(provenance))
    training = info.get("training") or {}
    if "image_sha256" in training and "source_image_sha256" not in info:
        info["source_image_sha256"] = training["image_sha256"]
    if "method" in training and "method" not in info:
        info["method"] = training["method"]
    info.update(extra)

    tmp = base / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        archive = build_archive(backbone, layers, min_size)
        archive.write_out(str(tmp), verbose=False)
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        while True:
            version = _next_version(base)
            target = base / str(version)
            try:
                os.rename(tmp, target)  # atomic; fails if another exporter took this number meanwhile
                break
            except OSError:
                if not target.exists():
                    raise
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _trunk_name(backbone: Any) -> str | None:
    """The registry name of the trunk (``trunk_class(name).from_config(trunk_config)`` rebuilds it), None if
    unregistered."""
    from keras_oneimage.models.registry import trunk_name

    try:
        return trunk_name(backbone)
    except InputError:
        return None


def read_metadata(version_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``keras_oneimage.json`` of an export version directory ({} if it has none)."""
    try:
        return json.loads((pathlib.Path(version_dir) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return {}
