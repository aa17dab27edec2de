"""Tests for pipeline.net.receptive_field: known values, a gradient oracle, hypothesis conv stacks.

Gradient oracle: make a model linear and positive (conv/linear weights 1/fan_in, biases 0,
BatchNorm the identity, max pooling swapped for average pooling over the same window) and feed it
an image of ones. Every activation is then positive where the unit sees at least one pixel, so
ReLU acts as the identity, and the gradient of unit (y, x) is a sum of positive path products:
non-zero exactly at the pixels some path connects to the unit. The bounding box of that gradient
must equal `rf.box(y, x)`. Gradients are summed over channels, since after an Inception `cat`
single channels have smaller fields than the layer. Patching F.max_pool2d also reaches the
functional max pools inside Inception v3. Every layer tested this way, adaptive pooling included
(identity or 1x1 at the sizes used), matches the oracle exactly: no case needs an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.net.receptive_field import ReceptiveField, receptive_field

Box = tuple[int, int, int, int]  # (top, left, bottom, right), half-open
NO_INIT = {"aux_logits": False, "init_weights": False}  # skip the slow scipy truncated-normal init
BUILD = {"googlenet": NO_INIT, "inception_v3": NO_INIT, "vgg16": {"init_weights": False}}


@functools.cache
def positive_model(name: str) -> nn.Module:
    """A torchvision model (no weights downloaded) made linear and positive for the oracle."""
    return make_positive(torchvision.models.get_model(name, weights=None, **BUILD.get(name, {})))


def make_positive(model: nn.Module) -> nn.Module:
    """Weights 1/fan_in, biases 0, BatchNorm the identity, eval mode, no parameter gradients."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.fill_(1 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()  # mean 0, var 1
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def max_as_avg_pooling():
    """Swap F.max_pool2d (behind nn.MaxPool2d and Inception alike) for an average pool."""
    average = F.avg_pool2d

    def pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, **_):
        assert dilation in (1, (1, 1)), "average pooling has no dilation"
        return average(input, kernel_size, stride, padding, ceil_mode)

    original, F.max_pool2d = F.max_pool2d, pool
    try:
        yield
    finally:
        F.max_pool2d = original


def gradient_boxes(model: nn.Module, units: dict[str, list], size, channels: int = 3) -> dict:
    """Bounding box of the non-zero input gradient of each unit, per layer: {layer: [Box|None]}."""
    batch = max(len(u) for u in units.values())
    image = torch.ones(batch, channels, *size, requires_grad=True)  # (B, C, H, W)
    outputs = {}  # layer -> its latest output, cloned before in-place ReLUs change it

    def recorder(layer):
        return lambda module, inputs, out: outputs.__setitem__(layer, out.clone())

    hooks = [model.get_submodule(layer).register_forward_hook(recorder(layer)) for layer in units]
    try:
        with max_as_avg_pooling():
            model(image)
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: _boxes(outputs[layer], image, yx) for layer, yx in units.items()}


def _boxes(out: torch.Tensor, image: torch.Tensor, units: list) -> list[Box | None]:
    vector = out.dim() == 2  # (B, F) after flatten, else (B, C, h, w)
    picks = [out[b].sum() if vector else out[b, :, y, x].sum() for b, (y, x) in enumerate(units)]
    (grad,) = torch.autograd.grad(sum(picks), image, retain_graph=True)  # (B, C, H, W)
    return [bounding_box(g.abs().sum(0) > 0) for g in grad[: len(units)]]


