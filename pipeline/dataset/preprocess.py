"""From a decoded image to model input, and the geometry that maps model input back to the file.

to_uint8: resize the shorter side to `resize` (bilinear, antialiased), centre-crop `crop`,
        -> uint8 (3, crop, crop); the float conversion and normalisation run batched on the device.
geometry: where the crop sits in the original image, for export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipeline.config import Preprocess


def to_uint8(
    image: Image.Image, pre: Preprocess, box: tuple[float, float, float, float] | None = None
) -> torch.Tensor:
    """Resize the shorter side, centre-crop: (3, crop, crop) uint8. After a reduced decode,
    `box` (`Decoded.box`) is resampled to the size torchvision gives the full image."""
    if box is None:
        resized = TF.resize(image, [pre.resize], antialias=True)
    else:
        left, top, right, bottom = box
        w, h = right - left, bottom - top  # the original's size / s, exactly (s a power of 2)
        long = int(pre.resize * max(w, h) / min(w, h))  # torchvision's rule, same ratio
        size = (pre.resize, long) if w <= h else (long, pre.resize)
        resized = image.resize(size, Image.Resampling.BILINEAR, box=box)
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
