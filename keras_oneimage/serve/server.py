"""A TensorFlow-Serving-REST-compatible server for exported trunks, on starlette + uvicorn.

Endpoints (TF Serving's REST API, https://www.tensorflow.org/tfx/serving/api_rest):

``GET  /v1/models/<name>[/versions/<v>]``              model version status (``model_version_status``)
``GET  /v1/models/<name>[/versions/<v>]/metadata``     signature defs (``model_spec`` + ``metadata``)
``POST /v1/models/<name>[/versions/<v>]:predict``      ``{"instances": [...]}`` → ``{"predictions": [...]}`` or
                                                      ``{"inputs": ...}`` → ``{"outputs": ...}``

Binary inputs (``serving_bytes``) are sent as ``{"b64": "<base64>"}``. Errors answer ``{"error": "..."}`` with 400
(bad request), 404 (no such model or version), 413 (body over ``max_body_bytes``) or 503 (queue full).

Like ``tensorflow_model_server --model_base_path``, the server watches the base path and serves the highest numeric
version directory, loading a new one when it appears (and unloading the previous one) without a restart.
Concurrent predict requests are merged into one model call (see :mod:`keras_oneimage.serve.batching`).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import socket
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import orjson

from keras_oneimage.errors import InputError
from keras_oneimage.serve.batching import BatchScheduler, QueueFullError

log = logging.getLogger("keras_oneimage.serve")

DEFAULT_PORT = 8501
DEFAULT_SIGNATURE = "serving_default"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_VERSION_RE = re.compile(r"^[0-9]+$")
_PATH_RE = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:[A-Za-z]+)?$"
)


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, the message goes into ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ==================================================================================================================
# JSON encoding of tensors
# ==================================================================================================================
# Feature maps are large (conv1 + conv2 of the cifar AlexNet at 32 px are 163,840 floats per image), so the response
# encoding is most of a predict request's CPU time. orjson writes numpy arrays natively (OPT_SERIALIZE_NUMPY), in
# compiled code, with the shortest decimal text that reads back as the same float32: 3.3 CPU ms for those two maps,
# against 13.9 for the vectorised numpy encoder this replaced (with ~15% more text) and 128 for
# json.dumps(arr.tolist()). See docs/serving.md, "Benchmark".
# orjson writes NaN / Infinity as null, so a float array holding any of them takes the slow path below instead,
# which writes them as TF Serving does (NaN, Infinity, -Infinity: Python's json module reads them back).
_NUMPY_OPTION = orjson.OPT_SERIALIZE_NUMPY
#: numpy kinds orjson serialises natively (float16/32/64, ints, uints, bool); anything else goes through ``tolist()``.
_ORJSON_KINDS = frozenset("fiub")


def _generic_json(arr: np.ndarray, name: str = "") -> Any:
    if arr.dtype == object or arr.dtype.kind in "SU":
        binary = name.endswith("_bytes")

        def conv(v):
            if isinstance(v, list):
                return [conv(x) for x in v]
            if isinstance(v, bytes):
                if binary:
                    return {"b64": base64.b64encode(v).decode("ascii")}
                return v.decode("utf-8", errors="replace")
            return v

        return conv(arr.tolist())
    return arr.tolist()


def _json_value(arr: Any, name: str = "") -> Any:
    """Something ``orjson.dumps(..., option=OPT_SERIALIZE_NUMPY)`` writes as the JSON of ``arr``, exactly.

    A native-endian, C-contiguous numeric array (orjson writes it in compiled code), a numpy scalar, or an
    ``orjson.Fragment`` of pre-encoded text (non-finite floats, strings, bytes, other dtypes).
    """
    arr = np.asarray(arr)
    kind = arr.dtype.kind
    if kind in _ORJSON_KINDS and arr.dtype.itemsize <= 8:
        if kind == "f" and not np.isfinite(arr).all():
            # float32/16 → Python float is exact, and repr() round-trips it; json writes NaN/Infinity.
            return orjson.Fragment(json.dumps(arr.tolist(), separators=(",", ":")).encode())
        if arr.ndim == 0:
            return arr[()]  # a numpy scalar (orjson refuses 0-d arrays)
        return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    return orjson.Fragment(json.dumps(_generic_json(arr, name), separators=(",", ":")).encode())


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_NUMPY_OPTION)


def encode_array(arr: np.ndarray, name: str = "") -> bytes:
    """JSON text of a whole tensor as a nested list (floats read back as exactly the same float32)."""
    return _dumps(_json_value(arr, name))


def encode_rows(arr: np.ndarray, name: str = "") -> list[bytes]:
    """JSON text of each entry along axis 0 (one list per instance, for the row format)."""
    arr = np.asarray(arr)
    if arr.ndim == 0:
        raise ValueError("a row-format output needs a batch dimension")
    return [encode_array(row, name) for row in arr]


def encode_predict_response(outputs: Mapping[str, np.ndarray], row_format: bool) -> bytes:
    """TF Serving's predict response: ``predictions`` (row) or ``outputs`` (columnar); names dropped if single."""
    names = list(outputs)
    if len(names) == 1:
        value = _json_value(outputs[names[0]], names[0])
        return _dumps({"predictions" if row_format else "outputs": value})
    if not row_format:
        return _dumps({"outputs": {name: _json_value(outputs[name], name) for name in names}})
    arrays = {name: np.asarray(outputs[name]) for name in names}
    if any(arr.ndim == 0 for arr in arrays.values()):
        raise RequestError("an output has no batch dimension; use the columnar 'inputs' format", 400)
    counts = {arr.shape[0] for arr in arrays.values()}
    if len(counts) != 1:
        raise RequestError("the outputs have different batch sizes; use the columnar 'inputs' format", 400)
    # Check and convert each whole array once (finiteness, contiguity); its rows are then views orjson can write.
    values = {name: _json_value(arr, name) for name, arr in arrays.items()}
    predictions = [
        {
            name: (value[i] if isinstance(value, np.ndarray) else _json_value(arrays[name][i], name))
            for name, value in values.items()
        }
        for i in range(counts.pop())
    ]
    return _dumps({"predictions": predictions})


