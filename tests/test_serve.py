"""The TF-Serving-style REST server: formats, errors, batching, hot reload, and the benchmark's quick mode."""
import asyncio
import base64
import importlib.util
import io
import json
import pathlib
import threading
import time

import httpx
import keras
import numpy as np
import pytest
from PIL import Image

from keras_oneimage.errors import InputError
from keras_oneimage.export import export
from keras_oneimage.models.alexnet import AlexNet
from keras_oneimage.serve import BatchScheduler, QueueFullError, make_app, start_in_thread
from keras_oneimage.serve.codec import encode_array, encode_predict_response, parse_predict

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("conv1", "conv2")
MAX_BODY = 200_000


def tiny_alexnet(seed: int) -> AlexNet:
    """imagenet-variant stem (11x11/4 conv1, valid pools) so that there is a real minimum image size."""
    keras.utils.set_random_seed(seed)
    model = AlexNet("imagenet", image_size=64, widths=(6, 8, 8, 8, 6))
    model.build()
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0.0, 0.3, layer.moving_mean.shape).astype("float32"))
            layer.beta.assign(rng.normal(0.2, 0.3, layer.beta.shape).astype("float32"))
    return model


def features(model, images, layers=LAYERS):
    out = model.features(np.asarray(images, dtype=np.float32), layers=layers, training=False)
    return {name: keras.ops.convert_to_numpy(value) for name, value in out.items()}


def png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_alexnet(seed=0)
    base = tmp_path_factory.mktemp("serve") / "tiny"
    export(model, base, layers=LAYERS)
    handle = start_in_thread(base, poll_seconds=0, max_body_bytes=MAX_BODY, max_batch_size=8)
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield handle, client, model
    client.close()
    handle.stop()


def assert_ok_predict(client, model):
    """The server still answers a good request correctly (used after every error case)."""
    image = np.random.default_rng(99).random((1, 32, 32, 3), dtype=np.float32)
    response = client.post("/v1/models/tiny:predict", json={"instances": image.tolist()})
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["predictions"][0]["conv1"], dtype=np.float32)
    np.testing.assert_allclose(got, features(model, image)["conv1"][0], atol=1e-5, rtol=0)


def test_binds_loopback_on_a_free_port(served):
    handle, _, _ = served
    assert handle.host == "127.0.0.1" and handle.port > 0


