"""Test-wide settings: quiet TF logs, a small thread budget, and shared fixtures."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
IMAGE_A = SHARED / "data" / "images" / "image_a.jpg"
IMAGE_B = SHARED / "data" / "images" / "image_b.jpg"


@pytest.fixture(scope="session")
def image_a_path() -> pathlib.Path:
    """The paper's Image A from ../shared (present in development and CI)."""
    if not IMAGE_A.exists():
        pytest.fail(f"{IMAGE_A} is missing: tests need ../shared beside the checkout")
    return IMAGE_A
