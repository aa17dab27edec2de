"""From file bytes to an oriented RGB image, or the reason the image is skipped.

decode: bytes -> RGB PIL image, EXIF orientation applied, 16-bit/palette/CMYK/alpha converted,
        images over `max_pixels` refused before their pixels are decoded.
content_hash: the sha256 of a file's bytes, stored per image (`image_hash`).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImage(ValueError):
    """The bytes are not a decodable image within limits; the image is skipped and recorded."""


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, oriented
    image_hash: str  # sha256 hex of the file's bytes
    nbytes: int


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, max_pixels: int, resize: int = 0) -> Decoded:
    """Decode `data` to an oriented RGB image, or raise BadImage saying why.

    Refused before decoding: more than `max_pixels` pixels, or an aspect ratio so extreme that
    resizing the shorter side to `resize` would exceed `max_pixels`.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own check, at twice its limit
        raise BadImage(f"refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image format Pillow can read") from e
    except Exception as e:  # any decoder failure means this file is not a usable image
        raise BadImage(re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")) from e
    return Decoded(rgb, content_hash(data), len(data))


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
