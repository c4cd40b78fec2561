"""Why does the one-image BiGAN's encoder lose to a random trunk? Read the game off its trained checkpoints.

For each paper-table BiGAN run (``experiments/outputs/table_<protocol><size>/bigan*__s*/model.keras``) this draws
augmented patches of the row's source image, as in training, and prints
`keras_oneimage.methods.bigan.bigan_diagnostics`: where E's codes lie against z's support, D's accuracy on real and
fake pairs, how often D calls a real patch with a *random* code real (near its real-pair accuracy, D ignores codes,
so E's gradient says little about the image), and how well G(E(x)) reconstructs x against G of a random code.

    python experiments/bigan_diagnose.py                       # every BiGAN row of the coarse 32 px table
    python experiments/bigan_diagnose.py --runs experiments/outputs/table_coarse32/bigan_a__s0
"""
from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from ablation import write_json  # experiments/ablation.py: atomic JSON output
from paper_table import ROWS, SHARED_IMAGES

HERE = pathlib.Path(__file__).resolve().parent
COLUMNS = ("code_std", "code_outside", "code_max_abs", "d_real", "d_fake", "d_real_random_code",
           "reconstruction_error", "random_code_error")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=None, help="comma-separated run directories (default: every bigan*__s* run "
                                                "under experiments/outputs/table_coarse32)")
    p.add_argument("--patches", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "outputs" / "bigan_diagnose.json"))
    args = p.parse_args(argv)

    from keras_oneimage.checkpoints import load_checkpoint
    from keras_oneimage.data.images import load_image
    from keras_oneimage.data.synthetic import patch_dataset
    from keras_oneimage.methods.bigan import bigan_diagnostics

    if args.runs:
        runs = [pathlib.Path(r) for r in args.runs.split(",")]
    else:
        runs = sorted(d for d in (HERE / "outputs" / "table_coarse32").glob("bigan*__s*") if d.is_dir())
    results = {}
    print("| run | " + " | ".join(COLUMNS) + " |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for run in runs:
        model, _ = load_checkpoint(run / "model.keras")
        row = run.name.rsplit("__s", 1)[0]
        image = load_image(SHARED_IMAGES / ROWS[row][1])
        stream = patch_dataset([image], image_size=model.image_size, batch_size=args.patches, seed=args.seed)
        results[run.name] = bigan_diagnostics(model, next(iter(stream)), seed=args.seed)
        print(f"| {run.name} | " + " | ".join(f"{results[run.name][c]:.3g}" for c in COLUMNS) + " |", flush=True)
    write_json(pathlib.Path(args.out), results)
    return results


if __name__ == "__main__":
    main()
