"""DeepCluster's first steps, step by step: does the loss spike after the first re-clustering?

DeepCluster re-initialises its top layer every epoch (Caron et al., ECCV 2018, §3.2). Put straight on the
trunk's flattened conv5 (4096 post-ReLU features of O(1) each, so ``|f|^2`` is in the thousands), one SGD step at
lr 0.05 moves each logit by about ``lr * |f|^2 / batch``: it overshoots and the loss jumps far above ln(k). An MLP
with BatchNorm between trunk and top layer (Caron et al.'s fc6-fc7; ``head_widths``) keeps the top layer's input at
unit scale. This script prints the per-step loss of the first ``--steps`` steps for each head, same seed and data.

    python experiments/deepcluster_spike.py --head_widths none,1024-1024 --steps 40
"""
from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from ablation import write_json  # experiments/ablation.py: atomic JSON output

HERE = pathlib.Path(__file__).resolve().parent
IMAGE_A = HERE.parent.parent / "shared" / "data" / "images" / "image_a.jpg"


def run(head_widths: tuple[int, ...], args) -> list[float]:
    import keras

    from keras_oneimage import api

    losses: list[float] = []

    class PerStep(keras.callbacks.Callback):
        """Keras logs the running mean; recover each step's loss from successive means."""

        def on_epoch_begin(self, epoch, logs=None):
            self.previous = 0.0

        def on_train_batch_end(self, batch, logs=None):
            mean, k = float(logs["loss"]), batch + 1
            losses.append(k * mean - (k - 1) * self.previous)
            self.previous = mean

    optimizer = keras.optimizers.SGD(learning_rate=args.lr, momentum=0.9, weight_decay=1e-5)
    api.fit(args.image, method="deepcluster", image_size=32, batch_size=args.batch_size, epochs=1,
            steps_per_epoch=args.steps, optimizer=optimizer, callbacks=[PerStep()], verbose=0, seed=args.seed,
            pool_size=args.pool_size, num_clusters=args.num_clusters, head_widths=head_widths)
    return losses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(IMAGE_A))
    p.add_argument("--head_widths", default="none,1024-1024", help="comma-separated heads; 'none' = linear head")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05, help="SGD rate (DeepCluster's default, Caron et al. §4)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--pool_size", type=int, default=2000)
    p.add_argument("--num_clusters", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "outputs" / "deepcluster_spike.json"))
    args = p.parse_args(argv)
    results = {}
    for spec in args.head_widths.split(","):
        widths = () if spec == "none" else tuple(int(w) for w in spec.split("-"))
        results[spec] = run(widths, args)
    print("step " + "".join(f"{spec:>12s}" for spec in results))
    for step in range(args.steps):
        if step < 8 or step % 4 == 0 or step == args.steps - 1:
            print(f"{step:4d} " + "".join(f"{losses[step]:12.3f}" for losses in results.values()))
    write_json(pathlib.Path(args.out), {"settings": vars(args), "loss_per_step": results})
    return results


if __name__ == "__main__":
    main()
