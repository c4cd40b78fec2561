"""patch_dataset: shapes, determinism, shards, several sources, input kinds, argument checks, bench smoke test."""
import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage.data import AugmentConfig, patch_dataset
from keras_oneimage.data.synthetic import batch_function
from keras_oneimage.errors import InputError
from tests import bad_inputs

S, B = 16, 8


@pytest.fixture(scope="module")
def texture():
    return np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def take(ds, n=2):
    return [b.numpy() for b in ds.take(n)]


def test_batches_are_float32_in_unit_range(texture):
    ds = patch_dataset(texture, image_size=S, batch_size=B, seed=1)
    assert ds.element_spec.shape.as_list() == [B, S, S, 3] and ds.element_spec.dtype == tf.float32
    first, second = take(ds)
    assert first.shape == (B, S, S, 3) and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 1 and first.std() > 0.02
    assert not np.array_equal(first, second)  # the stream moves on
    assert not np.array_equal(first[0], first[1])  # patches in a batch differ


def test_same_seed_same_stream_other_seed_or_shard_differs(texture):
    def stream(**kw):
        return np.stack(take(patch_dataset(texture, image_size=S, batch_size=B, **kw), 3))

    reference = stream(seed=5)
    assert np.array_equal(reference, stream(seed=5))
    assert not np.allclose(reference, stream(seed=6))
    shard0 = stream(seed=5, num_shards=2, shard_index=0)
    shard1 = stream(seed=5, num_shards=2, shard_index=1)
    assert np.array_equal(shard0, stream(seed=5, num_shards=2, shard_index=0))
    assert not np.allclose(shard0, shard1)


def test_several_sources_are_all_used_and_never_mixed():
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((24, 40, 3), np.uint8)
    blue[..., 2] = 255
    plain = AugmentConfig(color=0.0, brightness=0.0, contrast=0.0)
    batch = take(patch_dataset([red, blue], image_size=S, batch_size=32, augment=plain), 1)[0]
    is_red = np.all(np.abs(batch - [1, 0, 0]) < 1e-5, axis=(1, 2, 3))
    is_blue = np.all(np.abs(batch - [0, 0, 1]) < 1e-5, axis=(1, 2, 3))
    assert (is_red | is_blue).all()
    assert 4 <= is_red.sum() <= 28


def test_strength_zero_gives_the_whole_square_image_every_time(texture):
    square = texture[:, :48]
    batch = take(patch_dataset(square, image_size=S, batch_size=4, augment=AugmentConfig().scaled(0)), 1)[0]
    assert np.abs(batch - batch[:1]).max() < 1e-6
    # and it is the image shrunk 3x: compare with a 3x3 box average
    box = square.reshape(16, 3, 16, 3, 3).mean(axis=(1, 3)) / 255
    assert np.abs(batch[0] - box).mean() < 0.08


def test_every_input_kind_renders(texture, tmp_path):
    path = tmp_path / "deep.png"
    path.write_bytes(bad_inputs.png16_bytes(texture.astype(np.uint16) * 257))
    kinds = [texture[..., 0], np.concatenate([texture, texture[..., :1]], -1), texture.astype(np.uint16) * 257,
             texture / 255.0, tf.constant(texture), str(path)]  # gray, RGBA, uint16, float, tensor, 16-bit PNG
    render, pyramid = batch_function(kinds, image_size=S, batch_size=32)
    patches = render(tf.constant([1, 2], tf.int64)).numpy()
    assert pyramid.num_sources == len(kinds) and pyramid.shapes == [(48, 64)] * len(kinds)
    assert patches.shape == (32, S, S, 3) and patches.dtype == np.float32
    assert 0 <= patches.min() and patches.max() <= 1 and patches.std() > 0.02


@pytest.mark.parametrize("kwargs, fragment", [
    ({"image_size": 0}, "image_size"), ({"image_size": 2.5}, "image_size"), ({"batch_size": 0}, "batch_size"),
    ({"seed": "a"}, "seed"), ({"seed": 1.5}, "seed"), ({"num_shards": 0}, "num_shards"),
    ({"num_shards": 2, "shard_index": 2}, "shard_index"), ({"shard_index": -1}, "shard_index"),
    ({"augment": {"min_area": 0.1}}, "augmentconfig"), ({"seed": 2**64}, "seed"),
    ({"augment": AugmentConfig(blur_sigma=5.0), "image_size": 8}, "blur_sigma"),
])
def test_bad_arguments_raise_input_error(texture, kwargs, fragment):
    with pytest.raises(InputError) as info:
        patch_dataset(texture, **kwargs)
    assert fragment in str(info.value).lower()


def test_bad_image_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        patch_dataset(str(tmp_path / "nope.jpg"))


def test_bench_quick_mode_runs_and_prints_the_ratio_line(capsys, photo_path):
    from experiments import bench_augment

    bench_augment.main(["--quick", "--image", str(photo_path)])
    out = capsys.readouterr().out
    assert "ratio" in out.lower() and "(a)/(b)" in out
