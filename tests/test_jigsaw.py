"""Jigsaw: the permutation set, the tiles and their labels, learning on a photograph, saving, fit and the CLI."""
import itertools
import json
import math

import numpy as np
import pytest
import tensorflow as tf

import keras
from keras_oneimage import cli
from keras_oneimage.errors import InputError
from keras_oneimage.methods import registry
from keras_oneimage.methods.jigsaw import (
    Jigsaw,
    cut_tiles,
    hamming_permutations,
    make_puzzles,
    min_pairwise_distance,
    normalize_tiles,
    shuffle_tiles,
    smallest_image_size,
    tile_size,
)
from keras_oneimage.models import AlexNet

TINY = (8, 16, 24, 24, 16)
PATCH = 57  # the smallest patch whose tiles (16 px) the cifar AlexNet takes


def _guaranteed_min_distance(count: int) -> int:
    """The distance greedy farthest-point selection must reach for ``count`` permutations of 9.

    While the k permutations chosen so far leave some permutation outside all their Hamming balls of radius d - 1
    (k · |ball(d - 1)| < 9!), the greedy step finds one at distance >= d from all of them.
    """
    derangements = [1, 0]
    for n in range(2, 10):
        derangements.append((n - 1) * (derangements[-1] + derangements[-2]))

    def ball(radius):
        return sum(math.comb(9, k) * derangements[k] for k in range(radius + 1))

    return max(d for d in range(1, 10) if (count - 1) * ball(d - 1) < math.factorial(9))


@pytest.mark.parametrize("count", [100, 1000])
def test_permutations_are_distinct_and_as_far_apart_as_greedy_selection_guarantees(count):
    perms = hamming_permutations(count, seed=0)
    assert perms.shape == (count, 9) and perms.dtype == np.int32
    assert (np.sort(perms, axis=1) == np.arange(9)).all()
    assert len(np.unique(perms, axis=0)) == count
    assert min_pairwise_distance(perms) >= _guaranteed_min_distance(count)
    np.testing.assert_array_equal(hamming_permutations(count, seed=0), perms)  # a seed fixes the set
    assert not np.array_equal(hamming_permutations(count, seed=1), perms)


def test_each_permutation_is_a_farthest_one_from_those_before_it():
    everything = np.array(list(itertools.permutations(range(9))), np.int8)
    perms = hamming_permutations(12, seed=3)
    for k in range(1, len(perms)):
        previous = perms[:k]
        to_previous = (everything[:, None, :] != previous[None, :, :]).sum(-1).min(axis=1)
        chosen = (perms[k][None, :] != previous).sum(-1).min()
        assert chosen == to_previous.max(), k


def test_tile_geometry_follows_the_paper():
    assert tile_size(225) == 64  # 75 px cells, 64 px tiles (Noroozi & Favaro §3.2)
    assert tile_size(smallest_image_size(32)) >= 32 > tile_size(smallest_image_size(32) - 3)
    assert Jigsaw.trunk_input_size(PATCH) == 16
    with pytest.raises(InputError, match=f"image_size >= {PATCH}"):
        Jigsaw.trunk_input_size(PATCH - 3)


