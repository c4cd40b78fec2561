"""Keras Tuner search over augmentation: search space, probe objective, resume, Hyperband budgets."""
import csv
import json
import pathlib
import types

import numpy as np
import pytest

from keras_oneimage import trainer, tuning
from keras_oneimage.data.augment import AugmentConfig
from keras_oneimage.data.labelled import from_arrays
from keras_oneimage.errors import InputError
from keras_oneimage.probes import linear
from keras_oneimage.tuning import Boolean, Choice, Fixed, Float

TINY = dict(
    image_size=32, epochs=1, steps_per_epoch=2, batch_size=8, widths=(8, 8, 8, 8, 8),
    method_options={"head_widths": (16,)}, probe_epochs=1, probe_batch_size=16, verbose=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def toy_data():
    """Three classes that differ in mean colour, 32 px; 30 train (9 of them val), 9 test."""
    rng = np.random.default_rng(0)

    def draw(n):
        y = np.arange(n) % 3
        x = 0.25 + 0.5 * np.eye(3)[y][:, None, None, :] + rng.normal(0, 0.1, (n, 32, 32, 3))
        return np.clip(x, 0, 1).astype(np.float32), y

    return from_arrays(*draw(30), *draw(9), val_fraction=0.3, seed=0)


@pytest.fixture(scope="module")
def small_image():
    """A 64x64 textured image (a real photo is not needed where training is stubbed out)."""
    rng = np.random.default_rng(1)
    return (rng.uniform(0, 255, (64, 64, 3))).astype(np.uint8)


# ------------------------------------------------------------------------------------------- environment
def test_keras_tuner_and_tensorboard_import():
    import keras_tuner
    from tensorboard.plugins.hparams import api as hparams_api

    import keras_oneimage

    assert issubclass(tuning.AugmentationTuner, keras_tuner.Tuner)
    assert callable(hparams_api.hparams)
    assert keras_oneimage.tune is tuning.tune


# ----------------------------------------------------------------------------------------------- search space
def test_default_space_covers_the_recipe():
    space = tuning.resolve_search_space()
    assert set(space) == {"strength", "min_area", "max_rotation", "color_jitter", "flip"}
    assert space["min_area"].log and isinstance(space["flip"], Boolean)
    hp = tuning.hyperparameters_for(space)
    assert {p.name for p in hp.space} == set(space)
    assert hp.values["flip"] is True  # a real bool, also from a Choice([True, False]):
    assert tuning.hyperparameters_for(tuning.resolve_search_space({"flip": [True, False]})).values["flip"] is True


def test_overrides_fix_drop_change_and_add():
    space = tuning.resolve_search_space({
        "strength": Fixed(0.5), "max_rotation": None, "min_area": Float(1e-3, 1e-2, log=True),
        "noise_std": Float(0.0, 0.05), "blur_sigma": [0.0, 1.0], "flip": False,
    })  # fmt: skip
    assert space["strength"] == Fixed(0.5)
    assert "max_rotation" not in space
    assert space["min_area"] == Float(1e-3, 1e-2, log=True)
    assert space["noise_std"] == Float(0.0, 0.05)
    assert space["blur_sigma"] == Choice((0.0, 1.0))
    assert space["flip"] == Fixed(False)
    hp = tuning.hyperparameters_for(space)
    assert hp.values["strength"] == 0.5 and hp.values["flip"] is False
    assert "max_rotation" not in hp.values


def test_fine_grained_parameters_replace_the_coarse_default():
    space = tuning.resolve_search_space({"flip_prob": Float(0.0, 1.0), "color": Float(0.0, 0.3)})
    assert "flip" not in space and "color_jitter" not in space


@pytest.mark.parametrize("overrides, message", [
    ({"sharpness": Float(0, 1)}, "unknown search space parameter"),
    ({"max_rotation": Float(0, 270)}, "outside"),
    ({"min_area": Float(0.0, 0.1, log=True)}, "outside"),
    ({"strength": Float(1.0, 0.5)}, "low < high"),
    ({"noise_std": Float(0.0, 0.1, log=True)}, "low > 0"),
    ({"flip": True, "flip_prob": 0.5}, "set the same augmentation"),
    ({"max_rotation": Boolean()}, "only fits 'flip'"),
    ({"flip": Float(0, 1)}, "on/off"),
    ({"strength": Choice([1.0, 1.0])}, "repeat"),
    ({"strength": object()}, "must be Fixed"),
])  # fmt: skip
def test_bad_search_spaces_are_input_errors(overrides, message):
    with pytest.raises(InputError, match=message):
        tuning.resolve_search_space(overrides)


def test_parse_search_space_string():
    parsed = tuning.parse_search_space("strength=1, min_area=1e-4..0.1:log, max_rotation=-, flip=true|false")
    assert parsed == {"strength": Fixed(1.0), "min_area": Float(1e-4, 0.1, log=True), "max_rotation": None,
                      "flip": Choice((True, False))}  # fmt: skip
    with pytest.raises(InputError):
        tuning.parse_search_space("strength")


def test_augment_from_values():
    base = AugmentConfig()
    off = tuning.augment_from_values({"flip": False, "color_jitter": 0.0, "max_rotation": 10.0, "noise_std": 0.02})
    assert off.flip_prob == 0 and off.color == 0 and off.brightness == 0 and off.contrast == 0
    assert off.max_rotation == 10.0 and off.noise_std == 0.02 and off.min_area == base.min_area
    on = tuning.augment_from_values({"flip": True, "color_jitter": 2.0, "tuner/epochs": 3})
    assert on.flip_prob == base.flip_prob and on.color == pytest.approx(2 * base.color)
    assert tuning.augment_from_values({"strength": 0.5, "min_area": 1e-2}) == AugmentConfig(min_area=1e-2).scaled(0.5)
    with pytest.raises(InputError):
        tuning.augment_from_values({"min_area": 0.5, "max_area": 0.1})


@pytest.mark.parametrize("spec, layers, name", [
    ("conv2", ("conv2",), "val_conv2"),
    ("mean:conv3, conv1", ("conv1", "conv3"), "val_mean_conv1_conv3"),
])  # fmt: skip
def test_objective_parsing(spec, layers, name):
    objective = tuning.ProbeObjective.parse(spec)
    assert objective.layers == layers and objective.name == name
    assert objective.value({"conv1": 0.2, "conv2": 0.5, "conv3": 0.6}) == pytest.approx(
        np.mean([{"conv1": 0.2, "conv2": 0.5, "conv3": 0.6}[k] for k in layers]))


@pytest.mark.parametrize("kwargs, message", [
    ({"algorithm": "grid"}, "unknown algorithm"),
    ({"objective": "fc6"}, "unknown layer"),
    ({"objective": "mean:"}, "at least one layer"),
    ({"epochs": 0}, "epochs"),
    ({"search_space": {"strength": Float(0, 9)}}, "outside"),
    ({"method": "nope"}, "nope"),
    ({"method_options": {"no_such_option": 1}}, "method_options"),
])  # fmt: skip
def test_bad_arguments_fail_before_any_trial(tmp_path, toy_data, small_image, kwargs, message):
    args = dict(TINY, dataset=toy_data, max_trials=1, directory=tmp_path)
    args.update(kwargs)
    with pytest.raises((InputError, ValueError), match=message):
        tuning.tune(small_image, **args)
    assert not any(tmp_path.glob("*/trial_*"))


# ---------------------------------------------------------------------- the objective is the val-split probe
class _FakeBackbone:
    def __init__(self, augment, epochs):
        self.augment, self.epochs = augment, epochs


def _fake_accuracy(augment: AugmentConfig, layer: str) -> float:
    """Strictly decreasing in β, different per layer: the best trial is the one with the smallest min_area."""
    return float(1.0 / (1.0 + 100 * augment.min_area) - 0.01 * int(layer[-1]))


@pytest.fixture
def stubbed(monkeypatch):
    """Replace training by a stub that records its arguments, and the probe by one that scores the augment."""
    calls = types.SimpleNamespace(train=[], probe=[])

    def fake_train(images, *, augment, epochs, output_dir, **kwargs):
        calls.train.append({"augment": augment, "epochs": epochs, "output_dir": output_dir, **kwargs})
        return types.SimpleNamespace(backbone=_FakeBackbone(augment, epochs))

    def fake_probe(backbone, data, *, layers, split, **kwargs):
        scores = {layer: _fake_accuracy(backbone.augment, layer) for layer in layers}
        calls.probe.append({"split": split, "layers": tuple(layers), "data": data, "scores": scores})
        return scores

    monkeypatch.setattr(trainer, "train_method", fake_train)
    monkeypatch.setattr(linear, "probe", fake_probe)  # what probe_val calls
    return calls


def test_objective_is_the_val_probe_and_the_space_is_respected(tmp_path, toy_data, small_image, stubbed):
    space = {"strength": Fixed(0.5), "max_rotation": None, "min_area": Float(1e-3, 1e-1, log=True),
             "noise_std": Float(0.0, 0.05), "flip": Fixed(False)}  # fmt: skip
    result = tuning.tune(small_image, **dict(TINY, dataset=toy_data, max_trials=6, algorithm="random",
                                             directory=tmp_path, search_space=space, objective="conv2"))  # fmt: skip
    assert len(result.trials) == 6 and len(stubbed.train) == 6
    assert {c["split"] for c in stubbed.probe} == {"val"}
    assert all(c["data"] is toy_data and c["layers"] == ("conv2",) for c in stubbed.probe)
    for trial, call in zip(result.trials, stubbed.probe):
        assert trial["status"] == "COMPLETED"
        assert trial["score"] == pytest.approx(call["scores"]["conv2"])  # exactly the probe's val accuracy
        hp = trial["hyperparameters"]
        assert set(hp) == {"strength", "min_area", "noise_std", "flip", "color_jitter"}
        assert hp["strength"] == 0.5 and hp["flip"] is False
        assert 1e-3 <= hp["min_area"] <= 1e-1 and 0.0 <= hp["noise_std"] <= 0.05
    for call in stubbed.train:  # the recipe each trial trained with
        aug = call["augment"]
        assert aug.flip_prob == 0.0
        assert aug.max_rotation == pytest.approx(AugmentConfig().max_rotation * 0.5)  # dropped: base value, scaled
    scores = [t["score"] for t in result.trials]
    assert len(set(scores)) == 6  # the objective follows the hyper-parameters
    best = result.trials[int(np.argmax(scores))]
    assert result.best_trial_id == best["trial_id"] and result.best_score == pytest.approx(max(scores))
    assert result.best_hyperparameters == best["hyperparameters"]
    assert result.best_augment == tuning.augment_from_values(best["hyperparameters"])
    # Per-trial records: result.json and a TensorBoard HParams session.
    trial_dir = pathlib.Path(result.project_dir) / f"trial_{best['trial_id']}"
    record = json.loads((trial_dir / "result.json").read_text())
    assert record["metrics"]["val_conv2"] == pytest.approx(result.best_score)
    assert list((trial_dir / "hparams").glob("events.out.tfevents.*"))
    assert "val_conv2" in result.table() and f"{result.best_trial_id}*" in result.table()


def test_an_infeasible_combination_fails_only_its_trial(tmp_path, toy_data, small_image, stubbed):
    space = {"strength": Fixed(1.0), "min_area": Choice([0.05, 0.5]), "max_area": Fixed(0.2),
             "max_rotation": None, "color_jitter": None, "flip": None}  # two configurations in all
    result = tuning.tune(small_image, **dict(TINY, dataset=toy_data, max_trials=2, algorithm="random",
                                             directory=tmp_path, search_space=space))  # fmt: skip
    status = {t["hyperparameters"]["min_area"]: t["status"] for t in result.trials}
    assert status == {0.05: "COMPLETED", 0.5: "FAILED"}
    assert len(stubbed.train) == 1 and result.best_hyperparameters["min_area"] == 0.05
    assert "min_area" in result.table().splitlines()[-1] and "failed" in result.table().splitlines()[-1]


def test_mean_objective_averages_the_chosen_layers(tmp_path, toy_data, small_image, stubbed):
    result = tuning.tune(small_image, **dict(TINY, dataset=toy_data, max_trials=2, algorithm="random",
                                             directory=tmp_path, objective="mean:conv3,conv1"))  # fmt: skip
    assert result.objective == "val_mean_conv1_conv3"
    for trial, call in zip(result.trials, stubbed.probe):
        assert call["layers"] == ("conv1", "conv3") and call["split"] == "val"
        assert trial["score"] == pytest.approx((call["scores"]["conv1"] + call["scores"]["conv3"]) / 2)
        assert trial["metrics"]["val_conv1"] == pytest.approx(call["scores"]["conv1"])


def test_bayesian_search_uses_the_probe_scores(tmp_path, toy_data, small_image, stubbed):
    """Past its random start (2 points here) the Gaussian process proposes trials from the probe scores."""
    space = {"min_area": Float(1e-4, 1e-1, log=True)}
    result = tuning.tune(small_image, **dict(TINY, dataset=toy_data, max_trials=4, algorithm="bayesian",
                                             directory=tmp_path, search_space=space))
    assert [t["status"] for t in result.trials] == ["COMPLETED"] * 4
    for trial, call in zip(result.trials, stubbed.probe):
        assert call["split"] == "val" and trial["score"] == pytest.approx(call["scores"]["conv2"])
    assert result.best_score == max(t["score"] for t in result.trials)


def test_hyperband_passes_its_budgets(tmp_path, toy_data, small_image, stubbed):
    result = tuning.tune(small_image, **dict(TINY, dataset=toy_data, max_trials=None, algorithm="hyperband",
                                             directory=tmp_path, epochs=3, hyperband_factor=3))  # fmt: skip
    by_id = {t["trial_id"]: t for t in result.trials}
    assert [c["epochs"] for c in stubbed.train] == [t["epochs"] for t in result.trials]
    assert {t["epochs"] for t in result.trials} == {1, 3}
    promoted = [t for t in result.trials if t["continued_from"] is not None]
    assert promoted
    for t in promoted:
        parent = by_id[t["continued_from"]]
        assert t["initial_epoch"] == parent["epochs"] == 1 and t["epochs"] == 3
        assert t["hyperparameters"] == parent["hyperparameters"]
        # The promoted trial is the best of its round: no unpromoted sibling at 1 epoch scored higher.
        siblings = [s for s in result.trials if s["epochs"] == 1 and s["continued_from"] is None]
        assert parent["score"] == max(s["score"] for s in siblings)


# --------------------------------------------------------------------------- real training, end to end
@pytest.fixture
def probe_spy(monkeypatch):
    """Wrap the real probe: record the split and what it returned."""
    seen = []
    real = linear.probe

    def spy(backbone, data, **kwargs):
        scores = real(backbone, data, **kwargs)
        seen.append({"split": kwargs.get("split"), "scores": scores})
        return scores

    monkeypatch.setattr(linear, "probe", spy)
    return seen


def test_rerun_extends_resumes_and_refuses_other_settings(tmp_path, toy_data, small_image, stubbed):
    args = dict(TINY, dataset=toy_data, algorithm="random", directory=tmp_path, project_name="p")
    first = tuning.tune(small_image, max_trials=2, **args)
    assert first.trained == ["0", "1"] and len(stubbed.train) == 2
    assert tuning.tune(small_image, max_trials=2, **args).trained == [] and len(stubbed.train) == 2
    more = tuning.tune(small_image, max_trials=4, **args)  # a larger budget continues the same search
    assert len(more.trained) == 2 and len(more.trials) == 4 and len(stubbed.train) == 4
    assert [t["hyperparameters"] for t in more.trials[:2]] == [t["hyperparameters"] for t in first.trials]
    with pytest.raises(InputError, match="different epochs"):
        tuning.tune(small_image, max_trials=4, **dict(args, epochs=2))
    with pytest.raises(InputError, match="different search_space"):
        tuning.tune(small_image, max_trials=4, **dict(args, search_space={"strength": Fixed(1.0)}))
    assert len(stubbed.train) == 4
    fresh = tuning.tune(small_image, max_trials=1, **dict(args, epochs=2, overwrite=True))
    assert fresh.trained == ["0"] and len(fresh.trials) == 1


def test_interrupted_trial_is_rerun_on_resume(tmp_path, toy_data, small_image, stubbed, monkeypatch):
    args = dict(TINY, dataset=toy_data, algorithm="random", directory=tmp_path, project_name="p", max_trials=2)
    real_train = trainer.train_method

    def interrupted(*a, **k):
        if len(stubbed.train) == 1:  # the second trial dies mid-training (Ctrl-C, a killed job)
            raise KeyboardInterrupt
        return real_train(*a, **k)

    monkeypatch.setattr(trainer, "train_method", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(small_image, **args)
    monkeypatch.setattr(trainer, "train_method", real_train)
    resumed = tuning.tune(small_image, **args)
    assert resumed.trained == ["1"]  # trial 0 kept, trial 1 retried
    assert [t["status"] for t in resumed.trials] == ["COMPLETED", "COMPLETED"]


def test_refit_trains_the_best_recipe_longer(tmp_path, toy_data, small_image, stubbed):
    result = tuning.tune(small_image, **dict(TINY, dataset=toy_data, max_trials=3, algorithm="random",
                                             directory=tmp_path, refit_epochs=7))  # fmt: skip
    stubbed.train.clear()
    model = result.refit()
    assert stubbed.train[-1]["epochs"] == 7 and stubbed.train[-1]["augment"] == result.best_augment
    assert model.backbone.augment == result.best_augment
    result.refit(epochs=3, output_dir=tmp_path / "refit")
    assert stubbed.train[-1]["epochs"] == 3 and stubbed.train[-1]["output_dir"] == tmp_path / "refit"


def test_search_end_to_end_with_hyperband_continuation_then_resume(tmp_path, toy_data, photo_path, probe_spy):
    """Real training: two 1-epoch trials, then Hyperband promotes the better one to 2 epochs from its checkpoint."""
    args = dict(TINY, dataset=toy_data, algorithm="hyperband", epochs=2, hyperband_factor=2, max_trials=3,
                directory=tmp_path, project_name="e2e")  # fmt: skip
    result = tuning.tune(str(photo_path), **args)
    assert result.trained == ["0", "1", "2"]
    assert [t["status"] for t in result.trials] == ["COMPLETED"] * 3
    assert [t["epochs"] for t in result.trials] == [1, 1, 2]
    assert [s["split"] for s in probe_spy] == ["val"] * 3
    for trial, seen in zip(result.trials, probe_spy):
        assert 0.0 <= trial["score"] <= 1.0
        assert trial["score"] == seen["scores"]["conv2"]  # the objective is exactly the val probe result
    assert set(result.best_hyperparameters) == set(tuning.DEFAULT_SEARCH_SPACE)
    assert result.best_model().backbone.widths == (8, 8, 8, 8, 8)

    # The promoted trial continued from its parent's epoch-1 checkpoint instead of starting over.
    promoted = result.trials[2]
    parent_id = promoted["continued_from"]
    assert parent_id in {"0", "1"} and promoted["initial_epoch"] == 1
    assert promoted["hyperparameters"] == result.trials[int(parent_id)]["hyperparameters"]
    project = pathlib.Path(result.project_dir)
    assert json.loads((project / "trial_2" / "result.json").read_text())["resumed_from_epoch"] == 1

    def history(trial_id):
        with open(project / f"trial_{trial_id}" / "run" / "history.csv", newline="") as f:
            return list(csv.DictReader(f))

    parent_rows, rows = history(parent_id), history("2")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert rows[0] == parent_rows[0]  # epoch 0 is the parent's; only epoch 1 was trained in trial 2

    # Rerun in the same directory: nothing is trained again, the same answer comes back.
    again = tuning.tune(str(photo_path), **args)
    assert again.trained == [] and len(probe_spy) == 3
    assert again.best_hyperparameters == result.best_hyperparameters and again.best_score == result.best_score
