"""A small request must never take the server: per-request limits, deep nesting, load retries, slow clients."""
import asyncio
import base64
import os
import shutil
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest

from keras_oneimage.export import export
from keras_oneimage.serve import BatchScheduler, ModelManager, start_in_thread
from keras_oneimage.serve import models as serve_models
from tests.test_serve import LAYERS, features, tiny_alexnet

MAX_INSTANCES = 16
MAX_OUTPUT = 4000  # the tiny export gives 366 values per 32x32 image: 10 images are fine, 11 are not


def zeros_png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of zeros: a few KB of file that decodes to ``width * height`` pixels."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    model = tiny_alexnet(seed=0)
    base = tmp_path_factory.mktemp("bounded") / "tiny"
    export(model, base, layers=LAYERS)
    handle = start_in_thread(
        base, poll_seconds=0, max_batch_size=4, max_body_bytes=4_000_000, max_instances=MAX_INSTANCES,
        max_output_elements=MAX_OUTPUT, header_timeout=0.5, body_timeout=0.5,
    )
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield handle, client, model
    client.close()
    handle.stop()


def assert_ok(client, model):
    image = np.random.default_rng(99).random((1, 32, 32, 3), dtype=np.float32)
    response = client.post("/v1/models/tiny:predict", json={"instances": image.tolist()})
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["predictions"][0]["conv1"], dtype=np.float32)
    np.testing.assert_allclose(got, features(model, image)["conv1"][0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ limits
BIG_PNG = base64.b64encode(zeros_png(6000, 6000)).decode("ascii")  # 36 M pixels; ~50 KB of base64


@pytest.mark.parametrize(
    "payload, limit",
    [
        ({"instances": np.zeros((MAX_INSTANCES + 1, 32, 32, 3)).tolist()}, "max_instances"),
        ({"inputs": {"images": np.zeros((MAX_INSTANCES + 1, 32, 32, 3)).tolist()}}, "max_instances"),
        ({"signature_name": "serving_bytes", "instances": [{"b64": BIG_PNG}]}, "max_pixels"),
        ({"instances": np.zeros((11, 32, 32, 3)).tolist()}, "max_output_elements"),
        ({"signature_name": "serving_uint8", "inputs": np.zeros((2, 100, 100, 3), int).tolist()},
         "max_output_elements"),
    ],
    ids=["rows", "columnar-rows", "png-pixels", "outputs", "uint8-outputs"],
)
def test_requests_over_a_limit_get_413_before_the_model_runs(bounded, payload, limit):
    handle, client, model = bounded
    stats = handle.app.state.batcher.stats
    rows_before = stats["rows"]
    response = client.post("/v1/models/tiny:predict", json=payload)
    assert response.status_code == 413, response.text
    assert limit in response.json()["error"]
    assert stats["rows"] == rows_before  # refused before any model call
    assert_ok(client, model)


def test_memory_stays_bounded_while_huge_requests_are_refused(bounded):
    """36 M-pixel PNGs (decoded: 108 MB of pixels, 432 MB as float) from 4 clients: refused from their headers."""
    handle, client, model = bounded
    body = {"signature_name": "serving_bytes", "instances": [{"b64": BIG_PNG}]}
    baseline = rss_bytes()
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(0.002)

    statuses = []

    def send():
        with httpx.Client(base_url=handle.url, timeout=120) as own:
            for _ in range(3):
                statuses.append(own.post("/v1/models/tiny:predict", json=body).status_code)

    sampler = threading.Thread(target=sample)
    sampler.start()
    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(300)
    done.set()
    sampler.join()
    assert statuses == [413] * 12
    assert peak[0] - baseline < 100 * 2**20, f"RSS grew by {(peak[0] - baseline) / 2**20:.0f} MiB"
    assert_ok(client, model)


def test_a_big_request_runs_in_model_calls_of_at_most_max_batch_size(bounded):
    handle, client, model = bounded
    stats = handle.app.state.batcher.stats
    batches_before = stats["batches"]
    stats["max_rows"] = 0
    images = np.random.default_rng(1).random((10, 32, 32, 3), dtype=np.float32)
    response = client.post("/v1/models/tiny:predict", json={"inputs": images.tolist()})
    assert response.status_code == 200, response.text
    assert stats["max_rows"] == 4 and stats["batches"] - batches_before == 3  # 4 + 4 + 2 rows
    want = features(model, images)
    for name in LAYERS:
        np.testing.assert_allclose(np.asarray(response.json()["outputs"][name]), want[name], atol=1e-5, rtol=0)


def test_batch_scheduler_splits_a_request_larger_than_a_batch():
    calls = []

    def run(inputs):
        calls.append(inputs["x"].shape[0])
        return {"y": inputs["x"] * 2}

    async def main():
        batcher = BatchScheduler(max_batch_size=4, num_batch_threads=1)
        x = np.arange(10, dtype=np.float32).reshape(10, 1)
        result = await batcher.submit("k", {"x": x}, 10, run)
        batcher.close()
        return x, result

    x, result = asyncio.run(main())
    assert calls == [4, 4, 2]
    np.testing.assert_array_equal(result["y"], x * 2)


# ------------------------------------------------------------------------------------------------ nesting
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"instances": ' + b"[" * 5000 + b"0" + b"]" * 5000 + b"}",
        b'{"instances": ' + b"[" * 1000 + b"0" + b"]" * 1000 + b"}",
        b'{"signature_name": "serving_bytes", "instances": ' + b"[" * 1000 + b'"x"' + b"]" * 1000 + b"}",
    ],
    ids=["arrays-5000", "objects-100000", "instances-5000", "instances-1000", "strings-1000"],
)
def test_deeply_nested_json_gets_400(bounded, body):
    _, client, model = bounded
    response = client.post("/v1/models/tiny:predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "\n" not in response.json()["error"]
    assert_ok(client, model)


# ------------------------------------------------------------------------------------------------ hot reload
def _wait_for(predicate, what: str, seconds: float = 120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_version_copied_in_slowly_is_loaded_once_complete(tmp_path):
    """saved_model.pb lands first (and an empty variables/), the variables later: the load is retried."""
    first, second = tiny_alexnet(seed=10), tiny_alexnet(seed=11)
    base = tmp_path / "slow"
    export(first, base, layers=("conv1",))
    staged = export(second, tmp_path / "staging", layers=("conv1",))
    image = np.random.default_rng(5).random((1, 32, 32, 3), dtype=np.float32)
    with start_in_thread(base, poll_seconds=0.05) as handle, httpx.Client(base_url=handle.url, timeout=60) as client:
        target = base / "2"
        (target / "variables").mkdir(parents=True)
        for item in staged.iterdir():
            if item.is_file():
                shutil.copy2(item, target / item.name)

        def status_of_2():
            for entry in client.get("/v1/models/slow").json()["model_version_status"]:
                if entry["version"] == "2" and entry["state"] == "END":
                    return entry
            return None

        failed = _wait_for(status_of_2, "version 2's failed load")
        assert failed["status"]["error_code"] != "OK"
        assert client.post("/v1/models/slow:predict", json={"instances": image.tolist()}).headers[
            "x-model-version"] == "1"
        for item in (staged / "variables").iterdir():  # the rest of the copy, into the existing variables/
            shutil.copy2(item, target / "variables" / item.name)

        def available():
            states = {s["version"]: s["state"] for s in client.get("/v1/models/slow").json()["model_version_status"]}
            return states.get("2") == "AVAILABLE"

        _wait_for(available, "version 2 to load")
        response = client.post("/v1/models/slow:predict", json={"instances": image.tolist()})
        assert response.headers["x-model-version"] == "2"
        np.testing.assert_allclose(np.asarray(response.json()["predictions"]),
                                   features(second, image, ("conv1",))["conv1"], atol=1e-5, rtol=0)


def test_failed_loads_are_retried_with_a_doubling_back_off(tmp_path, monkeypatch):
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    (version_dir / "saved_model.pb").write_bytes(b"pb")
    attempts = []
    broken = [True]

    class FakeVersion:
        def __init__(self, path, version):
            attempts.append(version)
            if broken[0]:
                raise OSError("variables are not there yet")
            self.path, self.version = path, version

    monkeypatch.setattr(serve_models, "ServedVersion", FakeVersion)
    now = [0.0]
    manager = ModelManager(tmp_path, "m", poll_seconds=0, retry_min_seconds=1, retry_max_seconds=4,
                           clock=lambda: now[0])
    expected = [(0.0, 1), (0.5, 1), (1.0, 2), (2.9, 2), (3.0, 3), (6.9, 3), (7.0, 4), (10.9, 4), (11.0, 5)]
    for when, count in expected:  # retries after 1, 2, 4, then 4 s (the cap)
        now[0] = when
        manager.poll_once()
        assert len(attempts) == count, (when, attempts)
    assert manager.status()[0]["state"] == "END"
    (version_dir / "variables.index").write_bytes(b"new")  # a file landing: retried at once
    manager.poll_once()
    assert len(attempts) == 6
    broken[0] = False
    now[0] = 100.0
    assert manager.poll_once() and manager.current.version == 1
    assert manager.status()[0]["state"] == "AVAILABLE"


# ------------------------------------------------------------------------------------------------ slow clients
def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)  # a server that never closes makes this raise socket.timeout
        if not chunk:
            return data
        data += chunk


def test_connections_with_half_sent_headers_are_closed(bounded):
    handle, client, model = bounded
    for partial in (b"", b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"):
        with socket.create_connection((handle.host, handle.port), timeout=30) as sock:
            sock.sendall(partial)
            assert _read_until_closed(sock) == b""
    # on a kept-alive connection, the next request's half-sent headers too
    request = b"GET /v1/models/tiny HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection((handle.host, handle.port), timeout=30) as sock:
        sock.sendall(request)
        first = b""
        while b"AVAILABLE" not in first:
            first += sock.recv(65536)
        sock.sendall(b"GET /v1/models/tiny HTTP/1.1\r\nHo")
        assert _read_until_closed(sock) == b""
    assert_ok(client, model)


def test_a_body_that_does_not_arrive_gets_408_and_a_closed_connection(bounded):
    handle, client, model = bounded
    with socket.create_connection((handle.host, handle.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 1000\r\n\r\n{\"instances\": [")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout" in answer
    assert_ok(client, model)
