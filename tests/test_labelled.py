"""Labelled datasets: class-folder trees, archives (extracted once, atomically), local CIFAR-10, TFDS fallback.

CIFAR-10 runs on the tiny stand-in of ``conftest.make_cifar_like``; only the 50,000-image count needs ../shared.
"""
import os
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from keras_oneimage.data import labelled
from keras_oneimage.data.labelled import (
    CIFAR10_CLASSES,
    extract_archive,
    from_arrays,
    load_labelled,
)
from keras_oneimage.errors import InputError
from keras_oneimage.files import file_sha256

from .conftest import make_cifar_like, tar_tree
CLASSES = ("ant", "bee", "cat")  # class c has channel c bright; pixel (0, 0) of red channel encodes the image id


def _write_image(path: pathlib.Path, label: int, image_id: int, size: int = 6) -> None:
    pixels = np.full((size, size, 3), 20, np.uint8)
    pixels[..., label] = 220
    pixels[0, 0, 0] = image_id
    Image.fromarray(pixels).save(path)


def make_tree(root: pathlib.Path, n_train: int = 5, n_test: int = 2) -> pathlib.Path:
    image_id = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image_id += 1
                _write_image(folder / f"{i:03d}.png", label, image_id)
    return root


def _collect(ds):
    """[(image id, label)] of a split, checking the value conventions on the way."""
    out = []
    for image, label in ds.as_numpy_iterator():
        assert image.dtype == np.float32 and image.shape == (6, 6, 3)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert label.dtype == np.int32
        assert np.argmax(image[1, 1]) == label, "label must match the class folder the image came from"
        out.append((int(round(image[0, 0, 0] * 255)), int(label)))
    return out


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "tree")


def test_tree_loads_with_stratified_val_split(tree):
    data = load_labelled(tree, val_fraction=0.2, seed=0)
    assert data.class_names == CLASSES and data.num_classes == 3
    train, val, test = _collect(data.train), _collect(data.val), _collect(data.test)
    assert (data.train_size, data.val_size, data.test_size) == (len(train), len(val), len(test)) == (12, 3, 6)
    assert sorted(label for _, label in val) == [0, 1, 2], "one val image per class (20% of 5)"
    ids = [i for i, _ in train + val]
    assert sorted(ids) == list(range(1, 16)), "val and train partition the train/ folder"
    assert sorted(i for i, _ in test) == list(range(16, 22))


def test_val_split_is_deterministic_in_seed(tree):
    def val_ids(seed):
        return sorted(i for i, _ in _collect(load_labelled(tree, val_fraction=0.4, seed=seed).val))

    assert val_ids(3) == val_ids(3)
    assert len({tuple(val_ids(s)) for s in range(4)}) > 1, "different seeds should pick different val images"


def test_max_per_class_subsamples_every_split(tree):
    data = load_labelled(tree, val_fraction=0.5, max_per_class=2)
    assert (data.train_size, data.val_size, data.test_size) == (3, 3, 6)
    small = load_labelled(tree, val_fraction=0.0, max_per_class=1)
    assert (small.train_size, small.val_size, small.test_size) == (3, 0, 3)
    assert sorted(label for _, label in _collect(small.test)) == [0, 1, 2]


