"""Choose the linear-probe learning rate on the CIFAR-10 **validation** split (never on test).

The paper's probe code uses SGD with lr 0.01 (Asano et al., ICLR 2020, §4, after Zhang et al. 2017). On small
CIFAR subsets at 32 px we saw the probe loss grow at 0.01, so before the paper table is run this script scores
each candidate rate on the val split for two trunks: a random one and a briefly trained RotNet (Image A). The rate
with the best mean val accuracy over conv1..conv5 and both trunks wins; the table is then run with it.

    python experiments/probe_lr.py --rates 0.01,0.001 --max_per_class 1000 --probe_epochs 12 --train_minutes 3
    python experiments/probe_lr.py --quick
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ablation import write_json  # experiments/ablation.py: atomic JSON output

HERE = pathlib.Path(__file__).resolve().parent
IMAGE_A = HERE.parent.parent / "shared" / "data" / "images" / "image_a.jpg"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="0.01,0.001")
    p.add_argument("--image", default=str(IMAGE_A))
    p.add_argument("--max_per_class", type=int, default=1000)
    p.add_argument("--probe_epochs", type=int, default=12)
    p.add_argument("--train_minutes", type=float, default=3.0, help="RotNet training budget for the trained trunk")
    p.add_argument("--probe_augment", type=int, default=1, choices=(0, 1),
                   help="1: the paper's augmented probe; 0: probes on cached taps (the trunk runs once per image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "outputs" / "probe_lr.json"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.max_per_class, args.probe_epochs, args.train_minutes = 8, 1, 0.05

    import keras

    from keras_oneimage import api
    from keras_oneimage.data.labelled import load_labelled
    from keras_oneimage.models.alexnet import AlexNet
    from keras_oneimage.probes import probe_splits

    from keras_oneimage.training import TimeBudget

    rates = [float(r) for r in args.rates.split(",")]
    data = load_labelled("cifar10", seed=args.seed, max_per_class=args.max_per_class)
    keras.utils.set_random_seed(args.seed)
    random_trunk = AlexNet("cifar", 32)
    random_trunk(keras.ops.zeros((1, 32, 32, 3)))
    budget = TimeBudget(args.train_minutes)
    start = time.monotonic()
    rotnet = api.fit(args.image, method="rotnet", image_size=32, batch_size=64, epochs=1000, steps_per_epoch=50,
                     seed=args.seed, callbacks=[budget], verbose=0, precision="auto")
    trained_seconds = time.monotonic() - start
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
                     "rotnet_steps": budget.steps, "rotnet_train_seconds": round(trained_seconds, 1), "val": {}}
    for name, trunk in (("random", random_trunk), ("rotnet_a", rotnet.backbone)):
        for rate in rates:
            t0 = time.monotonic()
            scores = probe_splits(trunk, data, ("val",), epochs=args.probe_epochs, learning_rate=rate,
                                  seed=args.seed, verbose=0, augment=bool(args.probe_augment))["val"]
            results["val"][f"{name}@{rate:g}"] = scores
            print(f"{name:9s} lr {rate:<6g} val " + "  ".join(f"{k} {100 * v:.1f}" for k, v in scores.items())
                  + f"   ({time.monotonic() - t0:.0f} s)", flush=True)
    means = {rate: statistics.mean(v for key, s in results["val"].items() if key.endswith(f"@{rate:g}")
                                   for v in s.values()) for rate in rates}
    results["mean_val"] = {f"{r:g}": m for r, m in means.items()}
    results["chosen"] = max(means, key=means.get)
    print("mean val accuracy per rate:", {f"{r:g}": round(100 * m, 2) for r, m in means.items()},
          "-> chosen", results["chosen"])
    write_json(pathlib.Path(args.out), results)
    return results


if __name__ == "__main__":
    main()
