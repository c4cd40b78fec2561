"""Labelled image datasets for the probes: CIFAR-10 (local copy first, TFDS second) or any class-folder tree.

Asano et al. (ICLR 2020, §4) evaluate the learned trunks with linear probes on a labelled set (ImageNet, and CIFAR-10
for the small-image experiments). A probe needs ``train`` (to fit the linear classifiers), ``val`` (carved out of
``train``, for choosing hyper-parameters: never tune on ``test``) and ``test``.

Every split is an *unbatched* ``tf.data.Dataset`` of ``(image, label)``: ``float32 (H, W, 3)`` in ``[0, 1]`` and an
``int32`` scalar (``docs/DESIGN.md`` conventions).

Where ``load_labelled("cifar10")`` looks, in order (the first hit wins; nothing is ever downloaded unless
``download=True``, because an offline ``tfds.load`` retries for minutes before failing):

1. ``data_dir=`` — an extracted tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), a ``.tar.gz`` of one, or a
   folder holding ``cifar10-jpeg.tar.gz``;
2. the environment variable ``KERAS_ONEIMAGE_CIFAR10`` (same forms);
3. a completed extraction in the cache (``~/.cache/keras_oneimage/cifar10``, root overridable with
   ``KERAS_ONEIMAGE_CACHE`` or ``cache_dir=``);
4. ``../shared/data/cifar10/cifar10-jpeg.tar.gz`` relative to the working directory or to the repository (the
   layout of this project's development machines; ``KERAS_ONEIMAGE_HIDE_SHARED=1`` skips this step, so such a
   machine behaves like a fresh clone);
5. a TFDS copy already prepared in the TFDS data dir (``TFDS_DATA_DIR``, default ``~/tensorflow_datasets``);
6. ``download=True`` only: ``tfds.load("cifar10", download=True)``.

Archives are extracted once, atomically (into a temporary sibling folder, then renamed), and reused afterwards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tarfile
import tempfile
from typing import Sequence

import numpy as np
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.errors import InputError
from keras_oneimage.files import file_sha256

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
#: sha256 of the JPEG packaging of CIFAR-10 shipped in ``../shared/data/cifar10/``.
CIFAR10_SHA256 = "45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db"
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"
CIFAR10_ENV = "KERAS_ONEIMAGE_CIFAR10"
CACHE_ENV = "KERAS_ONEIMAGE_CACHE"
HIDE_SHARED_ENV = "KERAS_ONEIMAGE_HIDE_SHARED"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
SPLITS = ("train", "val", "test")
_MARKER = ".keras_oneimage_extracted.json"
_TEST_SUBSAMPLE_SEED = 0  # the test subset of ``max_per_class`` does not depend on ``seed``: runs stay comparable


@dataclasses.dataclass(frozen=True)
class LabelledData:
    """A labelled dataset split three ways; each split is unbatched ``(float32 (H, W, 3) in [0, 1], int32)``."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset
    num_classes: int
    class_names: tuple[str, ...]
    train_size: int
    val_size: int
    test_size: int
    source: str = ""  # where the images came from (a folder, or "tfds:cifar10")

    def split(self, name: str) -> tf.data.Dataset:
        """The dataset of split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise InputError(f"unknown split {name!r}; choose one of: {', '.join(SPLITS)}")
        return getattr(self, name)

    def size(self, name: str) -> int:
        """Number of examples in split ``name``."""
        if name not in SPLITS:
            raise InputError(f"unknown split {name!r}; choose one of: {', '.join(SPLITS)}")
        return getattr(self, f"{name}_size")


# ----------------------------------------------------------------------------------------------------- public API
def load_labelled(
    name_or_path: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    max_per_class: int | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> LabelledData:
    """Load ``"cifar10"`` or a class-folder tree (``root/train/<class>/*``, ``root/test/<class>/*``, or its .tar.gz).

    Args:
        name_or_path: ``"cifar10"``, a folder with ``train/`` and ``test/`` class folders, or a ``.tar.gz`` of one.
        val_fraction: share of each class of ``train`` held out as ``val`` (stratified; the paper tunes nothing on
            ``test``). Every class with at least 2 training images gives at least one to ``val`` when > 0.
        seed: seeds the (deterministic) val split and the ``max_per_class`` subsample of ``train``.
        data_dir: where a local CIFAR-10 lives (see the module docstring); ignored for paths.
        max_per_class: keep at most this many images per class from each of ``train/`` and ``test/`` (before the
            val split), for quick runs. ``None`` keeps all.
        download: allow ``tfds.load("cifar10", download=True)`` when no local copy exists. Off by default so an
            offline machine fails at once with a message saying what to pass.
        cache_dir: root of the extraction cache (default ``$KERAS_ONEIMAGE_CACHE`` or ``~/.cache/keras_oneimage``).
    """
    val_fraction = _check_fraction(val_fraction)
    seed = validation.int_at_least("seed", seed, 0)
    if max_per_class is not None:
        max_per_class = validation.int_at_least("max_per_class", max_per_class, 1)
    cache_root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()

    if isinstance(name_or_path, str) and name_or_path.lower() == "cifar10" and not os.path.exists(name_or_path):
        root = find_cifar10(data_dir, cache_dir=cache_root)
        if root is not None:
            return _from_tree(root, val_fraction, seed, max_per_class)
        return _from_tfds_cifar10(val_fraction, seed, max_per_class, download)

    path = pathlib.Path(name_or_path).expanduser()
    if not path.exists():
        from keras_oneimage.data.images import missing_reason

        reason = missing_reason(path)
        detail = "" if reason == "no such file" else f" ({reason})"
        raise InputError(f"labelled dataset {str(name_or_path)!r} is neither 'cifar10' nor an existing path{detail}")
    if path.is_file():
        if not _is_archive(path):
            raise InputError(f"{path} is a file but not a .tar.gz/.tgz/.tar archive of a class-folder tree")
        path = extract_archive(path, cache_root / _archive_stem(path))
    return _from_tree(_tree_root(path), val_fraction, seed, max_per_class)


def from_arrays(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> LabelledData:
    """In-memory images (``uint8`` or float in ``[0, 1]``, ``(N, H, W, 3)``) and integer labels as LabelledData.

    The val split is carved from train exactly as for folder trees (stratified, deterministic in ``seed``).
    """
    val_fraction = _check_fraction(val_fraction)
    seed = validation.int_at_least("seed", seed, 0)
    arrays = {}
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"{split} images must have shape (N, H, W, 3), got {images.shape}")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{split} labels must be {len(images)} integers, got shape {labels.shape} {labels.dtype}")
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        elif np.issubdtype(images.dtype, np.floating):
            images = images.astype(np.float32)
            if images.size and (images.min() < 0 or images.max() > 1):
                raise InputError(f"float {split} images must lie in [0, 1]")
        else:
            raise InputError(f"{split} images must be uint8 or float, got {images.dtype}")
        arrays[split] = (images, labels.astype(np.int32))
    labels = np.concatenate([arrays["train"][1], arrays["test"][1]])
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if labels.size == 0 or labels.min() < 0:
        raise InputError("labels must be non-negative integers, and there must be some")
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    if len(names) < num_classes:
        raise InputError(f"{len(names)} class names for labels up to {num_classes - 1}")
    if len(np.unique(labels)) < 2:
        raise InputError(f"the labels hold {len(np.unique(labels))} class; a labelled dataset needs at least 2 "
                         "classes (with one, every probe scores 100 %)")
    rng = np.random.Generator(np.random.Philox(seed))
    train_idx, val_idx = [], []
    for label in range(len(names)):
        members = np.flatnonzero(arrays["train"][1] == label)
        members = members[rng.permutation(len(members))]
        n_val = _val_count(len(members), val_fraction)
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    index = {"train": np.concatenate(train_idx), "val": np.concatenate(val_idx)}
    index = {s: i[rng.permutation(len(i))] for s, i in index.items()}
    index["test"] = np.arange(len(arrays["test"][1]))
    datasets = {
        s: tf.data.Dataset.from_tensor_slices(
            tuple(a[index[s]] for a in arrays["test" if s == "test" else "train"])
        )
        for s in SPLITS
    }
    return LabelledData(
        **datasets,
        num_classes=len(names),
        class_names=names,
        train_size=len(index["train"]),
        val_size=len(index["val"]),
        test_size=len(index["test"]),
        source="arrays",
    )


def default_cache_dir() -> pathlib.Path:
    """``$KERAS_ONEIMAGE_CACHE`` or ``~/.cache/keras_oneimage``: where archives are extracted, once."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "keras_oneimage"


def find_cifar10(
    data_dir: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path | None:
    """The root of a local, extracted CIFAR-10 tree (extracting an archive if needed), or ``None`` if none exists.

    An explicit ``data_dir`` or ``$KERAS_ONEIMAGE_CIFAR10`` that does not hold CIFAR-10 is an error, not a miss.
    """
    cache_root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_root / "cifar10"
    for origin, given in (("data_dir", data_dir), (CIFAR10_ENV, os.environ.get(CIFAR10_ENV) or None)):
        if given is None:
            continue
        found = _resolve_local(pathlib.Path(given).expanduser(), target)
        if found is None:
            raise InputError(
                f"{origin}={str(given)!r} holds no CIFAR-10: expected a folder with train/ and test/ class folders, "
                f"a .tar.gz of one, or a folder containing {CIFAR10_ARCHIVE}"
            )
        return found
    if _is_complete(target):
        return _tree_root(target)
    for archive in _default_archives():
        if archive.is_file():
            return _tree_root(extract_archive(archive, target, expected_sha256=CIFAR10_SHA256))
    return None


def extract_archive(
    archive: str | os.PathLike, target: str | os.PathLike, *, expected_sha256: str | None = None
) -> pathlib.Path:
    """Extract ``archive`` into the folder ``target`` once, atomically; return ``target``.

    A completed extraction (marker file recording the archive's sha256) is reused as long as the archive is the
    same file (size and mtime, else sha256). Extraction goes to a temporary sibling folder renamed into place, so
    an interrupted or concurrent run never leaves a half-extracted ``target``. ``expected_sha256`` verifies the
    archive before extracting it.
    """
    archive, target = pathlib.Path(archive), pathlib.Path(target)
    stat = archive.stat()
    fingerprint = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = _read_marker(target)
    if marker is not None and {k: marker.get(k) for k in fingerprint} == fingerprint:
        return target
    digest = file_sha256(archive)
    if marker is not None and marker.get("sha256") == digest:
        return target
    if expected_sha256 is not None and digest != expected_sha256:
        raise InputError(f"{archive} has sha256 {digest[:12]}…, expected {expected_sha256[:12]}… (corrupt copy?)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise InputError(f"cannot extract {archive}: {err}") from None
        (tmp / _MARKER).write_text(json.dumps({"archive": str(archive), "sha256": digest, **fingerprint}))
        marker = _read_marker(target)
        if marker is not None and marker.get("sha256") == digest:  # a concurrent run finished first
            return target
        if target.exists():  # a stale or different extraction: move it aside, then swap the new one in
            stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent run that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------- class-folder trees
def scan_tree(root: str | os.PathLike) -> tuple[tuple[str, ...], dict[str, list[list[str]]]]:
    """Validate a class-folder tree; return ``(class_names, {"train"|"test": [sorted file paths per class]})``."""
    root = pathlib.Path(root)
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise InputError(f"{root} is not a labelled image tree: missing {' and '.join(m + '/' for m in missing)}")
    classes = {}
    for split in ("train", "test"):
        entries = [e for e in sorted(os.scandir(root / split), key=lambda e: e.name) if not e.name.startswith(".")]
        stray = [e.name for e in entries if not e.is_dir()]
        if stray:
            raise InputError(f"{root / split} must hold only class folders, found file {stray[0]!r}")
        if not entries:
            raise InputError(f"{root / split} has no class folders")
        classes[split] = [e.name for e in entries]
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise InputError(
            f"{root}: train/ and test/ have different classes (only in train: {only_train}, only in test: {only_test})"
        )
    names = tuple(classes["train"])
    if len(names) < 2:  # one class: every probe scores 100 %, a meaningless number
        raise InputError(f"{root} has {len(names)} class folder ({names[0]!r}); a labelled dataset needs at least 2 "
                         "classes")
    files: dict[str, list[list[str]]] = {}
    for split in ("train", "test"):
        files[split] = []
        for name in names:
            folder = root / split / name
            paths = [e for e in sorted(os.scandir(folder), key=lambda e: e.name) if not e.name.startswith(".")]
            bad = [e.name for e in paths if not e.is_file() or not _is_image_name(e.name)]
            if bad:
                raise InputError(
                    f"{folder} holds {bad[0]!r}, which is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            if not paths:
                raise InputError(f"class {name!r} has no images in {folder}")
            files[split].append([e.path for e in paths])
    return names, files


def _from_tree(root: pathlib.Path, val_fraction: float, seed: int, max_per_class: int | None) -> LabelledData:
    names, files = scan_tree(root)
    rng = np.random.Generator(np.random.Philox(seed))
    test_rng = np.random.Generator(np.random.Philox(_TEST_SUBSAMPLE_SEED))
    split_files = {s: ([], []) for s in SPLITS}
    for label, (train_paths, test_paths) in enumerate(zip(files["train"], files["test"])):
        order = rng.permutation(len(train_paths))[:max_per_class]
        chosen = [train_paths[i] for i in order]
        n_val = _val_count(len(chosen), val_fraction)
        for split, paths in (("val", chosen[:n_val]), ("train", chosen[n_val:])):
            split_files[split][0].extend(paths)
            split_files[split][1].extend([label] * len(paths))
        if max_per_class is not None and len(test_paths) > max_per_class:
            keep = np.sort(test_rng.permutation(len(test_paths))[:max_per_class])
            test_paths = [test_paths[i] for i in keep]
        split_files["test"][0].extend(test_paths)
        split_files["test"][1].extend([label] * len(test_paths))
    # Mix the classes of train and val once (deterministically), so an unshuffled pass is not sorted by class.
    for split in ("train", "val"):
        paths, labels = split_files[split]
        order = rng.permutation(len(paths))
        split_files[split] = ([paths[i] for i in order], [labels[i] for i in order])
    datasets = {s: _file_dataset(*split_files[s]) for s in SPLITS}
    return LabelledData(
        **datasets,
        num_classes=len(names),
        class_names=names,
        train_size=len(split_files["train"][0]),
        val_size=len(split_files["val"][0]),
        test_size=len(split_files["test"][0]),
        source=str(root),
    )


#: Leading bytes of the formats ``tf.io.decode_image`` reads; another file fails with its path in the message.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")
BAD_IMAGE_MESSAGE = "not a JPEG, PNG, GIF, BMP or WebP image:"
#: The largest image (declared width x height) of a labelled set; the same bound as the source images'.
MAX_PIXELS = 100_000_000
TOO_LARGE_MESSAGE = f"image too large (above max_pixels={MAX_PIXELS:,} declared pixels):"


def _uint(data: tf.Tensor, start: int, length: int, little_endian: bool) -> tf.Tensor:
    raw = tf.io.decode_raw(tf.strings.substr(data, start, length), tf.uint8)
    raw = tf.cast(tf.pad(raw, [[0, length - tf.shape(raw)[0]]]), tf.int64)  # a short file reads as 0
    weights = tf.constant([256**i for i in (range(length) if little_endian else reversed(range(length)))], tf.int64)
    return tf.reduce_sum(raw * weights)


def _declared_pixels(data: tf.Tensor) -> tf.Tensor:
    """width x height from the header (PNG, GIF, BMP; JPEG through TF's header parser), 0 when unknown.

    Checked before decoding: TF fails on a 60000x60000 PNG with an allocation message that names no file and is
    cut at 60 characters ("PNG size too large for int: 60000 by 60").
    """
    def starts(magic: bytes) -> tf.Tensor:
        return tf.equal(tf.strings.substr(data, 0, len(magic)), magic)

    def jpeg() -> tf.Tensor:
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    return tf.case([
        (starts(b"\x89PNG"), lambda: _uint(data, 16, 4, False) * _uint(data, 20, 4, False)),
        (starts(b"GIF8"), lambda: _uint(data, 6, 2, True) * _uint(data, 8, 2, True)),
        # BMP sizes are signed 32-bit (a negative height means top-down): the magnitude counts
        (starts(b"BM"), lambda: tf.abs(_signed32(_uint(data, 18, 4, True)) * _signed32(_uint(data, 22, 4, True)))),
        (starts(b"\xff\xd8\xff"), jpeg),
    ], default=lambda: tf.constant(0, tf.int64))


def _signed32(value: tf.Tensor) -> tf.Tensor:
    return tf.where(value >= 2**31, value - 2**32, value)


def _decode(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    data = tf.io.read_file(path)
    known = tf.reduce_any(tf.stack([tf.equal(tf.strings.substr(data, 0, len(m)), m) for m in _IMAGE_MAGIC]))
    with tf.control_dependencies([tf.debugging.Assert(known, [BAD_IMAGE_MESSAGE, path])]):
        pixels = _declared_pixels(data)
    with tf.control_dependencies([tf.debugging.Assert(pixels <= MAX_PIXELS, [TOO_LARGE_MESSAGE, path])]):
        image = tf.io.decode_image(data, channels=3, dtype=tf.float32, expand_animations=False)
    return image, label


def _file_dataset(paths: Sequence[str], labels: Sequence[int]) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(paths), dtype=tf.string), tf.constant(list(labels), dtype=tf.int32))
    )
    return ds.map(_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ------------------------------------------------------------------------------------------------------------ TFDS
def _from_tfds_cifar10(val_fraction: float, seed: int, max_per_class: int | None, download: bool) -> LabelledData:
    import tensorflow_datasets as tfds

    tfds_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now, not when tfds was imported
    builder = tfds.builder("cifar10", data_dir=tfds_dir)
    if not builder.is_prepared() and not download:
        raise InputError(
            "no local CIFAR-10 found: pass data_dir=<folder with train/ and test/ class folders, or containing "
            f"{CIFAR10_ARCHIVE}>, set {CIFAR10_ENV}, or pass download=True to fetch it with TFDS"
        )
    arrays = {}
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(
            tfds.load(
                "cifar10", split=split, batch_size=-1, as_supervised=True, data_dir=tfds_dir, download=download
            )
        )
        arrays[split] = (np.asarray(images), np.asarray(labels, dtype=np.int32))
    rng = np.random.Generator(np.random.Philox(seed))
    test_rng = np.random.Generator(np.random.Philox(_TEST_SUBSAMPLE_SEED))
    index = {s: [] for s in SPLITS}
    for label in range(len(CIFAR10_CLASSES)):
        members = np.flatnonzero(arrays["train"][1] == label)
        chosen = members[rng.permutation(len(members))[:max_per_class]]
        n_val = _val_count(len(chosen), val_fraction)
        index["val"].append(chosen[:n_val])
        index["train"].append(chosen[n_val:])
        members = np.flatnonzero(arrays["test"][1] == label)
        if max_per_class is not None and len(members) > max_per_class:
            members = np.sort(members[test_rng.permutation(len(members))[:max_per_class]])
        index["test"].append(members)
    datasets, sizes = {}, {}
    for split in SPLITS:
        idx = np.concatenate(index[split])
        if split != "test":
            idx = idx[rng.permutation(len(idx))]
        images, labels = arrays["test" if split == "test" else "train"]
        datasets[split] = tf.data.Dataset.from_tensor_slices((images[idx], labels[idx])).map(
            lambda x, y: (tf.image.convert_image_dtype(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE
        )
        sizes[f"{split}_size"] = int(len(idx))
    return LabelledData(
        **datasets, num_classes=len(CIFAR10_CLASSES), class_names=CIFAR10_CLASSES, source="tfds:cifar10", **sizes
    )


# --------------------------------------------------------------------------------------------------------- helpers
def shared_hidden() -> bool:
    """Whether ``$KERAS_ONEIMAGE_HIDE_SHARED`` asks to ignore ``../shared`` (set and not ``0``/``false``/empty)."""
    return os.environ.get(HIDE_SHARED_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _default_archives() -> list[pathlib.Path]:
    """``../shared/data/cifar10/cifar10-jpeg.tar.gz`` relative to the working directory and to the repository.

    None when :func:`shared_hidden`.
    """
    if shared_hidden():
        return []
    rel = pathlib.Path("..", "shared", "data", "cifar10", CIFAR10_ARCHIVE)
    repo = pathlib.Path(__file__).resolve().parents[2]
    seen, out = set(), []
    for base in (pathlib.Path.cwd(), repo):
        path = (base / rel).resolve()
        if path not in seen:
            seen.add(path)
            out.append(path)
    return out


def _resolve_local(path: pathlib.Path, target: pathlib.Path) -> pathlib.Path | None:
    if path.is_file():
        return _tree_root(extract_archive(path, target)) if _is_archive(path) else None
    if not path.is_dir():
        return None
    root = _tree_root(path)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    if (path / CIFAR10_ARCHIVE).is_file():
        return _tree_root(extract_archive(path / CIFAR10_ARCHIVE, target))
    return None


def _tree_root(path: pathlib.Path) -> pathlib.Path:
    """``path`` if it holds ``train/`` and ``test/``, else its single subfolder that does (archives often nest)."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")] if path.is_dir() else []
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir() and (subdirs[0] / "test").is_dir():
        return subdirs[0]
    return path  # scan_tree reports what is missing


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_archive(path: pathlib.Path) -> bool:
    return path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def _archive_stem(path: pathlib.Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_marker(target: pathlib.Path) -> dict | None:
    try:
        return json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(target: pathlib.Path) -> bool:
    return _read_marker(target) is not None


def _val_count(n: int, val_fraction: float) -> int:
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(round(n * val_fraction))))


def _check_fraction(value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"val_fraction must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {value}")
    return value
