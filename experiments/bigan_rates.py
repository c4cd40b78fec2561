"""BiGAN on one image: does D win outright, or is the game contested? Per-epoch D accuracy for learning-rate pairs.

Donahue et al. (ICLR 2017, §4) train both players with Adam at 2e-4. On patches of one image D wins at those
rates; separate time-scales (Heusel et al. 2017) with E and G faster keep it contested. This script trains the
full-width BiGAN (`keras_oneimage.fit`, 32 px, batch 32) for each ``d_lr/eg_lr`` pair from the same seed and
prints D's accuracy per epoch (overall, on real pairs, on fake pairs).

    python experiments/bigan_rates.py --pairs 2e-4/2e-4,5e-5/5e-4 --epochs 8 --steps_per_epoch 10
"""
from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from ablation import write_json  # experiments/ablation.py: atomic JSON output

HERE = pathlib.Path(__file__).resolve().parent
IMAGE_A = HERE.parent.parent / "shared" / "data" / "images" / "image_a.jpg"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(IMAGE_A))
    p.add_argument("--pairs", default="2e-4/2e-4,5e-5/5e-4", help="comma-separated d_lr/eg_lr pairs")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps_per_epoch", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "outputs" / "bigan_rates.json"))
    args = p.parse_args(argv)

    from keras_oneimage import api

    results = {}
    for pair in args.pairs.split(","):
        d_lr, eg_lr = (float(v) for v in pair.split("/"))
        model = api.fit(args.image, method="bigan", image_size=32, batch_size=args.batch_size, epochs=args.epochs,
                        steps_per_epoch=args.steps_per_epoch, seed=args.seed, verbose=0,
                        d_learning_rate=d_lr, eg_learning_rate=eg_lr)
        history = model.history.history
        results[pair] = {k: [float(v) for v in history[k]] for k in ("d_accuracy", "d_acc_real", "d_acc_fake",
                                                                       "d_loss", "eg_loss")}
        for key in ("d_accuracy", "d_acc_real", "d_acc_fake"):
            print(f"D {pair:>11s} {key:10s} " + " ".join(f"{v:.2f}" for v in results[pair][key]), flush=True)
    write_json(pathlib.Path(args.out), {"settings": vars(args), "per_epoch": results})
    return results


if __name__ == "__main__":
    main()
