"""The paper's CIFAR-10 linear-probe table (Asano et al., ICLR 2020, Table 2 / Fig. 2) at a CPU scale.

Rows: RotNet, DeepCluster, BiGAN and Jigsaw trained from Image A and from Image B (``../shared/data/images``), a random
trunk, RotNet from Image A on a ResNet-18 trunk (``rotnet_a_resnet18``, issue #18: does the finding hold for a
stronger CNN?) beside an untrained ResNet-18 (``random_resnet18``), and the converged supervised reference
(``experiments/supervised_reference.py``: the same AlexNet trained on the CIFAR-10 train labels until validation
accuracy stops improving). Every row is probed with one named
protocol (``--protocol``; ``keras_oneimage.probes.protocols``) on all five taps of its trunk in one pass (the
AlexNet's conv1 … conv5, the ResNet-18's stem, stage1 … stage4), on CIFAR-10 (JPEG):
the probes train on the train split minus val (45,000 images; ``--max_per_class`` subsamples for quick runs) and
are scored on val (where choices are made) and on all 10,000 test images (what is reported).

Training length is a **fixed step count per method** (``--steps``; by default :data:`STEPS_30MIN`, the steps each
method made in 30 minutes), so a rerun does the same work whatever the machine's load; ``--train_minutes`` is a
legacy wall-clock budget (0: off). Each (row, seed) runs once and writes ``<out>/<row>__s<seed>.json``; rerunning
skips finished ones (and resumes a half-trained method run from its last epoch), so the table is built in parts.
``--report`` turns the JSON files into a RESULTS.md section (mean ± spread over seeds) and the figures. The
ResNet-18 rows get their own small table under the AlexNet one: their taps are not the AlexNet's, and are not put
in its conv1 … conv5 columns (stem + stage1 are the analogue of conv1-conv2, the layers run before the first
downsampling stage; deeper taps have no layer-for-layer counterpart).

    python experiments/paper_table.py --rows rotnet_a --seeds 0,1                 # one row, two seeds
    python experiments/paper_table.py --rows all                                  # everything (many hours on 2 cores)
    python experiments/paper_table.py --report                                    # RESULTS.md + figures
    python experiments/paper_table.py --quick --out /tmp/pt                       # smoke test (minutes)
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
sys.path.insert(0, str(HERE))
REPO = HERE.parent
SHARED_IMAGES = REPO.parent / "shared" / "data" / "images"
TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")  # the AlexNet's: the main table's columns

ROWS = {
    "rotnet_a": ("rotnet", "image_a.jpg"),
    "rotnet_b": ("rotnet", "image_b.jpg"),
    "deepcluster_a": ("deepcluster", "image_a.jpg"),
    "deepcluster_b": ("deepcluster", "image_b.jpg"),
    "bigan_a": ("bigan", "image_a.jpg"),
    "bigan_b": ("bigan", "image_b.jpg"),
    "jigsaw_a": ("jigsaw", "image_a.jpg"),
    "jigsaw_b": ("jigsaw", "image_b.jpg"),
    "random": (None, None),
    "supervised": ("supervised", None),
}
#: The N-image curve (issue #18): RotNet from N CIFAR-10 train images scaled up, at the same step count.
N_IMAGE_ROWS = {f"rotnet_n{n}": n for n in (1, 10, 100, 1000)}
ROWS.update({row: ("rotnet", f"{n} CIFAR-10 train images") for row, n in N_IMAGE_ROWS.items()})
#: Rows on another trunk than the paper's AlexNet (issue #18): the same method, image and step count as their
#: AlexNet row (or an untrained trunk, the reference beside them), the trunk named in
#: ``keras_oneimage.models.registry``.
TRUNK_ROWS = {"rotnet_a_resnet18": "resnet18", "random_resnet18": "resnet18"}
ROWS.update({"rotnet_a_resnet18": ("rotnet", "image_a.jpg"), "random_resnet18": (None, None)})
#: Variants for issue #12 §5 ("make the methods earn it"): a method row with one option changed, or a random trunk
#: built with a method's trunk option, chosen on val. DeepCluster's Sobel front end (Caron et al. §5) drops colour,
#: which CIFAR-10 probes read from conv1 on: ``random_sobel`` measures what that costs an untrained trunk, and
#: ``deepcluster_a_rgb`` trains DeepCluster on colour. ``bigan_a_equal_rates`` trains BiGAN at Donahue et al.'s
#: equal rates (2e-4 for both players) instead of our two time-scales; ``bigan_a_slow_encoder`` keeps them but
#: steps the encoder at D's 5e-5 instead of G's 5e-4 (RESULTS.md: E's gradient says little, and Adam takes full steps).
#: Each entry is ``row: (method, source image, fit options)``.
VARIANT_ROWS = {
    "deepcluster_a_rgb": ("deepcluster", "image_a.jpg", {"sobel": False}),
    "random_sobel": (None, None, {"sobel": True}),
    "bigan_a_equal_rates": ("bigan", "image_a.jpg",
                            {"d_learning_rate": 2e-4, "eg_learning_rate": 2e-4, "e_learning_rate": None}),
    "bigan_a_slow_encoder": ("bigan", "image_a.jpg", {"e_learning_rate": 5e-5}),
    "bigan_b_slow_encoder": ("bigan", "image_b.jpg", {"e_learning_rate": 5e-5}),
    # DeepCluster's §5 knobs, each on top of the colour input that beat Sobel on val (RESULTS.md): k above and
    # below the default 100; then, on val's best k (1000), more clusters still and a shorter re-clustering interval.
    "deepcluster_a_rgb_k1000": ("deepcluster", "image_a.jpg", {"sobel": False, "num_clusters": 1000}),
    "deepcluster_a_rgb_k20": ("deepcluster", "image_a.jpg", {"sobel": False, "num_clusters": 20}),
    "deepcluster_a_rgb_k3000": ("deepcluster", "image_a.jpg", {"sobel": False, "num_clusters": 3000}),
    "deepcluster_a_rgb_k1000_recluster50": ("deepcluster", "image_a.jpg", {"sobel": False, "num_clusters": 1000}),
    # val's best k against the default 100 on the other image: does k = 1,000 win beyond one image's noise?
    "deepcluster_b_rgb": ("deepcluster", "image_b.jpg", {"sobel": False}),
    "deepcluster_b_rgb_k1000": ("deepcluster", "image_b.jpg", {"sobel": False, "num_clusters": 1000}),
}
ROWS.update({row: (method, image) for row, (method, image, _) in VARIANT_ROWS.items()})
#: Every row's own fit (or trunk) options. BiGAN's encoder got an optimizer of its own (5e-5) by default on
#: 2026-12-03, chosen on val with the slow-encoder rows; the rows that ran before keep E on G's optimizer, so their
#: commands still reproduce them.
ROW_OPTIONS = {row: options for row, (_, _, options) in VARIANT_ROWS.items()}
ROW_OPTIONS.update({"bigan_a": {"e_learning_rate": None}, "bigan_b": {"e_learning_rate": None}})
#: Run-length rows (issue #12 §5: is RotNet's conv2 gap to supervised its budget, or its single image?): RotNet at
#: three times its 30-minute step count, from Image A and from 1,000 CIFAR-10 images, each beside its 1,500-step row.
#: Each entry is ``row: (the row it lengthens, its step count)``; source image and options are that row's.
LONG_ROWS = {"rotnet_a_steps4500": ("rotnet_a", 4500), "rotnet_n1000_steps4500": ("rotnet_n1000", 4500)}
ROWS.update({row: ROWS[base] for row, (base, _) in LONG_ROWS.items()})
#: Rows whose epoch is not ``--steps_per_epoch`` steps long. DeepCluster re-clusters its pool once per epoch, so
#: this is its re-clustering interval (default every 100 steps).
ROW_STEPS_PER_EPOCH = {"deepcluster_a_rgb_k1000_recluster50": 50}
#: CIFAR-10 source images are scaled up this many times (bicubic) before patches are cut, so that the augmentation's
#: smallest crops (area fraction β = 1e-4 of the image, Asano et al. §3) still span a few source pixels.
CIFAR_SOURCE_UPSCALE = 4
#: Steps (batches of 64 patches at 32 px) each method made in 30 minutes: six times its 5-minute run of
#: 2026-11-26 (RESULTS.md: RotNet 246 steps in bf16, DeepCluster 301, BiGAN 403). Fixed, so load changes only time.
#: Jigsaw (issue #18) came later: RotNet's count divided by the ratio of their step times (Jigsaw on 114 px
#: patches = 576 tiles of 32 px per batch, RotNet on 256 rotated 32 px patches), measured in one process with
#: alternating windows on 2026-12-02 on the 2-core AMX Xeon, bf16, under other jobs' load:
#: ``experiments/jigsaw_steps.py --windows 5 --steps 5`` printed 2.09 (docs/performance.md).
JIGSAW_STEP_TIME_RATIO = 2.09
STEPS_30MIN = {"rotnet": 1500, "deepcluster": 1800, "bigan": 2400}
STEPS_30MIN["jigsaw"] = int(round(STEPS_30MIN["rotnet"] / JIGSAW_STEP_TIME_RATIO, -2))


def row_trunk(row: str) -> str:
    """The registry name of the trunk ``row`` trains: the AlexNet unless :data:`TRUNK_ROWS` says otherwise."""
    return TRUNK_ROWS.get(row, "alexnet")


def method_image_size(method: str, image_size: int) -> int:
    """The patch side a method trains on in a row probed at ``image_size``.

    Every method trains its trunk on ``image_size`` px inputs, the probes' size, except Jigsaw, whose trunk sees
    3x3 tiles of its patch: its patch is the smallest whose tiles are ``image_size`` px (114 px for 32 px tiles),
    so that its trunk too trains at the scale it is probed at.
    """
    if method == "jigsaw":
        from keras_oneimage.methods.jigsaw import smallest_image_size

        return smallest_image_size(image_size)
    return image_size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="all", help=f"comma-separated subset of {', '.join(ROWS)} (or 'all')")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each (row, seed) is one run")
    p.add_argument("--out", default=None,
                   help="checkpoints and trunk weights, outside git (default: outputs/table_<protocol><size>)")
    p.add_argument("--records", default=None,
                   help="per-row JSON records and conv1 kernels, small and tracked in git so that rows accumulate "
                        "across sessions (default: results/table_<protocol><size>)")
    p.add_argument("--protocol", default="coarse", help="probe protocol (keras_oneimage.probes.protocols)")
    p.add_argument("--image_size", type=int, default=32, help="patch and probe image size (CIFAR: 32)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps_per_epoch", type=int, default=100)
    p.add_argument("--steps", default="30min",
                   help="training steps per method row: '30min' (STEPS_30MIN) or one integer for every method")
    p.add_argument("--train_minutes", type=float, default=0.0, help="legacy wall-clock budget per row (0: off)")
    p.add_argument("--probe_epochs", type=int, default=36)
    p.add_argument("--probe_lr", type=float, default=None, help="probe learning rate (default: the protocol's)")
    p.add_argument("--probe_augment", type=int, default=0, choices=(0, 1),
                   help="1: the protocol's augmented probe; 0: probes on cached taps (the trunk runs once per image)")
    p.add_argument("--max_per_class", type=int, default=None, help="subsample CIFAR-10 per class (quick runs)")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_bfloat16"],
                   help="self-supervised rows' compute precision (fit(precision=...)); 'auto' = bf16 on AMX CPUs")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: TF default)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.add_argument("--report", action="store_true", help="write RESULTS.md section and figures from the JSON files")
    p.add_argument("--section", default="paper_table_full", help="RESULTS.md marker name of the report section")
    p.add_argument("--results_md", default=str(HERE / "RESULTS.md"))
    p.add_argument("--figures", default=str(HERE / "figures"))
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if args.quick:
        args.steps = "4"
        args.steps_per_epoch = 2
        args.batch_size = 8
        args.probe_epochs = 1
        args.max_per_class = args.max_per_class or 20
    if args.out is None:
        args.out = str(HERE / "outputs" / f"table_{args.protocol}{args.image_size}")
    if args.records is None:
        args.records = args.out if args.quick else str(HERE / "results" / f"table_{args.protocol}{args.image_size}")
    return args


def method_steps(method: str, args: argparse.Namespace, row: str | None = None) -> int:
    """Training steps of ``row``: its own count if it is a :data:`LONG_ROWS` row (outside ``--quick``), else its
    method's ``--steps``."""
    if row in LONG_ROWS and not args.quick:
        return LONG_ROWS[row][1]
    return STEPS_30MIN[method] if args.steps == "30min" else int(args.steps)