# ==================================================================================================================
# Loaded models
# ==================================================================================================================
_NP_DTYPES = {
    "DT_FLOAT": np.float32,
    "DT_DOUBLE": np.float64,
    "DT_HALF": np.float16,
    "DT_UINT8": np.uint8,
    "DT_INT8": np.int8,
    "DT_UINT16": np.uint16,
    "DT_INT16": np.int16,
    "DT_INT32": np.int32,
    "DT_INT64": np.int64,
    "DT_BOOL": np.bool_,
    "DT_STRING": object,
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str  # the signature's key for this tensor (e.g. "images")
    dtype: str  # "DT_FLOAT", ...
    shape: tuple[int, ...] | None  # -1 for unknown dims; None for unknown rank


@dataclasses.dataclass
class Signature:
    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


class ServedVersion:
    """One loaded version directory: the TF object, its signatures and the export's ``keras_oneimage.json``."""

    def __init__(self, path: pathlib.Path, version: int):
        import tensorflow as tf
        from google.protobuf import json_format
        from tensorflow.core.protobuf import saved_model_pb2

        self.path = path
        self.version = version
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        meta_graph = next(
            (mg for mg in proto.meta_graphs if "serve" in mg.meta_info_def.tags), proto.meta_graphs[0]
        )
        self.signature_defs_json: dict[str, Any] = {}
        self.signatures: dict[str, Signature] = {}
        for sig_name, sig_def in meta_graph.signature_def.items():
            if sig_name.startswith("__"):
                continue
            self.signature_defs_json[sig_name] = json_format.MessageToDict(
                sig_def, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            self.signatures[sig_name] = Signature(
                sig_name,
                {key: _tensor_spec(key, info) for key, info in sorted(sig_def.inputs.items())},
                {key: _tensor_spec(key, info) for key, info in sorted(sig_def.outputs.items())},
            )
        self.loaded = tf.saved_model.load(str(path))
        try:
            self.metadata = json.loads((path / "keras_oneimage.json").read_text())
        except (OSError, ValueError):
            self.metadata = {}
        self.min_size = int(self.metadata.get("min_size") or 0)

    def runner(self, signature: str) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        import tensorflow as tf

        fn = self.loaded.signatures[signature]

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = fn(**{name: tf.constant(value) for name, value in inputs.items()})
            return {name: out[name].numpy() for name in sorted(out)}

        return run


def _tensor_spec(key: str, info: Any) -> TensorSpec:
    from tensorflow.core.framework import types_pb2

    dtype = types_pb2.DataType.Name(info.dtype)
    shape = None if info.tensor_shape.unknown_rank else tuple(int(d.size) for d in info.tensor_shape.dim)
    return TensorSpec(key, dtype, shape)


class ModelManager:
    """Watches ``base_path`` and keeps its highest loadable numeric version loaded (TF Serving's "latest" policy)."""

    def __init__(self, base_path: str | os.PathLike, name: str, poll_seconds: float = 2.0):
        self.base_path = pathlib.Path(base_path)
        self.name = name
        self.poll_seconds = float(poll_seconds)
        self.current: ServedVersion | None = None
        self._states: dict[int, dict[str, str]] = {}  # version → {"state", "error_code", "error_message"}
        self._failed: dict[int, float] = {}  # version → mtime of the dir when its load failed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _candidates(self) -> list[tuple[int, pathlib.Path]]:
        try:
            children = list(self.base_path.iterdir())
        except OSError:
            return []
        found = []
        for child in children:
            if _VERSION_RE.match(child.name) and (child / "saved_model.pb").is_file():
                found.append((int(child.name), child))
        return sorted(found, reverse=True)

    def poll_once(self) -> bool:
        """Load the highest version not known to be broken if it is not the one served; True if it changed."""
        with self._lock:
            for version, path in self._candidates():
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    continue
                if self._failed.get(version) == mtime:
                    continue
                if self.current is not None and self.current.version == version:
                    return False
                self._states[version] = {"state": "LOADING", "error_code": "OK", "error_message": ""}
                try:
                    served = ServedVersion(path, version)
                except Exception as exc:  # a broken version must not stop the server
                    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    log.error("cannot load version %s of %s from %s: %s", version, self.name, path, message)
                    self._failed[version] = mtime
                    self._states[version] = {"state": "END", "error_code": "UNKNOWN", "error_message": message}
                    continue
                previous, self.current = self.current, served
                self._states[version] = {"state": "AVAILABLE", "error_code": "OK", "error_message": ""}
                if previous is not None:
                    self._states[previous.version] = {"state": "END", "error_code": "OK", "error_message": ""}
                log.info("serving version %s of %s from %s", version, self.name, path)
                return True
            if self.current is not None:  # every version directory is gone: unload, as TF Serving does
                self._states[self.current.version] = {"state": "END", "error_code": "OK", "error_message": ""}
                self.current = None
                return True
            return False

    def get(self, version: int | None = None) -> ServedVersion:
        current = self.current
        if current is None:
            raise RequestError(f"Could not find any versions of model {self.name}", 404)
        if version is not None and version != current.version:
            raise RequestError(f"Servable not found for request: Specific({self.name}, {version})", 404)
        return current

    def status(self, version: int | None = None) -> list[dict[str, Any]]:
        items = sorted(self._states.items(), reverse=True)
        if version is not None:
            items = [(v, s) for v, s in items if v == version]
            if not items:
                raise RequestError(f"Could not find version {version} of model {self.name}", 404)
        if not items:
            raise RequestError(f"Could not find any versions of model {self.name}", 404)
        return [
            {
                "version": str(v),
                "state": s["state"],
                "status": {"error_code": s["error_code"], "error_message": s["error_message"]},
            }
            for v, s in items
        ]

    def start(self) -> None:
        if self.poll_seconds <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, name=f"oneimage-poll-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # never let the poller die
                log.exception("polling %s failed", self.base_path)


# ==================================================================================================================
# Request parsing
# ==================================================================================================================
def _b64decode(text: Any) -> bytes:
    if not isinstance(text, str):
        raise RequestError("a 'b64' value must be a string")
    data = text.strip().encode("ascii", errors="replace")
    data += b"=" * (-len(data) % 4)
    for altchars in (None, b"-_"):  # standard, then web-safe alphabet (TF Serving accepts both)
        try:
            return base64.b64decode(data, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    raise RequestError("invalid base64 in a 'b64' value")


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _strings(value: Any) -> Any:
    if isinstance(value, list):
        return [_strings(v) for v in value]
    if _is_b64(value):
        return _b64decode(value["b64"])
    if isinstance(value, str):
        return value.encode("utf-8")
    raise RequestError(f"expected a string or {{\"b64\": ...}} for a string input, got {type(value).__name__}")


def _to_array(value: Any, spec: TensorSpec, min_size: int = 0) -> np.ndarray:
    """A JSON value → numpy array of the spec's dtype; RequestError if it cannot be one."""
    label = f"input '{spec.name}'"
    if spec.dtype == "DT_STRING":
        converted = _strings(value)
        arr = np.empty(0, dtype=object)
        try:
            arr = np.array(converted, dtype=object)
        except ValueError:
            pass
        if arr.size and not all(isinstance(v, bytes) for v in arr.ravel()):
            raise RequestError(f"{label}: ragged nested lists (all rows must have the same shape)")
    else:
        np_dtype = _NP_DTYPES.get(spec.dtype)
        if np_dtype is None:
            raise RequestError(f"{label}: unsupported dtype {spec.dtype}")
        if _contains_b64(value):
            raise RequestError(f"{label} has dtype {spec.dtype}; 'b64' values are only for string inputs")
        try:
            raw = np.asarray(value)
        except (ValueError, TypeError):
            raise RequestError(f"{label}: ragged nested lists (all rows must have the same shape)") from None
        if raw.size == 0 and raw.dtype.kind == "f":
            raw = raw.astype(np_dtype)
        kinds = "iu" if np.dtype(np_dtype).kind in "iu" else ("b" if np_dtype is np.bool_ else "iuf")
        if raw.dtype.kind not in kinds:
            what = "ragged or non-numeric" if raw.dtype.kind in "OUS" else raw.dtype.name
            raise RequestError(f"{label} needs {spec.dtype} values; got {what} data")
        if np.dtype(np_dtype).kind in "iu" and raw.size:
            info = np.iinfo(np_dtype)
            if raw.min() < info.min or raw.max() > info.max:
                raise RequestError(f"{label}: values must be integers in [{info.min}, {info.max}] for {spec.dtype}")
        arr = raw.astype(np_dtype, copy=False)
    if spec.shape is not None:
        if arr.ndim != len(spec.shape):
            raise RequestError(
                f"{label} must have rank {len(spec.shape)} (shape {_fmt_shape(spec.shape)}); got shape "
                f"{list(arr.shape)}"
            )
        for got, want in zip(arr.shape, spec.shape):
            if want >= 0 and got != want:
                raise RequestError(f"{label} must have shape {_fmt_shape(spec.shape)}; got {list(arr.shape)}")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise RequestError(f"{label} is empty: send at least one instance")
    if min_size and arr.ndim == 4 and spec.dtype != "DT_STRING" and min(arr.shape[1:3]) < min_size:
        raise RequestError(
            f"images must be at least {min_size}x{min_size} pixels (height x width) for this export; got "
            f"{arr.shape[1]}x{arr.shape[2]}"
        )
    return arr


def _contains_b64(value: Any) -> bool:
    # Cheap check along the first elements: a b64 object appears at the leaves.
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, dict)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def parse_json(body: bytes) -> Any:
    """The request body as Python values: orjson (compiled, ~3x faster), else the json module.

    The json module is the fallback for what orjson refuses but TF Serving's parser takes (``NaN``, ``Infinity``,
    integers beyond 64 bits), and it gives the error message for malformed bodies (with line and column).
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON in the request body: {exc}") from None


@dataclasses.dataclass
class PredictRequest:
    signature: str
    inputs: dict[str, np.ndarray]
    row_format: bool
    rows: int


def parse_predict(body: bytes, version: ServedVersion) -> PredictRequest:
    """Validate a predict body against the served signatures (TF Serving's row and columnar formats)."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object with 'instances' or 'inputs'")
    unknown = sorted(set(payload) - {"signature_name", "instances", "inputs"})
    if unknown:
        raise RequestError(f"unknown key(s) {unknown} in the request; expected 'instances' or 'inputs'")
    if ("instances" in payload) == ("inputs" in payload):
        raise RequestError("the request must have exactly one of 'instances' (row format) or 'inputs' (columnar)")
    sig_name = payload.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(sig_name, str):
        raise RequestError("'signature_name' must be a string")
    signature = version.signatures.get(sig_name)
    if signature is None:
        raise RequestError(
            f"serving signature name '{sig_name}' not found in the model; available: "
            f"{', '.join(sorted(version.signatures))}"
        )
    specs = signature.inputs
    names = list(specs)
    min_size = version.min_size
    if "instances" in payload:
        instances = payload["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError("'instances' must be a non-empty list (one entry per image)")
        named = all(isinstance(x, dict) and not _is_b64(x) for x in instances)
        if named:
            columns: dict[str, list] = {name: [] for name in names}
            for i, instance in enumerate(instances):
                if set(instance) != set(names):
                    raise RequestError(f"instance {i} must have exactly the inputs {names}; got {sorted(instance)}")
                for name in names:
                    columns[name].append(instance[name])
        elif any(isinstance(x, dict) and not _is_b64(x) for x in instances):
            raise RequestError("'instances' mixes named objects and plain values")
        elif len(names) != 1:
            raise RequestError(f"the signature has several inputs {names}; give each instance as an object")
        else:
            columns = {names[0]: instances}
        inputs = {name: _to_array(columns[name], specs[name], min_size) for name in names}
        row_format = True
    else:
        value = payload["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            if set(value) != set(names):
                raise RequestError(f"'inputs' must have exactly the inputs {names}; got {sorted(value)}")
            inputs = {name: _to_array(value[name], specs[name], min_size) for name in names}
        elif len(names) != 1:
            raise RequestError(f"the signature has several inputs {names}; give 'inputs' as an object")
        else:
            inputs = {names[0]: _to_array(value, specs[names[0]], min_size)}
        row_format = False
    rows = {arr.shape[0] for arr in inputs.values()}
    if row_format and len(rows) != 1:
        raise RequestError("all inputs must have the same number of instances")
    return PredictRequest(sig_name, inputs, row_format, max(rows))


def model_error_message(exc: BaseException) -> str:
    """A one-line message from a TF runtime error (an assertion's own text when there is one)."""
    text = getattr(exc, "message", None) or str(exc)
    match = re.search(r"assertion failed: \[(.*?)\]", text)
    if match:
        message = match.group(1).rstrip(". ")
        value = re.search(r"\[x \([^)]*\) = \] \[([^\]]*)\]", text)
        if value and message.endswith(("height", "width")):
            message += f" {value.group(1)}"
        return message
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip()
        and not ln.strip().startswith(("[[", "Detected at node", "<stack traces", "Graph execution error"))
    ]
    return lines[-1] if lines else type(exc).__name__


# ==================================================================================================================
# The app
# ==================================================================================================================
def make_app(
    model_base_path: str | os.PathLike,
    *,
    model_name: str | None = None,
    max_batch_size: int = 8,
    batch_timeout_ms: float = 0.0,
    num_batch_threads: int = 2,
    max_enqueued_rows: int = 4096,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    poll_seconds: float = 2.0,
):
    """The starlette app serving the versions under ``model_base_path`` as model ``model_name``.

    The highest version present is loaded before this returns; polling for new versions runs while the app's
    lifespan is active (uvicorn, or ``with TestClient(app)``). ``app.state.manager`` (a :class:`ModelManager`)
    and ``app.state.batcher`` (a :class:`~keras_oneimage.serve.batching.BatchScheduler`) are exposed for tests.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    base = pathlib.Path(model_base_path)
    if not base.is_dir():
        raise InputError(f"model base path {str(base)!r} is not a directory (expected an export base_dir)")
    name = model_name or base.resolve().name
    if not name or "/" in name or ":" in name:
        raise InputError(f"invalid model name {name!r} (no '/' or ':')")
    for label, value in (
        ("max_batch_size", max_batch_size),
        ("num_batch_threads", num_batch_threads),
        ("max_body_bytes", max_body_bytes),
        ("max_enqueued_rows", max_enqueued_rows),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{label} must be a positive integer, got {value!r}")
    if batch_timeout_ms < 0 or poll_seconds < 0:
        raise InputError("batch_timeout_ms and poll_seconds must be >= 0")

    manager = ModelManager(base, name, poll_seconds)
    manager.poll_once()
    batcher = BatchScheduler(
        max_batch_size=max_batch_size,
        batch_timeout_ms=batch_timeout_ms,
        num_batch_threads=num_batch_threads,
        max_enqueued_rows=max_enqueued_rows,
    )
    drain_limit = max(4 * max_body_bytes, 16 * 1024 * 1024)

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        too_big = RequestError(f"request body is larger than the server's limit of {max_body_bytes} bytes", 413)
        if declared is not None:
            try:
                declared_size = int(declared)
            except ValueError:
                raise RequestError("invalid Content-Length header") from None
            if declared_size > drain_limit:
                raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                chunks = []  # keep reading (and dropping) so the client sees the 413, up to a hard limit
                if size > drain_limit:
                    break
                continue
            chunks.append(chunk)
        if size > max_body_bytes:
            raise too_big
        return b"".join(chunks)

    async def models(request: Request) -> Response:
        match = _PATH_RE.match(request.path_params["rest"])
        if not match or match.group("name") != name:
            requested = match.group("name") if match else request.path_params["rest"]
            return error(f"Servable not found for request: Latest({requested})", 404)
        if match.group("label") is not None:
            return error("model version labels are not supported by this server; use /versions/<n>", 404)
        version = None
        if match.group("version") is not None:
            if not _VERSION_RE.match(match.group("version")):
                return error(f"invalid version {match.group('version')!r} (expected an integer)", 400)
            version = int(match.group("version"))
        suffix = match.group("suffix")
        try:
            if suffix is None:
                if request.method != "GET":
                    return error(f"{request.method} is not allowed here; use GET", 405)
                return JSONResponse({"model_version_status": manager.status(version)})
            if suffix == "/metadata":
                if request.method != "GET":
                    return error(f"{request.method} is not allowed here; use GET", 405)
                served = manager.get(version)
                return JSONResponse(
                    {
                        "model_spec": {"name": name, "signature_name": "", "version": str(served.version)},
                        "metadata": {
                            "signature_def": {"signature_def": served.signature_defs_json},
                            "keras_oneimage": served.metadata,
                        },
                    }
                )
            if suffix != ":predict":
                return error(f"unsupported method {suffix[1:]!r}; this server implements :predict", 400)
            if request.method != "POST":
                return error(f"{request.method} is not allowed here; use POST", 405)
            served = manager.get(version)
            body = await read_body(request)
            parsed = await run_in_threadpool(parse_predict, body, served)
            return await predict(served, parsed)
        except RequestError as exc:
            return error(str(exc), exc.status)

    async def predict(served: ServedVersion, parsed: PredictRequest) -> Response:
        import tensorflow as tf

        if any(arr.dtype == object for arr in parsed.inputs.values()):
            key: Any = object()  # encoded images may differ in size: never merged
        else:
            key = (
                id(served),
                parsed.signature,
                tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(parsed.inputs.items())),
            )
        try:
            outputs = await batcher.submit(key, parsed.inputs, parsed.rows, served.runner(parsed.signature))
            # Encode in the thread pool, not in the batch worker: the worker is free for the next model call at
            # once (the model releases the GIL, the encoder holds it, so the two overlap), and each request's
            # response goes out when its own encoding is done rather than when the whole batch's is (~20% more
            # throughput at 8-32 clients on 2 cores).
            body = await run_in_threadpool(encode_predict_response, outputs, parsed.row_format)
        except QueueFullError as exc:
            return error(str(exc), 503)
        except RequestError as exc:
            return error(str(exc), exc.status)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            return error(model_error_message(exc), 400)
        except Exception as exc:  # pragma: no cover - unexpected model failure
            log.exception("predict failed")
            return error(f"internal error: {model_error_message(exc)}", 500)
        return Response(
            body, media_type="application/json", headers={"X-Model-Version": str(served.version)}
        )

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error(exc.detail if isinstance(exc.detail, str) else "not found", exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        manager.start()
        try:
            yield
        finally:
            manager.stop()
            batcher.close()

    app = Starlette(
        routes=[Route("/v1/models/{rest:path}", models, methods=["GET", "POST"])],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.batcher = batcher
    app.state.model_name = name
    return app


# ==================================================================================================================
# Running it
# ==================================================================================================================
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class ServerHandle:
    """A uvicorn server running in a background thread (see :func:`start_in_thread`)."""

    def __init__(self, server, thread: threading.Thread, sock: socket.socket, app):
        self.server = server
        self.thread = thread
        self.app = app
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def model_url(self) -> str:
        return f"{self.url}/v1/models/{self.app.state.model_name}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(
    model_base_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    startup_timeout: float = 60.0,
    **app_options: Any,
) -> ServerHandle:
    """Serve in a daemon thread (port 0: a free port); returns once it accepts connections. ``handle.stop()``."""
    import uvicorn

    app = make_app(model_base_path, **app_options)
    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="oneimage-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    return ServerHandle(server, thread, sock, app)


def serve(
    model_base_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    model_name: str | None = None,
    max_batch_size: int = 8,
    batch_timeout_ms: float = 0.0,
    num_batch_threads: int = 2,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    poll_seconds: float = 2.0,
    log_level: str = "info",
    require_version: bool = True,
) -> None:
    """Serve ``model_base_path`` TF-Serving-style until interrupted (blocks). Binds 127.0.0.1 unless told.

    With ``require_version`` (the default) a base path holding no loadable version is an InputError at start (a
    typo'd path, or an export that failed); ``False`` waits for one, as ``tensorflow_model_server`` does.
    """
    import uvicorn

    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InputError(f"port must be an integer in [0, 65535], got {port!r}")
    records: list[logging.LogRecord] = []  # load errors of the first poll: replayed, or folded into the InputError
    buffer, propagate = logging.Handler(), log.propagate
    buffer.emit = records.append
    log.addHandler(buffer)
    log.propagate = False
    try:
        app = make_app(
            model_base_path,
            model_name=model_name,
            max_batch_size=max_batch_size,
            batch_timeout_ms=batch_timeout_ms,
            num_batch_threads=num_batch_threads,
            max_body_bytes=max_body_bytes,
            poll_seconds=poll_seconds,
        )
    finally:
        log.removeHandler(buffer)
        log.propagate = propagate
    manager = app.state.manager
    if require_version and manager.current is None:
        failed = [(v, s["error_message"]) for v, s in sorted(manager._states.items(), reverse=True)]
        why = f"version {failed[0][0]} does not load: {failed[0][1]}" if failed else (
            "no numbered version directory holding a saved_model.pb (write one with `keras-oneimage export`)")
        raise InputError(f"nothing to serve in {str(model_base_path)!r}: {why}")
    for record in records:
        log.handle(record)
    sock = _bind(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the server has no authentication; bind 127.0.0.1 unless you mean it", host)
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"serving {app.state.model_name} at http://{bound_host}:{bound_port}/v1/models/{app.state.model_name}")
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on")).run(sockets=[sock])
