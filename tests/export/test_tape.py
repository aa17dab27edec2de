"""The forward tape: which rule each op is recorded under, and what the backward may not follow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.export.tape import INPUT, Tape


def record(fn, pixels: torch.Tensor) -> Tape:
    pixels = pixels.clone()
    with Tape(pixels) as tape, torch.no_grad():
        fn(pixels)
    return tape


def test_a_conv_net_is_recorded_rule_by_rule_with_sizes_and_switches():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, stride=2), nn.AvgPool2d(2), nn.Dropout(),
    ).eval()  # fmt: skip
    tape = record(net, torch.randn(2, 3, 16, 16))
    assert [s.rule for s in tape.steps] == ["conv", "scale", "relu", "pool", "conv", "conv", "same"]
    assert tape.steps[0].inputs == (INPUT,) and tape.mutated == ""
    assert [tape.sizes[s.output] for s in tape.steps] == [
        (16, 16), (16, 16), (16, 16), (8, 8), (3, 3), (1, 1), (1, 1),
    ]  # fmt: skip
    pool = tape.steps[3].params
    assert pool["switches"].shape == (2, 4, 8, 8) and pool["width"] == 16
    assert tape.steps[5].params["groups"] == 5  # average pooling as a depthwise convolution


def test_residual_sums_concatenations_and_constants():
    def forward(x):
        y = F.relu(x)
        z = torch.cat([x + y, 2 * y], dim=1)  # add of two traced maps, scale by a number
        return z + 1.0  # a constant: the same map

    tape = record(forward, torch.randn(1, 2, 4, 4))
    assert [s.rule for s in tape.steps] == ["relu", "add", "scale", "cat", "same"]
    assert tape.steps[2].params == {"factor": 2.0}
    assert tape.steps[3].params == {"channels": [2, 2]}


def test_ops_without_a_rule_are_opaque_and_untraceable_changes_are_named():
    tape = record(lambda x: torch.sigmoid(x) * x, torch.randn(1, 2, 4, 4))
    assert [s.rule for s in tape.steps] == ["opaque", "opaque"]  # a gate: two traced factors
    assert tape.steps[0].params["name"].endswith("sigmoid") and tape.mutated == ""

    training = record(lambda x: F.dropout(x, 0.5, training=True), torch.randn(1, 2, 4, 4))
    assert [s.rule for s in training.steps] == ["opaque"]

    def view_changed(x):
        x[:, :1].mul_(2.0)  # an in-place change through a view reaches x itself

    assert record(view_changed, torch.randn(1, 2, 4, 4)).mutated != ""


def test_constants_are_not_traced():
    weight = torch.randn(3, 3, 1, 1)
    tape = record(lambda x: F.conv2d(torch.ones(1, 3, 4, 4), weight) + x, torch.randn(1, 3, 4, 4))
    assert [s.rule for s in tape.steps] == ["same"]  # only the sum touches the input
    assert tape.steps[0].inputs == (INPUT,)