def source_image_count(row: str) -> int | None:
    """How many CIFAR-10 train images ``row`` trains from (:data:`N_IMAGE_ROWS`, directly or through the row it
    lengthens), or None for a row trained from one of the paper's images."""
    return N_IMAGE_ROWS.get(LONG_ROWS[row][0] if row in LONG_ROWS else row)


def _row_command(row: str, seed: int, args: argparse.Namespace) -> str:
    parts = ["python experiments/paper_table.py", f"--rows {row}", f"--seeds {seed}", f"--protocol {args.protocol}",
             f"--image_size {args.image_size}", f"--batch_size {args.batch_size}", f"--steps {args.steps}",
             f"--probe_epochs {args.probe_epochs}", f"--probe_augment {args.probe_augment}"]
    if args.train_minutes:
        parts.append(f"--train_minutes {args.train_minutes:g}")
    if args.precision != "auto":
        parts.append(f"--precision {args.precision}")
    if args.probe_lr is not None:
        parts.append(f"--probe_lr {args.probe_lr:g}")
    if args.max_per_class:
        parts.append(f"--max_per_class {args.max_per_class}")
    return " ".join(parts)


def _probe_both_splits(backbone, data, args) -> dict[str, dict[str, float]]:
    """Probes of every tap of the trunk, trained once, scored on val (where choices are made) and test (what is
    reported)."""
    from keras_oneimage.probes import probe_splits

    options = {"epochs": args.probe_epochs, "seed": args.seed, "verbose": 0, "layers": backbone.TAPS,
               "augment": bool(args.probe_augment), "protocol": args.protocol, "image_size": args.image_size}
    if args.probe_lr is not None:
        options["learning_rate"] = args.probe_lr
    return probe_splits(backbone, data, ("val", "test"), **options)


