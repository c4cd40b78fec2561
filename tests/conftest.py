"""Test-wide settings (quiet TF logs) and the data fixtures.

Every test runs on a clone with nothing beside it. The data the tests need ships in ``tests/data/`` or is made at
test time:

* ``photo_path``: ``tests/data/photo.jpg``, a downscaled crop of matplotlib's public-domain photograph of Grace
  Hopper (``tests/data/README.md``), standing in for the paper's Image A wherever any photograph will do;
* ``cifar_like_tree`` / ``cifar_like_archive``: a tiny CIFAR-10 in the layout of the real JPEG packaging
  (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``, all ten class names) and its ``cifar10-jpeg.tar.gz``,
  written into a temporary folder once per session. Tar extraction, the class-folder scan and the CIFAR-10 lookup
  order of ``keras_oneimage/data/labelled.py`` run on them.

The few tests only meaningful on the large data in ``../shared`` (the paper's Image A, the full CIFAR-10 tarball)
use it when present and skip, saying why, when it is not. They are:

* ``tests/test_images.py::test_paper_image_a_loads`` (Image A's size and content);
* ``tests/test_labelled.py::test_cifar10_shared_tarball_is_the_full_dataset`` (the 50,000 + 10,000 images).

``KERAS_ONEIMAGE_HIDE_SHARED=1`` makes these fixtures, and the library's own default CIFAR-10 lookup, ignore
``../shared``, and points the extraction cache at a fresh temporary folder, so a development or CI machine runs
the tests as a fresh clone would. Tests whose outcome can depend on ``../shared`` (those using the fixtures above
except ``photo_path``, and every test of the CIFAR-10 lookup in ``test_labelled.py``) get the ``data`` marker
automatically; ``.ci/run`` runs ``pytest -m data`` once with ``../shared`` hidden, then ``make test``.
``tests/test_fresh_clone.py`` keeps the other tests from reading ``../shared`` directly.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pathlib
import shutil
import tarfile
import tempfile

import numpy as np
import pytest

from keras_oneimage.data.labelled import CIFAR10_ARCHIVE, CIFAR10_CLASSES, HIDE_SHARED_ENV, shared_hidden

DATA = pathlib.Path(__file__).resolve().parent / "data"
PHOTO = DATA / "photo.jpg"
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
IMAGE_A = SHARED / "data" / "images" / "image_a.jpg"
CIFAR10_TARBALL = SHARED / "data" / "cifar10" / CIFAR10_ARCHIVE

#: Fixtures whose tests may behave differently with ../shared hidden; a test using one gets the ``data`` marker.
#: (``photo_path`` is not one: tests/data is the same everywhere.)
DATA_FIXTURES = frozenset({"image_a_path", "cifar_like_tree", "cifar_like_archive", "shared_cifar10"})
#: Test modules that exercise the library's own data lookup (``../shared``, the cache), marked ``data`` as a whole.
DATA_MODULES = frozenset({"test_labelled.py"})

_HIDDEN_CACHE = None
if shared_hidden():
    # A fresh machine has no extraction cache either: never reuse the one ../shared filled on this machine.
    _HIDDEN_CACHE = os.environ["KERAS_ONEIMAGE_CACHE"] = tempfile.mkdtemp(prefix="koi-hidden-cache-")


def pytest_configure(config):
    config.addinivalue_line("markers", "data: reads test data (tests/data, a generated CIFAR stand-in, ../shared)")


def pytest_unconfigure(config):
    if _HIDDEN_CACHE is not None:
        shutil.rmtree(_HIDDEN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in DATA_MODULES:
            item.add_marker(pytest.mark.data)


def shared_file(path: pathlib.Path) -> pathlib.Path:
    """``path`` under ``../shared``, or skip the test saying why (absent, or hidden by the environment)."""
    if shared_hidden():
        pytest.skip(f"needs ../{path.relative_to(SHARED.parent)} (large data); hidden by {HIDE_SHARED_ENV}=1")
    if not path.exists():
        pytest.skip(f"needs ../{path.relative_to(SHARED.parent)} (large data beside the checkout); not present")
    return path


@pytest.fixture(scope="session")
def photo_path() -> pathlib.Path:
    """A small photograph shipped with the tests (360x420 RGB JPEG)."""
    return PHOTO


@pytest.fixture(scope="session")
def image_a_path() -> pathlib.Path:
    """The paper's Image A from ../shared; skips when it is absent. Prefer ``photo_path`` unless Image A matters."""
    return shared_file(IMAGE_A)


@pytest.fixture(scope="session")
def shared_cifar10() -> pathlib.Path:
    """The full CIFAR-10 JPEG tarball from ../shared; skips when it is absent."""
    return shared_file(CIFAR10_TARBALL)


def make_cifar_like(root: pathlib.Path, n_train: int = 4, n_test: int = 3, size: int = 32) -> pathlib.Path:
    """A tiny CIFAR-10 tree at ``root``: ``train|test/<class>/NNNN.jpg``, ``size``-pixel crops of the test photo.

    Class ``c`` is cut from its own band of the photo, so classes differ in content; numbering restarts in each
    class folder, as in the real packaging.
    """
    from PIL import Image

    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    rng = np.random.default_rng(0)
    band = (photo.shape[0] - size) // len(CIFAR10_CLASSES)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                y = label * band + int(rng.integers(0, band + 1))
                x = int(rng.integers(0, photo.shape[1] - size + 1))
                Image.fromarray(photo[y : y + size, x : x + size]).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def tar_tree(root: pathlib.Path, archive: pathlib.Path) -> pathlib.Path:
    """``root``'s ``train/`` and ``test/`` as a .tar.gz with them at the top, as in ``cifar10-jpeg.tar.gz``."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=split)
    return archive


@pytest.fixture(scope="session")
def cifar_like_tree(tmp_path_factory) -> pathlib.Path:
    """A tiny CIFAR-10 class-folder tree (10 classes, 4 train and 3 test 32x32 JPEGs each); do not modify it."""
    return make_cifar_like(tmp_path_factory.mktemp("cifar_like") / "tree")


@pytest.fixture(scope="session")
def cifar_like_archive(cifar_like_tree, tmp_path_factory) -> pathlib.Path:
    """``cifar_like_tree`` packed like the real archive, under the real archive's file name."""
    return tar_tree(cifar_like_tree, tmp_path_factory.mktemp("cifar_like_archive") / CIFAR10_ARCHIVE)
