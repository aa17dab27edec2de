"""pipeline/export/heat.py against hand-computed values and a numpy oracle of bilinear resizing
(half-pixel centres, clamped at the border: what align_corners=False means), written here
without torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from pipeline.export.heat import (
    DIM,
    HEAT_ALPHA,
    OUTLINE,
    hot,
    mask,
    mask_image,
    outline,
    overlay,
    unit_maps,
    upsample,
)


def resize_1d(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Bilinear along one axis, align_corners=False: output i reads (i + 0.5) * n / size - 0.5."""
    n = values.shape[axis]
    source = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)  # (size,)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n - 1)
    t = source - low
    shape = [1, 1]
    shape[axis] = size
    t = t.reshape(shape)
    return np.take(values, low, axis) * (1 - t) + np.take(values, high, axis) * t


def bilinear(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return resize_1d(resize_1d(values.astype(np.float64), size[0], 0), size[1], 1)


def test_upsample_by_hand():
    # 2 -> 4 with half-pixel centres reads source 0 (clamped), 0.25, 0.75, 1 (clamped)
    grid = torch.tensor([[0.0, 4.0], [8.0, 12.0]])  # value = 8 * row + 4 * column
    t = np.array([0.0, 0.25, 0.75, 1.0])
    expected = 8 * t[:, None] + 4 * t[None, :]  # (4, 4)
    np.testing.assert_allclose(upsample(grid, 4, (0, 0, 4, 4), (4, 4)), expected, atol=1e-6)
    np.testing.assert_allclose(upsample(grid, 4, (1, 2, 3, 4), (2, 2)), expected[1:3, 2:4])
    # the 2x2 cut enlarged to 4x4 reads it at 0 (clamped), 0.25, 0.75, 1 again
    cut = expected[1:3, 1:3]  # [[3, 5], [7, 9]]
    np.testing.assert_allclose(
        upsample(grid, 4, (1, 1, 3, 3), (4, 4)), 3 + 4 * t[:, None] + 2 * t[None, :], atol=1e-6
    )
    assert cut.tolist() == [[3, 5], [7, 9]]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 7), st.integers(1, 7), st.integers(8, 40), st.data(),
)  # fmt: skip
def test_upsample_matches_the_numpy_oracle(height, width, crop, data):
    values = np.asarray(
        data.draw(st.lists(st.floats(-5, 5), min_size=height * width, max_size=height * width))
    ).reshape(height, width)
    top = data.draw(st.integers(0, crop - 1))
    bottom = data.draw(st.integers(top + 1, crop))
    left = data.draw(st.integers(0, crop - 1))
    right = data.draw(st.integers(left + 1, crop))
    size = (data.draw(st.integers(1, 50)), data.draw(st.integers(1, 50)))
    expected = bilinear(bilinear(values, (crop, crop))[top:bottom, left:right], size)
    got = upsample(
        torch.tensor(values, dtype=torch.float32), crop, (top, left, bottom, right), size
    )
    assert got.shape == size
    np.testing.assert_allclose(got, expected, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 6), st.data())
def test_the_heat_peaks_within_one_cell_of_the_maximum(height, width, zoom, data):
    """Where the recorded (y, x) is, the overlay is hottest: the upsampled map's maximum maps
    back to within one map cell of it, and never exceeds the map's maximum."""
    y, x = data.draw(st.integers(0, height - 1)), data.draw(st.integers(0, width - 1))
    seed = data.draw(st.integers(0, 2**16))
    values = np.random.default_rng(seed).uniform(-1, 1, (height, width))
    values[y, x] = 2.0  # the unique maximum
    crop = max(height, width) * zoom + data.draw(st.integers(0, 5))
    heat = upsample(torch.tensor(values, dtype=torch.float32), crop, (0, 0, crop, crop),
                    (crop, crop))  # fmt: skip
    assert heat.max() <= 2.0 + 1e-6
    i, j = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs((i + 0.5) * height / crop - 0.5 - y) < 1
    assert abs((j + 0.5) * width / crop - 0.5 - x) < 1


def test_hot_ramp():
    colours = hot(np.array([0.0, 1 / 3, 2 / 3, 1.0]))
    np.testing.assert_allclose(colours, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], atol=1e-12)


