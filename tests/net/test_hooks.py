"""Capture: spatial maxima computed inside the forward pass; hooks never outlive the block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.net.hooks import Capture, probe, spatial_max


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_spatial_max_takes_first_maximum_in_row_major_order():
    out = torch.zeros(1, 2, 3, 4)  # (N, C, H, W)
    out[0, 0, 1, 2] = out[0, 0, 2, 0] = 5.0  # tie: (1, 2) comes first
    out[0, 1] = -1.0  # flat map: first position
    m = spatial_max("l", out)
    assert m.values.tolist() == [[5.0, -1.0]]
    assert (m.ys.tolist(), m.xs.tolist()) == ([[1, 0]], [[2, 0]])


def test_spatial_max_canonicalises_nan_and_negative_zero():
    m = spatial_max("l", torch.tensor([[float("nan"), -0.0]]))
    assert m.values[0, 0] == float("-inf")
    assert str(m.values[0, 1].item()) == "0.0"


def test_capture_sees_conv_output_before_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1))
    nn.init.constant_(model[0].bias, -100.0)  # every conv output negative: ReLU zeroes it in place
    x = torch.randn(2, 3, 8, 8)
    expected = model[0](x).flatten(2).max(dim=2).values  # (2, 4)
    with torch.inference_mode(), Capture(model, {"0": model[0]}) as cap:
        got = cap.run(x)["0"].values
    assert torch.allclose(got, expected) and (got < 0).any()


class Exploding(nn.Module):
    def forward(self, x):
        raise AssertionError("layers after the last captured one must not run")


def test_stops_after_the_deepest_layer_and_removes_hooks():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), Exploding())
    with torch.inference_mode(), Capture(model, {"0": model[0]}) as cap:
        assert cap.run(torch.randn(1, 3, 5, 5))["0"].values.shape == (1, 2)
    assert all_hooks(model) == 0


def test_hooks_removed_when_the_forward_raises():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), Exploding())
    with pytest.raises(AssertionError), Capture(model, {"1": model[1]}, stop_early=True) as cap:
        cap.run(torch.randn(1, 3, 5, 5))
    assert all_hooks(model) == 0


def test_probe_reports_shapes_and_rejects_unindexable_outputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    shapes = probe(model, {"0": model[0], "2": model[2]}, crop=7)
    assert shapes == {"0": (4, 3, 3), "2": (5,)}
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(0))
    with pytest.raises(ConfigError, match=r"outputs \(36,\).*\[N, C, H, W\] or \[N, C\]"):
        probe(flat, {"1": flat[1]}, 7)
    with pytest.raises(ConfigError, match="'unused' never ran"):
        probe(model, {"unused": nn.Identity()}, 7)
