"""The experiment scripts' records: what they write into git must read back right on another clone.

experiments/transfer_table.py keeps one JSON per Table 4 row in a tracked folder and rebuilds the markdown table
from whatever rows are there; its recorded commands must not name this machine's checkout. And
experiments/supervised_reference.py's ``load_trunk(partial=True)`` must report the epoch the backup really holds.
"""
import csv
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import supervised_reference  # noqa: E402
import transfer_table  # noqa: E402


def _row(test, val, seconds=120.0, frozen=("conv1", "conv2")):
    return {"test_accuracy": test, "val_accuracy": val, "frozen": list(frozen), "epochs_run": 3,
            "images_seen": 13500, "seconds": seconds, "dataset": "cifar10", "train_size": 4500, "val_size": 500,
            "test_size": 5000, "image_size": 32, "widths": [96, 256, 384, 384, 256]}


def test_table_is_rebuilt_from_the_records_present_in_row_order(tmp_path):
    (tmp_path / "scattering.json").write_text(json.dumps(_row(0.368, 0.366, frozen=("scattering",))))
    (tmp_path / "rotnet.json").write_text(json.dumps(_row(0.408, 0.396)))
    text = transfer_table.write_table(tmp_path)
    header = ("| conv1-2 from", "| ---")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(header)]
    assert rows[0].startswith(f"| {transfer_table.DESCRIPTIONS['rotnet']} | conv1, conv2 | 40.8 | 39.6 | 3 |")
    assert rows[1].startswith(f"| {transfer_table.DESCRIPTIONS['scattering']} | scattering | 36.8 | 36.6 |")
    assert len(rows) == 2  # no row invented for the three sources without a record
    assert (tmp_path / transfer_table.TABLE_FILE).read_text() == text


def test_records_default_to_the_tracked_folder_and_commands_are_clone_relative(tmp_path):
    args = transfer_table.parse_args(["--rows", "random", "--max_per_class", "500", "--epochs", "3"])
    assert pathlib.Path(args.records) == ROOT / "experiments" / "results" / "transfer_table"
    assert pathlib.Path(args.out) == ROOT / "experiments" / "outputs" / "transfer_table"
    command = transfer_table.command_line("random", args)
    assert "--out experiments/outputs/transfer_table" in command
    assert "--records experiments/results/transfer_table" in command
    assert str(ROOT) not in command
    outside = transfer_table.parse_args(["--rows", "random", "--out", str(tmp_path), "--records", str(tmp_path)])
    assert f"--records {tmp_path}" in transfer_table.command_line("random", outside)  # kept as given
    quick = transfer_table.parse_args(["--quick", "--out", str(tmp_path)])
    assert quick.records == str(tmp_path)  # a smoke test writes nothing into the tracked folder


def test_rows_of_another_recipe_are_refused_before_any_training(tmp_path):
    args = transfer_table.parse_args(["--rows", "random", "--records", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--max_per_class", "500", "--epochs", "3"])
    (tmp_path / "rotnet.json").write_text(json.dumps({**_row(0.408, 0.396), **transfer_table.recipe(args)}))
    transfer_table.check_recipe(tmp_path, args)  # same recipe: accepted
    longer = transfer_table.parse_args(["--rows", "random", "--records", str(tmp_path), "--max_per_class", "500",
                                        "--epochs", "15"])
    with pytest.raises(SystemExit, match=r"rotnet.json was trained with another recipe \(epochs 3 there, 15 here\)"):
        transfer_table.main(["--rows", "random", "--records", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--max_per_class", "500", "--epochs", "15"])
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["rotnet.json"]  # nothing written, nothing lost
    assert transfer_table.recipe(longer)["epochs"] == 15


def test_partial_reference_reports_the_epoch_its_backup_holds(tmp_path):
    # Keras's BackupAndRestore writes the number of completed epochs; after 2 epochs the backup is epoch 2's.
    args = supervised_reference.parse_args(["--image_size=32", "--variant=cifar", f"--out={tmp_path}"])
    model, _ = supervised_reference.build_classifier(args)
    (tmp_path / "backup").mkdir()
    model.save_weights(str(tmp_path / "backup" / "latest.weights.h5"))
    (tmp_path / "backup" / "training_metadata.json").write_text(json.dumps({"epoch": 2, "batch": 0}))
    with open(tmp_path / "curve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "accuracy", "loss", "val_accuracy", "val_loss"])
        writer.writerow([0, 0.38, 1.7, 0.527, 1.33])
        writer.writerow([1, 0.55, 1.3, 0.614, 1.07])
    assert supervised_reference.load_trunk(32, "cifar", out=str(tmp_path)) is None  # not finished
    trunk, record = supervised_reference.load_trunk(32, "cifar", out=str(tmp_path), partial=True)
    assert record["partial"] and record["epochs_run"] == 2
    assert record["best_val_accuracy"] == pytest.approx(0.614)
    assert trunk.get_layer("conv1") is not None