def _coordinates_patch(size):
    """A patch whose value encodes the pixel: channel c at (y, x) holds (c · size + y) · size + x."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(size), np.arange(size), indexing="ij")
    return tf.constant(((c * size + y) * size + x).transpose(1, 2, 0)[None].astype(np.float32))


@pytest.mark.parametrize("jitter", [0, 2])
def test_tiles_come_from_their_own_cell_with_random_gaps_and_channel_jitter(jitter):
    size, tile = 60, 16
    cell = size // 3
    patch = _coordinates_patch(size)
    tiles = cut_tiles(tf.repeat(patch, 8, axis=0), tile, seed=tf.constant([4, 2], tf.int64),
                      channel_jitter=jitter).numpy()
    assert tiles.shape == (8, 9, tile, tile, 3)
    corners = []
    for b in range(8):
        for k in range(9):
            for c in range(3):
                value = tiles[b, k, 0, 0, c]
                y0, x0 = int(value // size) % size, int(value % size)
                assert int(value // (size * size)) == c
                # a contiguous crop of this channel, inside cell k (no pixel of a neighbouring cell)
                expected = ((c * size + y0 + np.arange(tile)[:, None]) * size + x0 + np.arange(tile)[None, :])
                np.testing.assert_array_equal(tiles[b, k, :, :, c], expected)
                assert k // 3 * cell <= y0 <= k // 3 * cell + cell - tile
                assert k % 3 * cell <= x0 <= k % 3 * cell + cell - tile
                corners.append((b, k, c, y0 - k // 3 * cell, x0 - k % 3 * cell))
    corners = np.array(corners)
    assert len(np.unique(corners[:, 3:], axis=0)) > 10  # positions (so gaps between tiles) vary
    per_tile = corners[:, 3:].reshape(8 * 9, 3, 2)
    spread = per_tile.max(axis=1) - per_tile.min(axis=1)
    if jitter == 0:
        assert spread.max() == 0  # the channels of a tile are aligned
    else:
        assert 0 < spread.max() <= 2 * jitter and (spread > 0).mean() > 0.5

    centred = cut_tiles(patch, tile).numpy()  # no seed: every tile from the centre of its cell
    offset = (cell - tile) // 2
    np.testing.assert_array_equal(centred[0, 4, :, :, 0], patch.numpy()[0, cell + offset:cell + offset + tile,
                                                                         cell + offset:cell + offset + tile, 0])


def test_labels_match_the_shuffles():
    size = 60
    cell_index = (np.arange(size)[:, None] // 20) * 3 + np.arange(size)[None, :] // 20
    patches = tf.constant(np.repeat(cell_index[None, :, :, None], 3, axis=-1).repeat(32, axis=0), tf.float32)
    perms = hamming_permutations(10, seed=0)
    shuffled, labels = make_puzzles(patches, perms, tf.constant([7, 7], tf.int64), channel_jitter=1)
    shuffled, labels = shuffled.numpy(), labels.numpy()
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10 and len(set(labels)) > 3
    for b in range(32):
        values = shuffled[b, :, 0, 0, 0]
        np.testing.assert_array_equal(values, perms[labels[b]])  # position i holds tile perms[label][i]
        unshuffled = np.empty_like(values)
        unshuffled[perms[labels[b]]] = values
        np.testing.assert_array_equal(unshuffled, np.arange(9))
    # shuffle_tiles itself, on arbitrary tiles: the inverse gather gives back the input
    tiles = tf.random.stateless_uniform((4, 9, 3, 3, 3), seed=(1, 1))
    chosen = tf.constant([0, 3, 9, 5])
    back = tf.gather(shuffle_tiles(tiles, chosen, perms), np.argsort(perms[chosen.numpy()], axis=1), batch_dims=1)
    np.testing.assert_array_equal(back.numpy(), tiles.numpy())


def test_each_tile_reaches_conv1_standardised():
    backbone = AlexNet("cifar", 16, widths=TINY)
    tiles = tf.random.stateless_uniform((2, 9, 16, 16, 3), seed=(5, 6)) * tf.constant([0.2, 0.5, 1.0]) + 0.3
    tiles = tf.concat([tiles, tf.fill((1, 9, 16, 16, 3), 0.5)], axis=0)  # flat tiles too
    seen = backbone.preprocess(tf.reshape(normalize_tiles(tiles, backbone.mean, backbone.std), (-1, 16, 16, 3)))
    mean, var = tf.nn.moments(seen, axes=[1, 2])
    np.testing.assert_allclose(mean.numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(var.numpy()[:18]), 1.0, atol=1e-3)
    assert np.isfinite(seen.numpy()).all() and np.abs(seen.numpy()[18:]).max() < 1e-5


def test_registry_defaults_and_bad_options():
    assert registry.get("jigsaw") is Jigsaw and "jigsaw" in registry.available()
    model = Jigsaw(AlexNet("cifar", 16, widths=TINY))
    assert model.num_permutations == 100 and model.permutations.shape == (100, 9) and model.head_widths == (1024, 1024)
    backbone = AlexNet("cifar", 16, widths=TINY)
    for options, message in [
        ({"num_permutations": 1}, "num_permutations"),
        ({"num_permutations": 1001}, "num_permutations"),
        ({"num_permutations": "ten"}, "num_permutations"),
        ({"num_permutations": 3, "permutations": [[0, 1, 2, 3, 4, 5, 6, 7, 8]] * 3}, "distinct"),
        ({"num_permutations": 2, "permutations": [[0, 1, 2, 3, 4, 5, 6, 7, 8]]}, "shape"),
        ({"num_permutations": 2, "permutations": [[0] * 9, list(range(9))]}, "permutation of 0..8"),
        ({"channel_jitter": -1}, "channel_jitter"),
        ({"head_widths": (8, 0)}, "head_widths"),
        ({"seed": "x"}, "seed"),
    ]:
        with pytest.raises(InputError, match=message):
            Jigsaw(backbone, **options)
    with pytest.raises(InputError, match=f"image_size >= {PATCH}"):
        Jigsaw(AlexNet("cifar", 12, widths=TINY))  # a trunk built for tiles smaller than any patch gives


def test_model_round_trips_with_its_permutations(tmp_path):
    perms = hamming_permutations(10, seed=0)[::-1].copy()  # not what the seed alone would give
    model = Jigsaw(AlexNet("cifar", 16, widths=TINY), num_permutations=10, permutations=perms, head_widths=(16,),
                   channel_jitter=1, seed=5)
    patches = tf.random.stateless_uniform((3, PATCH, PATCH, 3), seed=(1, 2))
    puzzles, _ = model.puzzles(patches, tf.constant([3, 4], tf.int64))
    model(puzzles, training=True)  # moves the BatchNorm statistics away from their initial values
    logits = model(puzzles, training=False)
    assert logits.shape == (3, 10) and logits.dtype == tf.float32
    assert model(patches, training=False).shape == (3, 10)  # a patch as it is: its tiles in place
    model.save(tmp_path / "jigsaw.keras")
    loaded = keras.saving.load_model(tmp_path / "jigsaw.keras")
    assert isinstance(loaded, Jigsaw)
    np.testing.assert_array_equal(loaded.permutations, perms)
    assert (loaded.channel_jitter, loaded.seed, loaded.head_widths) == (1, 5, (16,))
    np.testing.assert_allclose(loaded(puzzles, training=False).numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_jigsaw_learns_permutations_on_a_photo(photo_path):
    from keras_oneimage.data.images import load_image
    from keras_oneimage.data.synthetic import patch_dataset

    keras.utils.set_random_seed(0)
    data = patch_dataset([load_image(photo_path)], image_size=PATCH, batch_size=16, seed=0)
    model = Jigsaw(AlexNet("cifar", 16, widths=(16, 32, 48, 48, 32)), num_permutations=10, head_widths=(128,),
                   seed=0)
    model.compile(optimizer=model.default_optimizer())
    history = model.fit(data, epochs=3, steps_per_epoch=10, verbose=0, shuffle=False).history
    chance_loss, chance = math.log(10), 1 / 10
    assert history["loss"][-1] < chance_loss - 0.3, history
    assert history["permutation_accuracy"][-1] > 3 * chance, history
    assert history["permutation_accuracy"][-1] > history["permutation_accuracy"][0], history


def test_fit_resume_export_and_cli(tmp_path, photo_path, capsys):
    from keras_oneimage import api
    from keras_oneimage.checkpoints import backbone_of
    from keras_oneimage.export.savedmodel import export

    out = tmp_path / "run"
    options = dict(image_size=PATCH, batch_size=4, steps_per_epoch=2, seed=0, output_dir=out, verbose=0,
                   num_permutations=10, head_widths=(32,))
    model = api.fit(str(photo_path), method="jigsaw", epochs=1, **options)
    assert isinstance(model, Jigsaw) and model.backbone.image_size == 16
    assert json.loads((out / "run.json").read_text())["method"] == "jigsaw"
    resumed = api.fit(str(photo_path), method="jigsaw", epochs=2, **options)
    with open(out / "history.csv") as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["0", "1"]
    np.testing.assert_array_equal(resumed.permutations, model.permutations)
    trunk = backbone_of(out)
    assert isinstance(trunk, AlexNet) and trunk.image_size == 16
    version = export(out, tmp_path / "export", layers=("conv1",))
    served = tf.saved_model.load(str(version)).signatures["serving_default"](images=tf.zeros((1, 32, 32, 3)))
    assert served["conv1"].shape[-1] == 96

    with pytest.raises(InputError, match=f"image_size >= {PATCH}"):
        api.fit(str(photo_path), method="jigsaw", image_size=48, output_dir=tmp_path / "small")
    assert not (tmp_path / "small").exists()

    cli_out = tmp_path / "cli"
    argv = ["keras-oneimage", "fit", "--method", "jigsaw", "--image", str(photo_path), "--image_size", str(PATCH),
            "--batch_size", "2", "--epochs", "1", "--steps_per_epoch", "1", "--output_dir", str(cli_out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (cli_out / "model.keras").is_file()
    assert cli.main([*argv[:-2], "--output_dir", str(tmp_path / "cli_small"), "--image_size", "40"]) == 2
    assert "image_size >= 57" in capsys.readouterr().err


def test_the_default_stem_follows_the_tile_not_the_patch(photo_path):
    from keras_oneimage import trainer

    # 128-221 px patches give 36-63 px tiles: the CIFAR stem, although the patch alone would pick the ImageNet one
    assert trainer.prepare_run(str(photo_path), "jigsaw", image_size=128).variant == "cifar"
    assert trainer.prepare_run(str(photo_path), "rotnet", image_size=128).variant == "imagenet"
