"""Augmentation ablation: which parts of the single-image recipe matter for which layer (Asano et al. 2020, §3).

Starting from the default recipe (``AugmentConfig()``: crops down to β = 1e-4 of the image, aspect γ = 3/4, ±35°
rotations, flips, colour jitter; plus noise / blur when ``--noise`` / ``--blur`` are given), every component is

* removed one at a time (``no_<component>``: the full recipe without it), then
* added back one at a time from nothing (``only_<component>``: no augmentation but that component),

plus ``full`` and ``none``. For each configuration a RotNet is trained on Image A (``--epochs`` x
``--steps_per_epoch`` batches of ``--image_size`` px patches) and linear probes on conv1..conv5 are trained on
CIFAR-10's train split (less a validation split) and scored on both the validation split (the number to make any
choice on) and the test split (the number reported). Components:

  scale     crop area in [β, 1] → off: the whole image (min_area = max_area = 1)
  aspect    aspect ratios in [γ, 1/γ] → off: square crops (γ = 1). With scale off too, a non-square image then
            gives its largest square crop at a random position (75% of a 4:3 image), while aspect on allows the
            whole image, squeezed to a square patch.
  rotation  ±max_rotation degrees → off: 0
  flip      horizontal flips (p = 0.5) → off: p = 0
  colour    colour matrix, brightness, contrast → off: 0
  noise     gaussian noise (only with --noise > 0) → off: 0
  blur      gaussian blur (only with --blur > 0) → off: 0

Each configuration writes ``<out>/<name>-<digest>.json`` (the digest covers every setting, so runs with other
settings never mix) and trains in ``<out>/runs/<name>-<digest>/`` (resumable: rerunning continues after the last
completed epoch, and configurations whose JSON exists are skipped). At the end ``<out>/ablation.md`` holds the
table and ``ablation_remove.png`` / ``ablation_add.png`` the per-layer plots.

Usage::

    .venv/bin/python experiments/ablation.py --quick                      # a few minutes on a laptop CPU
    .venv/bin/python experiments/ablation.py --epochs 30 --steps_per_epoch 200 --image_size 64   # the real one
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "images" / "image_a.jpg"
OUTPUTS = ROOT / "experiments" / "outputs"
TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")

#: The AugmentConfig fields each component owns, and their values when the component is off.
COMPONENTS: dict[str, dict[str, float]] = {
    "scale": {"min_area": 1.0, "max_area": 1.0},
    "aspect": {"aspect": 1.0},
    "rotation": {"max_rotation": 0.0},
    "flip": {"flip_prob": 0.0},
    "colour": {"color": 0.0, "brightness": 0.0, "contrast": 0.0},
    "noise": {"noise_std": 0.0},
    "blur": {"blur_sigma": 0.0},
}

#: --quick: tiny trunk, few steps, a CIFAR-10 subset, one probe epoch (checks the pipeline, not the science).
QUICK = dict(image_size=32, batch_size=16, epochs=1, steps_per_epoch=3, probe_epochs=1, max_per_class=20,
             widths="8,8,8,8,8", head_widths="32", probe_batch_size=64)  # fmt: skip


# ---------------------------------------------------------------------------------------------- shared helpers
def digest(payload: Mapping[str, Any]) -> str:
    """Short stable hash of a JSON-able dict."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def int_list(text: str | None) -> tuple[int, ...] | None:
    return None if not text else tuple(int(v) for v in text.split(",") if v.strip())


