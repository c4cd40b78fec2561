"""Fine-tuning on top of frozen conv1-2 on CIFAR-10: the paper's Table 4 at CPU scale (Asano et al., ICLR 2020).

Asano et al. freeze conv1-conv2 of trunks trained in different ways, train the rest of AlexNet (conv3-5 and the
classifier) on the labelled set, and compare top-1 accuracy: conv1-2 learned from one image do about as well as
supervised ones. The rows here (``keras_oneimage.transfer.finetune``, the same recipe and seed for every row):

  rotnet      conv1-2 from a single-image RotNet checkpoint (``--rotnet_checkpoint``: a model.keras, a fit
              output dir, or an export), frozen
  random      conv1-2 randomly initialised, frozen
  supervised  conv1-2 from an AlexNet classifier trained on the CIFAR-10 train labels (``--supervised_checkpoint``,
              else the trunk the ``scratch`` row trains), frozen
  scratch     nothing frozen: the whole AlexNet trained on CIFAR-10 from scratch (also the supervised trunk)
  scattering  no conv1-2: a fixed scattering transform (kymatio Scattering2D, J=2, L=8; Oyallon et al. 2017) in
              their place, standardised on the training images, the rest of the same AlexNet trained on it
              (``finetune(..., front_end="scattering")``; needs ``pip install keras-oneimage[scattering]``)

Each row writes ``<records>/<row>.json`` (accuracies on test and val, history, timing, the command); rows already done
are skipped (``--force`` reruns them), so the table can be built in parts. ``<records>/transfer_table.md`` is rewritten
from every JSON present after each row (``--report`` only rewrites it).

    python experiments/transfer_table.py --quick                                # smoke test (about a minute)
    python experiments/transfer_table.py --rotnet_checkpoint runs/rotnet_a \\
        --max_per_class 1000 --epochs 15 --train_minutes 60                     # CPU scale (hours on 2 cores)
    python experiments/transfer_table.py --report                               # the table from the JSON files

On 2 CPU cores one epoch of the full-width AlexNet over all 45k CIFAR-10 training images takes of the order of half
an hour; ``--max_per_class`` and ``--train_minutes`` bound a row.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from record_paths import REPO, shown_path  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED_IMAGES = REPO.parent / "shared" / "data" / "images"

ROWS = ("rotnet", "random", "supervised", "scattering", "scratch")
RUN_ORDER = ("scratch", "supervised", "random", "rotnet", "scattering")  # scratch first: it may provide the supervised trunk
DESCRIPTIONS = {
    "rotnet": "RotNet, one image (conv1-2 frozen)",
    "random": "random init (conv1-2 frozen)",
    "supervised": "supervised on CIFAR-10 labels (conv1-2 frozen)",
    "scratch": "nothing frozen (full supervised training)",
    "scattering": "scattering transform J=2, L=8 (fixed, in place of conv1-2)",
}
QUICK_WIDTHS = (8, 16, 16, 16, 8)
TABLE_FILE = "transfer_table.md"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="all", help=f"comma-separated subset of {', '.join(ROWS)} (or 'all')")
    p.add_argument("--out", help="trunks and checkpoints, outside git (default experiments/outputs/transfer_table, "
                   "or .../transfer_table_quick with --quick)")
    p.add_argument("--records", help="per-row JSON records and the markdown table, small and tracked in git so that "
                   "rows accumulate across sessions (default experiments/results/transfer_table; --out with --quick)")
    p.add_argument("--rotnet_checkpoint", help="single-image RotNet: model.keras, fit output dir or export dir")
    p.add_argument("--supervised_checkpoint",
                   help="a supervised AlexNet (model.keras or export); default: the trunk the scratch row trains")
    p.add_argument("--dataset", default="cifar10", help="labelled set for load_labelled (default cifar10)")
    p.add_argument("--max_per_class", type=int, help="keep at most this many train (and test) images per class")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=0.01)
    p.add_argument("--train_minutes", type=float, help="wall-clock budget per row (training stops after it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rerun rows whose JSON exists")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown table from the JSON files")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny AlexNet, 20 images per class, 1 epoch, a RotNet trained here for a few steps")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(HERE / "outputs" / ("transfer_table_quick" if args.quick else "transfer_table"))
    if args.records is None:
        args.records = args.out if args.quick else str(HERE / "results" / "transfer_table")
    if args.quick:
        args.max_per_class = args.max_per_class or 20
        args.epochs, args.batch_size, args.learning_rate = 1, 32, 0.05
    args.row_list = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.row_list if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if "rotnet" in args.row_list and not (args.rotnet_checkpoint or args.quick or args.report):
        p.error("the rotnet row needs --rotnet_checkpoint (a single-image RotNet: model.keras, fit dir or export)")
    return args


def command_line(row: str, args: argparse.Namespace) -> str:
    parts = ["python experiments/transfer_table.py", f"--rows {row}", f"--out {shlex.quote(shown_path(args.out))}",
             f"--records {shlex.quote(shown_path(args.records))}",
             f"--dataset {shlex.quote(args.dataset)}", f"--image_size {args.image_size}", f"--epochs {args.epochs}",
             f"--batch_size {args.batch_size}", f"--learning_rate {args.learning_rate:g}", f"--seed {args.seed}"]
    for flag in ("rotnet_checkpoint", "supervised_checkpoint", "max_per_class", "train_minutes"):
        value = getattr(args, flag)
        if value is not None:
            parts.append(f"--{flag} {shlex.quote(str(value))}")
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def random_trunk(args: argparse.Namespace):
    """``None`` (finetune's own random AlexNet) or, with --quick, a tiny random one."""
    if not args.quick:
        return None
    import keras

    from keras_oneimage.models.alexnet import AlexNet

    keras.utils.set_random_seed(args.seed + 1)
    trunk = AlexNet(widths=QUICK_WIDTHS, image_size=args.image_size)
    trunk.build()
    return trunk


def quick_rotnet(args: argparse.Namespace, out: pathlib.Path) -> str:
    """A tiny RotNet trained for a few steps on Image A, saved as a fit-style dir (the --quick rotnet source)."""
    import keras

    from keras_oneimage.data.images import load_image
    from keras_oneimage.data.synthetic import patch_dataset
    from keras_oneimage.methods.rotnet import RotNet
    from keras_oneimage.models.alexnet import AlexNet

    run_dir = out / "quick_rotnet"
    if (run_dir / "model.keras").is_file():
        return str(run_dir)
    keras.utils.set_random_seed(args.seed)
    model = RotNet(AlexNet(widths=QUICK_WIDTHS, image_size=args.image_size), head_widths=(32,))
    patches = patch_dataset([load_image(str(SHARED_IMAGES / "image_a.jpg"))], image_size=args.image_size,
                            batch_size=16, seed=args.seed)
    model.compile(optimizer=model.default_optimizer())
    model.fit(patches, epochs=1, steps_per_epoch=20, verbose=0)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save(run_dir / "model.keras")
    return str(run_dir)


def run_row(row: str, args: argparse.Namespace, data, out: pathlib.Path) -> dict:
    from keras_oneimage.transfer import finetune

    options = dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                   seed=args.seed, image_size=args.image_size, verbose=2)
    if args.train_minutes:
        from keras_oneimage.training import TimeBudget

        options["callbacks"] = [TimeBudget(args.train_minutes)]
    source_label = None
    if row == "rotnet":
        source = args.rotnet_checkpoint or quick_rotnet(args, out)
        result = finetune(source, data, freeze=("conv1", "conv2"), **options)
    elif row == "random":
        source = random_trunk(args)
        source_label = "random"
        result = finetune(source if source is not None else "random", data, freeze=("conv1", "conv2"), **options)
    elif row == "supervised":
        source = args.supervised_checkpoint or str(out / "scratch_trunk.keras")
        if not args.supervised_checkpoint and not pathlib.Path(source).is_file():
            raise SystemExit(f"no supervised trunk at {source}: run the scratch row first or pass "
                             "--supervised_checkpoint")
        result = finetune(source, data, freeze=("conv1", "conv2"), **options)
    elif row == "scattering":  # the source only sets the architecture: conv3-5 and the head start fresh
        source = random_trunk(args)
        source_label = "scattering (kymatio, J=2, L=8)"
        result = finetune(source if source is not None else "random", data, front_end="scattering", **options)
    else:  # scratch: nothing frozen, nothing copied
        source = random_trunk(args)
        source_label = "random (trained from scratch)"
        result = finetune(source if source is not None else "random", data, freeze=(), init=(), **options)
        result.backbone.save(out / "scratch_trunk.keras")  # the supervised trunk for the supervised row
    record = result.as_dict()
    if source_label:
        record["source"] = source_label
    return record


