"""jpeg: the device decode path against the Pillow path on real photographs (CPU decoder here),
EXIF orientations, the fallbacks to Pillow, and the reduced-size (draft) decode's bound.

Bounds (README "Decoding"): model inputs of `--decode device` on CPU are within 1 grey level of
Pillow's (mean under 0.01); a reduced decode is within 6 levels (mean under 0.4 per image) of a
full decode, on photographs from 500x375 to 4032x3024.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from photos import FOLDERS, _photo
from pipeline.config import Preprocess
from pipeline.dataset import jpeg
from pipeline.dataset.decode import BadImage, decode
from pipeline.dataset.preprocess import geometry, to_uint8

PRE = Preprocess()
CPU = torch.device("cpu")
NAMES = [name for names in FOLDERS.values() for name in names]
SIZES = [None, (500, 375), (1024, 768), (2000, 1501)]


def encoded(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def photo_jpeg(name: str, size: tuple[int, int] | None = None, **kw) -> bytes:
    image = Image.fromarray(_photo(name))
    if size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return encoded(image, quality=90, **kw)


def pil_input(data: bytes, draft: bool = False) -> torch.Tensor:
    decoded = decode(data, PRE.max_pixels, PRE.resize, draft)
    return to_uint8(decoded.image, PRE, decoded.box)  # (3, crop, crop)


def device_input(data: bytes) -> torch.Tensor | None:
    header = jpeg.inspect(data, PRE.max_pixels, PRE.resize)
    assert header is not None
    return jpeg.to_uint8([header], PRE, CPU)[0]


def rotated(data_image: Image.Image, turn: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = turn
    return encoded(data_image, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_device_inputs_are_within_one_level_of_pillow(size):
    datas = [photo_jpeg(name, size) for name in NAMES]
    headers = [jpeg.inspect(data, PRE.max_pixels, PRE.resize) for data in datas]
    got = jpeg.to_uint8(headers, PRE, CPU)  # one batch, as the worker decodes
    for name, data, pixels in zip(NAMES, datas, got, strict=True):
        want = pil_input(data).int()
        diff = (pixels.int() - want).abs()  # (3, crop, crop)
        assert pixels.shape == (3, PRE.crop, PRE.crop) and pixels.dtype == torch.uint8
        assert diff.max() <= 1 and diff.float().mean() < 0.01, (name, size)


@pytest.mark.parametrize("turn", range(1, 9))
def test_every_exif_orientation_is_pillows_exactly(turn):
    image = Image.fromarray(_photo("chelsea")).crop((0, 0, 301, 203))  # odd sizes, not square
    data = rotated(image, turn)
    header = jpeg.inspect(data, PRE.max_pixels, PRE.resize)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert (header.width, header.height) == reference.size
    stored = jpeg._decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], CPU)[0]
    shown = jpeg.orient(stored, header.orientation)  # (3, H, W)
    assert torch.equal(shown, torch.from_numpy(np.array(reference)).permute(2, 0, 1))
    diff = (device_input(data).int() - pil_input(data).int()).abs()
    assert diff.max() <= 1


def test_grayscale_and_progressive_jpegs_take_the_device_path():
    gray = photo_jpeg("camera")  # mode L
    progressive = photo_jpeg("astronaut", progressive=True)
    for data in (gray, progressive):
        assert jpeg.inspect(data, PRE.max_pixels, PRE.resize) is not None
        assert (device_input(data).int() - pil_input(data).int()).abs().max() <= 1


def test_other_files_are_left_to_pillow():
    photo = Image.fromarray(_photo("coffee"))
    good = encoded(photo)
    cmyk = encoded(photo.convert("CMYK"))
    png = encoded(photo, "PNG")
    for data in (cmyk, png, good[: len(good) // 2], b"", b"not an image"):
        assert jpeg.inspect(data, PRE.max_pixels, PRE.resize) is None


def test_header_checks_raise_what_pillow_raises():
    data = encoded(Image.new("RGB", (20, 20)))
    for limit in (100, 399):
        with pytest.raises(BadImage) as device:
            jpeg.inspect(data, limit, PRE.resize)
        with pytest.raises(BadImage) as pil:
            decode(data, limit, PRE.resize)
        assert str(device.value) == str(pil.value)
    sliver = encoded(Image.new("RGB", (4000, 2)))  # 256 x 512,000 once resized
    with pytest.raises(BadImage, match="would be resized to"):
        jpeg.inspect(sliver, PRE.max_pixels, PRE.resize)


def test_an_image_the_device_decoder_refuses_comes_back_as_none():
    good = photo_jpeg("coffee")
    scan = good.index(b"\xff\xda")
    broken = good[:scan] + jpeg.EOI  # a valid header, no scan at all
    header = jpeg.inspect(broken, PRE.max_pixels, PRE.resize)
    assert header is not None
    out = jpeg.to_uint8([jpeg.inspect(good, PRE.max_pixels, PRE.resize), header], PRE, CPU)
    assert out[1] is None and torch.equal(out[0], device_input(good))
    with pytest.raises(BadImage, match="cannot load this image"):
        jpeg.model_input(broken, PRE, "device", False, CPU)  # Pillow's answer, as with pil


@pytest.mark.parametrize("size", [None, (2000, 1500), (1333, 1999)], ids=str)
def test_reduced_decode_is_within_its_bound(size):
    for name in NAMES:
        data = photo_jpeg(name, size)
        full, reduced = decode(data, PRE.max_pixels, PRE.resize), pil_input(data, draft=True)
        diff = (reduced.int() - pil_input(data).int()).abs()
        assert diff.max() <= 6 and diff.float().mean() < 0.4, (name, size)
        drafted = decode(data, PRE.max_pixels, PRE.resize, draft=True)
        assert (drafted.height, drafted.width) == (full.height, full.width)
        if size is not None and min(size) >= 4 * PRE.resize:
            assert drafted.box is not None and drafted.image.width <= (full.width + 1) // 2


def test_reduced_decode_only_below_four_times_the_resize():
    small = photo_jpeg("astronaut", (1000, 1000))  # 1000 < 4 x 256: decoded in full
    assert decode(small, PRE.max_pixels, PRE.resize, draft=True).box is None
    assert torch.equal(pil_input(small, draft=True), pil_input(small))
    png = encoded(Image.fromarray(_photo("astronaut")).resize((2048, 2048)), "PNG")
    assert decode(png, PRE.max_pixels, PRE.resize, draft=True).box is None


@pytest.mark.parametrize("turn", range(1, 9))
def test_reduced_decode_of_rotated_photos_keeps_geometry(turn):
    image = Image.fromarray(_photo("retina")).resize((2001, 1501))  # odd: partial last pixels
    data = rotated(image, turn, quality=90)
    full, drafted = (decode(data, PRE.max_pixels, PRE.resize, d) for d in (False, True))
    assert drafted.box is not None
    assert (drafted.height, drafted.width) == (full.height, full.width) == full.image.size[::-1]
    assert geometry(drafted.height, drafted.width, PRE) == geometry(*full.image.size[::-1], PRE)
    diff = (pil_input(data, draft=True).int() - pil_input(data).int()).abs()
    assert diff.max() <= 6 and diff.float().mean() < 0.4, turn


def test_model_input_follows_the_decode_mode():
    data = photo_jpeg("chelsea")
    assert torch.equal(jpeg.model_input(data, PRE, "pil", False, CPU), pil_input(data))
    assert torch.equal(jpeg.model_input(data, PRE, "device", False, CPU), device_input(data))
    png = encoded(Image.fromarray(_photo("chelsea")), "PNG")
    assert torch.equal(jpeg.model_input(png, PRE, "device", False, CPU), pil_input(png))