def cifar_source_images(count: int, seed: int) -> "np.ndarray":
    """``count`` CIFAR-10 train images (a seeded draw, classes balanced as far as ``count`` allows), scaled up.

    They come from the probes' train split: self-supervision sees them without labels, as ImageNet methods see
    the images their probes later train on. N = 1 is then a CIFAR image too, so the curve compares like with like.
    """
    import numpy as np
    import tensorflow as tf

    import cifar_arrays

    arrays = cifar_arrays.load_arrays()
    x, y = arrays["train_x"], arrays["train_y"]
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    picks = [per_class[i % 10][i // 10] for i in range(count)]  # round-robin over the classes
    side = x.shape[1] * CIFAR_SOURCE_UPSCALE
    up = tf.image.resize(x[picks].astype(np.float32), (side, side), method="bicubic")
    return np.clip(np.round(up.numpy()), 0, 255).astype(np.uint8)


def train_row(row: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (or build, or load) the trunk of ``row`` and return its record (without probe results)."""
    import keras

    from keras_oneimage import api
    from keras_oneimage.training import TimeBudget

    method, image_name = ROWS[row]
    run_dir = pathlib.Path(args.out) / f"{row}__s{seed}"
    variant = "cifar" if args.image_size < 128 else "imagenet"
    record = {"row": row, "method": method or "random", "image": image_name, "image_size": args.image_size,
              "seed": seed, "protocol": args.protocol, "command": _row_command(row, seed, args),
              "trunk": row_trunk(row)}
    start = time.monotonic()
    options = ROW_OPTIONS.get(row, {})
    if options:
        record["options"] = options
    if method is None:
        from keras_oneimage.models.registry import build_trunk

        keras.utils.set_random_seed(seed)
        backbone = build_trunk(row_trunk(row), variant=variant, image_size=args.image_size, **options)
        backbone(keras.ops.zeros((1, args.image_size, args.image_size, 3)))
        record.update(train_seconds=0.0, patches=0)
    elif method == "supervised":
        import supervised_reference

        ref_args = [f"--image_size={args.image_size}", f"--variant={variant}", f"--seed={seed}"]
        if args.quick:
            ref_args += ["--quick", f"--out={pathlib.Path(args.out) / 'supervised_quick'}"]
        supervised_reference.main(ref_args)  # trains it, resumably, unless it is finished
        backbone, reference = supervised_reference.load_trunk(
            args.image_size, variant, seed, out=str(pathlib.Path(args.out) / "supervised_quick") if args.quick else None)
        record.update(supervised_test_accuracy=reference["test_accuracy"],
                      supervised_val_accuracy=reference["best_val_accuracy"], supervised_epochs=reference["epochs_run"],
                      labelled_images_seen=reference["epochs_run"] * reference["train_images"],
                      reference_command=reference["command"])
    else:
        steps = method_steps(method, args, row)
        callbacks = [TimeBudget(args.train_minutes)] if args.train_minutes else []
        if source_image_count(row):
            source = cifar_source_images(source_image_count(row), seed)
        else:
            source = str(SHARED_IMAGES / image_name)
        steps_per_epoch = args.steps_per_epoch if args.quick else ROW_STEPS_PER_EPOCH.get(row, args.steps_per_epoch)
        patch_size = method_image_size(method, args.image_size)
        record.update(patch_size=patch_size, steps_per_epoch=min(steps, steps_per_epoch))
        model = api.fit(
            source, method=method, image_size=patch_size,
            batch_size=args.batch_size, epochs=max(1, steps // steps_per_epoch),
            steps_per_epoch=min(steps, steps_per_epoch), seed=seed, output_dir=str(run_dir),
            callbacks=callbacks, verbose=0 if args.quick else 2, precision=args.precision,
            trunk=row_trunk(row), **options,
        )
        backbone = model.backbone
        record.update(train_seconds_last_session=time.monotonic() - start, steps=steps,
                      patches=steps * args.batch_size, precision=args.precision)
    return record, backbone


def run_rows(args: argparse.Namespace) -> None:
    import cifar_arrays
    import numpy as np

    from keras_oneimage.training import configure_threads

    if args.threads:
        configure_threads(args.threads, 1)
    rows = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows: {unknown}; choose from {list(ROWS)}")
    out, records = pathlib.Path(args.out), pathlib.Path(args.records)
    out.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    data = cifar_arrays.labelled(max_per_class=args.max_per_class)
    for row in rows:
        for seed in args.seeds:
            path = records / f"{row}__s{seed}.json"
            if path.exists():
                print(f"[{row} seed {seed}] done already ({path}); delete it to rerun")
                continue
            print(f"[{row} seed {seed}] training ...", flush=True)
            args.seed = seed
            record, backbone = train_row(row, seed, args)
            print(f"[{row} seed {seed}] probing {','.join(backbone.TAPS)} ({args.protocol}, {args.probe_epochs} "
                  "epochs) ...", flush=True)
            t0 = time.monotonic()
            record["probe"] = _probe_both_splits(backbone, data, args)
            record.update(probe_seconds=time.monotonic() - t0, probe_epochs=args.probe_epochs,
                          probe_augment=bool(args.probe_augment), probe_lr=args.probe_lr,
                          cifar_train_images=data.train_size, cifar_test_images=data.test_size)
            backbone.save_weights(str(out / f"{row}__s{seed}.weights.h5"))
            # conv1 alone (tens of kB) is kept beside the record, so the Fig. 3 panel survives the weights' cache
            # (a ResNet's first conv is its stem's: kept too, though the AlexNet panel does not show it)
            first = backbone.get_layer(backbone.TAPS[0]).conv.kernel
            np.savez(records / f"{row}__s{seed}.conv1.npz", kernel=np.asarray(first),
                     sobel=bool(getattr(backbone, "sobel", False)))
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, path)
            print(f"[{row} seed {seed}] test: "
                  + "  ".join(f"{k} {100 * v:.1f}" for k, v in record["probe"]["test"].items()), flush=True)


def _load_records(out: pathlib.Path) -> dict[str, list[dict]]:
    """``{row: [record per seed]}`` of the finished runs, in :data:`ROWS` order."""
    records: dict[str, list[dict]] = {}
    for row in ROWS:
        found = sorted(out.glob(f"{row}__s*.json"), key=lambda p: int(p.stem.rsplit("__s", 1)[1]))
        if found:
            records[row] = [json.loads(p.read_text()) for p in found]
    return records


def _test_means(recs: list[dict], taps=TAPS) -> dict[str, float]:
    """``{tap: mean test accuracy in %}`` over the seeds' records of one row."""
    import statistics

    return {k: 100 * statistics.mean(r["probe"]["test"][k] for r in recs) for k in taps}


def _mean_spread(values: list[float]) -> str:
    import statistics

    mean = statistics.mean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def report(args: argparse.Namespace) -> str:
    """Write the RESULTS.md section and the figures from the finished rows; return the markdown."""
    import numpy as np

    from keras_oneimage.models.alexnet import AlexNet
    from keras_oneimage.plots import conv1_filter_comparison, layer_accuracy_plot

    out = pathlib.Path(args.records)
    records = _load_records(out)
    if not records:
        sys.exit(f"no finished rows in {out}")
    curve = {row: recs for row, recs in records.items() if row in N_IMAGE_ROWS}
    if curve:
        report_n_images(curve, records.get("supervised"), records.get("random"), args)
    records = {row: recs for row, recs in records.items() if row not in N_IMAGE_ROWS}
    other_trunks = {row: recs for row, recs in records.items() if row in TRUNK_ROWS}
    records = {row: recs for row, recs in records.items() if row not in TRUNK_ROWS}
    trunk_section = report_other_trunks(other_trunks, records, args) if other_trunks else ""
    if not records:
        return trunk_section or "only N-image rows are finished; the table section waits for its rows"
    name = args.section
    figures = pathlib.Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    means = {row: _test_means(recs) for row, recs in records.items()}
    mean_test = {row: {k: v / 100 for k, v in row_means.items()} for row, row_means in means.items()}
    layer_accuracy_plot(mean_test, figures / f"{name}_layers.png",
                        title=f"CIFAR-10 (JPEG) linear probes, test ({args.protocol} protocol)")
    trunks = {}
    for row, recs in records.items():
        kernel = out / f"{row}__s{recs[0]['seed']}.conv1.npz"
        if kernel.exists() and recs[0]["method"] != "random":
            size = recs[0]["image_size"]
            with np.load(kernel) as saved:
                net = AlexNet("cifar" if size < 128 else "imagenet", size, sobel=bool(saved["sobel"]))
                net(np.zeros((1, size, size, 3), "float32"))
                net.get_layer("conv1").conv.kernel.assign(saved["kernel"])
            trunks[row] = net
    if trunks:
        conv1_filter_comparison(trunks, figures / f"{name}_conv1.png")

    sup = records.get("supervised")
    lines = [f"<!-- {name}:start -->",
             f"### Test accuracy per layer, {args.protocol} protocol, {args.image_size} px (mean ± spread over seeds)", "",
             "| row | seeds | conv1 | conv2 | conv3 | conv4 | conv5 | Δ conv1 vs sup. | Δ conv2 vs sup. | "
             "Δ conv3 vs sup. | val conv1 | val conv2 | steps | patches |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row, recs in records.items():
        cells = [_mean_spread([100 * r["probe"]["test"][k] for r in recs]) for k in TAPS]
        deltas = [f"{means[row][k] - means['supervised'][k]:+.1f}" if sup else "—"
                  for k in ("conv1", "conv2", "conv3")]
        val = [_mean_spread([100 * r["probe"]["val"][k] for r in recs]) for k in ("conv1", "conv2")]
        steps = recs[0].get("steps") or (f"{recs[0].get('supervised_epochs', 0)} epochs" if row == "supervised" else 0)
        patches = recs[0].get("patches") or recs[0].get("labelled_images_seen", 0)
        lines.append(f"| {row} | {','.join(str(r['seed']) for r in recs)} | " + " | ".join(cells) + " | "
                     + " | ".join(deltas) + " | " + " | ".join(val) + f" | {steps} | {patches:,} |")
    lines += ["", "Commands that reproduce each row:", ""]
    for row, recs in records.items():
        seeds = ",".join(str(r["seed"]) for r in recs)
        command = recs[0]["command"].replace(f"--seeds {recs[0]['seed']}", f"--seeds {seeds}")
        lines.append(f"- `{row}`: `{command}`")
    lines += ["", f"![per-layer accuracy](figures/{name}_layers.png)", "",
              f"![conv1 filters](figures/{name}_conv1.png)", "", f"<!-- {name}:end -->"]
    section = "\n".join(lines)
    _write_section(args, name, section)
    return section


def report_other_trunks(rows: dict[str, list[dict]], alexnet_rows: dict[str, list[dict]],
                        args: argparse.Namespace) -> str:
    """RESULTS.md section of the rows on another trunk (:data:`TRUNK_ROWS`): their own taps as columns, and the
    AlexNet row with the same method and image beside each, for reference. No figure: the per-layer plot's axis is
    the AlexNet's conv1 … conv5."""
    name = f"{args.section}_other_trunks"
    lines = [f"<!-- {name}:start -->",
             f"### Other trunks: test accuracy per tap, {args.protocol} protocol, {args.image_size} px "
             "(mean ± spread over seeds)", "",
             "Each row's columns are its own trunk's taps, in forward order. ResNet-18's stem + stage1 are the "
             "analogue of the AlexNet's conv1-conv2 (the layers before the first downsampling stage); stage2 … "
             "stage4 have no layer-for-layer AlexNet counterpart, so the two trunks are compared row by row, "
             "not column by column.", ""]
    for row, recs in rows.items():
        taps = list(recs[0]["probe"]["test"])  # the record keeps its trunk's taps in forward order
        twin = next((r for r in alexnet_rows if ROWS[r] == ROWS[row] and r not in TRUNK_ROWS
                     and ROW_OPTIONS.get(r) == ROW_OPTIONS.get(row)), None)
        lines += [f"| row | trunk | seeds | {' | '.join(taps)} | steps | patches |",
                  "| --- | --- | ---: |" + " ---: |" * (len(taps) + 2)]
        seeds = ",".join(str(r["seed"]) for r in recs)
        lines.append(f"| {row} | {recs[0].get('trunk', TRUNK_ROWS[row])} | {seeds} | "
                     + " | ".join(_mean_spread([100 * r["probe"]["test"][k] for r in recs]) for k in taps)
                     + f" | {recs[0].get('steps', '')} | {recs[0].get('patches', 0):,} |")
        if twin:
            twin_recs = alexnet_rows[twin]
            lines += ["", f"Same method, image and steps on the AlexNet (`{twin}`): "
                      + ", ".join(f"{k} {_mean_spread([100 * r['probe']['test'][k] for r in twin_recs])}"
                                  for k in TAPS) + "."]
        lines.append("")
    lines += ["Commands that reproduce each row:", ""]
    for row, recs in rows.items():
        seeds = ",".join(str(r["seed"]) for r in recs)
        command = recs[0]["command"].replace(f"--seeds {recs[0]['seed']}", f"--seeds {seeds}")
        lines.append(f"- `{row}`: `{command}`")
    lines += ["", f"<!-- {name}:end -->"]
    section = "\n".join(lines)
    _write_section(args, name, section)
    return section


def _write_section(args: argparse.Namespace, name: str, section: str) -> None:
    """Put ``section`` between its ``name`` markers in RESULTS.md (replacing an earlier one)."""
    import collect_results

    results = pathlib.Path(args.results_md)
    text = results.read_text() if results.exists() else "# Results\n"
    results.write_text(collect_results.insert(text, name, section))


def report_n_images(curve: dict[str, list[dict]], supervised: list[dict] | None, random: list[dict] | None,
                    args: argparse.Namespace) -> str:
    """RESULTS.md section and figure of the N-image curve: test accuracy per layer against N source images, with
    the supervised reference (dashed) and the random trunk (dotted) per layer as horizontal lines."""
    from matplotlib.figure import Figure

    name = f"n_images_{args.protocol}{args.image_size}"
    ns = sorted(N_IMAGE_ROWS[row] for row in curve)
    by_n = {N_IMAGE_ROWS[row]: recs for row, recs in curve.items()}
    mean = {n: _test_means(recs) for n, recs in by_n.items()}
    sup = _test_means(supervised) if supervised else None
    rnd = _test_means(random) if random else None
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for i, layer in enumerate(TAPS):
        color = f"C{i}"
        ax.plot(ns, [mean[n][layer] for n in ns], marker="o", color=color, label=layer)
        if sup:
            ax.axhline(sup[layer], color=color, linestyle="--", linewidth=0.8)
        if rnd:
            ax.axhline(rnd[layer], color=color, linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("source images N (CIFAR-10 train, scaled up 4x)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_title("RotNet from N images" + ("; dashed: supervised" if sup else "") + ("; dotted: random" if rnd else ""))
    ax.legend(fontsize="small")
    figures = pathlib.Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    fig.savefig(figures / f"{name}.png", dpi=120, bbox_inches="tight")
    lines = [f"<!-- {name}:start -->",
             f"### RotNet from N source images, {args.protocol} protocol, {args.image_size} px (test accuracy, %)", "",
             "| N | seeds | " + " | ".join(TAPS) + " | steps |", "| ---: | ---: |" + " ---: |" * (len(TAPS) + 1)]
    for n in ns:
        recs = by_n[n]
        lines.append(f"| {n} | {','.join(str(r['seed']) for r in recs)} | "
                     + " | ".join(_mean_spread([100 * r["probe"]["test"][k] for r in recs]) for k in TAPS)
                     + f" | {recs[0].get('steps', '')} |")
    for label, recs, means, steps_cell in (("supervised", supervised, sup, " | |"), ("random", random, rnd, " | 0 |")):
        if recs:
            lines.append(f"| {label} | {','.join(str(r['seed']) for r in recs)} | "
                         + " | ".join(f"{means[k]:.1f}" for k in TAPS) + steps_cell)
    lines += ["", f"![N-image curve](figures/{name}.png)", "", f"<!-- {name}:end -->"]
    section = "\n".join(lines)
    _write_section(args, name, section)
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