def test_model_status_and_metadata(served):
    _, client, _ = served
    status = client.get("/v1/models/tiny")
    assert status.status_code == 200
    assert status.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert client.get("/v1/models/tiny/versions/1").json()["model_version_status"][0]["version"] == "1"
    meta = client.get("/v1/models/tiny/metadata").json()
    assert meta["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    assert set(sigs) == {"serving_default", "serving_uint8", "serving_bytes"}
    images = sigs["serving_default"]["inputs"]["images"]
    assert images["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in images["tensor_shape"]["dim"]] == ["-1", "-1", "-1", "3"]
    assert sigs["serving_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert set(sigs["serving_default"]["outputs"]) == set(LAYERS)
    assert sigs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert meta["metadata"]["keras_oneimage"]["layers"] == list(LAYERS)


def test_row_format_matches_in_process(served):
    _, client, model = served
    images = np.random.default_rng(1).random((2, 30, 36, 3), dtype=np.float32)
    response = client.post("/v1/models/tiny:predict", json={"instances": images.tolist()})
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "1"
    predictions = response.json()["predictions"]
    assert len(predictions) == 2 and all(set(p) == set(LAYERS) for p in predictions)
    want = features(model, images)
    for name in LAYERS:
        got = np.asarray([p[name] for p in predictions], dtype=np.float32)
        assert got.shape == want[name].shape
        np.testing.assert_allclose(got, want[name], atol=1e-5, rtol=0)


def test_named_row_instances_and_columnar_format(served):
    _, client, model = served
    images = np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32)
    want = features(model, images)
    named = client.post("/v1/models/tiny:predict", json={"instances": [{"images": im.tolist()} for im in images]})
    columnar = client.post("/v1/models/tiny/versions/1:predict", json={"inputs": {"images": images.tolist()}})
    bare = client.post("/v1/models/tiny:predict", json={"inputs": images.tolist(), "signature_name": "serving_default"})
    for response in (named, columnar, bare):
        assert response.status_code == 200, response.text
    assert set(columnar.json()) == {"outputs"} and set(columnar.json()["outputs"]) == set(LAYERS)
    for name in LAYERS:
        np.testing.assert_allclose(
            np.asarray([p[name] for p in named.json()["predictions"]]), want[name], atol=1e-5, rtol=0
        )
        for response in (columnar, bare):
            np.testing.assert_allclose(np.asarray(response.json()["outputs"][name]), want[name], atol=1e-5, rtol=0)


def test_b64_images_and_uint8_signature(served):
    _, client, model = served
    u8 = np.random.default_rng(3).integers(0, 256, (2, 33, 31, 3), dtype=np.uint8)
    want = features(model, u8.astype(np.float32) / 255.0)
    rows = client.post(
        "/v1/models/tiny:predict",
        json={"signature_name": "serving_bytes", "instances": [{"b64": png_b64(im)} for im in u8]},
    )
    named = client.post(
        "/v1/models/tiny:predict",
        json={"signature_name": "serving_bytes", "instances": [{"image_bytes": {"b64": png_b64(u8[0])}}]},
    )
    columnar = client.post(
        "/v1/models/tiny:predict",
        json={"signature_name": "serving_bytes", "inputs": {"image_bytes": [{"b64": png_b64(im)} for im in u8]}},
    )
    ints = client.post("/v1/models/tiny:predict", json={"signature_name": "serving_uint8", "inputs": u8.tolist()})
    for response in (rows, named, columnar, ints):
        assert response.status_code == 200, response.text
    for name in LAYERS:
        np.testing.assert_allclose(
            np.asarray([p[name] for p in rows.json()["predictions"]]), want[name], atol=1e-5, rtol=0
        )
        np.testing.assert_allclose(np.asarray(named.json()["predictions"][0][name]), want[name][0], atol=1e-5)
        np.testing.assert_allclose(np.asarray(columnar.json()["outputs"][name]), want[name], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(ints.json()["outputs"][name]), want[name], atol=1e-5, rtol=0)


GOOD_IMAGE = np.zeros((1, 32, 32, 3)).tolist()


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'{"examples": []}', "unknown key"),
        (b"{}", "exactly one of"),
        (json.dumps({"instances": GOOD_IMAGE, "inputs": GOOD_IMAGE}).encode(), "exactly one of"),
        (b'{"instances": []}', "non-empty"),
        (b'{"instances": [[1.0, 2.0]]}', "rank 4"),
        (json.dumps({"instances": np.zeros((1, 32, 32, 4)).tolist()}).encode(), "shape"),
        (b'{"instances": [[[[0.1, 0.2, 0.3]]], [[[0.1, 0.2]]]]}', "ragged"),
        (b'{"instances": [[[["a", "b", "c"]]]]}', "DT_FLOAT"),
        (b'{"instances": [[[[null, 0, 0]]]]}', "DT_FLOAT"),
        (b'{"signature_name": "serving_bytes", "instances": [{"b64": "@@not base64@@"}]}', "base64"),
        (b'{"signature_name": "serving_bytes", "instances": [{"b64": "bm90IGFuIGltYWdl"}]}', "image file format"),
        (b'{"instances": [{"b64": "AAAA"}]}', "only for string inputs"),
        (b'{"signature_name": "serving_uint8", "instances": [[[[256, 0, 0]]]]}', "[0, 255]"),
        (b'{"signature_name": "serving_uint8", "instances": [[[[0.5, 0, 0]]]]}', "DT_UINT8"),
        (b'{"signature_name": "nope", "instances": [1]}', "not found"),
        (b'{"signature_name": 3, "instances": [1]}', "must be a string"),
        (b'{"instances": [{"pixels": 1}]}', "exactly the inputs"),
        (json.dumps({"instances": np.zeros((1, 14, 40, 3)).tolist()}).encode(), "at least 15x15"),
    ],
)
def test_bad_requests_get_400_and_the_server_stays_up(served, body, message):
    _, client, model = served
    response = client.post("/v1/models/tiny:predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error
    assert_ok_predict(client, model)


def test_oversized_body_gets_413_and_the_server_stays_up(served):
    _, client, model = served
    big = json.dumps({"instances": np.zeros((1, 160, 160, 3)).tolist()}).encode()
    assert len(big) > MAX_BODY
    response = client.post("/v1/models/tiny:predict", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "limit" in response.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    response = client.post("/v1/models/tiny:predict", content=chunks())
    assert response.status_code == 413
    assert_ok_predict(client, model)


def test_unknown_models_versions_and_routes_get_json_errors(served):
    _, client, model = served
    assert client.get("/v1/models/other").status_code == 404
    assert "Servable not found" in client.post("/v1/models/other:predict", json={"instances": [1]}).json()["error"]
    assert client.post("/v1/models/tiny/versions/2:predict", json={"instances": GOOD_IMAGE}).status_code == 404
    assert client.get("/v1/models/tiny/versions/5").status_code == 404
    assert client.get("/v1/models/tiny/labels/stable").status_code == 404
    assert client.get("/v1/models/tiny:predict").status_code == 405
    assert client.post("/v1/models/tiny:classify", json={}).status_code == 400
    assert "error" in client.get("/elsewhere").json()
    assert_ok_predict(client, model)


def test_concurrent_requests_each_get_their_own_features(served):
    handle, client, model = served
    batcher = handle.app.state.batcher
    rows_before = batcher.stats["rows"]
    images = np.random.default_rng(4).random((12, 32, 32, 3), dtype=np.float32)
    results: dict[int, np.ndarray] = {}

    def ask(i):
        with httpx.Client(base_url=handle.url, timeout=60) as own:
            r = own.post("/v1/models/tiny:predict", json={"instances": images[i : i + 1].tolist()})
            results[i] = np.asarray(r.json()["predictions"][0]["conv2"], dtype=np.float32)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    want = features(model, images)["conv2"]
    assert sorted(results) == list(range(len(images)))
    for i in range(len(images)):
        np.testing.assert_allclose(results[i], want[i], atol=1e-5, rtol=0)
    assert batcher.stats["rows"] - rows_before == len(images)


def test_serves_a_version_added_while_running_and_skips_broken_ones(tmp_path):
    base = tmp_path / "live"
    first, second = tiny_alexnet(seed=10), tiny_alexnet(seed=11)
    export(first, base, layers=("conv1",))
    image = np.random.default_rng(5).random((1, 32, 32, 3), dtype=np.float32)
    with start_in_thread(base, poll_seconds=0.1) as handle, httpx.Client(base_url=handle.url, timeout=60) as client:
        r1 = client.post("/v1/models/live:predict", json={"instances": image.tolist()})
        assert r1.headers["x-model-version"] == "1"
        # a single output: TF Serving drops the name in the row format
        np.testing.assert_allclose(np.asarray(r1.json()["predictions"]), features(first, image, ("conv1",))["conv1"],
                                   atol=1e-5, rtol=0)

        export(second, base, layers=("conv1",))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {s["version"]: s["state"] for s in client.get("/v1/models/live").json()["model_version_status"]}
            if states.get("2") == "AVAILABLE":
                break
            time.sleep(0.1)
        assert states == {"2": "AVAILABLE", "1": "END"}
        r2 = client.post("/v1/models/live:predict", json={"instances": image.tolist()})
        assert r2.status_code == 200 and r2.headers["x-model-version"] == "2"
        np.testing.assert_allclose(np.asarray(r2.json()["predictions"]), features(second, image, ("conv1",))["conv1"],
                                   atol=1e-5, rtol=0)
        assert client.post("/v1/models/live/versions/1:predict", json={"instances": image.tolist()}).status_code == 404

        broken = base / "3"  # a version that cannot load must not take the model down
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"garbage")
        deadline = time.monotonic() + 60
        status: dict = {}
        while time.monotonic() < deadline:
            status = {s["version"]: s for s in client.get("/v1/models/live").json()["model_version_status"]}
            if "3" in status and status["3"]["state"] == "END":
                break
            time.sleep(0.1)
        assert status["3"]["status"]["error_code"] != "OK" and status["3"]["status"]["error_message"]
        r3 = client.post("/v1/models/live:predict", json={"instances": image.tolist()})
        assert r3.status_code == 200 and r3.headers["x-model-version"] == "2"


def test_app_factory_works_in_process_without_a_socket(tmp_path):
    model = tiny_alexnet(seed=0)
    export(model, tmp_path / "m", layers=LAYERS)
    app = make_app(tmp_path / "m", model_name="inproc", poll_seconds=0)
    image = np.random.default_rng(6).random((1, 32, 32, 3), dtype=np.float32)

    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/models/inproc:predict", json={"inputs": image.tolist()})

    response = asyncio.run(call())
    assert response.status_code == 200
    np.testing.assert_allclose(np.asarray(response.json()["outputs"]["conv2"]), features(model, image)["conv2"],
                               atol=1e-5, rtol=0)
    app.state.batcher.close()


def test_make_app_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        make_app(tmp_path / "missing")
    with pytest.raises(InputError, match="max_batch_size"):
        make_app(tmp_path, max_batch_size=0)
    empty = make_app(tmp_path, poll_seconds=0)  # an empty base path is served (404) until a version appears
    assert empty.state.manager.current is None


# ------------------------------------------------------------------------------------------------ JSON encoding
def test_float_encoding_round_trips_float32_exactly():
    rng = np.random.default_rng(7)
    values = (rng.standard_normal(20_000) * 10.0 ** rng.integers(-44, 38, 20_000)).astype(np.float32)
    values = values[np.isfinite(values)]
    specials = np.array([0.0, -0.0, 1.0, 0.1, 1e-45, 3.4028235e38, -1.1754944e-38, np.nan, np.inf, -np.inf], np.float32)
    for arr in (values, specials, values[:24].reshape(2, 3, 4), np.float32(2.5)):
        back = np.asarray(json.loads(encode_array(arr)), dtype=np.float32)
        np.testing.assert_array_equal(back, arr)
    arr = values[:60].reshape(3, 4, 5)
    both = json.loads(encode_predict_response({"a": arr, "b": arr[:, :1]}, row_format=True))
    assert [sorted(p) for p in both["predictions"]] == [["a", "b"]] * 3
    np.testing.assert_array_equal(np.asarray(both["predictions"][2]["b"], np.float32), arr[2, :1])
    columnar = json.loads(encode_predict_response({"a": arr}, row_format=False))
    assert list(columnar) == ["outputs"]
    np.testing.assert_array_equal(np.asarray(columnar["outputs"], np.float32), arr)


def test_encoding_handles_non_finite_strided_and_foreign_byte_order_arrays():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    with_nan = arr.copy()
    with_nan[1, 2, 3] = np.nan
    with_nan[0, 0, 0] = -np.inf
    text = encode_predict_response({"clean": arr[:, ::2], "dirty": with_nan}, row_format=True)
    assert b"NaN" in text and b"-Infinity" in text and b"null" not in text
    rows = json.loads(text)["predictions"]
    np.testing.assert_array_equal(np.asarray([r["clean"] for r in rows], np.float32), arr[:, ::2])
    np.testing.assert_array_equal(np.asarray([r["dirty"] for r in rows], np.float32), with_nan)
    swapped = arr.astype(">f4")
    np.testing.assert_array_equal(np.asarray(json.loads(encode_array(swapped)), np.float32), arr)
    assert json.loads(encode_array(np.array([[1, 2]], np.uint8))) == [[1, 2]]
    encoded = json.loads(encode_array(np.array([b"x", b"\xff"], object), "image_bytes"))
    assert encoded == [{"b64": "eA=="}, {"b64": "/w=="}]
    assert encode_array(np.float32(0.1)) == b"0.1"  # the shortest text that reads back as this float32


def test_request_with_nan_literals_is_parsed_like_tf_serving(served):
    """orjson refuses NaN / Infinity literals; the server falls back to the json module, as TF Serving takes them."""
    handle, client, model = served
    image = np.random.default_rng(8).random((1, 32, 32, 3), dtype=np.float32)
    image[0, 0, 0, 0], image[0, 5, 5, 1] = np.nan, np.inf
    body = json.dumps({"instances": image.tolist()}).encode()
    assert b"NaN" in body and b"Infinity" in body
    parsed = parse_predict(body, handle.app.state.manager.current)
    np.testing.assert_array_equal(parsed.inputs["images"], image)  # NaN and inf where they were sent
    response = client.post("/v1/models/tiny:predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    conv1 = np.asarray(json.loads(response.content)["predictions"][0]["conv1"], np.float32)
    assert conv1.shape == features(model, np.nan_to_num(image))["conv1"].shape[1:]


# ------------------------------------------------------------------------------------------------ batching
def test_batch_scheduler_merges_queued_requests_and_splits_results():
    calls = []

    def run(inputs):
        calls.append(inputs["x"].shape[0])
        return {"y": inputs["x"] * 2}

    async def main():
        batcher = BatchScheduler(max_batch_size=4, num_batch_threads=1)
        xs = [np.full((1, 2), i, dtype=np.float32) for i in range(6)]
        # All six are queued before the scheduler first runs: batches of 4 and 2.
        results = await asyncio.gather(*(batcher.submit("k", {"x": x}, 1, run) for x in xs))
        other = await batcher.submit("other", {"x": np.ones((3, 2), np.float32)}, 3, run)
        batcher.close()
        return xs, results, other

    xs, results, other = asyncio.run(main())
    assert calls == [4, 2, 3]
    for x, result in zip(xs, results):
        np.testing.assert_array_equal(result["y"], x * 2)
    np.testing.assert_array_equal(other["y"], np.full((3, 2), 2.0))


def test_batch_scheduler_isolates_a_failing_request():
    def run(inputs):
        if np.any(inputs["x"] < 0):
            raise ValueError("negative input")
        return {"y": inputs["x"] + 1}

    async def main():
        batcher = BatchScheduler(max_batch_size=8, num_batch_threads=1)
        xs = [np.array([[1.0]]), np.array([[-1.0]]), np.array([[3.0]])]
        results = await asyncio.gather(*(batcher.submit("k", {"x": x}, 1, run) for x in xs), return_exceptions=True)
        batcher.close()
        return results, batcher.stats

    results, stats = asyncio.run(main())
    assert isinstance(results[1], ValueError)
    assert results[0]["y"].tolist() == [[2.0]] and results[2]["y"].tolist() == [[4.0]]
    assert stats["retried_alone"] == 1


def test_batch_scheduler_refuses_work_beyond_its_queue():
    def run(inputs):
        return {"y": inputs["x"]}

    async def main():
        batcher = BatchScheduler(max_batch_size=2, num_batch_threads=1, max_enqueued_rows=3)
        tasks = [asyncio.ensure_future(batcher.submit("k", {"x": np.zeros((2, 1))}, 2, run)) for _ in range(2)]
        await asyncio.sleep(0)  # both queued (2 + 2 > 3 rows: the second is refused)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        batcher.close()
        return results

    results = asyncio.run(main())
    assert isinstance(results[1], QueueFullError) and not isinstance(results[0], Exception)


# ------------------------------------------------------------------------------------------------ benchmark
def test_bench_quick_mode_completes(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "experiments" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--clients", "2", "--seconds", "0.5", "--requests", "8", "--json", str(out)])
    results = json.loads(out.read_text())
    for side in ("in_process", "grpc", "rest"):
        (level,) = results[side]
        assert level["clients"] == 2 and level["requests"] > 0 and not level["errors"]
        assert level["slices"] == 2  # --quick alternates two slices of each side
    assert results["grpc"][0]["ratio"] > 0 and results["rest"][0]["ratio"] > 0
