"""Feature inversion at conv1 and conv2 for a single-image, a random and a supervised trunk, side by side.

Issue #18, part 5: one application of the learned layers, compared across trunks. Each trunk's conv1 and conv2
features of one image are inverted by gradient descent on the pixels with a total-variation prior (Mahendran &
Vedaldi, CVPR 2015; ``keras_oneimage.applications.inversion``), from the same noise and for the same number of
steps, and scored by PSNR against the image. The trunks:

* single image: a RotNet checkpoint (``--single_image PATH``), or RotNet trained here on ``--train_image`` for
  ``--train_steps`` steps (Asano et al., ICLR 2020: one image, heavy augmentation);
* random: the same architecture, He-normal weights from ``--seed``;
* supervised: ``--supervised PATH``, the output directory of ``experiments/supervised_reference.py`` (its
  ``trunk.weights.h5``), a model.keras or an export; by default that script's 32 px output if it exists. When
  there is none the column reads "not available" and the script says how to make one.

Writes ``experiments/figures/inversion.png`` and ``experiments/results/inversion.json``, and puts the table and the
figure between the ``inversion`` markers of ``experiments/RESULTS.md`` (``--results_md ''`` skips that).

    python experiments/inversion_figure.py                                   # train RotNet here (minutes)
    python experiments/inversion_figure.py --single_image runs/rotnet_a \
        --supervised ~/.cache/keras_oneimage/supervised/cifar32_seed0
    python experiments/inversion_figure.py --report                          # RESULTS.md from the saved JSON
    python experiments/inversion_figure.py --quick --out_dir /tmp/inv        # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from record_paths import REPO, shown_path  # noqa: E402

IMAGE_A = REPO.parent / "shared" / "data" / "images" / "image_a.jpg"
LAYERS = ("conv1", "conv2")
TRUNKS = ("single_image", "random", "supervised")
TITLES = {"single_image": "single image (RotNet)", "random": "random", "supervised": "supervised (CIFAR-10)"}
SUPERVISED_HOWTO = "python experiments/supervised_reference.py --image_size 32 --epochs 8"


def default_image() -> str:
    """The paper's Image A beside the checkout when present, else the package's embedded photograph."""
    if IMAGE_A.exists():
        return str(IMAGE_A)
    from keras_oneimage.api import default_image_path

    return default_image_path()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=None, help="image to invert (default: Image A, else the embedded photo)")
    p.add_argument("--train_image", default=None, help="RotNet's source image when trained here (default: --image)")
    p.add_argument("--single_image", default=None, help="a RotNet model.keras or fit output dir (default: train)")
    p.add_argument("--train_steps", type=int, default=150, help="RotNet steps when trained here (batch 64, 32 px)")
    p.add_argument("--supervised", default=None, help="supervised_reference.py output dir, a model.keras or export")
    p.add_argument("--size", type=int, default=64, help="side of the reconstructions")
    p.add_argument("--steps", type=int, default=300, help="gradient steps per inversion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=str(HERE), help="figures/ and results/ go under it")
    p.add_argument("--work_dir", default=str(HERE / "outputs" / "inversion"), help="the RotNet trained here")
    p.add_argument("--results_md", default=str(HERE / "RESULTS.md"), help="'' to leave RESULTS.md alone")
    p.add_argument("--quick", action="store_true", help="tiny step counts (smoke test)")
    p.add_argument("--report", action="store_true", help="only rewrite the RESULTS.md section from the saved JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.steps, args.size = 4, 10, 32
    args.image = args.image or default_image()
    args.train_image = args.train_image or args.image
    return args


# ------------------------------------------------------------------------------------------------------ trunks
def single_image_trunk(args: argparse.Namespace):
    """(trunk, description, how it was made) for the single-image column."""
    from keras_oneimage.applications.inversion import load_trunk

    if args.single_image:
        trunk, description = load_trunk(args.single_image)
        return trunk, description, {"checkpoint": str(args.single_image)}
    from keras_oneimage import api

    out = pathlib.Path(args.work_dir) / f"rotnet_{args.train_steps}steps_seed{args.seed}"
    print(f"training RotNet on {args.train_image} for {args.train_steps} steps -> {out}", flush=True)
    start = time.monotonic()
    model = api.fit(args.train_image, method="rotnet", image_size=32, batch_size=64, epochs=1,
                    steps_per_epoch=args.train_steps, seed=args.seed, output_dir=str(out), verbose=1)
    made = {"trained_here": True, "method": "rotnet", "image": shown_path(args.train_image), "image_size": 32,
            "batch_size": 64, "steps": args.train_steps, "seconds": round(time.monotonic() - start, 1)}
    trunk, _ = load_trunk(model)
    return trunk, f"RotNet, {args.train_steps} steps on {pathlib.Path(args.train_image).name}", made


def supervised_trunk(args: argparse.Namespace):
    """(trunk, description) of the supervised column, or None when there is no supervised trunk to load."""
    from keras_oneimage.applications.inversion import load_trunk

    path = pathlib.Path(os.path.expanduser(args.supervised)) if args.supervised else None
    if path is None:
        import supervised_reference

        path = supervised_reference.default_out(32, "cifar", 0)
        if not path.exists():
            return None
    if (path / "trunk.weights.h5").exists():
        import supervised_reference

        record = json.loads((path / "record.json").read_text())
        loaded = supervised_reference.load_trunk(record["image_size"], record["variant"], record["seed"], out=str(path))
        if loaded is None:
            return None
        trunk, record = loaded
        accuracy = record.get("test_accuracy")
        tested = f", test {100 * accuracy:.1f}%" if accuracy is not None else ""
        return trunk, f"supervised on CIFAR-10 ({record['epochs_run']} epochs{tested})"
    return load_trunk(path)


# ------------------------------------------------------------------------------------------------------ figure
def draw(target, reconstructions: dict, records: dict, path: pathlib.Path) -> None:
    """Rows conv1, conv2; columns: the image, then one per trunk (PSNR in each title)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.3 * (1 + len(TRUNKS)), 2.5 * len(LAYERS) + 0.4))
    axes = fig.subplots(len(LAYERS), 1 + len(TRUNKS), squeeze=False)
    for row, layer in enumerate(LAYERS):
        ax = axes[row][0]
        ax.imshow(target, interpolation="nearest")
        ax.set_title("image" if row == 0 else "", fontsize=9)
        ax.set_ylabel(layer, fontsize=11)
        for col, trunk in enumerate(TRUNKS, start=1):
            ax = axes[row][col]
            if trunk in reconstructions:
                ax.imshow(reconstructions[trunk][layer], interpolation="nearest")
                ax.set_title(f"{TITLES[trunk]}\n{layer}: {records[trunk][layer]['psnr']:.1f} dB", fontsize=8)
            else:
                ax.text(0.5, 0.5, "not available:\nrun\nsupervised_reference.py", ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
                ax.set_title(f"{TITLES[trunk]}\n{layer}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Feature inversion (Mahendran & Vedaldi 2015): PSNR against the image", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def section(result: dict, figure_link: str) -> str:
    """The RESULTS.md section: the PSNR table, what each trunk was, and the figure."""
    lines = ["<!-- inversion:start -->",
             f"## Feature inversion: what conv1 and conv2 keep of an image (issue #18 part 5; {result['date']})", "",
             f"Each trunk's conv1 / conv2 features of `{pathlib.Path(result['image']).name}` ({result['size']} px, "
             f"centre crop) inverted by {result['steps']} Adam steps on the pixels with a total-variation prior "
             "(Mahendran & Vedaldi, CVPR 2015), from the same noise; PSNR against the image (higher: more of the "
             f"image is recoverable from the features). Constant grey scores {result['baselines']['grey']:.1f} dB, "
             f"the image's mean colour {result['baselines']['mean_colour']:.1f} dB.", "",
             "| trunk | conv1 PSNR (dB) | conv2 PSNR (dB) | conv1 feature loss | conv2 feature loss |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for trunk in TRUNKS:
        entry = result["trunks"].get(trunk)
        if entry is None:
            lines.append(f"| {TITLES[trunk]} | not available | not available | — | — |")
            continue
        cells = [f"{entry['records'][k]['psnr']:.1f}" for k in LAYERS]
        cells += [f"{entry['records'][k]['feature_loss']:.2g}" for k in LAYERS]
        lines.append(f"| {TITLES[trunk]}: {entry['description']} | " + " | ".join(cells) + " |")
    available = [result["trunks"][t]["records"] for t in TRUNKS if result["trunks"].get(t)]
    if len(available) > 1:
        gaps = {k: max(r[k]["psnr"] for r in available) - min(r[k]["psnr"] for r in available) for k in LAYERS}
        lines += ["", "Largest PSNR difference between trunks: "
                  + ", ".join(f"{k} {gaps[k]:.1f} dB" for k in LAYERS) + "."]
    if min(r[k]["psnr"] for r in available for k in LAYERS) > 30:
        lines += ["", "Every reconstruction is near-lossless (> 30 dB): the conv1 and conv2 maps hold many more numbers "
                  "than the pixels they come from, so a random trunk keeps the image as well as a trained one, as Mahendran & Vedaldi found for AlexNet's first layers. Inversion "
                  "at these layers shows what is kept, not what is useful: it does not separate the trunks that the "
                  "linear probes separate."]
    made = result["trunks"]["single_image"].get("made", {})
    if made.get("image") == result["image"]:
        lines += ["", "The single-image trunk was trained on patches of this same image (the paper's setting); "
                  "`--train_image` trains it on another."]
    if result["trunks"].get("supervised") is None:
        lines += ["", f"No supervised trunk was available: `{SUPERVISED_HOWTO}` makes one, then rerun this script."]
    trained = f", {made['seconds']:.0f} s of it training RotNet" if made.get("seconds") else ""
    lines += ["", f"Command: `{result['command'].strip()}` ({result['seconds']:.0f} s on {result['machine']}, "
              f"shared with other jobs{trained}).", "",
              f"![feature inversion]({figure_link})", "", "<!-- inversion:end -->"]
    return "\n".join(lines)


def write_section(result: dict, figure: pathlib.Path, results_md: pathlib.Path) -> None:
    """Put the section between the ``inversion`` markers of ``results_md`` (replacing an earlier one)."""
    import collect_results

    text = results_md.read_text() if results_md.exists() else "# Results\n"
    block = section(result, os.path.relpath(figure, results_md.parent))
    results_md.write_text(collect_results.insert(text, "inversion", block))
    print(f"section 'inversion' written to {results_md}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = pathlib.Path(args.out_dir)
    figure = out_dir / "figures" / "inversion.png"
    json_path = out_dir / "results" / "inversion.json"
    if args.report:
        result = json.loads(json_path.read_text())
        if args.results_md:
            write_section(result, figure, pathlib.Path(args.results_md))
        return result
    import numpy as np

    from keras_oneimage.applications.inversion import invert_features, psnr, random_trunk, square_image

    start = time.monotonic()
    target = square_image(args.image, args.size)
    single, single_description, made = single_image_trunk(args)
    trunks = {"single_image": (single, single_description),
              "random": (random_trunk(single, seed=args.seed), f"random He-normal (seed {args.seed})")}
    supervised = supervised_trunk(args)
    if supervised is not None:
        trunks["supervised"] = supervised
    else:
        print(f"no supervised trunk: the supervised column is 'not available'. Make one with `{SUPERVISED_HOWTO}` "
              "(or pass --supervised PATH)", flush=True)

    reconstructions, records = {}, {}
    for name, (trunk, description) in trunks.items():
        reconstructions[name], records[name] = {}, {}
        for layer in LAYERS:
            print(f"[{name}] inverting {layer}", flush=True)
            image, record = invert_features(trunk, args.image, layer, steps=args.steps, seed=args.seed, size=args.size)
            reconstructions[name][layer] = image
            records[name][layer] = record.as_dict()
            print(f"[{name}] {layer}: PSNR {record.psnr:.2f} dB, feature loss {record.initial_feature_loss:.3g} -> "
                  f"{record.feature_loss:.3g}", flush=True)

    draw(target, reconstructions, records, figure)
    result = {
        "image": shown_path(args.image), "size": args.size, "steps": args.steps, "seed": args.seed,
        "baselines": {"grey": psnr(np.full_like(target, 0.5), target),
                      "mean_colour": psnr(np.broadcast_to(target.mean(axis=(0, 1)), target.shape), target)},
        "trunks": {name: {"description": trunks[name][1], "records": records[name],
                          **({"made": made} if name == "single_image" else {})} for name in trunks},
        "seconds": round(time.monotonic() - start, 1),
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "command": "python experiments/inversion_figure.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
    }
    result["trunks"].setdefault("supervised", None)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    print(f"figure: {figure}\nresults: {json_path}")
    if args.results_md:
        write_section(result, figure, pathlib.Path(args.results_md))
    return result


if __name__ == "__main__":
    main()