def bounding_box(mask: torch.Tensor) -> Box | None:
    """Half-open box of the True pixels of an (H, W) mask; None when there are none."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()  # (r,), (c,)
    if len(rows) == 0:
        return None
    return rows[0].item(), cols[0].item(), rows[-1].item() + 1, cols[-1].item() + 1


def probe_units(rf: ReceptiveField) -> list[tuple[int, int]]:
    """Centre, corners and edge midpoints of the layer's map, without repeats."""
    h, w = rf.output_size
    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
    return list(dict.fromkeys([(h // 2, w // 2), *corners, (0, w // 2), (h // 2, 0)]))


def analytic_box(rf: ReceptiveField, y: int, x: int) -> Box | None:
    top, left, bottom, right = rf.box(y, x)
    return None if top >= bottom or left >= right else (top, left, bottom, right)


# --- known values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer", "size", "stride"),
    [("alexnet", "features.10", 163, 16), ("vgg16", "features.30", 212, 32)]
    + [("resnet50", "layer4", 427, 32), ("resnet18", "layer4", 435, 32)],
)
def test_known_sizes(name, layer, size, stride):
    rf = receptive_field(positive_model(name), layer)
    assert (rf.size, rf.stride, rf.input_size) == ((size, size), (stride, stride), (224, 224))


def test_alexnet_conv5_span_and_boxes():
    rf = receptive_field(positive_model("alexnet"), "features.10")
    assert rf.padding == (66, 66) and rf.output_size == (13, 13)
    assert rf.box(6, 6) == (30, 30, 193, 193)  # 6*16 - 66 = 30, 30 + 163 = 193
    assert rf.box(0, 12) == (0, 126, 97, 224)  # clipped at the top and the right


# --- gradient oracle on torchvision models ----------------------------------------------------

ORACLE_CASES = [
    ("alexnet", (224, 224), ["features.0", "features.2", "features.5", "features.10", "avgpool"]),
    ("alexnet", (160, 192), ["features.3", "features.10", "features.12", "classifier.1"]),
    ("vgg16", (72, 104), ["features.4", "features.16", "features.30"]),
    ("resnet18", (224, 224), ["maxpool", "layer2.0", "fc"]),
    ("resnet18", (97, 113), ["layer1.0.conv1", "layer2.0.downsample", "layer3.1.conv2", "layer4"]),
    ("resnet50", (64, 80), ["layer1.2.conv2", "layer2.0", "layer4"]),
    ("googlenet", (64, 80), ["maxpool2", "inception3b", "inception5b"]),
    ("inception_v3", (79, 87), ["Mixed_5b", "Mixed_6a", "Mixed_7c"]),
    ("squeezenet1_1", (80, 96), ["features.2", "features.4", "features.8", "features.12"]),
    ("shufflenet_v2_x0_5", (64, 80), ["stage2", "stage3.0", "conv5"]),  # chunk, views, transpose
]


@pytest.mark.parametrize(("name", "size", "layers"), ORACLE_CASES)
def test_boxes_match_gradient_oracle(name, size, layers):
    model = positive_model(name)
    fields = {layer: receptive_field(model, layer, size) for layer in layers}
    units = {layer: probe_units(rf) for layer, rf in fields.items()}
    oracle = gradient_boxes(model, units, size)
    for layer, rf in fields.items():
        got = [analytic_box(rf, y, x) for y, x in units[layer]]
        assert got == oracle[layer], f"{name} {layer} at {size}, units {units[layer]}"


def test_layers_without_spatial_dims_see_the_whole_input():
    rf = receptive_field(positive_model("resnet18"), "fc", (97, 113))
    assert (rf.size, rf.stride, rf.padding) == ((97, 113), (97, 113), (0, 0))
    assert rf.output_size == (1, 1)
    assert rf.box(0, 0) == (0, 0, 97, 113)


@pytest.mark.parametrize(("name", "layer"), [("resnet50", "layer3"), ("googlenet", "inception4e")])
def test_boxes_are_the_clipped_span_when_no_unit_sees_padding_only(name, layer):
    rf = receptive_field(positive_model(name), layer, (192, 256))
    for y in range(rf.output_size[0]):
        for x in range(rf.output_size[1]):
            top, left = y * rf.stride[0] - rf.padding[0], x * rf.stride[1] - rf.padding[1]
            bottom, right = top + rf.size[0], left + rf.size[1]
            assert rf.box(y, x) == (max(top, 0), max(left, 0), min(bottom, 192), min(right, 256))


def test_boxes_drop_pixels_reached_only_through_padding():
    # conv 3/2 on 6 px: units see [0, 3) and [2, 5), pixel 5 is dropped; conv 3/1 pad 1 on top
    model = nn.Sequential(nn.Conv2d(1, 1, 3, 2), nn.Conv2d(1, 1, 3, 1, 1))
    rf = receptive_field(model, "1", (6, 6))
    assert (rf.size, rf.stride, rf.padding, rf.output_size) == ((7, 7), (2, 2), (2, 2), (2, 2))
    assert rf.box(1, 1) == (0, 0, 5, 5)  # the span [0, 7) clipped is [0, 6), but 5 is never read


# --- hypothesis: random conv stacks and two-branch merges -------------------------------------


@st.composite
def windows(draw) -> nn.Module:
    """One conv or pooling layer with drawn kernel, stride, padding, dilation / ceil mode."""
    kind = draw(st.sampled_from(["conv", "max", "avg"]))
    k, s = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    if kind == "conv":
        padding, dilation = draw(st.integers(0, 3)), draw(st.integers(1, 3))
        return nn.Conv2d(1, 1, k, s, padding=padding, dilation=dilation)
    pool = nn.MaxPool2d if kind == "max" else nn.AvgPool2d
    return pool(k, s, padding=draw(st.integers(0, k // 2)), ceil_mode=draw(st.booleans()))


STACKS = st.lists(windows(), min_size=1, max_size=4)
BRANCHES = st.lists(windows(), min_size=1, max_size=3)
SIZES = st.tuples(st.integers(4, 18), st.integers(4, 18))


class Merge(nn.Module):
    """Two branches over the same input, added or concatenated along channels."""

    def __init__(self, a: nn.Module, b: nn.Module, how: str) -> None:
        super().__init__()
        self.a, self.b, self.how = a, b, how

    def forward(self, x):
        a, b = self.a(x), self.b(x)  # (N, 1, h, w) each
        return a + b if self.how == "add" else torch.cat([a, b], 1)


def output_shape(model: nn.Module, size) -> torch.Size | None:
    """Output shape of `model` on a (1, 1, H, W) input; None when some layer has no output left."""
    try:
        with torch.no_grad():
            return model(torch.zeros(1, 1, *size)).shape
    except RuntimeError:
        return None


def assert_all_units_match(model: nn.Module, layer: str, size) -> None:
    rf = receptive_field(model, layer, size)
    units = [(y, x) for y in range(rf.output_size[0]) for x in range(rf.output_size[1])]
    oracle = gradient_boxes(model, {layer: units}, size, channels=1)[layer]
    assert [analytic_box(rf, y, x) for y, x in units] == oracle


@settings(max_examples=50, deadline=None)
@given(layers=STACKS, size=SIZES)
def test_conv_stacks_match_gradient_oracle(layers, size):
    model = make_positive(nn.Sequential(*layers))
    assume(output_shape(model, size) is not None)
    assert_all_units_match(model, str(len(layers) - 1), size)


def sees_pixels_everywhere(model: nn.Module, layer: str, size) -> bool:
    """Whether no unit of `layer` sees padding only: the condition for exact boxes at merges."""
    return all(
        start < end for axis in receptive_field(model, layer, size).spans for start, end in axis
    )


def total_stride(stack: list[nn.Module]) -> int:
    return math.prod(m.stride if isinstance(m.stride, int) else m.stride[0] for m in stack)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(a=BRANCHES, b=BRANCHES, size=SIZES, how=st.sampled_from(["add", "cat"]))
def test_merged_branches_match_gradient_oracle(a, b, size, how):
    model = make_positive(nn.Sequential(Merge(nn.Sequential(*a), nn.Sequential(*b), how)))
    shapes = output_shape(model[0].a, size), output_shape(model[0].b, size)
    assume(None not in shapes and shapes[0] == shapes[1])
    assume(
        sees_pixels_everywhere(model, "0.a", size) and sees_pixels_everywhere(model, "0.b", size)
    )
    if total_stride(a) != total_stride(b):
        with pytest.raises(ValueError, match="strides"):
            receptive_field(model, "0", size)
        return
    assert_all_units_match(model, "0", size)


# --- other architectures, policies and errors ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer", "stride", "side"),
    [("densenet121", "features.denseblock4", 32, 7), ("mnasnet0_5", "layers.16", 32, 7)]
    + [("mobilenet_v3_small", "features.12", 32, 7), ("efficientnet_b0", "features.8", 32, 7)]
    + [("regnet_y_400mf", "trunk_output", 32, 7), ("convnext_tiny", "features.7", 32, 7)],
)
def test_other_torchvision_cnns_trace(name, layer, stride, side):
    """Smoke test: dense cat, permute + Linear (ConvNeXt), SE gates, means over H and W trace.

    Their hardswish, SiLU, sigmoid gates and LayerNorm break the positive linear oracle.
    """
    rf = receptive_field(torchvision.models.get_model(name, weights=None), layer)
    assert rf.stride == (stride, stride) and rf.output_size == (side, side)
    top, left, bottom, right = rf.box(side // 2, side // 2)
    assert top <= 112 < bottom and left <= 112 < right


class Gated(nn.Module):
    """A squeeze-and-excitation style gate: x times a per-channel scale computed from all of x."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 1, 3), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.conv(x)  # (N, 1, h, w)
        return x * torch.sigmoid(self.pool(x))  # (N, 1, 1, 1) broadcast over the map


def test_broadcast_gates_do_not_widen_the_field():
    model = nn.Sequential(Gated())
    gated, conv = receptive_field(model, "0", (16, 16)), receptive_field(model, "0.conv", (16, 16))
    assert dataclasses.replace(gated, layer="0.conv") == conv


def test_merging_different_strides_raises():
    branches = Merge(nn.Conv2d(1, 1, 5), nn.Conv2d(1, 1, 2, stride=2), "add")  # 8 px -> 4 px each
    model = nn.Sequential(branches, nn.ReLU())
    assert receptive_field(model, "0.b", (8, 8)).stride == (2, 2)
    with pytest.raises(ValueError, match=re.escape("strides [1, 2]")):
        receptive_field(model, "1", (8, 8))


def test_ops_we_cannot_follow_raise_until_the_map_is_flattened():
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2), nn.ReLU())
    model.append(nn.Flatten()).append(nn.Linear(144, 2))
    with pytest.raises(ValueError, match=re.escape("cannot follow node '_1' (Upsample)")):
        receptive_field(model, "2", (8, 8))
    assert receptive_field(model, "4", (8, 8)).box(0, 0) == (0, 0, 8, 8)


def test_unequal_adaptive_bins_raise_but_later_global_layers_work():
    model = positive_model("alexnet")
    with pytest.raises(ValueError, match="unequal bins"):
        receptive_field(model, "avgpool", (160, 192))  # a 4x5 map pooled to 6x6
    assert receptive_field(model, "classifier.1", (160, 192)).box(0, 0) == (0, 0, 160, 192)


def test_unknown_layer_lists_close_names():
    with pytest.raises(ValueError, match=re.escape("'layer4.1.conv2'")):
        receptive_field(positive_model("resnet18"), "layer4.1.conv3")


@pytest.mark.parametrize(("y", "x"), [(13, 0), (0, 13), (-1, 0)])
def test_box_outside_the_map_raises(y, x):
    rf = receptive_field(positive_model("alexnet"), "features.10")
    with pytest.raises(ValueError, match=r"0 <= y < 13, 0 <= x < 13"):
        rf.box(y, x)


def test_a_reused_module_is_described_by_its_last_call():
    model = positive_model("resnet18")  # layer1.0.relu runs twice, last after the residual add
    relu, block = receptive_field(model, "layer1.0.relu"), receptive_field(model, "layer1.0")
    assert dataclasses.replace(relu, layer="layer1.0") == block


def test_training_flags_are_restored():
    model = torchvision.models.resnet18(weights=None).train()
    model.layer1.eval()
    receptive_field(model, "layer2")
    assert model.training and not model.layer1.training and model.layer2.training
