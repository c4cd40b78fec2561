"""AugmentConfig validation/scaling, PatchSampler parameter statistics, and the geometry of rendered patches."""
import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage.data import augment as augment_lib
from keras_oneimage.data.augment import AugmentConfig, PatchSampler
from keras_oneimage.data.pyramid import build_pyramid
from keras_oneimage.errors import InputError

NO_COLOUR = AugmentConfig(color=0.0, brightness=0.0, contrast=0.0)


@pytest.mark.parametrize("field, value", [
    ("min_area", -0.1), ("min_area", 0.0), ("min_area", 1.5), ("max_area", 0.0), ("aspect", 0.0),
    ("aspect", 1.2), ("aspect", -1.0), ("max_rotation", -1.0), ("max_rotation", 200.0), ("flip_prob", 1.5),
    ("color", -0.1), ("brightness", 2.0), ("contrast", -0.5), ("noise_std", -1.0), ("blur_sigma", -1.0),
    ("min_area", float("nan")), ("color", "strong"), ("flip_prob", True),
])
def test_invalid_config_raises_input_error(field, value):
    with pytest.raises(InputError) as info:
        AugmentConfig(**{field: value})
    assert field.split("_")[0] in str(info.value) and "\n" not in str(info.value)


def test_min_area_above_max_area_is_rejected():
    with pytest.raises(InputError, match="max_area"):
        AugmentConfig(min_area=0.5, max_area=0.4)


def test_defaults_are_the_papers():
    cfg = AugmentConfig()
    assert (cfg.min_area, cfg.max_area, cfg.aspect, cfg.max_rotation, cfg.flip_prob) == (1e-4, 1.0, 0.75, 35.0, 0.5)


def test_scaled_zero_one_and_two():
    cfg = AugmentConfig(noise_std=0.1, blur_sigma=1.0)
    assert cfg.scaled(1.0) == cfg
    zero = cfg.scaled(0)
    assert (zero.min_area, zero.max_area, zero.aspect) == (1.0, 1.0, 1.0)
    assert zero.max_rotation == zero.flip_prob == zero.color == zero.brightness == zero.contrast == 0
    assert zero.noise_std == zero.blur_sigma == 0
    two = cfg.scaled(2)
    assert two.min_area == pytest.approx(1e-8) and two.aspect == pytest.approx(0.75 ** 2)
    assert two.max_rotation == 70 and two.flip_prob == 0.5 and two.color == pytest.approx(0.2)
    huge = cfg.scaled(100)  # clamped to valid ranges, and still a valid config
    assert huge.max_rotation == 180 and huge.brightness == 1 and huge.contrast == 1 and huge.blur_sigma == 8
    assert huge.min_area > 0 and 0 < huge.aspect <= 1
    for bad in (-1, float("inf"), "x", None):
        with pytest.raises(InputError):
            cfg.scaled(bad)


def test_sampler_rejects_non_config():
    with pytest.raises(InputError):
        PatchSampler({"min_area": 0.1})


@pytest.fixture(scope="module")
def wide_pyramid():
    """One 60x160 source (aspect 8/3, like the paper's Image B) and one 50x50 source."""
    rng = np.random.default_rng(0)
    return build_pyramid([rng.integers(0, 256, (60, 160, 3), dtype=np.uint8),
                          rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)])


