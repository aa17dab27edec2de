"""From file bytes to an oriented RGB image, or the reason the image is skipped.

decode: bytes -> RGB PIL image, EXIF orientation applied, 16-bit/palette/CMYK/alpha converted,
        images over `max_pixels` refused before their pixels are decoded (`open_checked`, which
        the device path in `jpeg` shares); optionally a reduced-size JPEG decode (`draft`).
content_hash: the sha256 of a file's bytes, stored per image (`image_hash`).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError


class BadImage(ValueError):
    """The bytes are not a decodable image within limits; the image is skipped and recorded."""


TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DRAFT_MARGIN = 2  # a reduced decode keeps at least this many pixels per output pixel


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, oriented; smaller than height x width after a reduced decode
    image_hash: str  # sha256 hex of the file's bytes
    nbytes: int
    height: int  # the original image's, oriented
    width: int
    box: tuple[float, float, float, float] | None = None  # after a reduced decode: the region
    # (left, top, right, bottom) of `image` that holds the original, in `image`'s pixels


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, max_pixels: int, resize: int = 0, draft: bool = False) -> Decoded:
    """Decode `data` to an oriented RGB image, or raise BadImage saying why.

    Refused before decoding: see `open_checked`. With `draft`, a JPEG whose shorter side is at
    least 2 x DRAFT_MARGIN x `resize` is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (libjpeg scaling), the largest reduction that keeps the shorter side at least DRAFT_MARGIN x
    `resize`; `box` then says where the original lies in the smaller image, and `height` and
    `width` stay the original's, so geometry maps through the original size.
    """
    with reasons():
        image = open_checked(data, max_pixels, resize)
        width, height = image.size  # as stored, before any reduced decode
        box: tuple[float, float, float, float] | None = None
        if draft and resize and image.format == "JPEG":
            reduced = image.draft("RGB", draft_size(width, height, resize))
            if reduced is not None and image.size != (width, height):
                box = reduced[1]  # (0, 0, width / s, height / s): the last pixel is partial
        image.load()
        turn = orientation(image)
        if box is not None:
            box = oriented_box(box, image.size, turn)
        if turn in TRANSPOSING:
            width, height = height, width
        rgb = _to_rgb(ImageOps.exif_transpose(image))
    return Decoded(rgb, content_hash(data), len(data), height, width, box)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation `ImageOps.exif_transpose` applies (1: none), read from the header."""
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def open_checked(data: bytes, max_pixels: int, resize: int) -> Image.Image:
    """Open `data` from its header only (no pixel decoded), or raise BadImage: an empty file,
    more than `max_pixels` pixels, or an aspect ratio so extreme that resizing the shorter side
    to `resize` would exceed `max_pixels`. Call it inside `reasons()`."""
    if not data:
        raise BadImage("empty file")
    image: Image.Image = Image.open(io.BytesIO(data))  # exif_transpose: a plain Image
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise BadImage(
            f"{image.width}x{image.height} = {pixels} pixels, over the limit of "
            f"{max_pixels} (--max-pixels)"
        )
    short, long = sorted((max(1, image.width), max(1, image.height)))
    upscaled = resize * resize * long // short  # area after the shorter side is resized
    if upscaled > max_pixels:
        raise BadImage(
            f"{image.width}x{image.height} would be resized to {upscaled} pixels "
            f"(shorter side to the resize size), over the limit of {max_pixels}"
        )
    return image


@contextmanager
def reasons() -> Iterator[None]:
    """Turn any decoder failure inside the block into BadImage with a one-line reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except BadImage:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own check, at twice its limit
        raise BadImage(f"refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image format Pillow can read") from e
    except Exception as e:  # any decoder failure means this file is not a usable image
        raise BadImage(re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")) from e


def draft_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """The size to ask `Image.draft` for: the shorter side at DRAFT_MARGIN x `resize`, the
    aspect kept. libjpeg then picks the largest scale 1/s (s in 1, 2, 4, 8) that keeps both
    sides at least this, so the antialiased resize still shrinks by at least DRAFT_MARGIN."""
    short = max(1, min(width, height))
    side = DRAFT_MARGIN * resize
    return max(1, width * side // short), max(1, height * side // short)


def oriented_box(
    box: tuple[float, float, float, float], size: tuple[int, int], turn: int
) -> tuple[float, float, float, float]:
    """`box` (0, 0, w, h) in an image of `size` (W, H) as stored -> the same region after
    `ImageOps.exif_transpose` for EXIF orientation `turn` (the partial pixels move with it)."""
    _, _, w, h = box
    big_w, big_h = size
    return {
        2: (big_w - w, 0, big_w, h),  # mirrored
        3: (big_w - w, big_h - h, big_w, big_h),  # rotated 180
        4: (0, big_h - h, w, big_h),  # flipped
        5: (0, 0, h, w),  # transposed
        6: (big_h - h, 0, big_h, w),  # rotated 90 clockwise
        7: (big_h - h, big_w - w, big_h, big_w),  # transverse
        8: (0, big_w - w, h, big_w),  # rotated 90 anticlockwise
    }.get(turn, box)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB; 16-bit grayscale is scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or array.max(initial=0) > 255:
            array = array / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        backdrop = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(backdrop, image)  # transparent areas show as white
    return image.convert("RGB")
