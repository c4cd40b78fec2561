"""How many Jigsaw steps match RotNet's 30-minute step count in the paper table (``STEPS_30MIN``).

The paper table trains every method for a fixed number of steps, the steps it made in 30 minutes
(``experiments/paper_table.py``). Jigsaw came later, so its count is RotNet's scaled by the ratio of their step
times, measured here in one process: both methods are built as ``fit`` builds them for the table (full-width
AlexNet, default heads, ``precision="auto"``), fed by ``patch_dataset`` from the same image (RotNet: 32 px
patches; Jigsaw: the table's patch size, whose 3x3 tiles are 32 px), warmed up, then timed in alternating
windows (round robin, so a change in the machine's load hits both alike). The printed ratio is the median of the
per-round ratios. Usage:

    .venv/bin/python experiments/jigsaw_steps.py [--windows 5] [--steps 5] [--image PATH]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Step:
    """One method, compiled as ``fit`` compiles it; ``run(n)`` times ``n`` steps through ``train_function``."""

    def __init__(self, method: str, size: int, batch: int, image, precision: str):
        import keras
        import tensorflow as tf

        from keras_oneimage.data.images import load_image
        from keras_oneimage.data.synthetic import patch_dataset
        from keras_oneimage.methods import registry
        from keras_oneimage.precision import precision_scope
        from keras_oneimage.models import AlexNet

        keras.utils.set_random_seed(0)
        cls = registry.get(method)
        with precision_scope(precision) as self.policy:
            self.model = cls(AlexNet("cifar", cls.trunk_input_size(size)))
        self.model.compile(optimizer=self.model.default_optimizer())
        self.model(tf.zeros((1, size, size, 3)), training=False)
        self.iterator = iter(patch_dataset([load_image(image)], image_size=size, batch_size=batch, seed=0))
        self.model.make_train_function()

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            logs = self.model.train_function(self.iterator)
        float(logs["loss"])  # waits for the last step
        return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    import paper_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="auto")
    p.add_argument("--image", default=str(paper_table.SHARED_IMAGES / "image_a.jpg"))
    args = p.parse_args(argv)
    image = args.image if pathlib.Path(args.image).exists() else None
    if image is None:
        from keras_oneimage.api import default_image_path

        image = default_image_path()
    sizes = {"rotnet": 32, "jigsaw": paper_table.method_image_size("jigsaw", 32)}
    steps = {name: Step(name, size, args.batch, image, args.precision) for name, size in sizes.items()}
    for name, step in steps.items():
        step.run(2)  # tracing, compilation, oneDNN caches
    times = {name: [] for name in steps}
    for _ in range(args.windows):
        for name, step in steps.items():
            times[name].append(step.run(args.steps))
    ratio = statistics.median(j / r for j, r in zip(times["jigsaw"], times["rotnet"]))
    for name in steps:
        print(f"{name:7s} {sizes[name]:4d} px patches  {statistics.median(times[name]):.3f} s/step "
              f"({steps[name].policy}, batch {args.batch})")
    rotnet_steps = paper_table.STEPS_30MIN["rotnet"]
    print(f"jigsaw / rotnet step time: {ratio:.2f} (median of {args.windows} paired windows of {args.steps} steps)")
    print(f"=> jigsaw steps for RotNet's {rotnet_steps}: {rotnet_steps / ratio:.0f}")


if __name__ == "__main__":
    main()
