"""keras_oneimage.files: atomic JSON records and digests."""
import hashlib
import json

import numpy as np
import pytest

from keras_oneimage import files


def test_write_json_atomic_writes_sorted_json_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    files.write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_write_json_atomic_keeps_the_old_record_when_the_new_one_fails(tmp_path):
    path = tmp_path / "run.json"
    files.write_json_atomic(path, {"epoch": 3})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("cannot encode")

    with pytest.raises(RuntimeError):
        files.write_json_atomic(path, {"epoch": Unserialisable()})
    assert json.loads(path.read_text()) == {"epoch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_file_sha256_matches_hashlib_across_chunk_boundaries(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=(1 << 20) + 17, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert files.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_bytes_sha256_of_a_strided_array_equals_that_of_its_contiguous_copy():
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    strided = image[:, ::2]
    assert files.bytes_sha256(strided) == hashlib.sha256(np.ascontiguousarray(strided).tobytes()).hexdigest()
    assert files.bytes_sha256(image) == hashlib.sha256(image.tobytes()).hexdigest()
    assert files.bytes_sha256(image) != files.bytes_sha256(strided)