def write_json(path: pathlib.Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def train_and_probe(name: str, augment, args, images, data, out: pathlib.Path, extra: Mapping[str, Any] | None = None,
                    log=print) -> dict[str, Any]:
    """Train RotNet with ``augment`` and probe it (val + test); cached in ``out/<name>-<digest>.json``."""
    from keras_oneimage.tuning import train_method

    train_settings = {
        "augment": dataclasses.asdict(augment), "image": str(args.image), "image_size": args.image_size,
        "batch_size": args.batch_size, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
        "seed": args.seed, "widths": args.widths, "head_widths": args.head_widths, "method": "rotnet",
        "precision": args.precision,
    }  # fmt: skip
    probe_settings = {"dataset": "cifar10", "max_per_class": args.max_per_class, "val_fraction": args.val_fraction,
                      "probe_epochs": args.probe_epochs, "probe_batch_size": args.probe_batch_size,
                      "probe_lr": args.probe_lr, "probe_augment": args.probe_augment}  # fmt: skip
    tag = f"{name}-{digest({**train_settings, **probe_settings})}"
    path = out / f"{tag}.json"
    if path.exists():
        log(f"[skip] {name}: {path.name} exists")
        return json.loads(path.read_text())
    start = time.time()
    widths = int_list(args.widths)
    head = int_list(args.head_widths)
    model = train_method(
        images, method="rotnet", augment=augment, image_size=args.image_size, batch_size=args.batch_size,
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, seed=args.seed, widths=widths,
        output_dir=out / "runs" / f"{name}-{digest(train_settings)}", verbose=args.verbose,
        method_options={} if head is None else {"head_widths": head}, precision=args.precision,
    )  # fmt: skip
    trained = time.time()
    from keras_oneimage.probes import probe_splits

    scores = probe_splits(model.backbone, data, ("val", "test"), epochs=args.probe_epochs, verbose=0,
                          batch_size=args.probe_batch_size, learning_rate=args.probe_lr, seed=args.seed,
                          augment=bool(args.probe_augment))
    record = {
        "name": name, **(extra or {}), "val": scores["val"], "test": scores["test"],
        "train_settings": train_settings, "probe_settings": probe_settings,
        "seconds": {"train": round(trained - start, 1), "probe": round(time.time() - trained, 1)},
    }  # fmt: skip
    write_json(path, record)
    log(f"[done] {name}: test " + " ".join(f"{k}={v:.3f}" for k, v in scores["test"].items()))
    return record


def markdown_table(records: Sequence[Mapping[str, Any]], reference: str | None = None) -> str:
    """Rows: configurations; columns: test accuracy per layer, their mean, val mean, Δ test mean vs reference."""
    ref = next((r for r in records if r["name"] == reference), None)
    head = ["config", *TAPS, "test mean", "val mean"] + (["Δ test mean"] if ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def mean(d):
        return sum(d[t] for t in TAPS if t in d) / max(1, sum(t in d for t in TAPS))

    for r in records:
        cells = [r["name"], *(f"{r['test'][t]:.3f}" if t in r["test"] else "-" for t in TAPS),
                 f"{mean(r['test']):.3f}", f"{mean(r['val']):.3f}"]  # fmt: skip
        if ref:
            delta = mean(r["test"]) - mean(ref["test"])
            cells.append(f"{0.0 if abs(delta) < 5e-4 else delta:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_cifar(args):
    from keras_oneimage.data.labelled import load_labelled

    return load_labelled("cifar10", val_fraction=args.val_fraction, seed=args.seed, max_per_class=args.max_per_class)


def common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny settings that check the pipeline in minutes")
    parser.add_argument("--image", type=pathlib.Path, default=DEFAULT_IMAGE, help="source image (Image A)")
    parser.add_argument("--image_size", type=int, default=32, help="patch side in pixels")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10, help="RotNet training epochs per configuration")
    parser.add_argument("--steps_per_epoch", type=int, default=100)
    parser.add_argument("--probe_epochs", type=int, default=36, help="linear-probe epochs (paper: 36)")
    parser.add_argument("--probe_batch_size", type=int, default=192)
    parser.add_argument("--probe_lr", type=float, default=0.01, help="linear-probe learning rate (paper: 0.01)")
    parser.add_argument("--probe_augment", type=int, default=1, choices=(0, 1),
                        help="1: the paper's augmented probe; 0: probes on cached taps (the trunk runs once per image)")
    parser.add_argument("--max_per_class", type=int, default=None, help="subsample CIFAR-10 (per class)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of CIFAR-10 train held out as val")
    parser.add_argument("--widths", default=None, help="AlexNet widths, e.g. 96,256,384,384,256 (default)")
    parser.add_argument("--head_widths", default=None, help="RotNet head widths, e.g. 1024,1024 (default)")
    parser.add_argument("--precision", default="float32", choices=("auto", "float32", "mixed_bfloat16"),
                        help="training precision ('auto': bf16 on AMX CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=0, help="Keras training verbosity (0, 1, 2)")


def apply_quick(args, parser: argparse.ArgumentParser, quick: Mapping[str, Any]) -> None:
    """--quick replaces every setting the user left at its default."""
    if not args.quick:
        return
    for key, value in quick.items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)


# ----------------------------------------------------------------------------------------------------- ablation
def configurations(noise: float, blur: float) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, AugmentConfig, info) for full, no_<c> for each c, none, only_<c> for each c."""
    from keras_oneimage.data.augment import AugmentConfig

    full = AugmentConfig(noise_std=noise, blur_sigma=blur)
    comps = [c for c in COMPONENTS if not (c == "noise" and noise <= 0) and not (c == "blur" and blur <= 0)]

    def build(active):
        fields = {}
        for comp, off in COMPONENTS.items():
            for field, off_value in off.items():
                fields[field] = getattr(full, field) if comp in active else off_value
        return AugmentConfig(**fields)

    configs = [("full", build(set(comps)), {"active": comps})]
    configs += [(f"no_{c}", build(set(comps) - {c}), {"active": [o for o in comps if o != c], "removed": c})
                for c in comps]  # fmt: skip
    configs.append(("none", build(set()), {"active": []}))
    configs += [(f"only_{c}", build({c}), {"active": [c], "added": c}) for c in comps]
    return configs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    common_flags(parser)
    parser.add_argument("--noise", type=float, default=0.0, help="also ablate gaussian noise of this max std")
    parser.add_argument("--blur", type=float, default=0.0, help="also ablate gaussian blur of this max sigma")
    parser.add_argument("--only", default=None, help="comma-separated configuration names to run (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default experiments/outputs/ablation, or ablation_quick)")
    args = parser.parse_args(argv)
    apply_quick(args, parser, QUICK)
    out = args.out or OUTPUTS / ("ablation_quick" if args.quick else "ablation")
    if not args.image.exists():
        print(f"error: source image {args.image} not found", file=sys.stderr)
        return 2

    from keras_oneimage.data.images import load_images
    from keras_oneimage.plots import layer_accuracy_plot

    configs = configurations(args.noise, args.blur)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {n for n, _, _ in configs}
        if unknown:
            print(f"error: unknown configuration(s) {sorted(unknown)}", file=sys.stderr)
            return 2
        configs = [c for c in configs if c[0] in wanted]
    images = load_images(str(args.image))
    data = load_cifar(args)
    print(f"{len(configs)} configurations -> {out}; CIFAR-10 train/val/test = "
          f"{data.train_size}/{data.val_size}/{data.test_size}")  # fmt: skip
    records = []
    for name, augment, info in configs:
        extra = {**info, "augment": dataclasses.asdict(augment)}
        records.append(train_and_probe(name, augment, args, images, data, out, extra=extra))

    by_name = {r["name"]: r for r in records}
    remove = [n for n in ["full", *(f"no_{c}" for c in COMPONENTS), "none"] if n in by_name]
    add = [n for n in ["none", *(f"only_{c}" for c in COMPONENTS), "full"] if n in by_name]
    settings = records[0]["train_settings"] | records[0]["probe_settings"] if records else {}
    settings = {k: v for k, v in settings.items() if k != "augment"}
    lines = [
        "# Augmentation ablation (RotNet on one image, linear probes on CIFAR-10)", "",
        "Test-split top-1 accuracy of linear probes per layer; `val mean` is the validation-split mean (use it, "
        "not the test numbers, to choose between configurations). `Δ` is relative to the full recipe (removal) or "
        "to no augmentation (addition).", "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(settings.items())), "",
    ]  # fmt: skip
    if remove:
        lines += ["## Removing one component from the full recipe", "",
                  markdown_table([by_name[n] for n in remove], "full" if "full" in by_name else None), ""]
    if add:
        lines += ["## Adding one component to no augmentation", "",
                  markdown_table([by_name[n] for n in add], "none" if "none" in by_name else None), ""]
    if records:
        best = max(records, key=lambda r: sum(r["val"].values()))
        lines += [f"Best configuration by validation mean: **{best['name']}**.", ""]
    (out / "ablation.md").write_text("\n".join(lines))
    for kind, names in (("remove", remove), ("add", add)):
        if names:
            layer_accuracy_plot({n: by_name[n]["test"] for n in names}, out / f"ablation_{kind}.png",
                                title=f"augmentation ablation ({'remove one' if kind == 'remove' else 'add one'})")
    print(f"wrote {out / 'ablation.md'}")
    print("\n".join(lines[6:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
