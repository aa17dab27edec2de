"""Tests for pipeline/deconv.py: captum's NeuronDeconvolution as oracle, a hand-computed tiny
model, functional vs module ReLUs, the model left untouched, and validation errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage import data, transform
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.export.deconv import project

captum_attr = pytest.importorskip("captum.attr")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # (3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)  # (3, 1, 1)
PHOTOS = ("astronaut", "coffee", "chelsea")


def photos(size: int) -> Tensor:
    """skimage photographs resized to size x size and ImageNet-normalised, (3, 3, size, size)."""
    images = []
    for name in PHOTOS:
        pixels = transform.resize(getattr(data, name)(), (size, size), anti_aliasing=True)
        image = torch.from_numpy(pixels).float().permute(2, 0, 1)  # (3, size, size) in [0, 1]
        images.append((image - MEAN) / STD)
    return torch.stack(images)  # (3, 3, size, size)


def layer_output(model: nn.Module, layer: str, images: Tensor) -> Tensor:
    """The plain (eval, no grad) output of `layer`, cloned before in-place ReLUs touch it."""
    outputs = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out.clone()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return outputs[0]  # (B, C, H, W) or (B, C)


def positive_choices(output: Tensor, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample a random unit among those with a positive activation, at its spatial argmax."""
    generator = torch.Generator().manual_seed(seed)
    maxima, where = output.flatten(2).max(dim=2)  # (B, C), (B, C)
    units = torch.stack(
        [torch.multinomial((m > 0).float(), 1, generator=generator)[0] for m in maxima]
    )
    flat = where[torch.arange(len(units)), units]  # (B,)
    width = output.shape[3]
    return units, flat // width, flat % width  # (B,) each


