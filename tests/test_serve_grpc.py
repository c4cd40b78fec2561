"""TF Serving's gRPC API beside the REST server: a stock TF Serving client, status codes, shared batching."""
import base64
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from keras_oneimage.export import export
from keras_oneimage.serve import start_in_thread
from tests.test_serve import LAYERS, features, png_b64, tiny_alexnet

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_MESSAGE = 300_000
MAX_INSTANCES = 16
MAX_OUTPUT = 4000  # the tiny export gives 366 values per 32x32 image: 10 images are fine, 11 are not


@pytest.fixture(scope="module")
def grpc_served(tmp_path_factory):
    model = tiny_alexnet(seed=0)
    base = tmp_path_factory.mktemp("grpc") / "tiny"
    export(model, base, layers=LAYERS)
    handle = start_in_thread(
        base, poll_seconds=0, grpc_port=0, max_batch_size=4, max_body_bytes=MAX_MESSAGE,
        max_instances=MAX_INSTANCES, max_output_elements=MAX_OUTPUT,
    )
    channel = grpc.insecure_channel(handle.grpc_target)
    yield handle, channel, model
    channel.close()
    handle.stop()


def predict_request(inputs, name="tiny", signature="serving_default", version=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto)
                                     else tf.make_tensor_proto(value))
    return request


def assert_grpc_ok(channel, model):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    image = np.random.default_rng(99).random((1, 32, 32, 3), dtype=np.float32)
    response = stub.Predict(predict_request({"images": image}), timeout=60)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["conv1"]), features(model, image)["conv1"],
                               atol=1e-5, rtol=0)


def test_grpc_binds_loopback_beside_rest(grpc_served):
    handle, _, _ = grpc_served
    assert handle.grpc_port > 0 and handle.grpc_port != handle.port
    with socket.create_connection(("127.0.0.1", handle.grpc_port), timeout=10):
        pass


def test_stock_tf_serving_client_round_trip_equals_in_process(grpc_served):
    _, channel, model = grpc_served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    images = np.random.default_rng(1).random((3, 30, 36, 3), dtype=np.float32)
    response = stub.Predict(predict_request({"images": images}), timeout=60)
    assert response.model_spec.name == "tiny" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    assert set(response.outputs) == set(LAYERS)
    want = features(model, images)
    for name in LAYERS:
        proto = response.outputs[name]
        assert proto.tensor_content and not proto.float_val  # raw bytes, not a list of floats
        np.testing.assert_allclose(tf.make_ndarray(proto), want[name], atol=1e-5, rtol=0)

    # the same image as uint8 pixels, as encoded PNG files, and with the values in float_val instead of bytes
    u8 = np.random.default_rng(2).integers(0, 256, (2, 33, 31, 3), dtype=np.uint8)
    want = features(model, u8.astype(np.float32) / 255.0)
    as_uint8 = stub.Predict(predict_request({"images": u8}, signature="serving_uint8"), timeout=60)
    pngs = [base64.b64decode(png_b64(im)) for im in u8]
    as_png = stub.Predict(predict_request({"image_bytes": tf.make_tensor_proto(pngs)}, signature="serving_bytes"),
                          timeout=60)
    listed = tf.make_tensor_proto(0.0, shape=[1, 33, 31, 3])
    listed.ClearField("float_val")
    listed.float_val.extend((u8[:1].astype(np.float32) / 255.0).ravel().tolist())
    as_list = stub.Predict(predict_request({"images": listed}, version=1), timeout=60)
    for name in LAYERS:
        np.testing.assert_allclose(tf.make_ndarray(as_uint8.outputs[name]), want[name], atol=1e-5, rtol=0)
        np.testing.assert_allclose(tf.make_ndarray(as_png.outputs[name]), want[name], atol=1e-5, rtol=0)
        np.testing.assert_allclose(tf.make_ndarray(as_list.outputs[name]), want[name][:1], atol=1e-5, rtol=0)
    filtered = predict_request({"images": images[:1]})
    filtered.output_filter.append("conv2")
    assert list(stub.Predict(filtered, timeout=60).outputs) == ["conv2"]


def test_model_metadata_and_status(grpc_served):
    _, channel, _ = grpc_served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "tiny"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=60)
    assert response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert set(signatures.signature_def) == {"serving_default", "serving_uint8", "serving_bytes"}
    images = signatures.signature_def["serving_default"].inputs["images"]
    assert images.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in images.tensor_shape.dim] == [-1, -1, -1, 3]
    assert set(signatures.signature_def["serving_default"].outputs) == set(LAYERS)

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "tiny"}), timeout=60)
    (version,) = status.model_version_status
    assert version.version == 1
    assert version.state == get_model_status_pb2.ModelVersionStatus.State.Value("AVAILABLE")
    assert version.status.error_code == 0 and version.status.error_message == ""


