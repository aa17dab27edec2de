"""From file bytes to model input, and the geometry that maps model input back to the file.

decode: bytes -> RGB PIL image, EXIF orientation applied, 16-bit/palette/CMYK/alpha converted,
        images over `max_pixels` refused before their pixels are decoded.
to_uint8: resize the shorter side to `resize` (bilinear, antialiased), centre-crop `crop`,
        -> uint8 (3, crop, crop); the float conversion and normalisation run batched on the device.
geometry: where the crop sits in the original image, for export.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import Preprocess


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
            image = Image.open(io.BytesIO(data))
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


def to_uint8(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side, centre-crop: (3, crop, crop) uint8."""
    resized = TF.resize(image, [pre.resize], antialias=True)
    cropped = TF.center_crop(resized, [pre.crop, pre.crop])
    return TF.pil_to_tensor(cropped)  # (3, crop, crop) uint8


def normalize(batch: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, H, W) float32 normalised with the config's mean and std."""
    std = torch.tensor(pre.std, dtype=torch.float64)  # (3,)
    scale = (1.0 / (255.0 * std)).float().to(batch.device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    shift = (-torch.tensor(pre.mean, dtype=torch.float64) / std).float()  # (3,)
    shift = shift.to(batch.device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    x = batch.to(torch.float32)  # (B, 3, H, W); in place from here: one buffer, two passes
    return x.mul_(scale).add_(shift)  # (x/255 - mean) / std; addcmul is 10x slower on CPU


@dataclass(frozen=True)
class Geometry:
    """How model-input pixels map to the original image.

    Input pixel (r, c) of the crop covers original pixels starting at
    ((r + top) * scale_y, (c + left) * scale_x), each scale_y x scale_x in size.
    """

    height: int  # original (oriented) size
    width: int
    resized_height: int  # after resizing the shorter side
    resized_width: int
    top: int  # crop offset within the resized image
    left: int

    @property
    def scale_y(self) -> float:
        return self.height / self.resized_height

    @property
    def scale_x(self) -> float:
        return self.width / self.resized_width

    def to_original(
        self, top: int, left: int, bottom: int, right: int
    ) -> tuple[int, int, int, int]:
        """A half-open box in crop pixels -> the half-open box of original pixels it covers."""
        t = int(np.floor((top + self.top) * self.scale_y))
        b = int(np.ceil((bottom + self.top) * self.scale_y))
        le = int(np.floor((left + self.left) * self.scale_x))
        r = int(np.ceil((right + self.left) * self.scale_x))
        return max(t, 0), max(le, 0), min(b, self.height), min(r, self.width)


def geometry(height: int, width: int, pre: Preprocess) -> Geometry:
    """The resize and centre crop that `to_uint8` applies to an image of this size."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(pre.resize * long / short)  # torchvision's rule for an int size
    rh, rw = (pre.resize, new_long) if height <= width else (new_long, pre.resize)
    top = int(round((rh - pre.crop) / 2.0))
    left = int(round((rw - pre.crop) / 2.0))
    return Geometry(height, width, rh, rw, top, left)