def captum_deconv(model: nn.Module, layer: str, image: Tensor, neuron: tuple) -> Tensor:
    """captum's NeuronDeconvolution of one neuron (seed 1) for one image, (C, H, W)."""
    module = dict(model.named_modules())[layer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum warns about setting requires_grad and ReLU hooks
        attribution = captum_attr.NeuronDeconvolution(model, module).attribute(image[None], neuron)
    return attribution[0]  # (C, H, W)


def assert_matches_captum(model: nn.Module, layer: str, images: Tensor, choices: tuple) -> None:
    """Batched projections agree per sample with captum's one-sample oracle (cosine >= 0.999)."""
    projections, activations = project(model, layer, images, *choices, return_activations=True)
    assert projections.shape == images.shape
    linear = isinstance(dict(model.named_modules())[layer], nn.Linear)
    for b, neuron in enumerate(zip(*[c.tolist() for c in choices], strict=True)):
        neuron = neuron[:1] if linear else neuron  # captum selects (unit,) in a (B, C) output
        expected = captum_deconv(model, layer, images[b], neuron)  # (C, H, W)
        cosine = F.cosine_similarity(projections[b].flatten(), expected.flatten(), dim=0)
        assert cosine >= 0.999, (layer, b, float(cosine))
        scale = projections[b].norm() / expected.norm()  # seed = activation, captum's seed = 1
        assert torch.allclose(scale, activations[b], rtol=1e-3)


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.mark.parametrize(("layer", "size"), [("features.3", 224), ("features.10", 224)])
def test_alexnet_matches_captum(alexnet: nn.Module, layer: str, size: int) -> None:
    images = photos(size)  # (3, 3, size, size)
    choices = positive_choices(layer_output(alexnet, layer, images))
    assert_matches_captum(alexnet, layer, images, choices)


def test_vgg16_matches_captum() -> None:
    torch.manual_seed(2)
    model = torchvision.models.vgg16(weights=None).eval()
    images = photos(64)  # (3, 3, 64, 64)
    choices = positive_choices(layer_output(model, "features.16", images))
    assert_matches_captum(model, "features.16", images, choices)


@pytest.mark.parametrize("layer", ["layer2.1", "layer3.0.conv1"])
def test_resnet18_matches_captum(resnet18: nn.Module, layer: str) -> None:
    images = photos(96)  # (3, 3, 96, 96)
    choices = positive_choices(layer_output(resnet18, layer, images))
    assert_matches_captum(resnet18, layer, images, choices)


def test_activations_are_the_layer_values(alexnet: nn.Module) -> None:
    images = photos(224)  # (3, 3, 224, 224)
    output = layer_output(alexnet, "features.10", images)  # (3, 256, 13, 13)
    units, ys, xs = positive_choices(output, seed=3)
    _, activations = project(alexnet, "features.10", images, units, ys, xs, return_activations=True)
    assert torch.allclose(activations, output[torch.arange(3), units, ys, xs], rtol=1e-4)


def test_batched_equals_one_at_a_time(resnet18: nn.Module) -> None:
    """Samples are independent: one batched call equals B calls of one sample (eval BatchNorm)."""
    images = photos(64)  # (3, 3, 64, 64)
    units, ys, xs = positive_choices(layer_output(resnet18, "layer2.0", images), seed=7)
    batched = project(resnet18, "layer2.0", images, units, ys, xs)  # (3, 3, 64, 64)
    for b in range(3):
        one = project(
            resnet18, "layer2.0", images[b : b + 1], units[b : b + 1], ys[b : b + 1], xs[b : b + 1]
        )
        assert batched[b].abs().sum() > 0 and torch.allclose(batched[b], one[0], atol=1e-6)


def test_deconvnet_is_not_the_gradient(alexnet: nn.Module) -> None:
    """The ReLU rule is active: the projection differs from the plain gradient."""
    images = photos(224)[:1]  # (1, 3, 224, 224)
    units, ys, xs = positive_choices(layer_output(alexnet, "features.10", images))
    pixels = images.clone().requires_grad_(True)  # (1, 3, 224, 224)
    output = alexnet.features[:11](pixels)  # (1, 256, 13, 13)
    (gradient,) = torch.autograd.grad(output[0, units[0], ys[0], xs[0]], pixels)  # (1, 3, 224, 224)
    projection = project(alexnet, "features.10", images, units, ys, xs)  # (1, 3, 224, 224)
    assert F.cosine_similarity(gradient.flatten(), projection.flatten(), dim=0) < 0.9


class Tiny(nn.Module):
    """1x1 identity conv, ReLU, 2x2 conv with kernel K, ReLU, 2x2 max-pool; one channel."""

    KERNEL = ((1.0, -2.0), (3.0, 0.5))

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(1, 1, 2, bias=False)
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv2.weight.copy_(torch.tensor(self.KERNEL).view(1, 1, 2, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.relu(self.conv2(F.relu(self.conv1(x)))))


def test_tiny_model_by_hand() -> None:
    # h = relu(x); c = conv2(h) with K = [[1, -2], [3, 0.5]] is, in pool window (0, 0):
    #   c[0,0] = 0.5, c[0,1] = 3.5, c[1,0] = -1, c[1,1] = 1 - 2 + 6 + 0 = 5 -> switch (1, 1), a = 5
    # Deconvnet: unpool 5 at (1, 1); relu(5) = 5; transposed K puts 5 * K = [[5, -10], [15, 2.5]]
    # on rows/cols 1-2; the first ReLU rectifies the signal -> [[5, 0], [15, 2.5]], and keeps 2.5
    # at (2, 2) although x[2, 2] = -1 was inactive (the gradient would give [[5, -10], [15, 0]]).
    x = torch.zeros(5, 5)  # (5, 5)
    x[1, 1:3] = torch.tensor([1.0, 1.0])
    x[2, 1:3] = torch.tensor([2.0, -1.0])
    expected = torch.zeros(5, 5)  # (5, 5)
    expected[1:3, 1:3] = torch.tensor([[5.0, 0.0], [15.0, 2.5]])
    shifted = x.roll((2, 2), (0, 1))  # (5, 5) the same pattern, read at pool cell (1, 1)
    images = torch.stack([x, shifted, x])[:, None]  # (3, 1, 5, 5)
    cells = torch.tensor([0, 1, 1])  # (3,) sample 2 reads cell (1, 1) of x: all zeros there
    projections, activations = project(
        Tiny(),
        "pool",
        images,
        torch.zeros(3, dtype=torch.long),
        cells,
        cells,
        return_activations=True,
    )  # (3, 1, 5, 5), (3,)
    assert torch.equal(activations, torch.tensor([5.0, 5.0, 0.0]))
    assert torch.equal(projections[0, 0], expected)
    assert torch.equal(projections[1, 0], expected.roll((2, 2), (0, 1)))
    assert torch.equal(projections[2, 0], torch.zeros(5, 5))


class Functional(nn.Module):
    """Every functional ReLU form, in-place ones included (one of them discards its result)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8, 8, 8, 8, 8))
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        c = self.convs
        x = F.relu(c[0](x))
        x = F.max_pool2d(torch.relu(c[1](x)), 2)
        x = c[2](x).relu()
        x = F.relu(c[3](x), inplace=True)
        x = c[4](x)
        x.relu_()  # result discarded: the model relies on the mutation
        x = F.max_pool2d(torch.relu_(c[5](x)), 2)
        x = F.relu_(c[6](x))
        return self.fc(x.flatten(1))


class Modules(nn.Module):
    """The same network with `nn.ReLU` modules (in-place and not) and the same parameter names."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8, 8, 8, 8, 8))
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.relus = nn.ModuleList(nn.ReLU(inplace=i % 2 == 1) for i in range(7))

    def forward(self, x: Tensor) -> Tensor:
        for i, (conv, relu) in enumerate(zip(self.convs, self.relus, strict=True)):
            x = relu(conv(x))
            x = F.max_pool2d(x, 2) if i in (1, 5) else x
        return self.fc(x.flatten(1))


def twins() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(4)
    functional = Functional().eval()
    modules = Modules().eval()
    modules.load_state_dict(functional.state_dict())
    return functional, modules


@pytest.mark.parametrize("layer", ["convs.5", "fc"])
def test_functional_relus_match_modules_and_captum(layer: str) -> None:
    functional, modules = twins()
    images = photos(16)  # (3, 3, 16, 16)
    output = layer_output(modules, layer, images)  # (3, 8, 8, 8) or (3, 10)
    assert torch.allclose(output, layer_output(functional, layer, images))
    if output.dim() == 2:
        units = output.argmax(dim=1)  # (3,)
        choices = (units, torch.zeros_like(units), torch.zeros_like(units))
        assert (output[torch.arange(3), units] > 0).all()
    else:
        choices = positive_choices(output)
    via_functions = project(functional, layer, images, *choices)  # (3, 3, 16, 16)
    via_modules = project(modules, layer, images, *choices)  # (3, 3, 16, 16)
    assert torch.allclose(via_functions, via_modules, atol=1e-6)
    assert_matches_captum(modules, layer, images, choices)


def test_inplace_relu_on_the_input() -> None:
    """A model that rectifies its input in place works and leaves the caller's images alone."""
    torch.manual_seed(6)
    inplace = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
    plain = nn.Sequential(nn.ReLU(), inplace[1], nn.ReLU())
    images = photos(16)  # (3, 3, 16, 16) with negative values
    images_before = images.clone()  # (3, 3, 16, 16)
    choices = positive_choices(layer_output(plain, "2", images))
    assert torch.allclose(
        project(inplace, "2", images, *choices), project(plain, "2", images, *choices)
    )
    assert torch.equal(images, images_before)


def snapshot(model: nn.Module) -> dict:
    """Everything `project` must leave as it was."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for module in model.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            assert not getattr(module, hooks), (module, hooks)
        assert not module._backward_pre_hooks
    assert all(p.grad is None for p in model.parameters())
    assert torch._C._len_torch_function_stack() == 0  # the ReLU mode has been exited


class RaisesBefore(nn.Module):
    """ResNet-18 whose forward raises after `layer1` ran, before `layer2`."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.resnet = resnet

    def forward(self, x: Tensor) -> Tensor:
        r = self.resnet
        x = r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))
        raise RuntimeError("boom")