def _bad_requests():
    image = np.zeros((1, 32, 32, 3), np.float32)
    short = tf.make_tensor_proto(image)
    short.tensor_content = short.tensor_content[:-4]
    huge_rows = tf.make_tensor_proto(np.zeros((1, 32, 32, 3), np.float32))
    huge_rows.tensor_shape.dim[0].size = 100_000  # declared, never sent: refused from the shape alone
    huge_image = tf.make_tensor_proto(np.zeros((1, 1, 1, 3), np.float32))
    huge_image.tensor_shape.dim[1].size = huge_image.tensor_shape.dim[2].size = 50_000
    return [
        ("unknown model", predict_request({"images": image}, name="other"), "NOT_FOUND", "Servable not found"),
        ("unknown version", predict_request({"images": image}, version=7), "NOT_FOUND", "Specific(tiny, 7)"),
        ("unknown signature", predict_request({"images": image}, signature="nope"), "INVALID_ARGUMENT",
         "not found"),
        ("wrong input name", predict_request({"pixels": image}), "INVALID_ARGUMENT", "exactly the inputs"),
        ("wrong dtype", predict_request({"images": image.astype(np.float64)}), "INVALID_ARGUMENT", "DT_FLOAT"),
        ("wrong rank", predict_request({"images": image[0]}), "INVALID_ARGUMENT", "rank 4"),
        ("wrong channels", predict_request({"images": np.zeros((1, 32, 32, 4), np.float32)}), "INVALID_ARGUMENT",
         "shape"),
        ("too small", predict_request({"images": np.zeros((1, 14, 40, 3), np.float32)}), "INVALID_ARGUMENT",
         "at least 15x15"),
        ("short content", predict_request({"images": short}), "INVALID_ARGUMENT", "tensor_content"),
        ("not an image", predict_request({"image_bytes": tf.make_tensor_proto([b"not an image"])},
                                         signature="serving_bytes"), "INVALID_ARGUMENT", "image file format"),
        ("too many rows", predict_request({"images": huge_rows}), "RESOURCE_EXHAUSTED", "max_instances"),
        ("too many pixels", predict_request({"images": huge_image}), "RESOURCE_EXHAUSTED", "max_pixels"),
        ("too many outputs", predict_request({"images": np.zeros((11, 32, 32, 3), np.float32)}),
         "RESOURCE_EXHAUSTED", "max_output_elements"),
        ("message too big", predict_request({"images": np.zeros((1, 200, 200, 3), np.float32)}),
         "RESOURCE_EXHAUSTED", ""),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda case: case[0])
def test_bad_requests_get_tf_serving_status_codes(grpc_served, case):
    _, channel, model = grpc_served
    _, request, code, message = case
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=60)
    assert info.value.code() == getattr(grpc.StatusCode, code), info.value.details()
    assert message in info.value.details()
    assert_grpc_ok(channel, model)


def test_bad_metadata_and_status_requests(grpc_served):
    _, channel, model = grpc_served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    no_field = get_model_metadata_pb2.GetModelMetadataRequest()
    no_field.model_spec.name = "tiny"
    other = get_model_metadata_pb2.GetModelMetadataRequest()
    other.model_spec.name = "other"
    other.metadata_field.append("signature_def")
    status = model_service_pb2_grpc.ModelServiceStub(channel)
    cases = [
        (lambda: stub.GetModelMetadata(no_field, timeout=60), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.GetModelMetadata(other, timeout=60), grpc.StatusCode.NOT_FOUND),
        (lambda: status.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "other"}),
                                       timeout=60), grpc.StatusCode.NOT_FOUND),
        (lambda: status.GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "tiny", "version": {"value": 9}}),
            timeout=60), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.Regress(regression_pb2.RegressionRequest(), timeout=60), grpc.StatusCode.UNIMPLEMENTED),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code
    assert_grpc_ok(channel, model)


