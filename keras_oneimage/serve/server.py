"""A TensorFlow-Serving-compatible server for exported trunks: REST on starlette + uvicorn, and gRPC beside it.

Endpoints (TF Serving's REST API, https://www.tensorflow.org/tfx/serving/api_rest):

``GET  /v1/models/<name>[/versions/<v>]``              model version status (``model_version_status``)
``GET  /v1/models/<name>[/versions/<v>]/metadata``     signature defs (``model_spec`` + ``metadata``)
``POST /v1/models/<name>[/versions/<v>]:predict``      ``{"instances": [...]}`` → ``{"predictions": [...]}`` or
                                                      ``{"inputs": ...}`` → ``{"outputs": ...}``

Binary inputs (``serving_bytes``) are sent as ``{"b64": "<base64>"}``. Errors answer ``{"error": "..."}`` with 400
(bad request), 404 (no such model or version), 408 (body not received in time), 413 (body over ``max_body_bytes``,
or a request over the per-request :class:`~keras_oneimage.serve.limits.Limits`) or 503 (queue full). A predict
request with ``Accept: application/x-protobuf`` gets TF Serving's ``PredictResponse`` protobuf (raw float32 bytes)
instead of JSON.

With ``grpc_port``, TF Serving's gRPC API (``PredictionService.Predict``/``GetModelMetadata``,
``ModelService.GetModelStatus``) is served beside REST, from the same loaded model and the same batching queue
(:mod:`keras_oneimage.serve.grpc_server`).

Like ``tensorflow_model_server --model_base_path``, the server watches the base path and serves the highest numeric
version directory, loading a new one when it appears (and unloading the previous one) without a restart
(:mod:`keras_oneimage.serve.models`). Concurrent predict requests are merged into one model call
(:mod:`keras_oneimage.serve.batching`). The JSON format is in :mod:`keras_oneimage.serve.codec`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import re
import socket
import threading
import time
from typing import Any

from keras_oneimage.errors import InputError
from keras_oneimage.serve.batching import BatchScheduler, QueueFullError
from keras_oneimage.serve.codec import (
    PredictRequest,
    encode_predict_response,
    model_error_message,
    parse_predict,
)
from keras_oneimage.serve.errors import RequestError
from keras_oneimage.serve.limits import (
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MAX_OUTPUT_ELEMENTS,
    DEFAULT_MAX_PIXELS,
    Limits,
)
from keras_oneimage.serve.models import VERSION_RE, ModelManager, ServedVersion

log = logging.getLogger("keras_oneimage.serve")

DEFAULT_PORT = 8501
DEFAULT_GRPC_PORT = 8500
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Seconds a connection may take to send a request's headers (from its first byte, or from connecting).
DEFAULT_HEADER_TIMEOUT = 10.0
#: Seconds a request may take to send its whole body once its headers are in.
DEFAULT_BODY_TIMEOUT = 60.0
PROTOBUF_MEDIA_TYPE = "application/x-protobuf"
_PATH_RE = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:[A-Za-z]+)?$"
)


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
    max_instances: int = DEFAULT_MAX_INSTANCES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_output_elements: int = DEFAULT_MAX_OUTPUT_ELEMENTS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    grpc_port: int | None = None,
    grpc_host: str = "127.0.0.1",
    retry_min_seconds: float | None = None,
    retry_max_seconds: float | None = None,
):
    """The starlette app serving the versions under ``model_base_path`` as model ``model_name``.

    The highest version present is loaded before this returns; polling for new versions (and the gRPC server, with
    ``grpc_port``: 0 for a free port, None for none) runs while the app's lifespan is active (uvicorn, or
    ``with TestClient(app)``). ``app.state.manager`` (a :class:`ModelManager`), ``app.state.batcher`` (a
    :class:`~keras_oneimage.serve.batching.BatchScheduler`), ``app.state.limits`` and, once started,
    ``app.state.grpc_port`` are exposed for tests.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
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
        ("max_instances", max_instances),
        ("max_pixels", max_pixels),
        ("max_output_elements", max_output_elements),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{label} must be a positive integer, got {value!r}")
    if batch_timeout_ms < 0 or poll_seconds < 0:
        raise InputError("batch_timeout_ms and poll_seconds must be >= 0")
    if not body_timeout > 0:
        raise InputError(f"body_timeout must be > 0 seconds, got {body_timeout!r}")
    if grpc_port is not None and (isinstance(grpc_port, bool) or not isinstance(grpc_port, int)
                                  or not 0 <= grpc_port <= 65535):
        raise InputError(f"grpc_port must be an integer in [0, 65535] or None, got {grpc_port!r}")
    limits = Limits(max_instances=max_instances, max_pixels=max_pixels, max_output_elements=max_output_elements)

    retry = {k: v for k, v in (("retry_min_seconds", retry_min_seconds), ("retry_max_seconds", retry_max_seconds))
             if v is not None}
    manager = ModelManager(base, name, poll_seconds, **retry)
    manager.poll_once()
    batcher = BatchScheduler(
        max_batch_size=max_batch_size,
        batch_timeout_ms=batch_timeout_ms,
        num_batch_threads=num_batch_threads,
        max_enqueued_rows=max_enqueued_rows,
    )
    drain_limit = max(4 * max_body_bytes, 16 * 1024 * 1024)

    def error(message: str, status: int = 400) -> JSONResponse:
        # A 408 leaves the rest of the body unread: the connection cannot carry another request.
        headers = {"Connection": "close"} if status == 408 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

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
        async for chunk in _with_deadline(request.stream(), body_timeout):
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
            if not VERSION_RE.match(match.group("version")):
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
            parsed = await run_in_threadpool(parse_predict, body, served, limits)
            binary = PROTOBUF_MEDIA_TYPE in request.headers.get("accept", "")
            return await predict(served, parsed, binary)
        except RequestError as exc:
            return error(str(exc), exc.status)
        except ClientDisconnect:  # nobody to answer
            return Response(status_code=400)

    async def predict(served: ServedVersion, parsed: PredictRequest, binary: bool = False) -> Response:
        import tensorflow as tf

        key = served.batch_key(parsed.signature, parsed.inputs)
        try:
            outputs = await batcher.submit(key, parsed.inputs, parsed.rows, served.runner(parsed.signature))
            # Encode in the thread pool, not in the batch worker: the worker is free for the next model call at
            # once (the model releases the GIL, the encoder holds it, so the two overlap), and each request's
            # response goes out when its own encoding is done rather than when the whole batch's is.
            if binary:
                from keras_oneimage.serve.grpc_server import predict_response_bytes

                return Response(
                    predict_response_bytes(name, served.version, parsed.signature, outputs),
                    media_type=PROTOBUF_MEDIA_TYPE,
                    headers={"X-Model-Version": str(served.version)},
                )
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
        grpc_server = None
        if grpc_port is not None:
            from keras_oneimage.serve.grpc_server import start_grpc_server

            grpc_server, app.state.grpc_port = await start_grpc_server(
                manager, batcher, limits, host=grpc_host, port=grpc_port, max_message_bytes=max_body_bytes
            )
        manager.start()
        try:
            yield
        finally:
            manager.stop()
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            batcher.close()

    app = Starlette(
        routes=[Route("/v1/models/{rest:path}", models, methods=["GET", "POST"])],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.batcher = batcher
    app.state.limits = limits
    app.state.model_name = name
    app.state.grpc_port = None
    return app


async def _with_deadline(chunks, seconds: float):
    """The items of the async iterator ``chunks``; RequestError (408) once ``seconds`` have passed in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    iterator = chunks.__aiter__()
    while True:
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(iterator.__anext__(), remaining)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestError(f"the request body was not received within {seconds:g} s (body_timeout)", 408) \
                from None
        yield chunk


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


def _uvicorn_config(app, *, log_level: str, header_timeout: float, access_log: bool = True):
    import uvicorn

    if not header_timeout > 0:
        raise InputError(f"header_timeout must be > 0 seconds, got {header_timeout!r}")
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        http=_timed_h11_protocol(float(header_timeout)),
    )


def _timed_h11_protocol(header_timeout: float):
    """uvicorn's h11 protocol, closing connections that do not send a request's headers within ``header_timeout``.

    uvicorn times out idle keep-alive connections only after a response; a client that connects and sends half a
    request line, or headers one byte at a time, would hold its connection (and its buffers) forever. The timer
    runs from the connection (or, on a kept-alive one, from the next request's first byte) until the headers are
    complete; the body has its own deadline in the app (``body_timeout``, a 408).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still inside a request line or headers
                if self._header_timer is None and not self.transport.is_closing():
                    self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)
            else:
                self._cancel_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.debug("closing a connection that sent no complete headers in %g s", header_timeout)
                self.transport.close()

    return TimedH11Protocol


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

    @property
    def grpc_port(self) -> int | None:
        return self.app.state.grpc_port

    @property
    def grpc_target(self) -> str | None:
        """``host:port`` for ``grpc.insecure_channel`` (None without gRPC)."""
        return None if self.grpc_port is None else f"127.0.0.1:{self.grpc_port}"

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
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    **app_options: Any,
) -> ServerHandle:
    """Serve in a daemon thread (port 0: a free port); returns once it accepts connections. ``handle.stop()``.

    ``grpc_port=0`` also serves gRPC on a free port of 127.0.0.1 (``handle.grpc_target``).
    """
    import uvicorn

    app = make_app(model_base_path, **app_options)
    sock = _bind(host, port)
    server = uvicorn.Server(_uvicorn_config(app, log_level=log_level, header_timeout=header_timeout,
                                            access_log=False))
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
    grpc_port: int | None = None,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_output_elements: int = DEFAULT_MAX_OUTPUT_ELEMENTS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> None:
    """Serve ``model_base_path`` TF-Serving-style until interrupted (blocks). Binds 127.0.0.1 unless told.

    REST on ``port``; with ``grpc_port`` (TF Serving's default is 8500) gRPC too, on the same ``host``. With
    ``require_version`` (the default) a base path holding no loadable version is an InputError at start (a
    typo'd path, or an export that failed); ``False`` waits for one, as ``tensorflow_model_server`` does.
    """
    import uvicorn

    from keras_oneimage.serve.allocator import keep_large_buffers

    for label, value in (("port", port), ("grpc_port", grpc_port)):
        if value is None and label == "grpc_port":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise InputError(f"{label} must be an integer in [0, 65535], got {value!r}")
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
            max_instances=max_instances,
            max_pixels=max_pixels,
            max_output_elements=max_output_elements,
            body_timeout=body_timeout,
            grpc_port=grpc_port,
            grpc_host=host,
        )
    finally:
        log.removeHandler(buffer)
        log.propagate = propagate
    manager = app.state.manager
    if require_version and manager.current is None:
        failed = manager.load_failures()
        why = f"version {failed[0][0]} does not load: {failed[0][1]}" if failed else (
            "no numbered version directory holding a saved_model.pb (write one with `keras-oneimage export`)")
        raise InputError(f"nothing to serve in {str(model_base_path)!r}: {why}")
    for record in records:
        log.handle(record)
    keep_large_buffers()  # this process is the server's own: reuse big reply buffers instead of faulting new pages
    sock = _bind(host, port)
    if grpc_port:  # a clear error now rather than a failed startup inside uvicorn (racy, but only for messages)
        _bind(host, grpc_port).close()
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the server has no authentication; bind 127.0.0.1 unless you mean it", host)
    bound_host, bound_port = sock.getsockname()[:2]
    config = _uvicorn_config(app, log_level=log_level, header_timeout=header_timeout)
    server = uvicorn.Server(config)

    async def announce_grpc():
        while not server.started:
            await asyncio.sleep(0.01)
        print(f"serving {app.state.model_name} over gRPC at {bound_host}:{app.state.grpc_port}", flush=True)

    print(f"serving {app.state.model_name} at http://{bound_host}:{bound_port}/v1/models/{app.state.model_name}",
          flush=True)
    if grpc_port is None:
        server.run(sockets=[sock])
        return

    async def main():
        announcer = asyncio.ensure_future(announce_grpc())
        try:
            await server.serve(sockets=[sock])
        finally:
            announcer.cancel()

    asyncio.run(main())