def _break(root: pathlib.Path, how: str) -> None:
    if how == "no test":
        for p in sorted((root / "test").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (root / "test").rmdir()
    elif how == "no classes":
        for p in sorted(root.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (root / "train").mkdir()
        (root / "test").mkdir()
    elif how == "class sets differ":
        (root / "test" / "cat").rename(root / "test" / "cow")
    elif how == "empty class":
        for p in (root / "test" / "bee").iterdir():
            p.unlink()
    elif how == "non-image file":
        (root / "train" / "ant" / "notes.txt").write_text("hello")
    elif how == "stray file":
        (root / "train" / "README").write_text("hello")


@pytest.mark.parametrize(
    "how, message",
    [
        ("no test", "missing test/"),
        ("no classes", "no class folders"),
        ("class sets differ", "different classes"),
        ("empty class", "has no images"),
        ("non-image file", "not an image file"),
        ("stray file", "only class folders"),
    ],
)
def test_malformed_trees_are_rejected(tree, how, message):
    _break(tree, how)
    with pytest.raises(InputError, match=message):
        load_labelled(tree)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": "lots"}, "val_fraction"),
        ({"max_per_class": 0}, "max_per_class"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_rejected(tree, kwargs, message):
    with pytest.raises(InputError, match=message):
        load_labelled(tree, **kwargs)


def test_unknown_name_is_rejected(tmp_path):
    with pytest.raises(InputError, match="neither 'cifar10' nor an existing path"):
        load_labelled(tmp_path / "nope")
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(InputError, match="not a .tar.gz"):
        load_labelled(tmp_path / "data.zip")


def _tar(source: pathlib.Path, archive: pathlib.Path, arcname: str) -> pathlib.Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


def test_archive_is_extracted_once_atomically(tree, tmp_path):
    archive = _tar(tree, tmp_path / "toy.tar.gz", arcname="toy")  # nested one level, as archives often are
    cache = tmp_path / "cache"
    data = load_labelled(archive, cache_dir=cache, val_fraction=0.2)
    assert data.class_names == CLASSES and (data.train_size, data.test_size) == (12, 6)
    extracted = cache / "toy"
    marker = next(extracted.glob(".keras_oneimage_extracted.json"))
    stamp = marker.stat().st_mtime_ns
    probe_file = extracted / "toy" / "train" / "ant" / "000.png"
    probe_file.unlink()  # if the archive were extracted again, this file would come back
    again = load_labelled(archive, cache_dir=cache, val_fraction=0.2)
    assert again.train_size + again.val_size == 14 and not probe_file.exists()
    assert marker.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == ["toy"], "no temporary folders may be left behind"


def test_changed_archive_replaces_the_extraction(tree, tmp_path):
    archive = _tar(tree, tmp_path / "toy.tar.gz", arcname=".")
    cache = tmp_path / "cache"
    assert load_labelled(archive, cache_dir=cache).test_size == 6
    _write_image(tree / "test" / "ant" / "extra.png", 0, 99)
    _tar(tree, archive, arcname=".")
    assert load_labelled(archive, cache_dir=cache).test_size == 7
    assert sorted(p.name for p in cache.iterdir()) == ["toy"]


def test_wrong_checksum_is_rejected_before_extracting(tree, tmp_path):
    archive = _tar(tree, tmp_path / "toy.tar.gz", arcname=".")
    with pytest.raises(InputError, match="sha256"):
        extract_archive(archive, tmp_path / "out", expected_sha256="0" * 64)
    assert not (tmp_path / "out").exists()


def test_cifar10_env_var_and_data_dir_take_precedence(tree, tmp_path, monkeypatch):
    monkeypatch.setenv(labelled.CIFAR10_ENV, str(tree))
    assert load_labelled("cifar10", cache_dir=tmp_path / "c").class_names == CLASSES
    monkeypatch.setenv(labelled.CIFAR10_ENV, str(tmp_path / "missing"))
    with pytest.raises(InputError, match=labelled.CIFAR10_ENV):
        load_labelled("cifar10", cache_dir=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="data_dir"):
        load_labelled("cifar10", data_dir=tmp_path / "empty", cache_dir=tmp_path / "c")


def test_cifar10_without_local_data_fails_fast_offline(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def no_network(*args, **kwargs):
        raise AssertionError("tfds.load must not be called when download=False and nothing is prepared")

    monkeypatch.delenv(labelled.CIFAR10_ENV, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(labelled, "_default_archives", lambda: [])
    monkeypatch.setattr(tfds, "load", no_network)
    with pytest.raises(InputError, match="no local CIFAR-10.*data_dir.*download=True"):
        load_labelled("cifar10", cache_dir=tmp_path / "cache")


def test_cifar10_from_a_prepared_tfds_copy(tmp_path, monkeypatch):
    """The TFDS branch (faked: no network here) splits val from train by class and converts to [0, 1] floats."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), np.repeat(np.arange(10), n // 10))
              for s, n in (("train", 50), ("test", 20))}  # fmt: skip

    class Prepared:
        def is_prepared(self):
            return True

    calls = []

    def fake_load(name, *, split, batch_size, as_supervised, data_dir, download):
        calls.append((name, split, download))
        images, labels = splits[split]
        return tf.constant(images), tf.constant(labels, tf.int64)

    monkeypatch.delenv(labelled.CIFAR10_ENV, raising=False)
    monkeypatch.setattr(labelled, "_default_archives", lambda: [])
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Prepared())
    monkeypatch.setattr(tfds, "load", fake_load)
    data = load_labelled("cifar10", cache_dir=tmp_path, val_fraction=0.2, max_per_class=4)
    assert [c[:2] for c in calls] == [("cifar10", "train"), ("cifar10", "test")] and not calls[0][2]
    assert data.class_names == CIFAR10_CLASSES and data.source == "tfds:cifar10"
    assert (data.train_size, data.val_size, data.test_size) == (30, 10, 20)
    val_labels = sorted(int(y) for _, y in data.val.as_numpy_iterator())
    assert val_labels == list(range(10))
    image, label = next(data.test.as_numpy_iterator())
    np.testing.assert_allclose(image, splits["test"][0][0] / 255.0, atol=1e-6)


def test_from_arrays_splits_and_validates():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 5, 5, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    data = from_arrays(x, y, x[:8], y[:8], val_fraction=0.3, seed=1)
    assert (data.train_size, data.val_size, data.test_size, data.num_classes) == (28, 12, 8, 4)
    val = list(data.val.as_numpy_iterator())
    assert sorted(int(lbl) for _, lbl in val) == sorted([0, 1, 2, 3] * 3)
    image, label = val[0]
    assert image.dtype == np.float32 and image.max() <= 1.0
    with pytest.raises(InputError, match="shape"):
        from_arrays(x[..., :1], y, x, y)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        from_arrays(x.astype(np.float32), y, x, y)


def _check_cifar_split(data, per_class: int) -> None:
    labels = []
    for image, label in data.test.as_numpy_iterator():
        assert image.shape == (32, 32, 3) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.01
        labels.append(int(label))
    assert sorted(labels) == sorted(list(range(10)) * per_class)


def test_cifar10_local_tarball(cifar_like_archive, tmp_path):
    """The CIFAR-10 archive (here the stand-in, under the real file name) is extracted into the cache and scanned."""
    cache = tmp_path / "cache"
    data = load_labelled("cifar10", data_dir=cifar_like_archive, cache_dir=cache, max_per_class=3)
    assert data.class_names == CIFAR10_CLASSES
    assert (data.train_size, data.val_size, data.test_size) == (20, 10, 30)
    assert pathlib.Path(data.source) == cache / "cifar10"
    assert pathlib.Path(data.source, "train", "airplane", "0000.jpg").is_file()
    _check_cifar_split(data, 3)
    full_count = sum(len(os.listdir(pathlib.Path(data.source, "train", c))) for c in CIFAR10_CLASSES)
    assert full_count == 40  # every image of the archive was extracted, not only the max_per_class subsample
    folder = load_labelled("cifar10", data_dir=cifar_like_archive.parent, cache_dir=tmp_path / "other")
    assert (folder.train_size + folder.val_size, folder.test_size) == (40, 30), "a folder holding the archive"


def test_cifar10_lookup_order(cifar_like_tree, cifar_like_archive, tree, tmp_path, monkeypatch):
    """data_dir, then $KERAS_ONEIMAGE_CIFAR10, then the cache, then ../shared (checksum verified), then TFDS."""
    import tensorflow_datasets as tfds

    def no_network(*args, **kwargs):
        raise AssertionError("tfds.load must not be called when download=False and nothing is prepared")

    for var in (labelled.CIFAR10_ENV, labelled.HIDE_SHARED_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(tfds, "load", no_network)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    shared_archive = tmp_path / "shared" / "data" / "cifar10" / labelled.CIFAR10_ARCHIVE
    shared_archive.parent.mkdir(parents=True)
    shared_archive.write_bytes(cifar_like_archive.read_bytes())
    repo_archive = pathlib.Path(labelled.__file__).resolve().parents[3] / shared_archive.relative_to(tmp_path)
    assert labelled._default_archives() == [shared_archive, repo_archive], "working directory first, then the repo"

    # ../shared holds an archive that is not the known CIFAR-10 packaging: refused, not silently used.
    with pytest.raises(InputError, match="sha256"):
        load_labelled("cifar10", cache_dir=tmp_path / "c0")
    monkeypatch.setattr(labelled, "CIFAR10_SHA256", file_sha256(shared_archive))
    cache = tmp_path / "cache"
    data = load_labelled("cifar10", cache_dir=cache)
    assert pathlib.Path(data.source) == cache / "cifar10" and data.train_size + data.val_size == 40

    # The completed extraction in the cache now wins over ../shared, even when ../shared changes.
    smaller = make_cifar_like(tmp_path / "smaller", n_train=2, n_test=1)
    tar_tree(smaller, shared_archive)
    monkeypatch.setattr(labelled, "CIFAR10_SHA256", file_sha256(shared_archive))
    assert load_labelled("cifar10", cache_dir=cache).test_size == 30
    assert load_labelled("cifar10", cache_dir=tmp_path / "fresh").test_size == 10, "no cache: ../shared again"

    # $KERAS_ONEIMAGE_CIFAR10 wins over the cache, data_dir over both.
    monkeypatch.setenv(labelled.CIFAR10_ENV, str(tree))
    assert load_labelled("cifar10", cache_dir=cache).class_names == CLASSES
    assert load_labelled("cifar10", data_dir=cifar_like_tree, cache_dir=cache).class_names == CIFAR10_CLASSES
    monkeypatch.delenv(labelled.CIFAR10_ENV)

    # Hidden ../shared: a machine without it, no cache either, fails at once instead of reaching for the network.
    monkeypatch.setenv(labelled.HIDE_SHARED_ENV, "1")
    assert labelled._default_archives() == []
    with pytest.raises(InputError, match="no local CIFAR-10"):
        load_labelled("cifar10", cache_dir=tmp_path / "empty-cache")
    monkeypatch.setenv(labelled.HIDE_SHARED_ENV, "0")
    assert labelled._default_archives()[0] == shared_archive


def test_cifar10_shared_tarball_is_the_full_dataset(shared_cifar10):
    """The real CIFAR-10 from ../shared (skipped without it): extracted once into the user cache, all 60,000."""
    cache = pathlib.Path.home() / ".cache" / "keras_oneimage"
    data = load_labelled("cifar10", data_dir=shared_cifar10, cache_dir=cache, max_per_class=3)
    assert data.class_names == CIFAR10_CLASSES
    assert (data.train_size, data.val_size, data.test_size) == (20, 10, 30)
    _check_cifar_split(data, 3)
    for split, count in (("train", 50_000), ("test", 10_000)):
        assert sum(len(os.listdir(pathlib.Path(data.source, split, c))) for c in CIFAR10_CLASSES) == count