def test_rest_protobuf_response_equals_json(grpc_served):
    handle, _, model = grpc_served
    images = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
    with httpx.Client(base_url=handle.url, timeout=60) as client:
        response = client.post("/v1/models/tiny:predict", json={"instances": images.tolist()},
                               headers={"Accept": "application/x-protobuf"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-protobuf"
    parsed = predict_pb2.PredictResponse.FromString(response.content)
    want = features(model, images)
    for name in LAYERS:
        np.testing.assert_allclose(tf.make_ndarray(parsed.outputs[name]), want[name], atol=1e-5, rtol=0)


def test_grpc_and_rest_requests_share_one_batch(tmp_path):
    """With the only batch worker held, a REST and a gRPC request queue up and run as one model call."""
    model = tiny_alexnet(seed=0)
    export(model, tmp_path / "tiny", layers=LAYERS)
    handle = start_in_thread(tmp_path / "tiny", poll_seconds=0, grpc_port=0, num_batch_threads=1, max_batch_size=8)
    served = handle.app.state.manager.current
    gate, entered = threading.Event(), threading.Event()
    runner = served.runner

    def gated_runner(signature):
        run = runner(signature)

        def gated(inputs):
            entered.set()
            assert gate.wait(60)
            return run(inputs)

        return gated

    served.runner = gated_runner
    images = np.random.default_rng(4).random((3, 32, 32, 3), dtype=np.float32)
    results = {}

    def rest(i):
        with httpx.Client(base_url=handle.url, timeout=60) as client:
            r = client.post("/v1/models/tiny:predict", json={"instances": images[i:i + 1].tolist()})
            results[i] = np.asarray(r.json()["predictions"][0]["conv2"], np.float32)

    def grpc_call(i):
        with grpc.insecure_channel(handle.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            r = stub.Predict(predict_request({"images": images[i:i + 1]}), timeout=60)
            results[i] = tf.make_ndarray(r.outputs["conv2"])[0]

    batcher = handle.app.state.batcher
    try:
        first = threading.Thread(target=rest, args=(0,))
        first.start()
        assert entered.wait(60)  # the worker is now busy with request 0
        others = [threading.Thread(target=rest, args=(1,)), threading.Thread(target=grpc_call, args=(2,))]
        for t in others:
            t.start()
        deadline = time.monotonic() + 120  # a bound against hanging, not a timing assertion
        while batcher._queued_rows < 2:  # both wait in the queue: poll the scheduler's own count
            assert all(t.is_alive() for t in others) and time.monotonic() < deadline
            threading.Event().wait(0.01)
        gate.set()
        for t in [first, *others]:
            t.join(60)
    finally:
        gate.set()
        handle.stop()
    assert batcher.stats["batches"] == 2 and batcher.stats["max_rows"] == 2
    want = features(model, images)["conv2"]
    for i in range(3):
        np.testing.assert_allclose(results[i], want[i], atol=1e-5, rtol=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_with_grpc_port(tmp_path):
    model = tiny_alexnet(seed=0)
    export(model, tmp_path / "clitiny", layers=("conv1",))
    grpc_port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_oneimage.cli", "serve", "--model_base_path", str(tmp_path / "clitiny"),
         "--port", "0", "--grpc_port", str(grpc_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].startswith("serving clitiny at http://127.0.0.1:"), lines
        assert lines[1].strip() == f"serving clitiny over gRPC at 127.0.0.1:{grpc_port}", lines
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            image = np.random.default_rng(5).random((1, 32, 32, 3), dtype=np.float32)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(predict_request({"images": image}, name="clitiny"), timeout=120)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["conv1"]),
                                   features(model, image, ("conv1",))["conv1"], atol=1e-5, rtol=0)
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize(
    "outputs",
    [
        {"conv1": np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4) / 7, "conv2": np.ones((2, 5), np.float32)},
        {"ints": np.arange(-6, 6, dtype=np.int32).reshape(3, 4), "bytes": np.arange(200, 230, dtype=np.uint8)},
        {"half": np.linspace(-2, 2, 9, dtype=np.float16), "double": np.array(np.pi), "flags": np.array([True, False])},
        {"empty": np.zeros((0, 4), np.float32), "strided": np.arange(40, dtype=np.float32).reshape(5, 8)[:, ::3]},
        {"text": np.array([b"a", b"bc"], dtype=object), "x": np.ones(3, np.float32)},
    ],
    ids=["float_maps", "ints", "half_double_bool", "empty_and_strided", "strings_fall_back"],
)
def test_serialized_predict_response_parses_to_the_built_one(outputs):
    from keras_oneimage.serve.grpc_server import predict_response, predict_response_bytes

    for output_filter in ((), sorted(outputs)[:1]):
        wire = predict_response_bytes("m", 12, "serving_default", outputs, output_filter)
        parsed = predict_pb2.PredictResponse.FromString(wire)
        assert parsed == predict_response("m", 12, "serving_default", outputs, output_filter)
        assert sorted(parsed.outputs) == sorted(output_filter or outputs)
        for key in parsed.outputs:
            np.testing.assert_array_equal(tf.make_ndarray(parsed.outputs[key]), np.asarray(outputs[key]))


def test_keep_large_buffers_applies_on_glibc_and_yields_to_the_environment(monkeypatch):
    import ctypes.util

    from keras_oneimage.serve import allocator

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.keep_large_buffers() is False  # the user's own setting stays
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.keep_large_buffers() is False  # no C library found: nothing to tune
    monkeypatch.undo()
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        assert allocator.keep_large_buffers() is True
