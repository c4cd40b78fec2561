"""load_image / load_images: every input kind comes out uint8 (H, W, 3); every bad file is a clear InputError."""
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage.data.images import load_image, load_images
from keras_oneimage.errors import InputError
from tests import bad_inputs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_inputs.make_corpus(tmp_path_factory.mktemp("corpus"))


def _ok_names():
    return ["plain_jpeg", "non_utf8_name", "exif_rotated", "cmyk_jpeg", "animated_gif", "png_16bit", "rgba_png",
            "gray_png", "gray_jpeg", "palette_bmp", "rgb_bmp", "float_tiff"]


@pytest.mark.parametrize("name", sorted(bad_inputs.HINTS))
def test_bad_file_raises_one_line_input_error_naming_the_file(corpus, name):
    path, expected = corpus[name]
    assert expected == "error"
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert bad_inputs.HINTS[name] in message.lower()
    assert os.path.basename(path) in message


def test_corpus_cases_are_all_covered(corpus):
    errors = {n for n, (_, e) in corpus.items() if e == "error"}
    oks = {n for n, (_, e) in corpus.items() if e == "ok"}
    assert errors == set(bad_inputs.HINTS)
    assert oks == set(_ok_names())


@pytest.mark.parametrize("name", _ok_names())
def test_good_file_loads_as_uint8_rgb(corpus, name):
    path, expected = corpus[name]
    assert expected == "ok"
    image = load_image(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert image.flags["C_CONTIGUOUS"]


def test_lossless_files_match_the_test_card(corpus):
    card = bad_inputs.pattern()
    for name in ("png_16bit", "rgba_png", "rgb_bmp"):
        assert np.array_equal(load_image(corpus[name][0]), card), name
    palette = load_image(corpus["palette_bmp"][0]).astype(int)  # 256-colour quantisation of the card
    assert palette.shape == card.shape and np.abs(palette - card).mean() < 16
    gray = load_image(corpus["gray_png"][0])
    assert np.array_equal(gray[..., 0], card[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    # A float TIFF (mode F) in [0, 1] is scaled to 0..255, not clipped to an all-black image (issue 17, case 8).
    float_gray = load_image(corpus["float_tiff"][0])
    assert np.array_equal(float_gray[..., 0], card[..., 0]) and np.array_equal(float_gray[..., 0], float_gray[..., 1])


def test_jpeg_variants_match_the_test_card(corpus):
    card = bad_inputs.pattern().astype(int)
    for name in ("plain_jpeg", "cmyk_jpeg"):
        image = load_image(corpus[name][0]).astype(int)
        assert image.shape == card.shape
        assert np.abs(image - card).mean() < 6, name
    assert np.array_equal(load_image(corpus["non_utf8_name"][0]), load_image(corpus["plain_jpeg"][0]))


def test_exif_orientation_is_applied(corpus):
    path = corpus["exif_rotated"][0]
    raw = tf.io.decode_jpeg(open(path, "rb").read()).numpy()  # TF ignores EXIF: stored orientation
    image = load_image(path)
    assert raw.shape == (24, 40, 3) and image.shape == (40, 24, 3)
    assert np.array_equal(image, np.rot90(raw, k=-1))  # orientation 6 = rotate 90° clockwise to display
    # The card's blue (top-left when stored) must now be top-right.
    assert image[:10, -10:, 2].mean() > 200 and image[:10, :10, 2].mean() < 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    from PIL import Image, ImageOps

    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(bad_inputs.exif_jpeg(bad_inputs.pattern(), orientation))
    with Image.open(path) as pil:
        expected = np.asarray(ImageOps.exif_transpose(pil).convert("RGB")).astype(int)
    got = load_image(path).astype(int)
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 2  # TF's and Pillow's JPEG decoders differ by a few levels


def test_animated_gif_gives_its_first_frame(corpus):
    image = load_image(corpus["animated_gif"][0])
    assert image.shape == (24, 40, 3)
    assert (image[..., 0] == 255).all() and (image[..., 2] == 0).all()


def test_max_pixels_and_min_size_are_parameters(corpus):
    path = corpus["plain_jpeg"][0]  # 40x24 = 960 pixels
    with pytest.raises(InputError, match="max_pixels=959"):
        load_image(path, max_pixels=959)
    assert load_image(path, max_pixels=960).shape == (24, 40, 3)
    with pytest.raises(InputError, match="min_size=25"):
        load_image(path, min_size=25)
    assert load_image(corpus["tiny_1x1"][0], min_size=1).shape == (1, 1, 3)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(InputError):
            load_image(path, max_pixels=bad)


def test_arrays_and_tensors_of_every_kind():
    card = bad_inputs.pattern()
    gray = card[..., 0]
    cases = {
        "uint8 rgb": (card, card),
        "gray 2d": (gray, np.repeat(gray[..., None], 3, -1)),
        "gray hw1": (gray[..., None], np.repeat(gray[..., None], 3, -1)),
        "gray+alpha": (np.stack([gray, gray], -1), np.repeat(gray[..., None], 3, -1)),
        "rgba": (np.concatenate([card, card[..., :1]], -1), card),
        "uint16": (card.astype(np.uint16) * 257, card),
        "float32": (card.astype(np.float32) / 255, card),
        "float64": (card / 255.0, card),
        "int64 in range": (card.astype(np.int64), card),
        "tensor": (tf.constant(card), card),
        "float tensor": (tf.constant(card, tf.float32) / 255, card),
    }
    for name, (src, expected) in cases.items():
        image = load_image(src)
        assert image.dtype == np.uint8 and image.shape == expected.shape, name
        assert np.array_equal(image, expected), name


@pytest.mark.parametrize("bad, fragment", [
    (np.full((16, 16, 3), 1.5, np.float32), "[0, 1]"),
    (np.full((16, 16, 3), np.nan, np.float32), "nan"),
    (np.full((16, 16, 3), 300, np.int32), "[0, 255]"),
    (np.zeros((16, 16, 5), np.uint8), "channels"),
    (np.zeros((16,), np.uint8), "shape"),
    (np.zeros((2, 16, 16, 3), np.uint8), "load_images"),
    (np.zeros((16, 16, 3), bool), "pixel type"),
    (np.zeros((4, 16, 3), np.uint8), "min_size"),
    ([[1, 2], [3, 4]], "list"),
    (b"/tmp/x.jpg", "bytes"),
    ("", "empty"),
])
def test_bad_arrays_and_objects(bad, fragment):
    with pytest.raises(InputError) as info:
        load_image(bad)
    assert fragment in str(info.value).lower()


def test_load_images_accepts_one_many_or_a_batch(corpus):
    card = bad_inputs.pattern()
    assert len(load_images(card)) == 1
    two = load_images([card, corpus["gray_png"][0]])
    assert [i.shape for i in two] == [(24, 40, 3), (24, 40, 3)]
    batch = load_images(np.stack([card, card[::-1]]))
    assert len(batch) == 2 and np.array_equal(batch[1], card[::-1])
    assert len(load_images(tf.constant(np.stack([card] * 3)))) == 3
    with pytest.raises(InputError, match="empty list"):
        load_images([])


def test_paper_image_a_loads(image_a_path):
    image = load_image(image_a_path)
    assert image.shape == (1920, 2560, 3) and image.dtype == np.uint8
    assert 30 < image.mean() < 225
