"""run_training: compile defaults, method callbacks, output_dir artefacts, resume, NaN guard, thread helper."""
import csv
import json

import numpy as np
import pytest
import tensorflow as tf

import keras
from keras_oneimage.data.synthetic import patch_dataset
from keras_oneimage.errors import InputError
from keras_oneimage.methods.base import FitContext
from keras_oneimage.methods.rotnet import RotNet, rotation_loss
from keras_oneimage.models import AlexNet
from keras_oneimage.training import NonFiniteLossError, TimeBudget, completed_epochs, configure_threads, run_training

TINY = (4, 8, 8, 8, 8)
SIZE = 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    return patch_dataset([image], image_size=SIZE, batch_size=4, seed=0)


def _rotnet(seed):
    keras.utils.set_random_seed(seed)
    return RotNet(AlexNet("cifar", SIZE, widths=TINY), head_widths=(8,))


def _epochs_in_csv(path):
    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


class WeightsAtStart(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = [w.numpy().copy() for w in self.model.weights]


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_compiles_with_method_default_and_keeps_a_given_optimizer(data):
    model = _rotnet(0)
    run_training(model, data, epochs=1, steps_per_epoch=2, verbose=0)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.optimizer.iterations.numpy() == 2
    assert model.optimizer.learning_rate.numpy() == pytest.approx(model.default_optimizer().learning_rate)


def test_method_callbacks_receive_the_context_and_a_given_optimizer_is_kept(data):
    seen = {}

    class WithCallback(RotNet):
        def method_callbacks(self, context):
            seen["context"] = context
            seen["recorder"] = Recorder()
            return [seen["recorder"]]

    keras.utils.set_random_seed(0)
    model = WithCallback(AlexNet("cifar", SIZE, widths=TINY), head_widths=(8,))
    context = FitContext(images=[], image_size=SIZE, batch_size=4, seed=0, augment=None, steps_per_epoch=1,
                         epochs=2, output_dir=None)
    user = Recorder()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = run_training(model, data, epochs=2, steps_per_epoch=1, callbacks=[user], context=context, verbose=0)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert history.epoch == [0, 1] and set(history.history) == {"loss", "rotation_accuracy"}
    assert seen["context"] is context
    assert seen["recorder"].epochs == [0, 1] and user.epochs == [0, 1]


def test_bad_lengths_raise_input_error(data):
    with pytest.raises(InputError, match="epochs"):
        run_training(_rotnet(0), data, epochs=0, steps_per_epoch=1)
    with pytest.raises(InputError, match="steps_per_epoch"):
        run_training(_rotnet(0), data, epochs=1, steps_per_epoch=1.5)


def test_output_dir_artefacts_and_resume(data, tmp_path):
    out = tmp_path / "run"
    first = run_training(_rotnet(0), data, epochs=1, steps_per_epoch=3, output_dir=out, verbose=0)
    assert first.epoch == [0]
    for name in ("model.keras", "history.csv", "conv1_filters.png"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert not list(out.glob(".*")), "temporary files left behind"
    assert _epochs_in_csv(out / "history.csv") == [0]
    saved = keras.saving.load_model(out / "model.keras")
    saved_weights = [w.numpy() for w in saved.weights]

    # Simulate a crash after history.csv was written but before the backup was: the CSV is one epoch ahead.
    with open(out / "history.csv", "a", newline="") as f:
        f.write("1,123.0,0.5\n")

    # "Restart" with a differently initialised model and more epochs: it continues at epoch 2 (index 1)
    # from the saved weights, and the stale row of epoch index 1 is replaced.
    start = WeightsAtStart()
    second_model = _rotnet(1)
    second_model(tf.zeros((1, SIZE, SIZE, 3)))
    fresh = [w.numpy().copy() for w in second_model.weights]
    assert not all(np.array_equal(a, b) for a, b in zip(fresh, saved_weights))
    second = run_training(second_model, data, epochs=2, steps_per_epoch=3, output_dir=out, callbacks=[start],
                          verbose=0)
    assert second.epoch == [1]
    assert len(start.weights) == len(saved_weights) == len(second_model.weights)
    for restored, value, var in zip(start.weights, saved_weights, second_model.weights):
        np.testing.assert_array_equal(restored, value, err_msg=var.path)
    assert _epochs_in_csv(out / "history.csv") == [0, 1]
    with open(out / "history.csv", newline="") as f:
        assert float(list(csv.DictReader(f))[1]["loss"]) != 123.0
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 2

    # The resumed epoch does not stick to the model: training it again without output_dir starts at epoch 0.
    assert run_training(second_model, data, epochs=1, steps_per_epoch=1, verbose=0).epoch == [0]

    # Rerunning a finished run trains nothing and adds no row.
    third = run_training(_rotnet(2), data, epochs=2, steps_per_epoch=3, output_dir=out, verbose=0)
    assert third.epoch == []
    assert _epochs_in_csv(out / "history.csv") == [0, 1]


@keras.saving.register_keras_serializable(package="keras_oneimage_tests")
class NanAfter(RotNet):
    """A RotNet whose loss is multiplied by NaN from optimizer step ``nan_step`` on (poisoning the weights)."""

    def __init__(self, backbone, nan_step=0, **kwargs):
        super().__init__(backbone, **kwargs)
        self.nan_step = nan_step
        base = rotation_loss

        def poisoned(labels, logits):
            bad = self.optimizer.iterations >= self.nan_step
            return base(labels, logits) * tf.where(bad, float("nan"), 1.0)

        self.loss_fn = poisoned

    def get_config(self):
        return {**super().get_config(), "nan_step": self.nan_step}


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    keras.utils.set_random_seed(0)
    model = NanAfter(AlexNet("cifar", SIZE, widths=TINY), head_widths=(8,), nan_step=6)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2/3, step 3/4") as err:
        run_training(model, data, epochs=3, steps_per_epoch=4, output_dir=out, verbose=0)
    assert "model.keras holds epoch 1" in str(err.value)
    history = err.value.history.history
    assert np.isfinite(history["loss"][0]) and np.isnan(history["loss"][1])  # Keras logs the aborted epoch
    assert model.optimizer.iterations.numpy() == 7  # stopped right after the bad step
    assert not np.isfinite(model.get_layer("alexnet").get_layer("conv1").conv.kernel.numpy()).all()
    assert _epochs_in_csv(out / "history.csv") == [0]
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    good = keras.saving.load_model(out / "model.keras")
    assert all(np.isfinite(w.numpy()).all() for w in good.weights)
    assert np.isfinite(good(tf.zeros((1, SIZE, SIZE, 3))).numpy()).all()


def test_configure_threads():
    assert configure_threads() is True
    with pytest.raises(InputError, match="intra_op"):
        configure_threads(intra_op=-1)
    with pytest.raises(InputError, match="inter_op"):
        configure_threads(inter_op=1.5)
    tf.constant(1.0) + 1.0  # TF is initialised from here on
    current = tf.config.threading.get_intra_op_parallelism_threads()
    assert configure_threads(intra_op=current) is True
    with pytest.warns(UserWarning, match="already initialised"):
        assert configure_threads(intra_op=current + 3) is False


def test_time_budget_stops_after_the_batch_at_the_deadline_and_saves_the_epoch(data, tmp_path):
    budget = TimeBudget(1e-9)  # already over after the first batch
    history = run_training(_rotnet(0), data, epochs=3, steps_per_epoch=4, output_dir=tmp_path / "run",
                           callbacks=[budget], verbose=0)
    assert budget.steps == 1
    assert history.epoch == [0]
    assert _epochs_in_csv(tmp_path / "run" / "history.csv") == [0]
    assert (tmp_path / "run" / "model.keras").is_file()
    assert completed_epochs(tmp_path / "run") == 1
    assert completed_epochs(tmp_path / "nothing_here") == 0


@pytest.mark.parametrize("minutes", [0, -1.0, "5", True])
def test_time_budget_rejects_bad_values(minutes):
    with pytest.raises(InputError, match="max_minutes"):
        TimeBudget(minutes)
