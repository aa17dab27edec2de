"""Tests for pipeline/cone.py: `project_rows` against `deconv.project` (the autograd oracle) and
captum, on torchvision networks and a hand-built network with every rule on odd geometry; the
fallback for ops without a rule; the model and inputs left untouched; validation errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.export import cone
from pipeline.export.cone import _transpose_by_phases, project_rows
from pipeline.export.deconv import project
from tests.export.test_deconv import (
    Tiny,
    assert_untouched,
    captum_deconv,
    layer_output,
    mixed_resnet,
    photos,
    positive_choices,
    snapshot,
    twins,
)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if `project_rows` falls back to `deconv.project`: the cone path must be exercised."""

    def refuse(*args, **kwargs):
        raise AssertionError("project_rows fell back to deconv.project")

    monkeypatch.setattr(cone, "project", refuse)


def count_fallbacks(monkeypatch) -> list[int]:
    """A list that grows by one each time `project_rows` falls back to `deconv.project`."""
    calls: list[int] = []
    monkeypatch.setattr(cone, "project", lambda *a, **k: calls.append(1) or project(*a, **k))
    return calls


def random_rows(output: Tensor, count: int, seed: int) -> tuple[Tensor, ...]:
    """(which, unit, y, x) rows over the images of `output` (N, K, h, w), corners included."""
    generator = torch.Generator().manual_seed(seed)
    n, k, h, w = output.shape
    which, units = (torch.randint(0, m, (count,), generator=generator) for m in (n, k))  # (R,)
    ys, xs = torch.randint(0, h, (count,), generator=generator), torch.randint(0, w, (count,))
    ys[:2], xs[:2] = torch.tensor([0, h - 1]), torch.tensor([0, w - 1])  # two corners
    return which, units, ys, xs


def assert_equals_project(model: nn.Module, layer: str, images: Tensor, rows: tuple) -> None:
    """project_rows == project on each row's image, up to float rounding."""
    which, units, ys, xs = rows
    got, acts = project_rows(model, layer, images, which, units, ys, xs)
    want, want_acts = project(model, layer, images[which], units, ys, xs, return_activations=True)
    assert got.shape == want.shape == (len(which), *images.shape[1:])
    scale = want.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-30)  # (R, 1, 1, 1)
    assert torch.allclose(got / scale, want / scale, atol=1e-5), (layer, (got - want).abs().max())
    assert torch.allclose(acts, want_acts, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "layer", ["features.0", "features.3", "features.5", "features.10", "features.12"]
)
def test_alexnet_equals_project(layer: str, no_fallback) -> None:
    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    images = photos(224)  # (3, 3, 224, 224)
    rows = random_rows(layer_output(model, layer, images), 10, seed=1)
    assert_equals_project(model, layer, images, rows)


@pytest.mark.parametrize(
    ("name", "layer", "size"),
    [
        ("vgg16", "features.16", 64),
        ("resnet18", "layer1.0", 96),
        ("resnet18", "layer2.1", 96),
        ("resnet18", "layer3.0.conv1", 96),
        ("resnet18", "layer4", 96),
        ("googlenet", "inception4a", 128),  # concatenated branches, ceil-mode pools
        ("inception_v3", "Mixed_5b", 160),  # average pooling in a branch
    ],
)
def test_torchvision_equals_project(name: str, layer: str, size: int, no_fallback) -> None:
    torch.manual_seed(2)
    extra = {"aux_logits": False, "init_weights": False} if name.startswith(("goo", "inc")) else {}
    model = torchvision.models.get_model(name, weights=None, **extra).eval()
    images = photos(size)  # (3, 3, size, size)
    rows = random_rows(layer_output(model, layer, images), 8, seed=3)
    assert_equals_project(model, layer, images, rows)


def test_alexnet_matches_captum(no_fallback) -> None:
    """Two rows per image (captum's seed is 1, ours the activation, as in test_deconv)."""
    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    images = photos(224)  # (3, 3, 224, 224)
    output = layer_output(model, "features.10", images)  # (3, 256, 13, 13)
    first, second = positive_choices(output, 0), positive_choices(output, 1)
    choices = [torch.cat(pair) for pair in zip(first, second, strict=True)]  # units, ys, xs (6,)
    which = torch.tensor([0, 1, 2, 0, 1, 2])  # (6,)
    projections, activations = project_rows(model, "features.10", images, which, *choices)
    for r, neuron in enumerate(zip(*[c.tolist() for c in choices], strict=True)):
        expected = captum_deconv(model, "features.10", images[which[r]], neuron)  # (3, 224, 224)
        cosine = F.cosine_similarity(projections[r].flatten(), expected.flatten(), dim=0)
        assert cosine >= 0.999, (r, float(cosine))
        scale = projections[r].norm() / expected.norm()
        assert torch.allclose(scale, activations[r], rtol=1e-3)


