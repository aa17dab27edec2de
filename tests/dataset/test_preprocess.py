"""decode / to_uint8 / geometry: every image mode becomes RGB, bombs are refused before decoding,
and the geometry used by export is the one torchvision applies."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import Preprocess
from pipeline.dataset.decode import BadImage, decode
from pipeline.dataset.jpeg import model_input
from pipeline.dataset.preprocess import geometry, normalize, to_uint8

LIMIT = Preprocess().max_pixels
# every decode path (`--decode`, `--draft`): each must turn every input into the same model input
PATHS = [("pil", False), ("device", False), ("pil", True), ("device", True)]
path_ids = pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p[0]}{'+draft' * p[1]}")


def through(data: bytes, path: tuple[str, bool], pre: Preprocess | None = None) -> torch.Tensor:
    """The (3, crop, crop) uint8 model input of `data` on a decode path (device: CPU here)."""
    return model_input(data, pre or Preprocess(), path[0], path[1], torch.device("cpu"))


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, fmt", [("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG")]
)
def test_every_mode_becomes_rgb(mode, fmt):
    image = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    decoded = decode(encoded(image, fmt), LIMIT)
    assert decoded.image.mode == "RGB" and decoded.image.size == (40, 30)


def odd_inputs() -> dict[str, bytes]:
    photo = Image.new("RGB", (60, 40), (200, 100, 50))
    photo.paste((10, 250, 90), (0, 0, 30, 15))  # a corner patch shows orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = photo.convert("RGBA")
    rgba.putalpha(100)
    sixteen = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    return {
        "gray.jpg": encoded(photo.convert("L"), "JPEG"),
        "cmyk.jpg": encoded(photo.convert("CMYK"), "JPEG"),
        "rotated.jpg": encoded(photo, "JPEG", exif=exif.tobytes()),
        "progressive.jpg": encoded(photo, "JPEG", progressive=True),
        "palette.png": encoded(photo.convert("P")),
        "alpha.png": encoded(rgba),
        "la.png": encoded(photo.convert("LA")),
        "deep16.png": encoded(sixteen),
    }


@path_ids
@pytest.mark.parametrize("name", sorted(odd_inputs()))
def test_every_mode_gives_the_same_model_input_on_every_path(name, path):
    data = odd_inputs()[name]
    want = through(data, ("pil", False)).int()
    got = through(data, path).int()
    assert got.shape == (3, 224, 224) and (got - want).abs().max() <= 1, name


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    array = np.full((10, 10), 65535 // 2, dtype=np.uint16)
    image = Image.fromarray(array)  # mode I;16
    pixel = decode(encoded(image), LIMIT).image.getpixel((0, 0))
    assert pixel == (127, 127, 127)


def test_transparent_pixels_are_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode(encoded(image), LIMIT).image.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode(encoded(image, "JPEG", exif=exif.tobytes()), LIMIT)
    assert decoded.image.size == (20, 60)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb's signature."""
    data = encoded(Image.new("L", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(encoded(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@path_ids
def test_extreme_aspect_ratio_is_refused_before_upscaling(path):
    sliver = encoded(Image.new("L", (40000, 1)))  # 90 bytes, but 256 x 10,240,000 once resized
    with pytest.raises(BadImage, match="would be resized to"):
        decode(sliver, LIMIT, resize=256)
    with pytest.raises(BadImage, match="would be resized to"):
        through(encoded(Image.new("RGB", (4000, 1)), "JPEG"), path)
    with pytest.raises(BadImage, match="would be resized to"):
        through(sliver, path)


@path_ids
def test_decompression_bomb_is_refused_before_decoding(path):
    with pytest.raises(BadImage, match="decompression bomb"):
        decode(png_claiming(100_000, 100_000), LIMIT)
    with pytest.raises(BadImage, match="100000000 pixels, over the limit"):
        decode(png_claiming(10_000, 10_000), LIMIT)
    with pytest.raises(BadImage, match="over the limit of 100"):
        decode(encoded(Image.new("RGB", (20, 20))), max_pixels=100)
    with pytest.raises(BadImage, match="decompression bomb"):
        through(png_claiming(100_000, 100_000), path)
    with pytest.raises(BadImage, match="decompression bomb"):
        through(jpeg_claiming(60_000, 60_000), path)
    with pytest.raises(BadImage, match="100000000 pixels, over the limit"):
        through(jpeg_claiming(10_000, 10_000), path)
    small = Preprocess(max_pixels=100, resize=8, crop=8)
    with pytest.raises(BadImage, match="over the limit of 100"):
        through(encoded(Image.new("RGB", (20, 20)), "JPEG"), path, small)


@path_ids
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        encoded(Image.new("RGB", (50, 50)))[:60],
        encoded(Image.new("RGB", (50, 50)), "JPEG")[:300],
    ],
)
def test_unreadable_bytes_raise_bad_image(data, path):
    with pytest.raises(BadImage) as pil:
        decode(data, LIMIT)
    with pytest.raises(BadImage) as other:
        through(data, path)
    assert str(other.value) == str(pil.value)


def test_normalize_matches_the_textbook_formula():
    pre = Preprocess()
    batch = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    assert torch.allclose(normalize(batch, pre), (batch / 255.0 - mean) / std, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(height=st.integers(230, 700), width=st.integers(230, 700))
def test_geometry_is_torchvisions_resize_and_centre_crop(height, width):
    pre = Preprocess()
    g = geometry(height, width, pre)
    image = Image.new("RGB", (width, height))
    assert TF.resize(image, [pre.resize]).size == (g.resized_width, g.resized_height)
    # a marker pixel at the crop's origin in the resized image lands at (0, 0) of the crop
    canvas = np.zeros((g.resized_height, g.resized_width, 3), dtype=np.uint8)
    canvas[g.top, g.left] = 255
    cropped = TF.center_crop(Image.fromarray(canvas), [pre.crop, pre.crop])
    assert np.asarray(cropped)[0, 0, 0] == 255 and np.asarray(cropped).sum() == 3 * 255


def test_to_uint8_shape_and_box_to_original():
    pre = Preprocess()
    tensor = to_uint8(Image.new("RGB", (512, 256)), pre)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.uint8
    g = geometry(256, 512, pre)  # resized 256 x 512, crop offset (16, 144), scale 1
    assert g.to_original(0, 0, 224, 224) == (16, 144, 240, 368)
    assert geometry(512, 1024, pre).to_original(0, 0, 224, 224) == (32, 288, 480, 736)
