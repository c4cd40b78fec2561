"""Paths as the experiment records write them: relative to the checkout, so a record names no machine's home dir."""
from __future__ import annotations

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the checkout when it is in it or beside it (``../shared/...``), else as it is."""
    resolved = pathlib.Path(path).resolve()
    return os.path.relpath(resolved, REPO) if REPO.parent in resolved.parents else str(path)
