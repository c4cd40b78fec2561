"""Serving benchmark: features/s and latency of the gRPC and REST servers against an in-process call of one SavedModel.

One run, loopback only, bounded in requests and in time:

1. export a trunk (random weights, or ``--checkpoint``) as a SavedModel, or use ``--model_base_path``;
2. load it in-process with ``tf.saved_model.load`` and time ``serving_default`` on full batches (the model's peak);
3. start ``keras_oneimage.serve`` in a subprocess with REST and gRPC on free 127.0.0.1 ports (the first answer of
   each is checked against the in-process features);
4. for 1, 8 and 32 clients, alternate ``--rounds`` short slices of (a) in-process calls of ``serving_default`` from
   that many threads, one image per call, (b) the same images as TF Serving gRPC ``Predict`` calls
   (``tf.make_tensor_proto`` inputs, ``tensor_content`` outputs) from that many client threads, one channel each,
   and (c) the same images as TF-Serving REST requests (``{"instances": [image]}``) from that many keep-alive client
   threads, each response read whole. Alternating slices keep the ratios meaningful on a shared machine whose load
   drifts.

"features/s" counts images whose requested feature maps were returned. Prints a table and the ratio of each
server's throughput to the in-process one; the goal is gRPC >= 0.70 of in-process at 32 clients with p99 <= 3x p50.
``--quick`` is a seconds-long smoke test.

    .venv/bin/python experiments/bench_serve.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python experiments/bench_serve.py --quick    # smoke test
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 and 4 clients, ~1 s per level")
    p.add_argument("--model_base_path", help="serve an existing export base dir instead of exporting one")
    p.add_argument("--checkpoint", help="export this model.keras instead of a randomly initialised AlexNet")
    p.add_argument("--variant", default="cifar", choices=("cifar", "imagenet"))
    p.add_argument("--image_size", type=int, default=32, help="side of the request images")
    p.add_argument("--layers", default="conv1,conv2", help="comma-separated taps to export")
    p.add_argument("--clients", help="comma-separated client counts (default 1,8,32; --quick: 1,4)")
    p.add_argument("--seconds", type=float, help="time bound per level (default 6; --quick: 1)")
    p.add_argument("--requests", type=int, help="request bound per level and side (default 2000; --quick: 60)")
    p.add_argument("--rounds", type=int, help="alternating in-process / server slices per level (default 4; "
                   "--quick: 2)")
    p.add_argument("--max_batch_size", type=int, default=8,
                   help="server-side batching limit (the server default, 8) and the in-process peak batch")
    p.add_argument("--batch_timeout_ms", type=float, default=0.0)
    p.add_argument("--num_batch_threads", type=int, default=2)
    p.add_argument("--grpc_channel", default="shared", choices=("shared", "per_client"),
                   help="gRPC clients share one channel (default) or open one each")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    defaults = {"clients": "1,4", "seconds": 1.0, "requests": 60, "rounds": 2} if args.quick else {
        "clients": "1,8,32", "seconds": 6.0, "requests": 2000, "rounds": 4}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    args.layer_names = tuple(s.strip() for s in args.layers.split(",") if s.strip())
    if not args.client_counts or min(args.client_counts) < 1 or args.seconds <= 0 or args.requests < 1 \
            or args.rounds < 1:
        p.error("--clients, --seconds, --requests and --rounds must be positive")
    return args


def make_export(args, workdir: pathlib.Path) -> pathlib.Path:
    import keras

    from keras_oneimage.export import export
    from keras_oneimage.models.alexnet import AlexNet

    base = workdir / "bench_model"
    if args.checkpoint:
        export(args.checkpoint, base, layers=args.layer_names)
        return base
    keras.utils.set_random_seed(0)
    widths = (8, 16, 16, 16, 8) if args.quick else (96, 256, 384, 384, 256)
    model = AlexNet(args.variant, image_size=args.image_size, widths=widths)
    model.build()
    export(model, base, layers=args.layer_names, metadata={"note": "random weights, benchmark only"})
    return base


def latest_version(base: pathlib.Path) -> pathlib.Path:
    versions = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
    if not versions:
        raise SystemExit(f"no version directory under {base}")
    return base / str(versions[-1])


def run_level(clients: int, seconds: float, max_requests: int, make_worker) -> dict:
    """Run ``clients`` threads until ``max_requests`` calls or ``seconds`` pass; latencies in ms."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    budget = [max_requests]
    deadline = time.perf_counter() + seconds

    def take() -> bool:
        with lock:
            if budget[0] <= 0 or time.perf_counter() > deadline:
                return False
            budget[0] -= 1
            return True

    def body():
        call = make_worker()
        try:
            while take():
                t0 = time.perf_counter()
                try:
                    call()
                except Exception as exc:  # record and stop this client
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    return
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000.0)
        finally:
            close = getattr(call, "close", None)
            if close:
                close()

    threads = [threading.Thread(target=body, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.perf_counter() - start
    return {"clients": clients, "latencies": latencies, "elapsed": elapsed, "errors": errors}


def summarise(runs: list[dict]) -> dict:
    """One level's result from its interleaved slices: features/s over their summed time, pooled latencies."""
    latencies = [x for run in runs for x in run["latencies"]]
    elapsed = sum(run["elapsed"] for run in runs)
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {
        "clients": runs[0]["clients"],
        "requests": len(latencies),
        "seconds": elapsed,
        "slices": len(runs),
        "features_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": [e for run in runs for e in run["errors"]][:3],
    }


def interleaved(clients: int, args, workers: dict) -> dict:
    """``{name: summary}`` for each worker factory, measured in alternating slices of ``seconds / rounds``.

    On a shared machine the load drifts over seconds; alternating short slices exposes every contender to the
    same drift, so their ratio is far steadier than that of two back-to-back runs.
    """
    seconds = args.seconds / args.rounds
    requests = max(1, args.requests // args.rounds)
    runs: dict[str, list[dict]] = {name: [] for name in workers}
    for _ in range(args.rounds):
        for name, make_worker in workers.items():
            runs[name].append(run_level(clients, seconds, requests, make_worker))
    return {name: summarise(r) for name, r in runs.items()}


class Client:
    """One keep-alive HTTP connection posting the same pre-encoded request body."""

    def __init__(self, port: int, path: str, body: bytes):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.path = path
        self.body = body
        self.headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}

    def __call__(self):
        self.conn.request("POST", self.path, body=self.body, headers=self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return data

    def close(self):
        self.conn.close()


def start_server(base: pathlib.Path, args, root: pathlib.Path = ROOT) -> tuple[subprocess.Popen, int, int]:
    """``keras_oneimage.serve`` in a subprocess (importing the package from ``root``); (process, REST port, gRPC port)."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
        "from keras_oneimage.serve.server import serve\n"
        f"serve({str(base)!r}, host='127.0.0.1', port=0, grpc_port=0, model_name='bench',"
        f" max_batch_size={args.max_batch_size}, batch_timeout_ms={args.batch_timeout_ms},"
        f" num_batch_threads={args.num_batch_threads}, poll_seconds=0, log_level='warning')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=str(root),
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    deadline = time.monotonic() + 180
    port = grpc_port = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("serving ") and " over gRPC at " in line:
            grpc_port = int(line.rsplit(":", 1)[1])
            break
        if line.startswith("serving "):
            port = int(line.rsplit(":", 1)[1].split("/")[0])
    if port is None or grpc_port is None:
        proc.kill()
        raise SystemExit("the server did not start")
    # wait until it answers
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models/bench")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, port, grpc_port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not answer")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def check_server(port: int, body: bytes, reference: dict) -> None:
    """The server's first answer must match the in-process features."""
    client = Client(port, "/v1/models/bench:predict", body)
    try:
        got = json.loads(client())["predictions"][0]
    finally:
        client.close()
    if len(reference) == 1:
        got = {next(iter(reference)): got}
    worst = max(float(np.abs(np.asarray(got[k], dtype=np.float32) - reference[k][0]).max()) for k in reference)
    if worst > 1e-4:
        raise SystemExit(f"server features differ from in-process ones by {worst}")


class GrpcClient:
    """A client calling TF Serving's ``PredictionService/Predict`` with the same pre-built request.

    With ``channel``, the client shares it (one HTTP/2 connection for all clients, the usual pattern of a TF
    Serving client); otherwise it opens its own.
    """

    def __init__(self, port: int, request, channel=None):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.own = channel is None
        self.channel = channel if channel is not None else grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        )
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.request = request

    def __call__(self):
        response = self.stub.Predict(self.request, timeout=120)
        if not all(t.tensor_content for t in response.outputs.values()):
            raise RuntimeError("a gRPC output came back without tensor_content")
        return response

    def close(self):
        if self.own:
            self.channel.close()


def grpc_request(image: np.ndarray):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "bench"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(image))
    return request


def check_grpc(port: int, request, reference: dict) -> None:
    """The gRPC server's first answer must match the in-process features."""
    import tensorflow as tf

    client = GrpcClient(port, request)
    try:
        response = client()
    finally:
        client.close()
    worst = max(float(np.abs(tf.make_ndarray(response.outputs[k]) - reference[k]).max()) for k in reference)
    if worst > 1e-4:
        raise SystemExit(f"gRPC features differ from in-process ones by {worst}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        base = pathlib.Path(args.model_base_path) if args.model_base_path else make_export(args, pathlib.Path(tmp))
        version_dir = latest_version(base)
        loaded = tf.saved_model.load(str(version_dir))
        signature = loaded.signatures["serving_default"]
        rng = np.random.default_rng(0)
        image = rng.random((1, args.image_size, args.image_size, 3), dtype=np.float32)
        reference = {k: v.numpy() for k, v in signature(images=tf.constant(image)).items()}
        floats = sum(v.size for v in reference.values())
        print(
            f"model {version_dir} | layers {sorted(reference)} | {args.image_size}px | {floats} floats per image "
            f"| clients {args.client_counts} | <= {args.requests} requests, <= {args.seconds:g} s per level and side, "
            f"in {args.rounds} interleaved slices"
        )

        results: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("client_counts",)}}
        results["config"]["floats_per_image"] = int(floats)
        x1 = tf.constant(image)
        signature(images=x1)  # warm up
        # --- in-process peak: full batches (the model alone, for reference) ---
        xb = tf.constant(np.repeat(image, args.max_batch_size, axis=0))
        signature(images=xb)
        calls = max(2, min(20, args.requests // args.max_batch_size))
        t0 = time.perf_counter()
        n = 0
        while n < calls and (time.perf_counter() - t0 < args.seconds or n < 2):
            signature(images=xb)
            n += 1
        batched_peak = n * args.max_batch_size / (time.perf_counter() - t0)

        # --- servers against in-process, one image per call, in alternating slices ---
        proc, port, grpc_port = start_server(base, args)
        shared = None
        try:
            body = json.dumps({"instances": image.tolist()}).encode()
            path = "/v1/models/bench:predict"
            request = grpc_request(image)
            check_server(port, body, reference)
            check_grpc(grpc_port, request, reference)
            import grpc

            shared = grpc.insecure_channel(
                f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
            )
            Client(port, path, body)()  # warm up
            workers = {
                "in_process": lambda: (lambda: signature(images=x1)),
                "grpc": lambda: GrpcClient(grpc_port, request, shared if args.grpc_channel == "shared" else None),
                "rest": lambda: Client(port, path, body),
            }
            levels = [interleaved(c, args, workers) for c in args.client_counts]
        finally:
            if shared is not None:
                shared.close()
            stop_server(proc)
        del loaded, signature

    in_process = [level["in_process"] for level in levels]
    sides = {side: [level[side] for level in levels] for side in ("grpc", "rest")}
    results.update(in_process=in_process, **sides, batched_peak_features_per_s=batched_peak)
    header = f"{'clients':>7} | {'in-process f/s':>14} {'p50 ms':>7} {'p99 ms':>7} |" + "".join(
        f" {side + ' f/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>5} |" for side in sides)
    print(header)
    print("-" * len(header))
    for i, a in enumerate(in_process):
        line = f"{a['clients']:>7} | {a['features_per_s']:>14.1f} {a['p50_ms']:>7.1f} {a['p99_ms']:>7.1f} |"
        for runs in sides.values():
            b = runs[i]
            b["ratio"] = b["features_per_s"] / a["features_per_s"] if a["features_per_s"] else float("nan")
            b["ratio_vs_peak"] = b["features_per_s"] / batched_peak if batched_peak else float("nan")
            line += f" {b['features_per_s']:>9.1f} {b['p50_ms']:>7.1f} {b['p99_ms']:>7.1f} {b['ratio']:>5.2f} |"
        print(line)
        for errors in [a["errors"]] + [runs[i]["errors"] for runs in sides.values()]:
            for e in errors:
                print(f"        error: {e}")
    print(f"in-process peak with batches of {args.max_batch_size}: {batched_peak:.1f} features/s")
    for side, runs in sides.items():
        last = runs[-1]
        spread = last["p99_ms"] / last["p50_ms"] if last["p50_ms"] else float("nan")
        goal = "met" if last["ratio"] >= 0.70 and spread <= 3.0 else "NOT met"
        print(
            f"{side} / in-process at {last['clients']} clients: {last['ratio']:.2f}, p99/p50 {spread:.2f} "
            f"(goal >= 0.70 and <= 3: {goal}); vs batched peak: {last['ratio_vs_peak']:.2f}"
        )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
