"""Tune the augmentation recipe on CIFAR-10's validation split, then compare with the paper's recipe on test.

1. ``keras_oneimage.tune``: a Keras Tuner search (``--algorithm``, ``--max_trials``) over the augmentation of a
   RotNet trained on Image A; every trial is scored by linear probes on CIFAR-10's **validation** split (held out
   of train). The search lives in ``<out>/tuner/`` and resumes when rerun.
2. The best configuration and the paper's defaults (``AugmentConfig()``) are each trained for ``--refit_epochs``
   (same seed, steps, size, trunk) and probed on conv1..conv5 with ``--final_probe_epochs``: the test split gives
   the reported numbers, the val split is recorded beside them.
3. ``<out>/tune_cifar.md`` (trial table, best hyper-parameters, test table) and ``<out>/tune_cifar.png``.

Every step is resumable (the tuner directory, the refit run folders and the per-run JSON files are reused).

Usage::

    .venv/bin/python experiments/tune_cifar.py --quick                  # minutes: checks the pipeline
    .venv/bin/python experiments/tune_cifar.py --max_trials 20 --epochs 4 --steps_per_epoch 200 \\
        --refit_epochs 30 --max_per_class 1000                        # the real one (hours on a CPU)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Sequence

import ablation  # experiments/ablation.py: shared flags and the train-and-probe helper

#: --quick: the ablation's tiny settings, a 2-trial random search, 1-epoch refits and probes.
QUICK = dict({k: v for k, v in ablation.QUICK.items() if k != "probe_epochs"}, max_trials=2, refit_epochs=1,
             final_probe_epochs=1, algorithm="random", trial_probe_epochs=1)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ablation.common_flags(parser)
    parser.set_defaults(epochs=2, probe_epochs=None)
    parser.add_argument("--algorithm", default="bayesian", choices=("bayesian", "hyperband", "random"))
    parser.add_argument("--max_trials", type=int, default=20)
    parser.add_argument("--objective", default="conv2", help="probe layer to maximise, or 'mean:conv1,conv2,...'")
    parser.add_argument("--search_space", default="",
                        help="overrides, e.g. 'strength=1, min_area=1e-4..0.1:log, noise_std=0..0.05, flip=-'")
    parser.add_argument("--trial_probe_epochs", type=int, default=10, help="probe epochs inside each trial")
    parser.add_argument("--refit_epochs", type=int, default=20, help="training epochs of the final comparison")
    parser.add_argument("--final_probe_epochs", type=int, default=36, help="probe epochs of the final comparison")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default experiments/outputs/tune_cifar, or tune_cifar_quick)")
    args = parser.parse_args(argv)
    if args.probe_epochs is not None:
        parser.error("use --trial_probe_epochs (inside the search) and --final_probe_epochs (final comparison)")
    ablation.apply_quick(args, parser, QUICK)
    out = args.out or ablation.OUTPUTS / ("tune_cifar_quick" if args.quick else "tune_cifar")
    if not args.image.exists():
        print(f"error: source image {args.image} not found", file=sys.stderr)
        return 2

    from keras_oneimage.data.augment import AugmentConfig
    from keras_oneimage.data.images import load_images
    from keras_oneimage.errors import InputError
    from keras_oneimage.plots import layer_accuracy_plot
    from keras_oneimage.tuning import parse_search_space, tune

    images = load_images(str(args.image))
    data = ablation.load_cifar(args)
    widths = ablation.int_list(args.widths)
    head = ablation.int_list(args.head_widths)
    try:
        result = tune(
            images, "rotnet", objective=args.objective, dataset=data, max_trials=args.max_trials,
            algorithm=args.algorithm, directory=out / "tuner", project_name=f"rotnet_{args.algorithm}",
            seed=args.seed, image_size=args.image_size, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size, search_space=parse_search_space(args.search_space),
            probe_epochs=args.trial_probe_epochs, probe_batch_size=args.probe_batch_size, widths=widths,
            method_options={} if head is None else {"head_widths": head}, verbose=1 if args.verbose == 0 else 2,
            precision=args.precision, probe_augment=bool(args.probe_augment), probe_learning_rate=args.probe_lr,
        )  # fmt: skip
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # The final comparison: the same training budget and probe protocol for both recipes.
    args.epochs, args.probe_epochs = args.refit_epochs, args.final_probe_epochs
    records = []
    for name, augment in (("tuned", result.best_augment), ("paper", AugmentConfig())):
        extra = {"augment": dataclasses.asdict(augment)}
        if name == "tuned":
            extra |= {"hyperparameters": result.best_hyperparameters, "search_val_score": result.best_score,
                      "search_objective": result.objective, "search_dir": result.project_dir}  # fmt: skip
        records.append(ablation.train_and_probe(name, augment, args, images, data, out, extra=extra))

    tuned, paper = records
    lines = [
        "# Tuned augmentation vs the paper's recipe (RotNet on one image, linear probes on CIFAR-10)", "",
        f"Search: {args.algorithm}, {len(result.trials)} trials, objective `{result.objective}` on the "
        f"**validation** split (best {result.best_score:.3f}, trial {result.best_trial_id}).", "",
        "```", result.table(), "```", "",
        "Best hyper-parameters: " + ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`"
                                             for k, v in result.best_hyperparameters.items()), "",
        "Best recipe (`AugmentConfig`): " + ", ".join(f"`{k}={v:.4g}`" for k, v in tuned["augment"].items()), "",
        f"## Test accuracy after {args.refit_epochs} epochs x {args.steps_per_epoch} steps, "
        f"{args.final_probe_epochs} probe epochs", "",
        ablation.markdown_table([tuned, paper], "paper"), "",
    ]  # fmt: skip
    (out / "tune_cifar.md").write_text("\n".join(lines))
    layer_accuracy_plot({"tuned": tuned["test"], "paper defaults": paper["test"]}, out / "tune_cifar.png",
                        title="tuned vs paper augmentation (CIFAR-10 test)")
    (out / "tune_cifar.json").write_text(json.dumps({"tuned": tuned, "paper": paper}, indent=2, default=str))
    print(f"wrote {out / 'tune_cifar.md'}")
    print(ablation.markdown_table([tuned, paper], "paper"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
