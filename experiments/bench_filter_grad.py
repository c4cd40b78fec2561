"""Filter gradients of AlexNet's convolutions: TensorFlow's ``Conv2DBackpropFilter`` against k·k matmuls.

Times the two ways ``keras_oneimage.models.conv`` could compute a "same", stride-1 convolution's filter gradient,
at the shapes one RotNet step of ``bench_train.py`` meets (4 x 64 rotated patches; conv2 to conv5 of the cifar
trunk at 32 and 64 px and of the ImageNet stem at 128 px), in bfloat16 (what ``precision="auto"`` runs on AMX /
AVX512-BF16 CPUs) or float32. The two are timed in alternating rounds and the medians printed, with their ratio;
the first call of each is checked against the other. This decides ``MATMUL_FILTER_GRAD_MAX_SIDE``
(docs/performance.md).

    .venv/bin/python experiments/bench_filter_grad.py [--dtype bfloat16] [--rounds 5] [--batch 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: (label, map side, input channels, output channels, kernel): conv2-conv5 of the AlexNet trunks that
#: ``bench_train.py`` and the paper table train (widths 96-256-384-384-256).
SHAPES = [
    ("conv2 @64px", 16, 96, 256, 5), ("conv3 @64px", 8, 256, 384, 3), ("conv4 @64px", 8, 384, 384, 3),
    ("conv5 @64px", 8, 384, 256, 3), ("conv2 @32px", 8, 96, 256, 5), ("conv3 @32px", 4, 256, 384, 3),
    ("conv4 @32px", 4, 384, 384, 3), ("conv5 @32px", 4, 384, 256, 3), ("conv2 @128px", 15, 96, 256, 5),
    ("conv4 @128px", 7, 384, 384, 3),
]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch", type=int, default=256, help="images per step (RotNet: 4 x 64 rotated patches)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="batch 4, 1 round: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds = 4, 1

    import numpy as np
    import tensorflow as tf

    from keras_oneimage.models.conv import matmul_filter_grad

    tf.get_logger().setLevel("ERROR")  # one trace per shape is the point, not a retracing accident
    dtype = getattr(tf, args.dtype)
    rows = []
    print(f"{args.dtype}, batch {args.batch}, {args.rounds} alternating rounds; ms per filter gradient (median)")
    print(f"{'shape':<14} {'side':>4} {'Conv2DBackpropFilter':>21} {'k*k matmuls':>12} {'speed-up':>9}")
    for label, side, cin, cout, k in SHAPES:
        x = tf.cast(tf.random.stateless_normal([args.batch, side, side, cin], seed=(0, 1)), dtype)
        w = tf.cast(tf.random.stateless_normal([k, k, cin, cout], seed=(0, 2)) * 0.05, dtype)
        dy = tf.cast(tf.random.stateless_normal([args.batch, side, side, cout], seed=(0, 3)), dtype)

        @tf.function
        def tf_grad(x, w, dy):
            return tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(w), out_backprop=dy,
                                                   strides=[1, 1, 1, 1], padding="SAME")

        @tf.function
        def matmul_grad(x, w, dy):
            return matmul_filter_grad(x, dy, w.shape[0])

        ref = tf_grad(x, w, dy).numpy().astype(np.float32)
        got = matmul_grad(x, w, dy).numpy().astype(np.float32)
        err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
        times = {"tf": [], "matmul": []}
        for _ in range(args.rounds):
            for name, fn in (("tf", tf_grad), ("matmul", matmul_grad)):
                start = time.perf_counter()
                fn(x, w, dy).numpy()
                times[name].append(1000 * (time.perf_counter() - start))
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"shape": label, "side": side, "cin": cin, "cout": cout, "kernel": k, "tf_ms": med["tf"],
               "matmul_ms": med["matmul"], "speedup": med["tf"] / med["matmul"], "max_rel_diff": err}
        rows.append(row)
        print(f"{label:<14} {side:>4} {med['tf']:>21.1f} {med['matmul']:>12.1f} {row['speedup']:>8.2f}x"
              f"   (max rel. diff {err:.1e})", flush=True)
    return rows


if __name__ == "__main__":
    main()
