"""JPEG decoding on the worker's device (`--decode device`): bytes -> (3, crop, crop) uint8.

Two halves, so that bytes rather than pixels cross from the reader threads to the worker:

inspect (reader thread): the header only, through Pillow's `decode.open_checked` (the same
        empty-file, bomb and aspect-ratio checks with the same messages as the Pillow path),
        -> a `Jpeg` record with the EXIF orientation, or None when Pillow must decode the file
        instead: not a JPEG, a CMYK/YCCK JPEG, or bytes that do not end in an EOI marker
        (truncated files, whose treatment then stays Pillow's).
to_uint8 (worker): one `torchvision.io.decode_jpeg` call decodes a batch on the device (nvJPEG
        on CUDA, libjpeg-turbo on CPU); then, per image and on the device, the EXIF orientation
        as flips and transposes, the shorter side resized to `resize` (bilinear, antialiased),
        and the centre crop. An image the decoder refuses comes back as None: the worker
        decodes it with Pillow, so a failure here is never a failure of the run.
model_input: both halves (or Pillow's path) for one image, as the export needs them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.config import Preprocess
from pipeline.dataset.decode import TRANSPOSING, decode, open_checked, orientation, reasons
from pipeline.dataset.preprocess import to_uint8 as pil_to_uint8

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker and the first byte of the next marker
EOI = b"\xff\xd9"  # end of image; cannot occur inside entropy-coded data (0xFF is stuffed)
DEVICE_MODES = ("RGB", "L")  # Pillow's modes of YCbCr/RGB and grayscale JPEGs; CMYK stays Pillow's


@dataclass(frozen=True)
class Jpeg:
    """A JPEG whose header passed the checks, waiting to be decoded on the device."""

    data: bytes
    orientation: int  # EXIF orientation 1..8 (1: as stored), as `ImageOps.exif_transpose` reads it
    height: int  # the displayed (oriented) size
    width: int


def inspect(data: bytes, max_pixels: int, resize: int) -> Jpeg | None:
    """The header of `data` as a `Jpeg`, None if Pillow should decode it; BadImage as Pillow's
    path would raise it (empty, over `max_pixels`, unreadable header)."""
    if not data.startswith(JPEG_MAGIC):
        return None  # empty files and other formats: Pillow gives today's answer
    with reasons():
        image = open_checked(data, max_pixels, resize)
    if image.format != "JPEG" or image.mode not in DEVICE_MODES or not data.endswith(EOI):
        return None
    try:
        turn = orientation(image)
    except Exception:  # a damaged EXIF block: Pillow's path decides what it means, as today
        return None
    width, height = image.size
    if turn in TRANSPOSING:
        width, height = height, width
    return Jpeg(data, turn, height, width)


def to_uint8(jpegs: list[Jpeg], pre: Preprocess, device: torch.device) -> list[torch.Tensor | None]:
    """Decode, orient, resize and crop a batch on `device`: each (3, crop, crop) uint8, or None
    for an image the device decoder refused (decode it with Pillow)."""
    if not jpegs:
        return []
    encoded = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]  # (n,) each
    try:
        images: list[torch.Tensor | None] = list(_decode(encoded, device))
    except (RuntimeError, ValueError):  # one bad image fails the call: one at a time, then
        images = [_decode_one(e, device) for e in encoded]
    return [
        None if image is None else fit(orient(image, j.orientation), pre)
        for image, j in zip(images, jpegs, strict=True)
    ]


def _decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)  # each (3, H, W)


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode([encoded], device)[0]  # (3, H, W) uint8
    except (RuntimeError, ValueError):
        return None


def orient(image: torch.Tensor, turn: int) -> torch.Tensor:
    """(3, H, W) as stored -> as displayed: `ImageOps.exif_transpose` for EXIF orientation
    `turn` (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
    8 rotate 90 anticlockwise)."""
    hw = (-2, -1)
    if turn == 2:
        return image.flip(-1)
    if turn == 3:
        return image.flip(hw)
    if turn == 4:
        return image.flip(-2)
    if turn == 5:
        return image.transpose(-2, -1)
    if turn == 6:
        return torch.rot90(image, -1, hw)
    if turn == 7:
        return image.transpose(-2, -1).flip(hw)
    if turn == 8:
        return torch.rot90(image, 1, hw)
    return image


def fit(image: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, crop, crop) uint8: shorter side to `resize` (bilinear,
    antialiased; torchvision's uint8 kernel on CPU, float then rounded on CUDA), centre crop."""
    resized = TF.resize(image.contiguous(), [pre.resize], antialias=True)  # (3, h, w)
    return TF.center_crop(resized, [pre.crop, pre.crop])  # (3, crop, crop)


def model_input(
    data: bytes, pre: Preprocess, how: str, draft: bool, device: torch.device
) -> torch.Tensor:
    """One image's (3, crop, crop) uint8 as the map worker makes it with `--decode how` (pil or
    device) and `--draft`: the export recomputes activations from the same pixels."""
    if how == "device":
        header = inspect(data, pre.max_pixels, pre.resize)
        pixels = to_uint8([header], pre, device)[0] if header is not None else None
        if pixels is not None:
            return pixels
    decoded = decode(data, pre.max_pixels, pre.resize, draft)
    return pil_to_uint8(decoded.image, pre, decoded.box)
