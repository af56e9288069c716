"""Decoding single image files: every mode comes back as 8-bit RGB, every broken file as a BadImageError.

The cases issue 7 names (zero-byte, truncated, text named .JPEG, decompression bomb, CMYK, 16-bit) are in
tests/reliability/test_bad_data.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from builders import jpeg_bytes
from transferlab.data.images import decode_image, is_image_name, open_image, to_rgb
from transferlab.errors import BadImageError

ORIGIN = "some/dir/img_7.JPEG"


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


# --- modes that decode -------------------------------------------------------------------------------


def test_rgb_jpeg_decodes_to_rgb_with_its_colour() -> None:
    img = decode_image(jpeg_bytes((220, 30, 30)), ORIGIN)
    assert img.mode == "RGB"
    assert img.size == (64, 64)
    mean = pixels(img).reshape(-1, 3).mean(axis=0)
    assert mean[0] > 180 and mean[1] < 70 and mean[2] < 70


def test_rgb_png_is_lossless() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = decode_image(encode(Image.fromarray(arr, "RGB"), "PNG"), ORIGIN)
    assert img.mode == "RGB"
    assert img.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_grayscale_comes_back_rgb_with_equal_channels() -> None:
    arr = np.array([[0, 17, 128, 255]], dtype=np.uint8)
    data = encode(Image.fromarray(arr, "L"), "PNG")
    assert open_image(data, ORIGIN).mode == "L"
    out = np.asarray(decode_image(data, ORIGIN))
    assert out.shape == (1, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_grayscale_jpeg_comes_back_rgb() -> None:
    data = jpeg_bytes((90, 90, 90), mode="L")
    assert open_image(data, ORIGIN).mode == "L"
    out = np.asarray(decode_image(data, ORIGIN))
    assert out.shape == (64, 64, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_palette_png_with_transparency_composited_on_white() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)  # red, but transparent
    pal.putpixel((1, 0), 1)  # opaque blue
    data = encode(pal, "PNG", transparency=0)
    opened = open_image(data, ORIGIN)
    assert opened.mode == "P"
    out = np.asarray(decode_image(data, ORIGIN))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]


def test_palette_png_without_transparency_keeps_colours() -> None:
    pal = Image.new("P", (1, 1))
    pal.putpalette([10, 200, 30] + [0] * (256 * 3 - 3))
    out = np.asarray(decode_image(encode(pal, "PNG"), ORIGIN))
    assert out[0, 0].tolist() == [10, 200, 30]


def test_rgba_composited_on_white() -> None:
    arr = np.array(
        [[[255, 0, 0, 0], [0, 255, 0, 255], [0, 0, 0, 128]]],
        dtype=np.uint8,
    )
    data = encode(Image.fromarray(arr, "RGBA"), "PNG")
    assert open_image(data, ORIGIN).mode == "RGBA"
    out = decode_image(data, ORIGIN)
    assert out.mode == "RGB"
    px = pixels(out)[0]
    assert px[0].tolist() == [255, 255, 255]  # fully transparent -> white, not the hidden red
    assert px[1].tolist() == [0, 255, 0]  # opaque stays as is
    assert all(abs(v - 127) <= 1 for v in px[2])  # half-transparent black over white -> mid grey


def test_la_composited_on_white() -> None:
    arr = np.array([[[0, 0], [50, 255]]], dtype=np.uint8)
    out = np.asarray(decode_image(encode(Image.fromarray(arr, "LA"), "PNG"), ORIGIN))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [50, 50, 50]


def test_grayscale_png_colour_key_transparency_composited_on_white() -> None:
    arr = np.array([[10, 200]], dtype=np.uint8)
    data = encode(Image.fromarray(arr, "L"), "PNG", transparency=10)
    out = np.asarray(decode_image(data, ORIGIN))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 200, 200]


def test_rgb_png_colour_key_transparency_composited_on_white() -> None:
    arr = np.array([[[1, 2, 3], [40, 50, 60]]], dtype=np.uint8)
    data = encode(Image.fromarray(arr, "RGB"), "PNG", transparency=(1, 2, 3))
    out = np.asarray(decode_image(data, ORIGIN))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [40, 50, 60]


def test_bilevel_image_becomes_black_and_white_rgb() -> None:
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    out = np.asarray(decode_image(encode(img, "PNG"), ORIGIN))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_decoded_image_is_fully_loaded() -> None:
    # Returned images must not depend on the input buffer any more (they go through DataLoader workers).
    img = decode_image(jpeg_bytes((10, 100, 200)), ORIGIN)
    assert img.tobytes()  # would raise if the file had to be read again
    assert isinstance(img, Image.Image)


def test_open_image_keeps_the_original_mode() -> None:
    cases = {
        "L": encode(Image.new("L", (3, 3), 7), "PNG"),
        "RGBA": encode(Image.new("RGBA", (3, 3), (1, 2, 3, 4)), "PNG"),
        "CMYK": encode(Image.new("CMYK", (8, 8), (1, 2, 3, 4)), "JPEG"),
        "I;16": encode(Image.fromarray(np.full((2, 2), 300, dtype=np.uint16)), "PNG"),
        "P": encode(Image.new("P", (3, 3), 1), "PNG"),
        "RGB": jpeg_bytes((1, 2, 3)),
    }
    for mode, data in cases.items():
        assert open_image(data, ORIGIN).mode == mode, mode
        assert decode_image(data, ORIGIN).mode == "RGB", mode


def test_to_rgb_returns_rgb_unchanged() -> None:
    img = Image.new("RGB", (2, 2), (9, 8, 7))
    assert to_rgb(img) is img


# --- broken files ------------------------------------------------------------------------------------


def test_truncated_png_is_an_error() -> None:
    arr = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(arr, "RGB"), "PNG")
    with pytest.raises(BadImageError) as ei:
        open_image(data[: len(data) // 2], ORIGIN)
    assert ei.value.origin == ORIGIN
    assert ei.value.reason.startswith("cannot decode")


def test_is_image_name() -> None:
    assert is_image_name("a/b/val_0.JPEG")
    assert is_image_name("x.png") and is_image_name("x.Jpg") and is_image_name("y.webp")
    assert not is_image_name("train/n01/n01_boxes.txt")
    assert not is_image_name("wnids.txt")
    assert not is_image_name("jpeg")
