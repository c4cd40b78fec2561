"""TF Serving's gRPC API beside the REST server: ``PredictionService`` and ``ModelService``, on ``grpc.aio``.

Implements ``tensorflow.serving.PredictionService/Predict`` and ``/GetModelMetadata`` and
``tensorflow.serving.ModelService/GetModelStatus`` with the protos and stubs of the ``tensorflow-serving-api``
package, so a client written for TF Serving works unchanged::

    channel = grpc.insecure_channel("127.0.0.1:8500")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "rotnet_a"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    outputs = {k: tf.make_ndarray(v) for k, v in stub.Predict(request).outputs.items()}

The server runs on the REST server's event loop and hands requests to the same
:class:`~keras_oneimage.serve.batching.BatchScheduler`, so gRPC and REST requests for the same signature and image
size are merged into the same model calls. Tensors travel as raw bytes: a request's ``tensor_content`` becomes a
numpy array without a copy (``np.frombuffer``), and outputs go back as ``tensor_content``, which is what makes gRPC
much cheaper than JSON for dense feature maps. Inputs are checked against the signature and the per-request
:class:`~keras_oneimage.serve.limits.Limits` from their declared shapes, before their values are read.

Status codes follow TF Serving: ``INVALID_ARGUMENT`` for a malformed request, ``NOT_FOUND`` for an unknown model or
version, ``RESOURCE_EXHAUSTED`` for a request over a limit (or a message over ``max_message_bytes``),
``UNAVAILABLE`` when the batching queue is full.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from keras_oneimage.errors import InputError
from keras_oneimage.serve.batching import BatchScheduler, QueueFullError
from keras_oneimage.serve.codec import DEFAULT_SIGNATURE, check_limits, check_shape, model_error_message
from keras_oneimage.serve.errors import GRPC_CODES, RequestError
from keras_oneimage.serve.limits import Limits
from keras_oneimage.serve.models import NP_DTYPES, ModelManager, ServedVersion, Signature, TensorSpec

log = logging.getLogger("keras_oneimage.serve")

#: The TensorProto field holding the values of each dtype when ``tensor_content`` is not used.
_VALUE_FIELDS = {
    "DT_FLOAT": "float_val",
    "DT_DOUBLE": "double_val",
    "DT_INT32": "int_val",
    "DT_INT16": "int_val",
    "DT_INT8": "int_val",
    "DT_UINT8": "int_val",
    "DT_UINT16": "int_val",
    "DT_INT64": "int64_val",
    "DT_BOOL": "bool_val",
    "DT_HALF": "half_val",
    "DT_STRING": "string_val",
}
#: tensorflow.error.Code numbers of the error codes the model manager reports.
_ERROR_CODES = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "NOT_FOUND": 5}


def _datatype_name(enum: int) -> str:
    from tensorflow.core.framework import types_pb2

    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"dtype {enum}"


def _shape_of(proto: Any, name: str) -> tuple[int, ...]:
    if proto.tensor_shape.unknown_rank:
        raise RequestError(f"input '{name}' has an unknown rank; give its shape")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise RequestError(f"input '{name}' has a negative dimension in its shape {list(shape)}")
    return shape


def tensor_to_array(proto: Any, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    """A request's TensorProto as a numpy array of ``shape`` (already checked against the limits).

    ``tensor_content`` is viewed in place (read-only, no copy); the typed value fields (``float_val``, ...) must
    hold exactly one value per element.
    """
    name = spec.name
    dtype = _datatype_name(proto.dtype)
    if dtype != spec.dtype:
        raise RequestError(f"input '{name}' must be {spec.dtype}; got {dtype}")
    count = math.prod(shape)
    if spec.dtype == "DT_STRING":
        values = proto.string_val
        if len(values) != count:
            raise RequestError(f"input '{name}' has {len(values)} strings for shape {list(shape)}")
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    np_dtype = np.dtype(NP_DTYPES[spec.dtype]).newbyteorder("<")  # tensor_content is little-endian
    if proto.tensor_content:
        content = proto.tensor_content
        if len(content) != count * np_dtype.itemsize:
            raise RequestError(
                f"input '{name}' has {len(content)} bytes of tensor_content; shape {list(shape)} of {spec.dtype} "
                f"needs {count * np_dtype.itemsize}"
            )
        return np.frombuffer(content, dtype=np_dtype).reshape(shape)
    field = _VALUE_FIELDS.get(spec.dtype)
    values = getattr(proto, field) if field else ()
    if len(values) != count:
        raise RequestError(f"input '{name}' has {len(values)} values for shape {list(shape)}")
    if spec.dtype == "DT_HALF":  # half_val holds the float16 bit patterns
        return np.asarray(values, dtype=np.uint16).view(np.float16).reshape(shape)
    try:
        return np.asarray(values, dtype=np_dtype).reshape(shape)
    except OverflowError:
        raise RequestError(f"input '{name}' has values out of range for {spec.dtype}") from None


def predict_response(
    model_name: str,
    version: int,
    signature_name: str,
    outputs: Mapping[str, np.ndarray],
    output_filter: Iterable[str] = (),
) -> Any:
    """TF Serving's ``PredictResponse`` for ``outputs``: numeric tensors as little-endian ``tensor_content``."""
    response = predict_pb2.PredictResponse()
    response.model_spec.name = model_name
    response.model_spec.version.value = int(version)
    response.model_spec.signature_name = signature_name
    for key in list(output_filter) or sorted(outputs):
        arr = np.asarray(outputs[key])
        proto = response.outputs[key]
        if arr.dtype == object or arr.dtype.kind in "SU":
            import tensorflow as tf

            proto.CopyFrom(tf.make_tensor_proto(arr))
            continue
        import tensorflow as tf

        proto.dtype = tf.as_dtype(arr.dtype.newbyteorder("=")).as_datatype_enum
        for size in arr.shape:
            proto.tensor_shape.dim.add(size=int(size))
        proto.tensor_content = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    return response


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int) -> bytes:
    """The tag of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2)


def predict_response_bytes(
    model_name: str,
    version: int,
    signature_name: str,
    outputs: Mapping[str, np.ndarray],
    output_filter: Iterable[str] = (),
) -> bytes:
    """:func:`predict_response` already serialized, with each output's values copied once.

    Building the message copies every output three times (``tobytes``, into the message, and serializing it): a
    32 px conv1-conv2 answer is 655 KB, so those copies were a visible share of the gRPC server's time. Here the
    small parts (model spec, dtypes, shapes) are serialized by protobuf and the values are joined in from the
    arrays' own buffers, in the wire format of ``PredictResponse`` (``outputs`` = 1, a map of ``TensorProto``
    whose ``tensor_content`` = 4; ``model_spec`` = 2). Parsing the result gives a message equal to
    :func:`predict_response`'s (tests/test_serve_grpc.py). Outputs that are not plain numbers go through
    :func:`predict_response`.
    """
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    keys = list(output_filter) or sorted(outputs)
    arrays = {key: np.asarray(outputs[key]) for key in keys}
    if any(arr.dtype == object or arr.dtype.kind in "SU" for arr in arrays.values()):
        return predict_response(model_name, version, signature_name, outputs, output_filter).SerializeToString()
    parts: list[Any] = []
    for key in keys:
        shape = arrays[key].shape  # before ascontiguousarray, which makes a 0-d array 1-d
        arr = np.ascontiguousarray(arrays[key], dtype=arrays[key].dtype.newbyteorder("<"))
        head = tensor_pb2.TensorProto(dtype=tf.as_dtype(arr.dtype.newbyteorder("=")).as_datatype_enum)
        for size in shape:
            head.tensor_shape.dim.add(size=int(size))
        head_bytes = head.SerializeToString() + _field(4) + _varint(arr.nbytes)
        name = key.encode()
        entry_head = _field(1) + _varint(len(name)) + name + _field(2) + _varint(len(head_bytes) + arr.nbytes)
        parts += [_field(1), _varint(len(entry_head) + len(head_bytes) + arr.nbytes), entry_head, head_bytes,
                  memoryview(arr.reshape(-1)).cast("B") if arr.size else b""]
    spec = predict_pb2.PredictResponse()
    spec.model_spec.name = model_name
    spec.model_spec.version.value = int(version)
    spec.model_spec.signature_name = signature_name
    parts.append(spec.SerializeToString())
    return b"".join(parts)


def _serialize_predict_response(response: Any) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


class _Base:
    def __init__(self, manager: ModelManager, batcher: BatchScheduler, limits: Limits):
        self.manager = manager
        self.batcher = batcher
        self.limits = limits

    def _served(self, model_spec: Any) -> ServedVersion:
        name = model_spec.name
        if name != self.manager.name:
            raise RequestError(f"Servable not found for request: Latest({name})", 404)
        if model_spec.WhichOneof("version_choice") == "version_label":
            raise RequestError("model version labels are not supported by this server; give a version number")
        version = model_spec.version.value if model_spec.HasField("version") else None
        return self.manager.get(version)


async def _abort(context: Any, status: int, message: str) -> None:
    await context.abort(getattr(grpc.StatusCode, GRPC_CODES.get(status, "UNKNOWN")), message)


class PredictionServicer(_Base, prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata (the rest answer UNIMPLEMENTED)."""

    async def Predict(self, request: Any, context: Any) -> Any:
        import tensorflow as tf

        try:
            served = self._served(request.model_spec)
            sig_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            signature = served.signatures.get(sig_name)
            if signature is None:
                raise RequestError(
                    f"serving signature name '{sig_name}' not found in the model; available: "
                    f"{', '.join(sorted(served.signatures))}"
                )
            inputs = self._inputs(request, signature, served.min_size)
            rows = {arr.shape[0] for arr in inputs.values()}
            if len(rows) != 1:
                raise RequestError("all inputs must have the same number of instances")
            wanted = list(request.output_filter)
            unknown = sorted(set(wanted) - set(signature.outputs))
            if unknown:
                raise RequestError(f"output_filter names unknown outputs {unknown}; the signature has "
                                   f"{sorted(signature.outputs)}")
            outputs = await self.batcher.submit(
                served.batch_key(sig_name, inputs), inputs, rows.pop(), served.runner(sig_name)
            )
            return predict_response_bytes(self.manager.name, served.version, sig_name, outputs, wanted)
        except RequestError as exc:
            status, message = exc.status, str(exc)
        except QueueFullError as exc:
            status, message = 503, str(exc)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            status, message = 400, model_error_message(exc)
        except Exception as exc:  # pragma: no cover - unexpected model failure
            log.exception("gRPC predict failed")
            status, message = 500, f"internal error: {model_error_message(exc)}"
        await _abort(context, status, message)

    def _inputs(self, request: Any, signature: Signature, min_size: int) -> dict[str, np.ndarray]:
        names = sorted(signature.inputs)
        if sorted(request.inputs) != names:
            raise RequestError(f"the request must have exactly the inputs {names}; got {sorted(request.inputs)}")
        # Shapes first: every check that can refuse the request runs before any value is read.
        shapes = {name: _shape_of(request.inputs[name], name) for name in names}
        for name in names:
            check_shape(shapes[name], signature.inputs[name], min_size)
        check_limits(signature, shapes, self.limits)
        inputs = {name: tensor_to_array(request.inputs[name], signature.inputs[name], shapes[name]) for name in names}
        if any(signature.inputs[name].dtype == "DT_STRING" for name in names):
            check_limits(signature, inputs, self.limits)  # encoded images: their headers give their sizes
        return inputs

    async def GetModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            fields = list(request.metadata_field)
            if not fields:
                raise RequestError("GetModelMetadataRequest must name at least one metadata_field ('signature_def')")
            unsupported = sorted(set(fields) - {"signature_def"})
            if unsupported:
                raise RequestError(f"metadata field(s) {unsupported} are not supported; use 'signature_def'")
            served = self._served(request.model_spec)
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for name, signature_def in served.signature_defs.items():
                signature_map.signature_def[name].CopyFrom(signature_def)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = self.manager.name
            response.model_spec.version.value = served.version
            response.metadata["signature_def"].Pack(signature_map)
            return response
        except RequestError as exc:
            await _abort(context, exc.status, str(exc))

    async def Classify(self, request: Any, context: Any) -> Any:
        await _abort(context, 501, "Classify is not implemented: the exports have predict signatures only")

    async def Regress(self, request: Any, context: Any) -> Any:
        await _abort(context, 501, "Regress is not implemented: the exports have predict signatures only")

    async def MultiInference(self, request: Any, context: Any) -> Any:
        await _abort(context, 501, "MultiInference is not implemented: the exports have predict signatures only")


