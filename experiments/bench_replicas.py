"""Training throughput at 1 and 2 replicas: source patches/s and network images/s, in one run, one table.

Configures N logical CPU devices (or uses the GPUs, if there are as many), then for each replica count trains
``keras_oneimage.fit`` with ``strategy=None`` (1 replica) or a ``MirroredStrategy`` over the first R devices (R >= 2)
at the same **global** batch, and times the epochs after the first (which includes tracing/compilation).

* ``patches/s``: source patches consumed per second (``global_batch · steps / seconds``);
* ``images/s``: images through the trunk per second: RotNet feeds each patch in 4 rotations (x4), DeepCluster
  and BiGAN's encoder 1 image per patch (BiGAN also runs G and D; they are not counted);
* ``pipeline patches/s``: the sharded input pipeline alone (``distribute_patches``), to see whether training is
  input-bound.

On a CPU-only host the logical devices share the same cores, so the 2-replica row weighs replication overhead
(half the batch per replica, an all-reduce per step) against two smaller graphs running side by side; it is not
multi-device scaling. On a multi-GPU host the same command measures the real scaling. Usage:

    .venv/bin/python experiments/bench_replicas.py [--quick] [--method rotnet] [--replicas 1,2]
        [--image_size 64] [--batch_size 64] [--steps 20] [--epochs 3] [--image PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "image_a.jpg"
IMAGES_PER_PATCH = {"rotnet": 4, "deepcluster": 1, "bigan": 1}


def _configure_devices(count: int) -> str:
    """Give TensorFlow ``count`` devices to mirror over (must run before TensorFlow initialises)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= count:
        return "GPU"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    return "CPU"


def _epoch_timer():
    """A Keras callback recording each epoch's wall-clock seconds in ``.seconds``."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _pipeline_rate(image, strategy, args, batches: int) -> float:
    from keras_oneimage import distribute

    from keras_oneimage.data import patch_dataset

    if strategy is not None:
        dataset = distribute.distribute_patches(image, image_size=args.image_size, batch_size=args.batch_size,
                                                seed=1, strategy=strategy)
    else:
        dataset = patch_dataset(image, image_size=args.image_size, batch_size=args.batch_size, seed=1)
    iterator = iter(dataset)
    next(iterator)  # warm-up (XLA compilation of the renderer)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return args.batch_size * batches / (time.perf_counter() - start)


def _method_options(method: str, quick: bool) -> dict:
    if method == "deepcluster":
        return {"num_clusters": 10, "pool_size": 512} if quick else {"num_clusters": 100, "pool_size": 4096}
    return {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (32 px, few steps)")
    parser.add_argument("--method", default="rotnet", choices=sorted(IMAGES_PER_PATCH))
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64, help="the global batch")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (the first is not timed)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.epochs = 32, 16, 3, 2
    replicas = sorted({int(r) for r in args.replicas.split(",")})
    if replicas[0] < 1 or args.epochs < 2:
        parser.error("replica counts must be >= 1 and --epochs >= 2 (the first epoch is not timed)")
    kind = _configure_devices(max(replicas))

    import keras
    import tensorflow as tf

    import keras_oneimage
    from keras_oneimage.data.images import load_image

    image = load_image(args.image)
    devices = [d.name for d in tf.config.list_logical_devices(kind)]
    rows = []
    for count in replicas:
        strategy = None if count == 1 else tf.distribute.MirroredStrategy(devices[:count])
        if args.batch_size % count:
            print(f"skipping {count} replicas: batch {args.batch_size} is not a multiple", file=sys.stderr)
            continue
        timer = _epoch_timer()
        keras.utils.clear_session()
        keras_oneimage.fit(image, args.method, image_size=args.image_size, batch_size=args.batch_size,
                           epochs=args.epochs, steps_per_epoch=args.steps, strategy=strategy, callbacks=[timer],
                           verbose=0, **_method_options(args.method, args.quick))
        seconds = statistics.median(timer.seconds[1:])
        patches = args.batch_size * args.steps / seconds
        rows.append((count, args.batch_size // count, 1000 * seconds / args.steps, patches,
                     patches * IMAGES_PER_PATCH[args.method],
                     _pipeline_rate(image, strategy, args, batches=max(4, args.steps))))

    print(f"\n{args.method}, {args.image_size} px, global batch {args.batch_size}, {args.steps} steps x "
          f"{args.epochs - 1} timed epoch(s), {kind} devices, {os.cpu_count()} cores")
    header = ("replicas", "per-replica batch", "ms/step", "patches/s", "images/s", "pipeline patches/s")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for count, per_replica, ms, patches, images, pipeline in rows:
        print(f"{count} | {per_replica} | {ms:.0f} | {patches:.0f} | {images:.0f} | {pipeline:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