def test_parameter_statistics_respect_the_config(wide_pyramid):
    cfg = AugmentConfig(min_area=0.01)
    p = {k: v.numpy() for k, v in PatchSampler(cfg).get_random_transformation(4000, 7, wide_pyramid).items()}
    gamma = cfg.aspect
    assert set(np.unique(p["source"])) == {0, 1}
    assert abs(np.mean(p["source"]) - 0.5) < 0.05
    assert (p["aspect"] >= gamma - 1e-5).all() and (p["aspect"] <= 1 / gamma + 1e-5).all()
    assert (p["area"] >= cfg.min_area - 1e-7).all() and (p["area"] <= 1 + 1e-6).all()
    # The wide source fits a crop with aspect <= 4/3 only up to half its area.
    wide = p["source"] == 0
    assert p["area"][wide].max() <= 0.5 + 1e-5 and p["area"][wide].max() > 0.45
    assert p["area"][~wide].max() > 0.95
    # Crops (before rotation) lie inside the source.
    hw = np.array([[60, 160], [50, 50]], np.float32)[p["source"]]
    area_px = p["area"] * hw[:, 0] * hw[:, 1]
    half_w = np.sqrt(area_px * p["aspect"]) / hw[:, 1] / 2
    half_h = np.sqrt(area_px / p["aspect"]) / hw[:, 0] / 2
    assert (p["center"][:, 0] - half_w >= -1e-4).all() and (p["center"][:, 0] + half_w <= 1 + 1e-4).all()
    assert (p["center"][:, 1] - half_h >= -1e-4).all() and (p["center"][:, 1] + half_h <= 1 + 1e-4).all()
    # Both ends of the aspect range are used (log-uniform), not just one.
    assert p["aspect"].min() < 0.8 and p["aspect"].max() > 1.25
    max_angle = math.radians(cfg.max_rotation)
    assert (np.abs(p["angle"]) <= max_angle + 1e-6).all() and np.abs(p["angle"]).max() > 0.9 * max_angle
    assert abs(p["flip"].mean() - 0.5) < 0.04
    assert np.abs(p["color_matrix"].mean(axis=0) - np.eye(3)).max() < 0.02
    assert abs((p["color_matrix"] - np.eye(3)).std() - cfg.color) < 0.01
    assert (np.abs(p["brightness"]) <= cfg.brightness + 1e-6).all()
    assert (np.abs(p["contrast"] - 1) <= cfg.contrast + 1e-6).all()


def test_min_area_never_below_one_source_pixel():
    tiny = build_pyramid([np.zeros((10, 10, 3), np.uint8)])
    p = PatchSampler(AugmentConfig(min_area=1e-6)).get_random_transformation(2000, 1, tiny)
    assert float(tf.reduce_min(p["area"])) >= 1 / 100 - 1e-7


def test_without_pyramid_parameters_are_still_valid():
    p = PatchSampler().get_random_transformation(500, 3)
    assert (p["source"].numpy() == 0).all()
    assert float(tf.reduce_min(p["area"])) >= 1e-4 - 1e-9


def test_same_seed_same_parameters_different_seed_different(wide_pyramid):
    sampler = PatchSampler()
    a = sampler.get_random_transformation(64, 5, wide_pyramid)
    b = sampler.get_random_transformation(64, tf.constant([5, 0], tf.int64), wide_pyramid)
    c = sampler.get_random_transformation(64, 6, wide_pyramid)
    for key in a:
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key
    assert not np.allclose(a["center"].numpy(), c["center"].numpy())


def _params(**overrides):
    base = {"source": [0], "center": [[0.5, 0.5]], "area": [1.0], "aspect": [1.0], "angle": [0.0], "flip": [False],
            "color_matrix": [np.eye(3)], "brightness": [0.0], "contrast": [1.0], "blur_sigma": [0.0],
            "noise_std": [0.0]}
    base.update(overrides)
    out = {k: tf.constant(np.asarray(v), tf.bool if k == "flip" else (tf.int32 if k == "source" else tf.float32))
           for k, v in base.items()}
    out["noise_seed"] = tf.constant([1, 2], tf.int64)
    return out


@pytest.fixture(scope="module")
def noise_image():
    return np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)


