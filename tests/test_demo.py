"""`keras-oneimage demo` at tiny sizes: the picture, the checkpoint, the per-step curve, the probe set."""
import numpy as np
import pytest
from matplotlib import image as mpimg

from keras_oneimage import cli
from keras_oneimage.demo import SHAPES, _step_values, run_demo, shapes_set


def test_step_values_undo_keras_running_means():
    steps = np.array([1.5, 0.5, 1.0, 0.2])
    means = np.cumsum(steps) / np.arange(1, 5)
    np.testing.assert_allclose(_step_values(means), steps)


def test_shapes_set_is_balanced_deterministic_and_draws_the_shape(photo_path):
    data = shapes_set(photo_path, n_train=3, n_test=2, size=32, seed=5)
    assert data.class_names == SHAPES and (data.train_size, data.val_size, data.test_size) == (18, 0, 12)
    test = list(data.test.as_numpy_iterator())
    assert sorted(int(y) for _, y in test) == sorted(list(range(len(SHAPES))) * 2)
    images = np.stack([x for x, _ in test])
    assert images.shape == (12, 32, 32, 3) and 0.0 <= images.min() and images.max() <= 1.0
    again = np.stack([x for x, _ in shapes_set(photo_path, n_train=3, n_test=2, size=32, seed=5).test])
    np.testing.assert_array_equal(images, again)
    other = np.stack([x for x, _ in shapes_set(photo_path, n_train=3, n_test=2, size=32, seed=6).test])
    assert not np.allclose(images, other)
    # A filled disc covers the patch centre with one flat colour; a ring leaves its centre to the photograph.
    labels = [int(y) for _, y in test]
    disc = images[labels.index(SHAPES.index("disc"))]
    assert disc[14:18, 14:18].std(axis=(0, 1)).max() < 0.02


def test_demo_writes_the_picture_and_a_loadable_checkpoint(tmp_path, photo_path, capsys):
    from keras_oneimage.api import load_trained

    out = tmp_path / "demo"
    code = cli.main(["keras-oneimage", "demo", f"--output_dir={out}", f"--image={photo_path}", "--epochs=2",
                     "--steps_per_epoch=2", "--batch_size=4", "--precision=float32"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert stdout.rstrip().splitlines()[-1] == f"the picture: {out / 'demo.png'}"
    assert "untrained -> trained" in stdout
    pixels = mpimg.imread(out / "demo.png")
    assert pixels.shape[0] > 1000 and pixels.shape[1] > 1000 and pixels[..., :3].std() > 0.1
    model = load_trained(out / "model.keras")
    assert model.backbone.get_layer("conv1").conv.kernel.shape == (5, 5, 3, 96)


def test_run_demo_reports_what_it_drew(tmp_path, photo_path):
    from keras_oneimage.api import load_trained

    result = run_demo(tmp_path, image=photo_path, epochs=2, steps_per_epoch=3, batch_size=4, precision="float32",
                      probe_examples=(2, 1), probe_epochs=1, verbose=0)
    assert result.picture == tmp_path / "demo.png" and result.picture.is_file()
    assert [len(v) for v in result.curve.values()] == [6, 6]
    assert all(0.0 <= a <= 1.0 for a in result.curve["rotation_accuracy"])
    assert set(result.probe) == {"random", "trained"}
    for scores in result.probe.values():
        assert set(scores) == {"conv1", "conv2"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert result.chance == pytest.approx(1 / len(SHAPES))
    # "before" is the kernel training started from; "after" is the one saved.
    assert not np.allclose(result.conv1_before, result.conv1_after)
    saved = load_trained(result.checkpoint).backbone.get_layer("conv1").conv.kernel
    np.testing.assert_allclose(np.asarray(saved), result.conv1_after)


def test_demo_bad_input_is_one_line_before_any_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli.main(["keras-oneimage", "demo", f"--output_dir={blocker}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a directory" in err[0]
    assert cli.main(["keras-oneimage", "demo", f"--output_dir={tmp_path / 'o'}", f"--image={tmp_path / 'no.jpg'}"]) == 2
    assert "no such file" in capsys.readouterr().err.lower() and not (tmp_path / "o").exists()
