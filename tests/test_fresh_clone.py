"""The suite needs nothing beside the repository: fixtures are small, and only conftest knows about ../shared."""
import pathlib
import re

from .conftest import DATA

TESTS = pathlib.Path(__file__).resolve().parent


def test_shipped_fixtures_are_small():
    files = [p for p in DATA.rglob("*") if p.is_file()]
    assert files, "tests/data is empty"
    assert all(p.stat().st_size < 1 << 20 for p in files), [p.name for p in files if p.stat().st_size >= 1 << 20]
    assert sum(p.stat().st_size for p in files) < 5 << 20


def test_only_the_conftest_points_at_shared():
    """A test reading ../shared by itself would fail on a fresh clone; use the conftest's fixtures instead."""
    # parent / "shared", parents[2] / "shared", "../shared", ("..", "shared"), an absolute /…/shared/data path
    pattern = re.compile(r"""parents?(\[\d+\])?\s*/\s*["']shared|["']\.\./shared"""
                         r"""|["']\.\.["']\s*,\s*["']shared|/shared/data""")
    offenders = [p.name for p in TESTS.glob("*.py")
                 if p.name not in ("conftest.py", pathlib.Path(__file__).name) and pattern.search(p.read_text())]
    assert offenders == []