def test_identity_flip_and_quarter_turn_reproduce_the_source_crop(noise_image):
    pyr = build_pyramid([noise_image])
    sampler = PatchSampler(NO_COLOUR)
    crop = noise_image[20:36, 30:46] / 255.0  # 16x16 at x=30, y=20
    where = {"center": [[38 / 120, 28 / 100]], "area": [256 / 12000]}
    cases = {
        "identity": ({}, crop),
        "flip": ({"flip": [True]}, crop[:, ::-1]),
        "quarter turn": ({"angle": [np.pi / 2]}, np.rot90(crop, k=1)),
    }
    for name, (override, expected) in cases.items():
        out = sampler.transform(pyr, _params(**where, **override), 16).numpy()[0]
        assert out.shape == (16, 16, 3)
        assert np.abs(out - expected).max() < 1e-5, name


def test_colour_parameters_act_as_documented(noise_image):
    pyr = build_pyramid([noise_image])
    sampler = PatchSampler(NO_COLOUR)
    where = {"center": [[38 / 120, 28 / 100]], "area": [256 / 12000]}
    plain = sampler.transform(pyr, _params(**where), 16).numpy()[0]
    swap = np.eye(3)[[2, 1, 0]]  # the colour matrix maps RGB -> BGR
    out = sampler.transform(pyr, _params(**where, color_matrix=[swap]), 16).numpy()[0]
    assert np.abs(out - plain[..., ::-1]).max() < 1e-5
    flat = sampler.transform(pyr, _params(**where, contrast=[0.0]), 16).numpy()[0]
    assert flat.std() < 1e-5 and abs(flat.mean() - plain.mean()) < 1e-4
    bright = sampler.transform(pyr, _params(**where, brightness=[0.1]), 16).numpy()[0]
    assert np.abs(bright - np.clip(plain + 0.1, 0, 1)).max() < 1e-5


def test_checkerboard_shrunk_forty_times_is_flat_grey():
    board = (np.indices((512, 512)).sum(0) % 2 * 255).astype(np.uint8)
    pyr = build_pyramid([np.repeat(board[..., None], 3, -1)])
    sampler = PatchSampler(NO_COLOUR)
    for angle in (0.0, 0.3):
        # Whole-image crops (footprint 40 and 16 source px per output px), also rotated: no moiré.
        for size in (13, 32):
            out = sampler.transform(pyr, _params(angle=[angle], area=[0.99]), size).numpy()
            assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.01, (angle, size)
    # Control: at 1:1 the checkerboard is still there.
    out = sampler.transform(pyr, _params(area=[(32 / 512) ** 2]), 32).numpy()
    assert out.std() > 0.45


def test_rotated_crops_leaving_the_image_are_reflected_not_filled():
    uniform = np.full((64, 64, 3), (200, 100, 50), np.uint8)
    pyr = build_pyramid([uniform])
    out = PatchSampler(NO_COLOUR).transform(pyr, _params(angle=[np.pi / 4]), 32).numpy()
    assert np.abs(out - np.array([200, 100, 50]) / 255).max() < 1e-5  # corners read mirrored image, no black
    assert np.allclose(augment_lib._reflect(tf.constant([-0.25, 0.3, 1.25, 1.0, 0.0])).numpy(),
                       [0.25, 0.3, 0.75, 1.0, 0.0])


def test_blur_smooths_and_noise_perturbs(noise_image):
    pyr = build_pyramid([noise_image])
    where = {"center": [[38 / 120, 28 / 100]], "area": [256 / 12000]}
    sharp = PatchSampler(NO_COLOUR).transform(pyr, _params(**where), 16).numpy()
    blurred = PatchSampler(dataclasses.replace(NO_COLOUR, blur_sigma=2.0)).transform(
        pyr, _params(**where, blur_sigma=[1.5]), 16).numpy()
    assert blurred.std() < 0.6 * sharp.std()
    noisy = PatchSampler(dataclasses.replace(NO_COLOUR, noise_std=0.2)).transform(
        pyr, _params(**where, noise_std=[0.1]), 16).numpy()
    assert 0.03 < np.abs(noisy - sharp).mean() < 0.12
    assert noisy.min() >= 0 and noisy.max() <= 1
