"""Benchmark: our XLA k-means (keras_oneimage.methods.kmeans) against faiss-cpu on the same features.

DeepCluster clusters every epoch, so k-means sits on the training critical path. We run it in TensorFlow on the
training accelerator instead of faiss; this script checks what that costs on a CPU, where faiss is strongest.
Both get the same points (a Gaussian mixture, PCA-style unit-norm rows like DeepCluster's preprocessed features),
the same k, the same number of Lloyd iterations and the same (random-point) initialisation scheme; inertia is
computed for both the same way (numpy, nearest final centroid).

    pip install faiss-cpu        # optional: only this script needs it
    python experiments/bench_kmeans.py                      # 50k x 256, k=1000, 20 iterations
    python experiments/bench_kmeans.py --n 5000 --k 100 --iterations 5   # a quick check

Ours is timed twice: the first call includes XLA compilation (once per shape), the second is what every later
epoch of a DeepCluster run pays.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def make_features(n: int, d: int, modes: int, seed: int) -> np.ndarray:
    """``n`` unit-norm rows in ``d`` dims drawn around ``modes`` random directions (clustered, not separable)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(modes, d))
    x = centres[rng.integers(0, modes, n)] + 2.0 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def inertia(x: np.ndarray, centroids: np.ndarray, block: int = 8192) -> float:
    """Sum of squared distances to the nearest centroid (float64 accumulation)."""
    c_sq = np.sum(centroids.astype(np.float64) ** 2, axis=1)
    total = 0.0
    for start in range(0, len(x), block):
        xb = x[start : start + block].astype(np.float64)
        d2 = np.sum(xb**2, axis=1, keepdims=True) - 2.0 * xb @ centroids.T.astype(np.float64) + c_sq
        total += float(np.maximum(d2.min(axis=1), 0.0).sum())
    return total


def run_ours(x: np.ndarray, k: int, iterations: int, seed: int, init: str) -> dict:
    from keras_oneimage.methods.kmeans import kmeans

    times = []
    for _ in range(2):  # first: with XLA compilation; second: warm
        start = time.perf_counter()
        result = kmeans(x, k, iterations=iterations, seed=seed, init=init)
        times.append(time.perf_counter() - start)
    return {"name": f"ours ({init})", "seconds": times[1], "seconds_first_call": times[0],
            "inertia": inertia(x, result.centroids), "splits": result.num_splits}


def run_faiss(x: np.ndarray, k: int, iterations: int, seed: int) -> dict | None:
    try:
        import faiss
    except ImportError:
        print("faiss-cpu is not installed (pip install faiss-cpu): skipping it")
        return None
    # max_points_per_centroid large: cluster every point, as DeepCluster does (no subsampling).
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, max_points_per_centroid=10_000_000,
                      verbose=False)
    start = time.perf_counter()
    km.train(x)
    km.index.search(x, 1)  # the final assignment, as ours returns labels
    seconds = time.perf_counter() - start
    return {"name": "faiss-cpu", "seconds": seconds, "inertia": inertia(x, km.centroids),
            "threads": faiss.omp_get_max_threads()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--modes", type=int, default=None, help="mixture components (default: k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import tensorflow as tf

    x = make_features(args.n, args.d, args.modes or args.k, args.seed)
    devices = [d.name for d in tf.config.list_logical_devices()]
    print(f"features {args.n} x {args.d}, k={args.k}, {args.iterations} iterations; TF devices: {devices}")
    results = [run_ours(x, args.k, args.iterations, args.seed, "random")]
    results.append(run_ours(x, args.k, args.iterations, args.seed, "kmeans++"))
    baseline = run_faiss(x, args.k, args.iterations, args.seed)
    if baseline is not None:
        results.append(baseline)
    for r in results:
        ratio = f"{r['seconds'] / baseline['seconds']:6.2f}x faiss" if baseline else ""
        first = f" (first call {r['seconds_first_call']:.2f}s)" if "seconds_first_call" in r else ""
        print(f"{r['name']:>16}: {r['seconds']:8.3f}s{first}  inertia {r['inertia']:.2f}  {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "devices": devices, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