class ModelServicer(_Base, model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus (reloading from a config is not supported)."""

    async def GetModelStatus(self, request: Any, context: Any) -> Any:
        try:
            name = request.model_spec.name
            if name != self.manager.name:
                raise RequestError(f"Could not find any versions of model {name}", 404)
            version = request.model_spec.version.value if request.model_spec.HasField("version") else None
            response = get_model_status_pb2.GetModelStatusResponse()
            states = get_model_status_pb2.ModelVersionStatus.State
            for item in self.manager.status(version):
                status = response.model_version_status.add()
                status.version = int(item["version"])
                status.state = states.Value(item["state"])
                status.status.error_code = _ERROR_CODES.get(item["status"]["error_code"], 2)
                status.status.error_message = item["status"]["error_message"]
            return response
        except RequestError as exc:
            await _abort(context, exc.status, str(exc))

    async def HandleReloadConfigRequest(self, request: Any, context: Any) -> Any:
        await _abort(context, 501, "reloading a model config is not supported: the server watches its base path")


async def start_grpc_server(
    manager: ModelManager,
    batcher: BatchScheduler,
    limits: Limits,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = 64 * 1024 * 1024,
) -> tuple[Any, int]:
    """Start a ``grpc.aio`` server on the running event loop; returns it and its bound port (port 0: a free one)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),  # a port in use must be an error, not a second listener sharing it
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            ("grpc.max_send_message_length", -1),
        ]
    )
    predictor = PredictionServicer(manager, batcher, limits)
    # Predict answers pre-serialized bytes (predict_response_bytes); this handler, added first, is the one gRPC
    # picks for it. The stock registration serves the service's other methods.
    predict = grpc.unary_unary_rpc_method_handler(
        predictor.Predict,
        request_deserializer=predict_pb2.PredictRequest.FromString,
        response_serializer=_serialize_predict_response,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {"Predict": predict}),)
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(predictor, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager, batcher, limits), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise InputError(f"cannot listen on {address} for gRPC: {exc}") from None
    if not bound:
        raise InputError(f"cannot listen on {address} for gRPC")
    await server.start()
    return server, bound