#: What every row of one table shares; a row trained otherwise belongs in another records folder.
RECIPE_KEYS = ("dataset", "image_size", "max_per_class", "epochs", "batch_size", "learning_rate", "seed")


def recipe(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in RECIPE_KEYS}


def check_recipe(records: pathlib.Path, args: argparse.Namespace) -> None:
    """Exit with a message when ``records`` holds rows trained with another recipe: write_table would put them in
    one table under the first row's data line."""
    wanted = recipe(args)
    for path in sorted(records.glob("*.json")):
        have = json.loads(path.read_text())
        differ = {k: (have[k], wanted[k]) for k in RECIPE_KEYS if k in have and have[k] != wanted[k]}
        if differ:
            listed = ", ".join(f"{k} {old!r} there, {new!r} here" for k, (old, new) in differ.items())
            raise SystemExit(f"{path} was trained with another recipe ({listed}); pass --records to a folder of "
                             "its own for this one")


def write_table(out: pathlib.Path) -> str:
    """The markdown table from every ``<row>.json`` in the records folder ``out``, written to its TABLE_FILE."""
    records = {row: json.loads((out / f"{row}.json").read_text()) for row in ROWS if (out / f"{row}.json").is_file()}
    lines = [
        "| conv1-2 from | frozen | test top-1 | val top-1 | epochs | labelled images seen | train min |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, rec in records.items():
        val = "" if rec.get("val_accuracy") is None else f"{100 * rec['val_accuracy']:.1f}"
        frozen = ", ".join(rec.get("frozen") or []) or "none"
        lines.append(
            f"| {DESCRIPTIONS[row]} | {frozen} | {100 * rec['test_accuracy']:.1f} | {val} | {rec['epochs_run']} | "
            f"{rec['images_seen']} | {rec['seconds'] / 60:.1f} |"
        )
    if records:
        first = next(iter(records.values()))
        lines += [
            "",
            f"Data: {first['dataset']} ({first['train_size']} train / {first['val_size']} val / {first['test_size']} "
            f"test images, {first['image_size']} px); AlexNet widths {first['widths']}; same seed and recipe for "
            "every row (keras_oneimage.transfer.finetune). Commands are in each row's JSON.",
        ]
    text = "\n".join(lines) + "\n"
    (out / TABLE_FILE).write_text(text)
    return text


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, records = pathlib.Path(args.out), pathlib.Path(args.records)
    out.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(write_table(records))
        return {}
    from keras_oneimage.data.labelled import load_labelled

    check_recipe(records, args)
    data = load_labelled(args.dataset, seed=args.seed, max_per_class=args.max_per_class)
    done = {}
    for row in [r for r in RUN_ORDER if r in args.row_list]:
        path = records / f"{row}.json"
        if path.exists() and not args.force:
            print(f"[{row}] done already ({path}); --force reruns it")
            continue
        print(f"[{row}] {DESCRIPTIONS[row]} ...", flush=True)
        start = time.monotonic()
        record = run_row(row, args, data, out)
        record.update(
            row=row, description=DESCRIPTIONS[row], seconds=time.monotonic() - start, command=command_line(row, args),
            dataset=args.dataset, train_size=data.train_size, val_size=data.val_size, test_size=data.test_size,
            **recipe(args),
        )
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)
        done[row] = record
        print(f"[{row}] test top-1 {100 * record['test_accuracy']:.1f}% ({record['seconds'] / 60:.1f} min)", flush=True)
        write_table(records)
    print(write_table(records))
    return done


if __name__ == "__main__":
    main()
