"""AlexNet's strided conv1: TensorFlow's ``Conv2D`` op against the same convolution on space-to-depth blocks.

Times, at the conv1 shapes one RotNet step of ``bench_train.py`` meets (4 x 64 rotated patches; the cifar stem at
64 px, the ImageNet stem at 128 and 224 px), the forward pass and the filter gradient together (conv1's input
gradient is never needed: its input is data), both ways: ``tf.nn.conv2d`` with the layer's stride, and
``keras_oneimage.models.conv.space_to_depth_conv2d``. The two are timed in alternating rounds and the medians
printed, with their ratio; their outputs and gradients are checked against each other first. This decides
``SPACE_TO_DEPTH_MIN_STRIDE`` and ``SPACE_TO_DEPTH_MAX_CHANNELS`` (docs/performance.md).

    .venv/bin/python experiments/bench_stem.py [--dtype bfloat16] [--rounds 7] [--batch 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: (label, input side, kernel, stride, padding): conv1 of the AlexNet trunks ``bench_train.py`` times. The ImageNet
#: stem pads 2 px with its own ZeroPadding2D layer, so its convolution is "valid" on a side 4 px larger.
SHAPES = [
    ("cifar stem @64px (5x5/2, same)", 64, 5, 2, "SAME"),
    ("ImageNet stem @128px (11x11/4)", 132, 11, 4, "VALID"),
    ("ImageNet stem @224px (11x11/4)", 228, 11, 4, "VALID"),
]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch", type=int, default=256, help="images per step (RotNet: 4 x 64 rotated patches)")
    p.add_argument("--filters", type=int, default=96, help="conv1's output channels")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="batch 2, 1 round: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds = 2, 1

    import tensorflow as tf

    from keras_oneimage.models.conv import space_to_depth_conv2d

    dtype = tf.as_dtype(args.dtype)
    print(f"TensorFlow {tf.__version__}, {args.dtype}, batch {args.batch}, {args.rounds} alternating rounds; "
          "ms per forward + filter gradient (median)")
    rows = []
    for label, side, kernel, stride, padding in SHAPES:
        x = tf.cast(tf.random.stateless_uniform([args.batch, side, side, 3], seed=[0, 1]), dtype)
        w = tf.random.stateless_normal([kernel, kernel, 3, args.filters], seed=[0, 2]) * 0.05

        def timed(conv):
            @tf.function
            def step(x, w):
                with tf.GradientTape() as tape:
                    tape.watch(w)
                    y = conv(x, tf.cast(w, dtype))
                    loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cos(tf.cast(y, tf.float32)))
                return y, tape.gradient(loss, w)
            return step

        stock = timed(lambda x, w: tf.nn.conv2d(x, w, stride, padding))
        blocks = timed(lambda x, w: space_to_depth_conv2d(x, w, stride, padding))
        (y_a, g_a), (y_b, g_b) = stock(x, w), blocks(x, w)
        y_a, y_b = tf.cast(y_a, tf.float32), tf.cast(y_b, tf.float32)
        rel = lambda a, b: float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(a)))  # noqa: E731
        times = {"conv2d": [], "space_to_depth": []}
        for _ in range(args.rounds):
            for name, fn in (("conv2d", stock), ("space_to_depth", blocks)):
                start = time.perf_counter()
                fn(x, w)[1].numpy()
                times[name].append(1e3 * (time.perf_counter() - start))
        row = {"shape": label, "side": side, "kernel": kernel, "stride": stride,
               "conv2d_ms": statistics.median(times["conv2d"]),
               "space_to_depth_ms": statistics.median(times["space_to_depth"]),
               "max_rel_diff_output": rel(y_a, y_b), "max_rel_diff_filter_grad": rel(g_a, g_b)}
        row["speedup"] = row["conv2d_ms"] / row["space_to_depth_ms"]
        rows.append(row)
        print(f"  {label:<32} conv2d {row['conv2d_ms']:8.1f}  space-to-depth {row['space_to_depth_ms']:8.1f}  "
              f"speed-up {row['speedup']:.2f}x  (max rel. diff: output {row['max_rel_diff_output']:.1e}, "
              f"filter gradient {row['max_rel_diff_filter_grad']:.1e})", flush=True)
    return rows


if __name__ == "__main__":
    main()
