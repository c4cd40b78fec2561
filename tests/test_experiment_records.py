"""The experiment scripts' records: what they write into git must read back right on another clone.

experiments/transfer_table.py keeps one JSON per Table 4 row in a tracked folder and rebuilds the markdown table
from whatever rows are there; its recorded commands must not name this machine's checkout. And
experiments/supervised_reference.py's ``load_trunk(partial=True)`` must report the epoch the backup really holds.
experiments/paper_table.py's report splits the records into the AlexNet table, the other-trunk table and the
N-image curve, each with its references.
"""
import csv
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import paper_table  # noqa: E402
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


def _table_record(row, seed, accuracies, **extra):
    method = {"supervised": "supervised", "random": "random"}.get(row, "rotnet")
    return {"row": row, "seed": seed, "method": method, "image_size": 32, "steps": 1500, "patches": 96000,
            "command": f"python experiments/paper_table.py --rows {row} --seeds {seed}",
            "probe": {split: dict(zip(paper_table.TAPS, accuracies)) for split in ("val", "test")}, **extra}


def test_report_puts_each_row_in_its_section_with_its_references(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    rows = {("supervised", 0): (0.62, 0.70, 0.76, 0.78, 0.79), ("random", 0): (0.59, 0.58, 0.58, 0.56, 0.50),
            ("random", 1): (0.60, 0.59, 0.59, 0.57, 0.52), ("rotnet_n1", 0): (0.60, 0.61, 0.62, 0.60, 0.55),
            ("rotnet_n1000", 0): (0.61, 0.64, 0.67, 0.66, 0.60), ("rotnet_a", 0): (0.605, 0.62, 0.64, 0.62, 0.57)}
    for (row, seed), acc in rows.items():
        (records / f"{row}__s{seed}.json").write_text(json.dumps(_table_record(row, seed, acc)))
    resnet = _table_record("rotnet_a_resnet18", 0, (0.5, 0.6, 0.6, 0.6, 0.5), trunk="resnet18")
    resnet["probe"] = {s: dict(zip(("stem", "stage1", "stage2", "stage3", "stage4"), (0.5, 0.6, 0.65, 0.6, 0.5)))
                       for s in ("val", "test")}
    (records / "rotnet_a_resnet18__s0.json").write_text(json.dumps(resnet))
    results = tmp_path / "RESULTS.md"
    args = paper_table.parse_args(["--report", "--records", str(records), "--results_md", str(results),
                                   "--figures", str(tmp_path / "figures")])
    paper_table.report(args)
    text = results.read_text()

    def section(name):
        return text.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]

    curve = section("n_images_coarse32")
    assert "| 1 | 0 | 60.0 | 61.0 | 62.0 | 60.0 | 55.0 | 1500 |" in curve
    assert "| 1000 | 0 | 61.0 | 64.0 | 67.0 | 66.0 | 60.0 | 1500 |" in curve
    assert "| supervised | 0 | 62.0 | 70.0 | 76.0 | 78.0 | 79.0 | |" in curve
    assert "| random | 0,1 | 59.5 | 58.5 | 58.5 | 56.5 | 51.0 | 0 |" in curve
    assert (tmp_path / "figures" / "n_images_coarse32.png").stat().st_size > 0
    main = section("paper_table_full")
    assert "| rotnet_a | 0 | 60.5 | 62.0 | 64.0 |" in main and "rotnet_n1 " not in main
    assert "| -1.5 | -8.0 | -12.0 |" in main  # the gaps to supervised at conv1-3
    other = section("paper_table_full_other_trunks")
    assert "| rotnet_a_resnet18 | resnet18 | 0 | 50.0 | 60.0 | 65.0 | 60.0 | 50.0 |" in other
    assert "Same method, image and steps on the AlexNet (`rotnet_a`): conv1 60.5" in other
