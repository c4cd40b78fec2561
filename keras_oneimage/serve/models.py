"""Loaded models: one served version (:class:`ServedVersion`) and the poller that keeps the latest one loaded
(:class:`ModelManager`, TF Serving's "latest version" policy with load retries)."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import re
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from keras_oneimage.serve.errors import RequestError

log = logging.getLogger("keras_oneimage.serve")

VERSION_RE = re.compile(r"^[0-9]+$")
DEFAULT_RETRY_MIN_SECONDS = 1.0
DEFAULT_RETRY_MAX_SECONDS = 60.0

NP_DTYPES = {
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
    #: upper bound of the output size from the input's; None when the signature is not an image model's
    output_size: "OutputSize | None" = None


#: The probe images' smallest side and the step between probes. Output sides of a stack of convolutions and pools
#: are ``floor((n - c) / S) + d`` (S: the total stride), so two probes a step apart give S exactly when S divides
#: the step, and an upper bound of the slope otherwise (see ``_Axis``).
_PROBE_SIDE = 32
_PROBE_STEP = 64


@dataclasses.dataclass(frozen=True)
class _Axis:
    """An upper bound of one output side as a function of the input side, from probes at ``at`` and ``at + step``."""

    at: int
    out: int
    slope: float  # (out(at + step) - out(at) + 1) / step: at least 1 / S

    def bound(self, n: int) -> int:
        if n <= self.at:
            return self.out  # output sides never grow when the input shrinks
        return self.out + 1 + math.ceil((n - self.at) * self.slope)


@dataclasses.dataclass(frozen=True)
class OutputSize:
    """Upper bound of the values a signature returns per image of ``height x width``, known before it runs.

    Measured once per loaded version by running the signature on three tiny probe images (a x a, (a+64) x a,
    a x (a+64)): the limits check a request against it before the model allocates anything.
    """

    outputs: dict  # name -> (_Axis for height, _Axis for width, channels) for maps, or int for a fixed size per row

    def per_image(self, height: int, width: int) -> int:
        total = 0
        for spec in self.outputs.values():
            if isinstance(spec, int):
                total += spec
            else:
                h_axis, w_axis, channels = spec
                total += h_axis.bound(height) * w_axis.bound(width) * channels
        return total


def _probe_output_size(loaded: Any, signature: "Signature", min_size: int) -> OutputSize | None:
    """Run ``signature`` on three small images and fit :class:`OutputSize`; None if it does not take images."""
    import tensorflow as tf

    if len(signature.inputs) != 1:
        return None
    (spec,) = signature.inputs.values()
    fn = loaded.signatures[signature.name]
    side = max(_PROBE_SIDE, int(min_size))

    if spec.dtype == "DT_STRING" and spec.shape is not None and len(spec.shape) == 1:
        from PIL import Image

        def make(h: int, w: int):
            buf = io.BytesIO()
            Image.new("RGB", (w, h)).save(buf, format="PNG")
            return tf.constant([buf.getvalue()])
    elif (
        spec.dtype in NP_DTYPES and spec.dtype != "DT_STRING" and spec.shape is not None and len(spec.shape) == 4
        and spec.shape[3] > 0 and spec.shape[1] < 0 and spec.shape[2] < 0
    ):
        def make(h: int, w: int):
            return tf.zeros([1, h, w, spec.shape[3]], dtype=tf.as_dtype(NP_DTYPES[spec.dtype]))
    else:
        return None
    try:
        shapes = [
            {name: tuple(int(d) for d in value.shape) for name, value in fn(**{spec.name: make(h, w)}).items()}
            for h, w in ((side, side), (side + _PROBE_STEP, side), (side, side + _PROBE_STEP))
        ]
    except Exception as exc:  # a model that does not run on small images: no bound, no output limit for it
        log.warning("cannot measure the output size of signature %s: %s", signature.name, str(exc).splitlines()[0])
        return None
    outputs: dict[str, Any] = {}
    for name, base in shapes[0].items():
        tall, wide = shapes[1][name], shapes[2][name]
        if not base or base[0] != 1:
            return None
        if len(base) == 4 and base[3] == tall[3] == wide[3]:
            def axis(grown: int, at: int) -> _Axis:
                return _Axis(side, at, (max(grown - at, 0) + 1) / _PROBE_STEP)

            outputs[name] = (axis(tall[1], base[1]), axis(wide[2], base[2]), base[3])
        elif base == tall == wide:
            outputs[name] = int(np.prod(base[1:], dtype=np.int64))
        else:
            return None
    return OutputSize(outputs)


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
        self.signature_defs: dict[str, Any] = {}  # name -> SignatureDef proto (the gRPC metadata)
        self.signatures: dict[str, Signature] = {}
        for sig_name, sig_def in meta_graph.signature_def.items():
            if sig_name.startswith("__"):
                continue
            self.signature_defs[sig_name] = sig_def
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
        for signature in self.signatures.values():
            signature.output_size = _probe_output_size(self.loaded, signature, self.min_size)

    def batch_key(self, signature: str, inputs: Mapping[str, np.ndarray]) -> Any:
        """The batching key of a request: equal only for requests whose inputs can be concatenated."""
        if any(arr.dtype == object for arr in inputs.values()):
            return object()  # encoded images may differ in size: never merged
        return (id(self), signature, tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items())))

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


@dataclasses.dataclass(frozen=True)
class _Failure:
    fingerprint: tuple  # the version directory's files when the load failed
    retry_at: float  # the manager's clock after which to load it again even if nothing changed
    delay: float  # the back-off that gave retry_at (doubled at each failure, up to retry_max_seconds)


def _fingerprint(path: pathlib.Path) -> tuple:
    """Every file under ``path`` with its size and mtime: what changes while a version is still being copied in.

    The directory's own mtime is not enough: files landing in ``variables/`` change only ``variables/``'s.
    """
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(entries)


class ModelManager:
    """Watches ``base_path`` and keeps its highest loadable numeric version loaded (TF Serving's "latest" policy).

    A version that fails to load (say, copied in file by file: ``saved_model.pb`` first, ``variables/`` later) is
    tried again as soon as any file in it changes, and otherwise after a back-off that starts at
    ``retry_min_seconds`` and doubles up to ``retry_max_seconds`` (TF Serving also retries failed loads). Meanwhile
    the previous version keeps serving.
    """

    def __init__(
        self,
        base_path: str | os.PathLike,
        name: str,
        poll_seconds: float = 2.0,
        *,
        retry_min_seconds: float = DEFAULT_RETRY_MIN_SECONDS,
        retry_max_seconds: float = DEFAULT_RETRY_MAX_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.base_path = pathlib.Path(base_path)
        self.name = name
        self.poll_seconds = float(poll_seconds)
        self.retry_min_seconds = float(retry_min_seconds)
        self.retry_max_seconds = max(float(retry_max_seconds), self.retry_min_seconds)
        self._clock = clock
        self.current: ServedVersion | None = None
        self._states: dict[int, dict[str, str]] = {}  # version → {"state", "error_code", "error_message"}
        self._failed: dict[int, _Failure] = {}  # versions whose last load failed, and when to try again
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
            if VERSION_RE.match(child.name) and (child / "saved_model.pb").is_file():
                found.append((int(child.name), child))
        return sorted(found, reverse=True)

    def poll_once(self) -> bool:
        """Load the highest version not known to be broken if it is not the one served; True if it changed."""
        with self._lock:
            for version, path in self._candidates():
                if self.current is not None and self.current.version == version:
                    return False
                failure = self._failed.get(version)
                fingerprint = _fingerprint(path)
                if failure is not None and failure.fingerprint == fingerprint and self._clock() < failure.retry_at:
                    continue  # nothing changed inside it and its back-off has not run out
                self._states[version] = {"state": "LOADING", "error_code": "OK", "error_message": ""}
                try:
                    served = ServedVersion(path, version)
                except Exception as exc:  # a broken version must not stop the server
                    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    delay = self.retry_min_seconds if failure is None else min(
                        2 * failure.delay, self.retry_max_seconds)
                    log.error("cannot load version %s of %s from %s (retrying in %.3g s, or when its files change): "
                              "%s", version, self.name, path, delay, message)
                    self._failed[version] = _Failure(fingerprint, self._clock() + delay, delay)
                    self._states[version] = {"state": "END", "error_code": "UNKNOWN", "error_message": message}
                    continue
                self._failed.pop(version, None)
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

    def load_failures(self) -> list[tuple[int, str]]:
        """``(version, error message)`` of each version whose last load failed, newest first."""
        with self._lock:
            return [(v, s["error_message"]) for v, s in sorted(self._states.items(), reverse=True)
                    if s["error_code"] != "OK"]

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

