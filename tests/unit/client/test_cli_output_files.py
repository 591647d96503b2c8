"""What `sdxl generate` writes: the output plan (sdxl_client.cli._generate) and the parameters embedded
in the image file (sdxl_client.cli._image_metadata)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from sdxl_client import ImageFormat
from sdxl_client.cli._generate import plan_output
from sdxl_client.cli._image_metadata import Parameters, embed
from sdxl_client.cli._messages import UsageError


def test_the_extension_chooses_the_format(tmp_path):
    assert plan_output("cat.jpg", None, 1).image_format is ImageFormat.JPEG
    assert plan_output("cat.JPEG", "jpeg", 1).image_format is ImageFormat.JPEG
    assert plan_output("cat.webp", None, 1).image_format is ImageFormat.WEBP
    assert plan_output(str(tmp_path), "webp", 2).image_format is ImageFormat.WEBP
    assert plan_output("-", None, 1).to_stdout
    for output, fmt, count, message in [
        ("x.png", "jpeg", 1, "contradicts"),
        ("x.gif", None, 1, "not an image format"),
        ("-", None, 2, "writes one image to stdout"),
    ]:
        with pytest.raises(UsageError, match=message):
            plan_output(output, fmt, count)


@pytest.mark.parametrize(
    ("fmt", "options"), [("PNG", {}), ("JPEG", {"quality": 80}), ("WEBP", {"quality": 80})]
)
def test_parameters_survive_in_the_file_and_the_pixels_are_untouched(fmt, options):
    text = Parameters("a 猫, at dusk", "", 30, 5.0, 7, 64, 64, "org/sdxl:v1", "sdxl-server 1").a1111_text()
    assert text.splitlines() == [
        "a 猫, at dusk",  # A1111 quotes a value holding a comma or a colon:
        'Steps: 30, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, Model: "org/sdxl:v1", '
        "Version: sdxl-server 1",
    ]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, fmt, **options)
    original = buffer.getvalue()
    tagged = embed(original, ImageFormat[fmt], text)
    with Image.open(io.BytesIO(tagged)) as image, Image.open(io.BytesIO(original)) as before:
        assert image.tobytes() == before.tobytes() and image.size == (64, 48)
        if fmt == "PNG":
            assert image.info["parameters"] == text
        else:
            assert image.getexif().get_ifd(0x8769)[0x9286] == b"UNICODE\x00" + text.encode("utf-16-be")
