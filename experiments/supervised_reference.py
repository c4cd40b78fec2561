"""The converged supervised reference: the same AlexNet trained on the CIFAR-10 (JPEG) train labels.

Issue #12: the verdict "single-image layers match supervised ones" is only as strong as the supervised reference.
This trains the trunk of a probe setting (stem + input size) as a classifier on the 45,000 train images, scores the
5,000 validation images after every epoch, and stops when validation accuracy has not improved for ``--patience``
epochs (or at ``--epochs``, the length of the cosine schedule). Every epoch is backed up, so a rerun resumes;
a finished run is skipped. The trunk's weights, the curve and the classifier's test accuracy land in ``--out``
(default ``~/.cache/keras_oneimage/supervised/<setting>``, outside git).

    python experiments/supervised_reference.py --image_size 32                  # the 32 px cifar-stem reference
    python experiments/supervised_reference.py --image_size 128                 # the ImageNet stem at 128 px
    python experiments/supervised_reference.py --image_size 32 --quick --out /tmp/sr   # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import keras  # noqa: E402


def setting_name(image_size: int, variant: str) -> str:
    return f"{variant}{image_size}"


def default_out(image_size: int, variant: str, seed: int) -> pathlib.Path:
    from keras_oneimage.data.labelled import default_cache_dir

    return default_cache_dir() / "supervised" / f"{setting_name(image_size, variant)}_seed{seed}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--variant", default="auto", choices=("auto", "cifar", "imagenet"),
                   help="AlexNet stem; auto: imagenet from 128 px up, as everywhere in the package")
    p.add_argument("--epochs", type=int, default=10, help="length of the cosine schedule (upper bound)")
    p.add_argument("--patience", type=int, default=4, help="stop after this many epochs without a better val")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=0.02)
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="tiny data and 2 epochs (smoke test)")
    args = p.parse_args(argv)
    if args.variant == "auto":
        args.variant = "imagenet" if args.image_size >= 128 else "cifar"
    args.out = pathlib.Path(args.out) if args.out else default_out(args.image_size, args.variant, args.seed)
    return args


class Progress(keras.callbacks.Callback):
    """Prints the running step rate every ``every`` batches: an epoch takes many minutes on 2 cores."""

    def __init__(self, every: int):
        super().__init__()
        self.every = every

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.start = epoch, time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0:
            rate = (batch + 1) / (time.monotonic() - self.start)
            print(f"  epoch {self.epoch + 1} step {batch + 1}: {rate:.2f} steps/s, "
                  f"accuracy {float(logs.get('accuracy', 0)):.3f}", flush=True)


def build_classifier(args):
    from keras_oneimage.precision import precision_scope
    from keras_oneimage.models.alexnet import AlexNet
    from keras_oneimage.models.classifier import AlexNetClassifier

    keras.utils.set_random_seed(args.seed)
    with precision_scope(args.precision) as policy:
        trunk = AlexNet(variant=args.variant, image_size=args.image_size)
        model = AlexNetClassifier(trunk, 10, seed=args.seed)
        model.build((None, args.image_size, args.image_size, 3))
    return model, policy


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out
    record_path = out / "record.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        print(f"done already: {record_path} (val {record['best_val_accuracy']:.4f}, test {record['test_accuracy']:.4f})")
        return record
    import cifar_arrays

    from keras_oneimage.data.pipelines import eval_pipeline, train_pipeline

    data = cifar_arrays.labelled(seed=0, max_per_class=60 if args.quick else None)
    if args.quick:
        args.epochs, args.batch_size = 2, 32
    out.mkdir(parents=True, exist_ok=True)
    model, policy = build_classifier(args)
    steps = math.ceil(data.train_size / args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, decay_steps=args.epochs * steps)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=True,  # XLA: about 1.25x the train steps per second of the graph executor on a 2-core CPU
    )
    size = args.image_size
    train = train_pipeline(data.train, size, data.train_size, args.batch_size, args.seed)
    val = eval_pipeline(data.val, size, 256).cache()
    callbacks = [
        keras.callbacks.BackupAndRestore(str(out / "backup")),
        keras.callbacks.CSVLogger(str(out / "curve.csv"), append=True),
        keras.callbacks.EarlyStopping("val_accuracy", patience=args.patience, mode="max"),
        Progress(every=50),
    ]
    print(f"supervised reference {setting_name(size, args.variant)} ({policy}): {data.train_size} train, "
          f"{data.val_size} val, {args.epochs}-epoch cosine, batch {args.batch_size}, lr {args.learning_rate}",
          flush=True)
    start = time.monotonic()
    model.fit(train, validation_data=val, epochs=args.epochs, verbose=2, callbacks=callbacks)
    seconds = time.monotonic() - start

    import csv

    with open(out / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    curve = {int(r["epoch"]) + 1: {"train_accuracy": float(r["accuracy"]), "val_accuracy": float(r["val_accuracy"]),
                                   "loss": float(r["loss"])} for r in rows}
    test = model.evaluate(eval_pipeline(data.test, size, 256), verbose=0, return_dict=True)["accuracy"]
    model.backbone.save_weights(str(out / "trunk.weights.h5"))
    record = {
        "setting": setting_name(size, args.variant), "image_size": size, "variant": args.variant,
        "precision": policy, "seed": args.seed, "epochs_run": len(curve), "schedule_epochs": args.epochs,
        "best_val_accuracy": max(c["val_accuracy"] for c in curve.values()),
        "final_val_accuracy": curve[max(curve)]["val_accuracy"], "test_accuracy": float(test),
        "curve": curve, "train_seconds_last_session": seconds, "train_images": data.train_size,
        "command": "python experiments/supervised_reference.py " + " ".join(argv or sys.argv[1:]),
    }
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, record_path)
    if not args.quick:  # the record (not the weights) is tracked in git: the curve outlives the machine's cache
        tracked = HERE / "results" / "supervised" / f"{out.name}.json"
        tracked.parent.mkdir(parents=True, exist_ok=True)
        tracked.write_text(json.dumps(record, indent=2))
    print(f"best val {record['best_val_accuracy']:.4f}, test {record['test_accuracy']:.4f} -> {out}")
    return record


def load_trunk(image_size: int, variant: str = "auto", seed: int = 0, out: str | None = None,
               partial: bool = False):
    """``(trunk, record)`` of the trained reference (an :class:`AlexNet`), or ``None`` when it is not trained.

    ``partial=True`` loads a run still in progress from its last backed-up epoch (its record then says which),
    to look at the trend before the reference has converged; never report it as the reference.
    """
    args = parse_args([f"--image_size={image_size}", f"--variant={variant}", f"--seed={seed}"]
                      + ([f"--out={out}"] if out else []))
    weights = args.out / "trunk.weights.h5"
    if weights.exists():
        import numpy as np

        from keras_oneimage.models.alexnet import AlexNet

        record = json.loads((args.out / "record.json").read_text())
        trunk = AlexNet(variant=args.variant, image_size=image_size)
        trunk(np.zeros((1, image_size, image_size, 3), "float32"))
        trunk.load_weights(str(weights))
        return trunk, record
    backup = args.out / "backup"
    if not partial or not (backup / "latest.weights.h5").exists():
        return None
    model, _ = build_classifier(args)
    model.load_weights(str(backup / "latest.weights.h5"))
    # Keras writes the number of completed epochs (BackupAndRestore.on_epoch_end: epoch + 1)
    epoch = json.loads((backup / "training_metadata.json").read_text())["epoch"]
    import csv

    with open(args.out / "curve.csv") as f:
        val = {int(r["epoch"]) + 1: float(r["val_accuracy"]) for r in csv.DictReader(f)}
    return model.backbone, {"partial": True, "epochs_run": epoch, "best_val_accuracy": val.get(epoch),
                            "test_accuracy": None}


if __name__ == "__main__":
    main()
