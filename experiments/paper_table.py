"""The paper's CIFAR-10 linear-probe table (Asano et al., ICLR 2020, Table 2 / Fig. 2) at a CPU scale.

Rows: RotNet, DeepCluster and BiGAN trained from Image A and from Image B (``../shared/data/images``), a random
trunk, and a fully supervised trunk (AlexNet trained on the CIFAR-10 train labels). Every row is probed with the
same protocol (frozen trunk, per-layer max-pool to ~9k dims, BN without affine, linear classifier; all five layers
in one pass) on CIFAR-10 (JPEG); the validation split (10% of train) is reported beside the test split, and any
choice is made on validation only.

Each row runs once and writes ``<out>/<row>.json``; rerunning skips finished rows, so the table can be built in
parts. ``--report`` turns the JSON files into the RESULTS.md section and the figures.

    python experiments/paper_table.py --rows rotnet_a --train_minutes 30          # one row
    python experiments/paper_table.py --rows all --train_minutes 30               # everything (hours on 2 cores)
    python experiments/paper_table.py --report                                    # RESULTS.md + figures
    python experiments/paper_table.py --quick --out /tmp/pt                       # smoke test (seconds)
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

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_IMAGES = REPO.parent / "shared" / "data" / "images"
TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")

ROWS = {
    "rotnet_a": ("rotnet", "image_a.jpg"),
    "rotnet_b": ("rotnet", "image_b.jpg"),
    "deepcluster_a": ("deepcluster", "image_a.jpg"),
    "deepcluster_b": ("deepcluster", "image_b.jpg"),
    "bigan_a": ("bigan", "image_a.jpg"),
    "bigan_b": ("bigan", "image_b.jpg"),
    "random": (None, None),
    "supervised": ("supervised", None),
}
MARK_START = "<!-- paper_table:start -->"
MARK_END = "<!-- paper_table:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="all", help=f"comma-separated subset of {', '.join(ROWS)} (or 'all')")
    p.add_argument("--out", default=str(HERE / "outputs" / "paper_table"), help="JSON results and checkpoints")
    p.add_argument("--image_size", type=int, default=32, help="patch and probe image size (CIFAR: 32)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps_per_epoch", type=int, default=200)
    p.add_argument("--max_epochs", type=int, default=1000, help="upper bound; the time budget usually stops first")
    p.add_argument("--train_minutes", type=float, default=30.0, help="wall-clock training budget per row")
    p.add_argument("--supervised_epochs", type=int, default=15,
                   help="epochs of the supervised row's cosine schedule (the time budget may stop it earlier)")
    p.add_argument("--probe_epochs", type=int, default=12)
    p.add_argument("--probe_lr", type=float, default=None, help="probe learning rate (default: the probe module's)")
    p.add_argument("--probe_augment", type=int, default=1, choices=(0, 1),
                   help="1: the paper's augmented probe; 0: probes on cached taps (the trunk runs once per image)")
    p.add_argument("--max_per_class", type=int, default=None, help="subsample CIFAR-10 per class (quick runs)")
    p.add_argument("--precision", default="float32", choices=["auto", "float32", "mixed_bfloat16"],
                   help="self-supervised rows' compute precision (fit(precision=...)); 'auto' = bf16 on AMX CPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: TF default)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.add_argument("--report", action="store_true", help="write RESULTS.md section and figures from the JSON files")
    p.add_argument("--results_md", default=str(HERE / "RESULTS.md"))
    p.add_argument("--figures", default=str(HERE / "figures"))
    args = p.parse_args(argv)
    if args.quick:
        args.train_minutes = min(args.train_minutes, 0.1)
        args.steps_per_epoch = 2
        args.batch_size = 8
        args.max_epochs = 1
        args.probe_epochs = 1
        args.supervised_epochs = 1
        args.max_per_class = args.max_per_class or 4
    return args


def _row_command(row: str, args: argparse.Namespace) -> str:
    parts = [
        "python experiments/paper_table.py",
        f"--rows {row}",
        f"--image_size {args.image_size}",
        f"--batch_size {args.batch_size}",
        f"--steps_per_epoch {args.steps_per_epoch}",
        f"--train_minutes {args.train_minutes:g}",
        f"--probe_epochs {args.probe_epochs}",
        f"--supervised_epochs {args.supervised_epochs}",
        f"--seed {args.seed}",
    ]
    if args.precision != "float32" and ROWS[row][0] not in (None, "supervised"):
        parts.append(f"--precision {args.precision}")
    if args.probe_lr is not None:
        parts.append(f"--probe_lr {args.probe_lr:g}")
    if not args.probe_augment:
        parts.append("--probe_augment 0")
    if args.max_per_class:
        parts.append(f"--max_per_class {args.max_per_class}")
    return " ".join(parts)


def _probe_both_splits(backbone, data, args) -> dict[str, dict[str, float]]:
    """Probes trained once, scored on val (where choices are made) and test (what is reported)."""
    from keras_oneimage.probes import probe_splits

    options = {"epochs": args.probe_epochs, "seed": args.seed, "verbose": 0, "layers": TAPS,
               "augment": bool(args.probe_augment)}
    if args.probe_lr is not None:
        options["learning_rate"] = args.probe_lr
    return probe_splits(backbone, data, ("val", "test"), **options)


def train_row(row: str, args: argparse.Namespace, data) -> dict:
    """Train (or build) the trunk of ``row`` and return its record (without probe results)."""
    import keras

    from keras_oneimage import api
    from keras_oneimage.models.alexnet import AlexNet
    from keras_oneimage.training import TimeBudget

    method, image_name = ROWS[row]
    run_dir = pathlib.Path(args.out) / row
    record = {"row": row, "method": method or "random", "image": image_name, "image_size": args.image_size,
              "seed": args.seed, "command": _row_command(row, args)}
    start = time.monotonic()
    if method is None:
        keras.utils.set_random_seed(args.seed)
        backbone = AlexNet("cifar" if args.image_size < 128 else "imagenet", args.image_size)
        backbone(keras.ops.zeros((1, args.image_size, args.image_size, 3)))
        record.update(train_seconds=0.0, patches=0)
    elif method == "supervised":
        from keras_oneimage.transfer import finetune

        result = finetune(None, data, freeze=(), epochs=args.supervised_epochs, batch_size=args.batch_size,
                          seed=args.seed, image_size=args.image_size, verbose=0,
                          callbacks=[TimeBudget(args.train_minutes)])
        backbone = result.backbone
        record.update(train_seconds=time.monotonic() - start, supervised_test_accuracy=result.test_accuracy,
                      labelled_images_seen=int(result.images_seen))
    else:
        budget = TimeBudget(args.train_minutes)
        model = api.fit(
            str(SHARED_IMAGES / image_name), method=method, image_size=args.image_size,
            batch_size=args.batch_size, epochs=args.max_epochs, steps_per_epoch=args.steps_per_epoch,
            seed=args.seed, output_dir=str(run_dir), callbacks=[budget], verbose=0 if args.quick else 2,
            precision=args.precision,
        )
        backbone = model.backbone
        record.update(train_seconds=time.monotonic() - start, steps=budget.steps,
                      patches=budget.steps * args.batch_size, precision=args.precision)
    return record, backbone


def run_rows(args: argparse.Namespace) -> None:
    from keras_oneimage.data.labelled import load_labelled
    from keras_oneimage.training import configure_threads

    if args.threads:
        configure_threads(args.threads, 1)
    rows = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows: {unknown}; choose from {list(ROWS)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_labelled("cifar10", seed=args.seed, max_per_class=args.max_per_class)
    for row in rows:
        path = out / f"{row}.json"
        if path.exists():
            print(f"[{row}] done already ({path}); delete it to rerun")
            continue
        print(f"[{row}] training ...", flush=True)
        record, backbone = train_row(row, args, data)
        print(f"[{row}] probing conv1..conv5 ({args.probe_epochs} epochs) ...", flush=True)
        t0 = time.monotonic()
        record["probe"] = _probe_both_splits(backbone, data, args)
        record["probe_seconds"] = time.monotonic() - t0
        record["probe_epochs"] = args.probe_epochs
        record["probe_augment"] = bool(args.probe_augment)
        record["probe_lr"] = args.probe_lr
        record["cifar_train_images"] = data.train_size
        backbone.save_weights(str(out / f"{row}.weights.h5"))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)
        print(f"[{row}] test: " + "  ".join(f"{k} {100 * v:.1f}" for k, v in record["probe"]["test"].items()))


def _load_records(out: pathlib.Path) -> dict[str, dict]:
    records = {}
    for row in ROWS:
        path = out / f"{row}.json"
        if path.exists():
            records[row] = json.loads(path.read_text())
    return records


def report(args: argparse.Namespace) -> str:
    """Write the RESULTS.md section and the figures from the finished rows; return the markdown."""
    from keras_oneimage.models.alexnet import AlexNet
    from keras_oneimage.plots import conv1_filter_comparison, layer_accuracy_plot

    out = pathlib.Path(args.out)
    records = _load_records(out)
    if not records:
        sys.exit(f"no finished rows in {out}")
    figures = pathlib.Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    test = {row: rec["probe"]["test"] for row, rec in records.items()}
    layer_accuracy_plot(test, figures / "paper_table_layers.png", title="CIFAR-10 (JPEG) linear probes, test")
    trunks = {}
    for row in records:
        weights = out / f"{row}.weights.h5"
        if weights.exists() and row != "random":
            rec = records[row]
            size = rec["image_size"]
            net = AlexNet("cifar" if size < 128 else "imagenet", size, sobel=rec["method"] == "deepcluster")
            net(__import__("numpy").zeros((1, size, size, 3), "float32"))
            net.load_weights(str(weights))
            trunks[row] = net
    if trunks:
        conv1_filter_comparison(trunks, figures / "paper_table_conv1.png")

    lines = [MARK_START, "## CIFAR-10 linear probes per layer (paper Table 2 / Fig. 2, CPU scale)", ""]
    lines += ["| row | conv1 | conv2 | conv3 | conv4 | conv5 | val conv1 | val conv2 | train time | patches | size | precision | seed |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for row, rec in records.items():
        t, v = rec["probe"]["test"], rec["probe"]["val"]
        patches = rec.get("patches") or rec.get("labelled_images_seen", 0)
        lines.append(
            f"| {row} | " + " | ".join(f"{100 * t[k]:.1f}" for k in TAPS)
            + f" | {100 * v['conv1']:.1f} | {100 * v['conv2']:.1f} | {rec['train_seconds'] / 60:.1f} min"
            + f" | {patches:,} | {rec['image_size']} | {rec.get('precision', 'float32')} | {rec['seed']} |"
        )
    lines += ["", "Commands that reproduce each row:", ""]
    lines += [f"- `{row}`: `{rec['command']}`" for row, rec in records.items()]
    lines += ["", "![per-layer accuracy](figures/paper_table_layers.png)", "",
              "![conv1 filters](figures/paper_table_conv1.png)", "", MARK_END]
    section = "\n".join(lines)
    results = pathlib.Path(args.results_md)
    text = results.read_text() if results.exists() else "# Results\n"
    if MARK_START in text:
        text = text[: text.index(MARK_START)] + section + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    results.write_text(text)
    return section


def main(argv=None) -> None:
    args = parse_args(argv)
    print("command:", " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    if args.report:
        print(report(args))
    else:
        run_rows(args)


if __name__ == "__main__":
    main()
