"""png_writer: lossless at every zlib level, a standard PNG Pillow reads, bad input named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sdxl_server.engine.png_writer import encode_png


def _pixels(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]  # a gradient, as images have
    noise = rng.integers(0, 40, (height, width, 3))
    return ((smooth + noise) % 256).astype(np.uint8)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_pillow_reads_back_the_exact_pixels(level):
    pixels = _pixels(48, 72)  # not square: catches a width/height mix-up
    data = encode_png(pixels, level)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (72, 48)
    np.testing.assert_array_equal(np.asarray(decoded), pixels)


def test_higher_levels_give_fewer_bytes_than_stored():
    pixels = _pixels(64, 64)
    assert len(encode_png(pixels, 9)) < len(encode_png(pixels, 1)) < len(encode_png(pixels, 0))


def test_a_view_of_a_larger_array_is_encoded_as_itself():
    # The workers encode one row of a decoded batch: a strided view, never copied first.
    batch = np.stack([_pixels(16, 16), 255 - _pixels(16, 16)])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(batch[1])))), batch[1])


@pytest.mark.parametrize(
    ("pixels", "level", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), 1, "uint8"),
        (np.zeros((4, 4), np.uint8), 1, "uint8"),
        (np.zeros((4, 4, 3), np.uint8), 10, "level"),
    ],
)
def test_bad_input_is_refused_naming_the_problem(pixels, level, message):
    with pytest.raises(ValueError, match=message):
        encode_png(pixels, level)