def test_tiny_model_by_hand(no_fallback) -> None:
    """The hand-computed deconvnet of test_deconv's Tiny model, rows sharing one image."""
    x = torch.zeros(5, 5)  # (5, 5) as in test_deconv.test_tiny_model_by_hand
    x[1, 1:3] = torch.tensor([1.0, 1.0])
    x[2, 1:3] = torch.tensor([2.0, -1.0])
    expected = torch.zeros(5, 5)  # (5, 5)
    expected[1:3, 1:3] = torch.tensor([[5.0, 0.0], [15.0, 2.5]])
    images = torch.stack([x, x.roll((2, 2), (0, 1))])[:, None]  # (2, 1, 5, 5)
    which, cells = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1])  # (3,)
    zeros = torch.zeros(3, dtype=torch.long)
    projections, activations = project_rows(Tiny(), "pool", images, which, zeros, cells, cells)
    assert torch.equal(activations, torch.tensor([5.0, 5.0, 0.0]))
    assert torch.equal(projections[0, 0], expected)
    assert torch.equal(projections[1, 0], expected.roll((2, 2), (0, 1)))
    assert torch.equal(projections[2, 0], torch.zeros(5, 5))


def test_every_relu_form(no_fallback) -> None:
    """Functional, method, in-place and module ReLUs (test_deconv's twins) all follow the rule."""
    functional, modules = twins()
    images = photos(16)  # (3, 3, 16, 16)
    rows = random_rows(layer_output(modules, "convs.5", images), 12, seed=4)
    assert_equals_project(functional, "convs.5", images, rows)
    assert_equals_project(modules, "convs.5", images, rows)


def test_inplace_relu_on_the_input(no_fallback) -> None:
    """A model that rectifies its input in place: the caller's images are left alone."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
    images = photos(16)  # (3, 3, 16, 16) with negative values
    rows = random_rows(layer_output(model, "2", images.clone()), 6, seed=8)
    images_before = images.clone()  # (3, 3, 16, 16)
    assert_equals_project(model, "2", images, rows)
    assert torch.equal(images, images_before)


class Odd(nn.Module):
    """Every rule on odd geometry: strided, non-square, dilated and grouped convolutions; a padded
    ceil-mode and a dilated max-pool; batch norm with real statistics; a residual sum, a product
    with a number, an average pool and a concatenation of two branches; in-place ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, (5, 3), stride=(2, 3), padding=(2, 1))
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.b = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3)
        self.c = nn.Conv2d(6, 4, 1)
        self.d = nn.Conv2d(6, 4, 3, padding=1)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.wide = nn.MaxPool2d(2, stride=1, dilation=2)
        self.e = nn.Conv2d(8, 5, 2, stride=2, padding=1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn(self.a(x)), inplace=True))
        x = torch.relu(x + 0.5 * self.b(x))
        x = torch.cat([self.c(x), self.avg(self.d(x))], dim=1)
        return self.e(self.wide(x.relu_()))


@pytest.fixture(scope="module")
def odd() -> nn.Module:
    torch.manual_seed(5)
    return Odd().eval()


@settings(max_examples=40, deadline=None)
@given(
    layer=st.sampled_from(["a", "bn", "pool", "b", "d", "avg", "wide", "e"]),
    height=st.integers(14, 40),
    width=st.integers(14, 40),
    seed=st.integers(0, 2**16),
)
def test_odd_geometry_equals_project(odd, layer, height, width, seed) -> None:
    torch.manual_seed(seed)
    images = torch.randn(3, 3, height, width)  # (3, 3, H, W)
    output = layer_output(odd, layer, images)  # (3, K, h, w)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cone, "project", None)  # no fallback: calling it would raise
        assert_equals_project(odd, layer, images, random_rows(output, 9, seed))