def mixed_resnet() -> nn.Module:
    """ResNet-18 in training mode except one block, with one frozen parameter."""
    torch.manual_seed(5)
    model = torchvision.models.resnet18(weights=None).train()
    model.layer2[0].eval()
    model.conv1.weight.requires_grad_(False)
    return model


def test_model_untouched_after_success() -> None:
    model = mixed_resnet()
    before = snapshot(model)
    images = photos(64)  # (3, 3, 64, 64)
    images_before = images.clone()  # (3, 3, 64, 64)
    index = torch.tensor([1, 2, 3])
    project(model, "layer2.1", images, index, index, index)
    assert_untouched(model, before)  # BatchNorm running stats included: eval inside
    assert torch.equal(images, images_before)
    with torch.inference_mode():  # an export step may call it from inference mode
        inferred = project(model, "layer2.1", images.clone(), index, index, index)
    assert torch.allclose(inferred, project(model, "layer2.1", images, index, index, index))
    assert_untouched(model, before)


def test_model_untouched_after_errors() -> None:
    model = mixed_resnet()
    before = snapshot(model)
    images = photos(32)  # (3, 3, 32, 32)
    zero = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="unit"):  # raised after the forward, before backward
        project(model, "layer2.1", images, zero + 999, zero, zero)
    assert_untouched(model, before)
    wrapped = RaisesBefore(model)
    before = snapshot(wrapped)
    with pytest.raises(RuntimeError, match="boom"):  # raised inside the forward, hooks in place
        project(wrapped, "resnet.layer2.0", images, zero, zero, zero)
    assert_untouched(wrapped, before)
    # The forward stops at the layer, so a failure after it is never reached.
    assert project(wrapped, "resnet.layer1.1", images, zero, zero, zero).shape == images.shape
    assert_untouched(wrapped, before)


def test_validation_errors(alexnet: nn.Module) -> None:
    images = torch.zeros(2, 3, 64, 64)  # (2, 3, 64, 64)
    zero = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="'features.10'"):
        project(alexnet, "feature.10", images, zero, zero, zero)
    with pytest.raises(ConfigError, match=r"unit must be in \[0, 255\]"):
        project(alexnet, "features.10", images, zero + 256, zero, zero)
    with pytest.raises(ValueError, match=r"y must be in \[0, 2\]"):  # 64x64 input: 3x3 map
        project(alexnet, "features.10", images, zero, zero + 3, zero)
    with pytest.raises(ValueError, match=r"x must be in \[0, 2\]"):
        project(alexnet, "features.10", images, zero, zero, zero - 1)
    with pytest.raises(ValueError, match=r"y must be in \[0, 0\]"):  # Linear: ys, xs must be 0
        project(alexnet, "classifier.6", images, zero, zero + 1, zero)
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        project(alexnet, "features.10", images, zero[:1], zero, zero)
    with pytest.raises(ValueError, match="integer"):
        project(alexnet, "features.10", images, zero.float(), zero, zero)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        project(alexnet, "features.10", images[0], zero, zero, zero)
    tiny = Tiny()
    tiny.spare = nn.ReLU()  # registered but never called by forward
    with pytest.raises(ValueError, match="not called"):
        project(tiny, "spare", torch.zeros(2, 1, 5, 5), zero, zero, zero)