def photo_patch(height=5, width=7) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_overlay_by_hand():
    patch = photo_patch()
    pixels = np.asarray(patch).astype(float)
    heat = np.zeros((5, 7))
    heat[2, 3], heat[0, 0], heat[4, 6] = 4.0, -3.0, 8.0  # full heat, none, above full (clipped)
    heat[1, 1] = 4.0 / 3  # t = 1/3: pure red
    out = np.asarray(overlay(patch, heat, scale=4.0)).astype(float)
    white = (1 - HEAT_ALPHA) * pixels + HEAT_ALPHA * 255
    np.testing.assert_allclose(out[2, 3], np.rint(white[2, 3]))
    np.testing.assert_allclose(out[4, 6], np.rint(white[4, 6]))
    cold = heat <= 0
    np.testing.assert_array_equal(out[cold], pixels[cold])  # no heat at or below 0
    a = HEAT_ALPHA / 3
    red = (1 - a) * pixels[1, 1] + a * np.array([255.0, 0.0, 0.0])
    np.testing.assert_allclose(out[1, 1], red, atol=0.5 + 1e-9)
    unchanged = np.asarray(overlay(patch, heat, scale=None))
    np.testing.assert_array_equal(unchanged, pixels)  # a unit that never fires: no heat
    np.testing.assert_array_equal(np.asarray(overlay(patch, heat, scale=0.0)), pixels)


def test_mask_is_strictly_above_the_threshold():
    heat = np.array([[0.0, 0.5, 1.0], [1.5, 0.99, 0.991]])
    assert mask(heat, 0.99).tolist() == [[False, False, True], [True, False, True]]
    assert not mask(np.zeros((2, 2)), 0.0).any()  # a silent map masks nothing at threshold 0


def test_outline_is_the_region_edge_but_not_the_patch_border():
    region = np.zeros((7, 8), dtype=bool)
    region[2:6, 1:6] = True
    edge = outline(region, 1)
    inner = np.zeros_like(region)
    inner[3:5, 2:5] = True
    np.testing.assert_array_equal(edge, region & ~inner)
    full = np.ones((4, 4), dtype=bool)
    assert not outline(full, 1).any()  # the patch's border is no edge
    left = np.zeros((4, 4), dtype=bool)
    left[:, :2] = True
    assert outline(left, 1).tolist() == [[False, True, False, False]] * 4
    assert outline(left, 2).tolist() == [[True, True, False, False]] * 4


def test_mask_image_dims_outside_and_outlines_the_region():
    patch = photo_patch(7, 8)
    pixels = np.asarray(patch).astype(float)
    region = np.zeros((7, 8), dtype=bool)
    region[2:6, 1:6] = True
    out = np.asarray(mask_image(patch, region)).astype(float)
    edge = outline(region, 1)
    np.testing.assert_array_equal(out[~region], np.rint(DIM * pixels[~region]))
    np.testing.assert_array_equal(out[edge], np.tile(OUTLINE, (int(edge.sum()), 1)))
    inside = region & ~edge
    np.testing.assert_array_equal(out[inside], pixels[inside])
    empty = np.asarray(mask_image(patch, np.zeros((7, 8), dtype=bool))).astype(float)
    np.testing.assert_array_equal(empty, np.rint(DIM * pixels))


def test_unit_maps_of_a_hand_weighted_model():
    """A 1x1 convolution whose unit 0 is the red channel and unit 1 twice the blue one, then a
    linear layer on the flattened map: maps are the layer's own output, per row's image and unit."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 2] = 2.0
    linear = nn.Linear(2 * 4 * 5, 3)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten(), linear)
    images = torch.randn(2, 3, 4, 5)  # (N, 3, H, W)
    which, units = torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1])
    maps = unit_maps(model, "0", images, which, units)  # (3, 4, 5)
    expected = torch.stack([images[1, 0], 2 * images[0, 2], 2 * images[1, 2]])
    torch.testing.assert_close(maps, expected)
    assert (maps < 0).any()  # taken before the in-place ReLU that follows
    flat = unit_maps(model, "3", images, torch.tensor([0, 1]), torch.tensor([2, 0]))
    outputs = model(images)  # (2, 3)
    assert flat.shape == (2, 1, 1)
    torch.testing.assert_close(flat[:, 0, 0], torch.stack([outputs[0, 2], outputs[1, 0]]))


@pytest.mark.parametrize("box", [(0, 0, 3, 4), (5, 5, 5, 8), (-1, 0, 2, 2)])
def test_upsample_refuses_boxes_outside_the_crop_or_empty(box):
    if box == (0, 0, 3, 4):
        assert upsample(torch.ones(2, 2), 4, box, (3, 4)).shape == (3, 4)
        return
    with pytest.raises(AssertionError):
        upsample(torch.ones(2, 2), 4, box, (3, 3))


def test_a_constant_map_stays_exactly_constant():
    """A linear layer's 1x1 map: every pixel is the value itself, so a mask at a threshold equal
    to it is empty (float rounding in the resizes would otherwise straddle it)."""
    value = torch.tensor([[0.8805272579193115]])
    heat = upsample(value, 224, (56, 15, 224, 224), (221, 220))
    assert (heat == value.item()).all()
    assert not mask(heat, value.item()).any()
