"""TF Serving's JSON predict format: request parsing and validation, and response encoding.

Shared by the REST front end (:mod:`keras_oneimage.serve.server`); the checks on shapes, sizes and limits are
shared with the gRPC front end (:mod:`keras_oneimage.serve.grpc_server`) too.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

import numpy as np
import orjson

from keras_oneimage.serve.errors import RequestError
from keras_oneimage.serve.limits import Limits, encoded_image_size, image_sizes
from keras_oneimage.serve.models import NP_DTYPES, ServedVersion, Signature, TensorSpec

DEFAULT_SIGNATURE = "serving_default"


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
        np_dtype = NP_DTYPES.get(spec.dtype)
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
    check_array(arr, spec, min_size)
    return arr


def check_array(arr: np.ndarray, spec: TensorSpec, min_size: int = 0) -> None:
    """RequestError (400) unless ``arr`` fits the signature's input ``spec`` (rank, fixed dims, image size)."""
    check_shape(tuple(arr.shape), spec, min_size)


def check_shape(shape: Sequence[int], spec: TensorSpec, min_size: int = 0) -> None:
    """RequestError (400) unless an input of ``shape`` fits ``spec`` (checked before its values are read)."""
    label = f"input '{spec.name}'"
    shape = tuple(int(d) for d in shape)
    if spec.shape is not None:
        if len(shape) != len(spec.shape):
            raise RequestError(
                f"{label} must have rank {len(spec.shape)} (shape {_fmt_shape(spec.shape)}); got shape {list(shape)}"
            )
        for got, want in zip(shape, spec.shape):
            if want >= 0 and got != want:
                raise RequestError(f"{label} must have shape {_fmt_shape(spec.shape)}; got {list(shape)}")
    if not shape or shape[0] == 0:
        raise RequestError(f"{label} is empty: send at least one instance")
    if min_size and len(shape) == 4 and spec.dtype != "DT_STRING" and min(shape[1:3]) < min_size:
        raise RequestError(
            f"images must be at least {min_size}x{min_size} pixels (height x width) for this export; got "
            f"{shape[1]}x{shape[2]}"
        )


def check_limits(signature: Signature, inputs: Mapping[str, Any], limits: Limits | None) -> None:
    """RequestError (413) if a request with these inputs (arrays, or just their shapes) is over ``limits``.

    ``inputs`` maps each input name to an array or a shape. Encoded images (a 1-D string input of a signature that
    decodes images) are measured from their file headers; nothing is decoded or run.
    """
    if limits is None:
        return
    rows = 0
    sizes: list[tuple[int, int, int]] = []  # (height, width, images of that size)
    for name, value in inputs.items():
        shape = tuple(np.shape(value)) if not isinstance(value, tuple) else value
        if not shape:
            continue
        rows = max(rows, int(shape[0]))
        limits.check_instances(rows)
        spec = signature.inputs.get(name)
        if spec is None:
            continue
        if spec.dtype == "DT_STRING":
            if signature.output_size is not None and len(shape) == 1 and not isinstance(value, tuple):
                sizes += [(*encoded_image_size(data), 1) for data in np.asarray(value, dtype=object).ravel()]
        else:
            sizes += [(h, w, int(shape[0])) for h, w in image_sizes(shape)]
    limits.check_images((h, w) for h, w, _ in sizes)
    if signature.output_size is not None and sizes:
        limits.check_outputs(sum(signature.output_size.per_image(h, w) * n for h, w, n in sizes))


def _nominal_shape(value: Any, depth: int = 8) -> tuple[int, ...]:
    """The shape a nested list would have if it were not ragged, from its first elements (no conversion)."""
    shape = []
    while isinstance(value, list) and len(shape) < depth:
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _contains_b64(value: Any) -> bool:
    # Cheap check along the first elements: a b64 object appears at the leaves.
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, dict)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def parse_json(body: bytes) -> Any:
    """The request body as Python values: orjson (compiled, so faster on large bodies), else the json module.

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
    except RecursionError:  # orjson stops at 1024 levels; json recurses until the interpreter's limit
        raise RequestError(_TOO_DEEP) from None


_TOO_DEEP = "the request body's JSON is nested too deeply"


@dataclasses.dataclass
class PredictRequest:
    signature: str
    inputs: dict[str, np.ndarray]
    row_format: bool
    rows: int


def parse_predict(body: bytes, version: ServedVersion, limits: Limits | None = None) -> PredictRequest:
    """Validate a predict body against the served signatures (TF Serving's row and columnar formats).

    With ``limits``, a request over them raises RequestError (413): its rows and nominal image size are checked
    before the JSON lists are converted to arrays, and the converted arrays (and encoded images' headers) before
    the model runs.
    """
    try:
        return _parse_predict(body, version, limits)
    except RecursionError:  # nesting that the parser took but a conversion cannot walk
        raise RequestError(_TOO_DEEP) from None


def _parse_predict(body: bytes, version: ServedVersion, limits: Limits | None) -> PredictRequest:
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
        _precheck(signature, columns, limits)
        inputs = {name: _to_array(columns[name], specs[name], min_size) for name in names}
        row_format = True
    else:
        value = payload["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            if set(value) != set(names):
                raise RequestError(f"'inputs' must have exactly the inputs {names}; got {sorted(value)}")
            _precheck(signature, value, limits)
            inputs = {name: _to_array(value[name], specs[name], min_size) for name in names}
        elif len(names) != 1:
            raise RequestError(f"the signature has several inputs {names}; give 'inputs' as an object")
        else:
            _precheck(signature, {names[0]: value}, limits)
            inputs = {names[0]: _to_array(value, specs[names[0]], min_size)}
        row_format = False
    rows = {arr.shape[0] for arr in inputs.values()}
    if row_format and len(rows) != 1:
        raise RequestError("all inputs must have the same number of instances")
    check_limits(signature, inputs, limits)
    return PredictRequest(sig_name, inputs, row_format, max(rows))


def _precheck(signature: Signature, values: Mapping[str, Any], limits: Limits | None) -> None:
    """Limits on the nominal shapes of the JSON lists, before they become arrays (which may take a copy each)."""
    if limits is not None:
        numeric = [name for name, spec in signature.inputs.items() if spec.dtype != "DT_STRING"]
        check_limits(signature, {name: _nominal_shape(values[name]) for name in numeric}, limits)
        for name, spec in signature.inputs.items():  # string inputs: count them
            if spec.dtype == "DT_STRING" and isinstance(values.get(name), list):
                limits.check_instances(len(values[name]))


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