@settings(max_examples=30, deadline=None)
@given(
    stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    kernel=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
)
def test_transpose_by_phases_is_the_transposed_convolution(stride, kernel, size) -> None:
    torch.manual_seed(sum(stride + kernel + size))
    values = torch.randn(2, 4, *size)  # (R, C_out, h, w)
    weight = torch.randn(4, 3, *kernel)  # (C_out, C_in, ky, kx) as a conv2d weight
    expected = F.conv_transpose2d(values, weight, stride=stride)  # (R, 3, ly, lx)
    assert torch.allclose(_transpose_by_phases(values, weight, stride), expected, atol=1e-5)


class Gated(nn.Module):
    """A squeeze-and-excitation-like gate (a traced product) and a ReLU in place on a slice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))
        x[:, :2].relu_()  # changes x through a view
        return self.conv2(x)


def test_ops_without_a_rule_fall_back_to_project(monkeypatch) -> None:
    torch.manual_seed(6)
    model = Gated().eval()
    images = photos(16)  # (3, 3, 16, 16)
    rows = random_rows(layer_output(model, "conv2", images), 6, seed=7)
    calls = count_fallbacks(monkeypatch)
    assert_equals_project(model, "conv2", images, rows)
    assert calls == [1]
    assert_equals_project(model, "conv1", images, rows)  # before the gate: the cone path
    assert calls == [1]


class Doubled(torch.autograd.Function):
    """A custom Function: its forward doubles, its backward passes the signal through as it is."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, signal: Tensor) -> Tensor:
        return signal


class Branches(nn.Module):
    """A residual branch that is TorchScript, or a custom autograd.Function: both hide their
    backward from the tape, so project_rows must fall back rather than follow the forward."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.how = how
        self.branch = torch.jit.script(nn.Conv2d(4, 4, 1)) if how == "script" else None

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = x + (self.branch(x) if self.how == "script" else Doubled.apply(x))
        return self.conv2(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["script", "function"])
def test_code_the_tape_cannot_see_falls_back_to_project(how, monkeypatch) -> None:
    torch.manual_seed(8)
    model = Branches(how).eval()
    images = photos(16)  # (3, 3, 16, 16)
    rows = random_rows(layer_output(model, "conv2", images), 6, seed=9)
    calls = count_fallbacks(monkeypatch)
    assert_equals_project(model, "conv2", images, rows)
    assert calls == [1]


def test_linear_layers_fall_back() -> None:
    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    images = photos(224)[:2]  # (2, 3, 224, 224)
    which, units = torch.tensor([0, 1, 1]), torch.tensor([3, 5, 7])  # (3,)
    zeros = torch.zeros(3, dtype=torch.long)
    assert_equals_project(model, "classifier.4", images, (which, units, zeros, zeros))


def test_model_and_images_untouched() -> None:
    model = mixed_resnet()
    before = snapshot(model)
    images = photos(64)  # (3, 3, 64, 64)
    images_before = images.clone()  # (3, 3, 64, 64)
    index = torch.tensor([1, 2, 0, 1])
    project_rows(model, "layer2.1", images, index % 3, index, index, index)
    assert_untouched(model, before)  # training flags restored, no hooks, no grads
    assert torch.equal(images, images_before) and not hasattr(images, "_ninebest_cone")
    with torch.inference_mode():  # the export may call it from inference mode
        project_rows(model, "layer2.1", images.clone(), index % 3, index, index, index)
    assert_untouched(model, before)


def test_validation_errors() -> None:
    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    images = torch.zeros(2, 3, 64, 64)  # (2, 3, 64, 64): features.10 is 3x3
    zero = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ConfigError, match="'features.10'"):
        project_rows(model, "feature.10", images, zero, zero, zero, zero)
    with pytest.raises(
        ConfigError, match=r"which must index the 2 images, in \[0, 1\]; got \[2, 2, 2\]"
    ):
        project_rows(model, "features.10", images, zero + 2, zero, zero, zero)
    with pytest.raises(ConfigError, match=r"shape \(R,\)"):
        project_rows(model, "features.10", images, zero, zero[:2], zero, zero)
    with pytest.raises(ConfigError, match="integer"):
        project_rows(model, "features.10", images, zero, zero.float(), zero, zero)
    with pytest.raises(ConfigError, match=r"y must be in \[0, 2\]"):
        project_rows(model, "features.10", images, zero, zero, zero + 3, zero)
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        project_rows(model, "features.10", images[0], zero, zero, zero, zero)
