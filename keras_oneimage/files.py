"""One home for the file helpers several modules share: atomic JSON writes and file digests.

A run's records (``run.json``, a trial's ``trial.json``, a backup's metadata) must never be half-written: a
reader that finds one trusts it. So every JSON record goes to a hidden temporary sibling first and is renamed into
place (``os.replace`` is atomic on POSIX and on Windows within one folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

#: Read size for hashing: large files (checkpoints, the CIFAR archive) are hashed without loading them whole.
_CHUNK = 1 << 20


def write_json_atomic(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented, key-sorted JSON to ``path``, all or nothing."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a non-serialisable value: leave no partial file behind
        raise
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_sha256(data: Any) -> str:
    """The hex sha256 of a bytes-like object (an array's buffer included), without copying it."""
    view = memoryview(data)
    if not view.c_contiguous:  # a strided view: hash its C-order bytes, as ``tobytes()`` lays them out
        view = memoryview(view.tobytes())
    return hashlib.sha256(view.cast("B")).hexdigest()
