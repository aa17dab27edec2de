"""Where a unit fires: its activation map on a patch, drawn as a heat overlay and as a mask.

`unit_maps` runs the model up to a layer and keeps each row's channel: (R, H', W'), a layer
without spatial dims giving (R, 1, 1). `upsample` puts one map on a patch's pixels in two steps,
both bilinear with align_corners=False (torch's `F.interpolate`):

1. the (H', W') map to the model input (crop, crop): input pixel i reads map coordinate
   (i + 0.5) * H' / crop - 0.5 (clamped to the map), so each map cell sits centred on the input
   pixels it strides over;
2. the row's input box (the receptive field of (y, x), clipped to the crop) cut from that and
   resized to the patch's pixel size (the same box in the original, at full resolution).

Bilinear interpolation only mixes neighbouring cells, so the upsampled map never exceeds the
map's maximum and peaks within one map cell of it: the overlay's hottest pixel lies where the
index recorded (y, x). The result is clamped to the map's [min, max], so that float rounding
cannot leave it either (a constant map, as a linear layer's, stays exactly constant, and a mask
at a threshold equal to the maximum stays empty).

`overlay` blends the patch with a "hot" colour ramp (black, red, yellow, white) at opacity
HEAT_ALPHA * t, t = heat / scale clipped to [0, 1]; the export's scale is the unit's top-1
activation, so every image of a unit is drawn on one scale and values at or below 0 show none.
`mask` is NetDissect's: the upsampled map strictly above the unit's threshold (the export uses
the 0.99 quantile of the unit's per-image activation; "strictly", so a unit whose quantile is 0
masks where it fires, not everything). `mask_image` dims the patch outside the mask to DIM of
its brightness and outlines the mask in OUTLINE, OUTLINE_PER pixels of patch per pixel of line.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from pipeline.net.instrument import StopForward, eval_mode, find_layer, stop_after

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom and right exclusive

HEAT_ALPHA = 0.65  # opacity of full heat over the patch
DIM = 0.3  # brightness kept outside the mask
OUTLINE = (255, 230, 0)  # the mask's outline
OUTLINE_PER = 160  # one pixel of outline per this many pixels of the patch's longer side


def unit_maps(model: nn.Module, layer: str, images: Tensor, which: Tensor, units: Tensor) -> Tensor:
    """The (H', W') map of units[r] of `layer` on images[which[r]], float32 on the CPU.

    images: (N, C, H, W) preprocessed model input; which, units: (R,). Returns (R, H', W'); an
    output without spatial dims ((N, K), as a linear layer's) gives (R, 1, 1).
    """
    module = find_layer(model, layer)
    with eval_mode(model), stop_after(module) as outputs, torch.no_grad():
        try:
            model(images)
        except StopForward:
            pass
    output = outputs[0]  # (N, K, H', W') or (N, K)
    if output.dim() == 2:
        output = output[:, :, None, None]  # (N, K, 1, 1)
    rows = which.to(output.device, torch.long), units.to(output.device, torch.long)
    return output[rows].float().cpu()  # (R, H', W')


def upsample(activation_map: Tensor, crop: int, box: Box, size: tuple[int, int]) -> np.ndarray:
    """The map under a patch: to the (crop, crop) input, cut to `box`, resized to `size` (h, w).

    activation_map: (H', W'). Both resizes are bilinear with align_corners=False (module doc).
    """
    top, left, bottom, right = box
    assert 0 <= top < bottom <= crop and 0 <= left < right <= crop, box
    grid = activation_map.detach().to("cpu", torch.float32)[None, None]  # (1, 1, H', W')
    full = F.interpolate(grid, size=(crop, crop), mode="bilinear", align_corners=False)
    cut = full[:, :, top:bottom, left:right]  # (1, 1, h_in, w_in)
    heat = F.interpolate(cut, size=size, mode="bilinear", align_corners=False)  # (1, 1, h, w)
    heat = heat.clamp(grid.min(), grid.max())  # rounding may not leave the map's range either
    return heat[0, 0].numpy()  # (h, w)


def hot(t: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) colours in [0, 1]: black, red, yellow, white."""
    return np.clip(np.stack([3 * t, 3 * t - 1, 3 * t - 2], axis=-1), 0.0, 1.0)


def overlay(patch: Image.Image, heat: np.ndarray, scale: float | None) -> Image.Image:
    """The patch under `heat` (h, w), full heat at `scale`; no heat where scale is None."""
    pixels = np.asarray(patch.convert("RGB"), dtype=np.float64)  # (h, w, 3)
    assert pixels.shape[:2] == heat.shape, (pixels.shape, heat.shape)
    valid = scale is not None and math.isfinite(scale) and scale > 0
    t = np.clip(heat / scale, 0.0, 1.0) if valid else np.zeros(heat.shape)  # (h, w)
    alpha = HEAT_ALPHA * t[..., None]  # (h, w, 1)
    blended = (1 - alpha) * pixels + alpha * 255.0 * hot(t)  # (h, w, 3)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def mask(heat: np.ndarray, threshold: float) -> np.ndarray:
    """(h, w) bool: where the upsampled map lies strictly above `threshold`."""
    return heat > threshold


def outline(region: np.ndarray, width: int) -> np.ndarray:
    """(h, w) bool: the pixels of `region` within `width` pixels (4-neighbour steps) of its
    outside; the patch's own border is not an edge."""
    inner = region.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, mode="edge")  # (h + 2, w + 2)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~inner


def mask_image(patch: Image.Image, region: np.ndarray) -> Image.Image:
    """The patch, DIM outside `region`, with the region's outline drawn in OUTLINE."""
    pixels = np.asarray(patch.convert("RGB"), dtype=np.float64)  # (h, w, 3)
    assert pixels.shape[:2] == region.shape, (pixels.shape, region.shape)
    shaded = np.where(region[..., None], pixels, DIM * pixels)  # (h, w, 3)
    width = max(1, round(max(region.shape) / OUTLINE_PER))
    shaded[outline(region, width)] = OUTLINE
    return Image.fromarray(np.clip(np.rint(shaded), 0, 255).astype(np.uint8))
