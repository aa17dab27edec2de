"""Deconvnet projections of single activations back to pixel space (Zeiler & Fergus, 2013).

`project` takes B (image, unit, y, x) choices, runs one forward pass up to `layer`, keeps only
the chosen activation of each sample (every other activation of the layer is zeroed) and sends
it back to the input through the deconvnet of section 2.1 of the paper:

* unpooling: a max-pool's backward puts each signal at the location of the maximum recorded in
  the forward pass (the "switches");
* rectification: each ReLU passes `relu(reconstructed signal)` downwards, whatever the sign of
  its forward input was (this is what distinguishes a deconvnet from a gradient);
* filtering: a convolution's backward applies the transposed filters (biases are not used).

In autograd terms the projection is the gradient of the chosen activation with respect to the
input, with every ReLU's backward replaced by ReLU of its incoming gradient. ReLUs are swapped
during the forward by a `TorchFunctionMode` that routes `nn.ReLU`, `F.relu`, `torch.relu`,
`Tensor.relu` and their in-place variants through `DeconvReLU`, so functional calls inside a
custom `forward` and a ReLU module reused several times (ResNet blocks) are all covered; the mode
is only active during the forward, which stops once `layer` has produced its output. Other
layers (batch norm, linear, average pooling, residual sums) keep their ordinary backward, and so
do other activations (`relu6`, `leaky_relu`, `clamp`), which the paper does not have.

Seed: as in the paper, the chosen activation keeps its value, so the projection scales with the
activation (a projection with seed 1, as captum uses, times the activation). An activation of 0
projects to all zeros.

The model is left as found: eval mode is used inside and every module's `training` flag is
restored, hooks are removed, parameters are neither changed nor given a `.grad`, also when the
call raises.

`project` is the reference: autograd over full maps, any model. The export uses
`cone.project_rows`, which gives the same projections for many rows per image with one forward
per image and each backward restricted to its activation's cone, and falls back to `project`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from pipeline.errors import ConfigError
from pipeline.net.instrument import StopForward, eval_mode, find_layer, stop_after

__all__ = ["RELUS", "RELUS_INPLACE", "check_range", "project"]

RELUS = {F.relu, torch.relu, Tensor.relu}
RELUS_INPLACE = {F.relu_, torch.relu_, Tensor.relu_}


class DeconvReLU(torch.autograd.Function):
    """ReLU forward; deconvnet backward: rectify the reconstructed signal (paper, section 2.1)."""

    @staticmethod
    def forward(ctx, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)  # keeps in-place semantics: autograd checks versions as usual
            return x.relu_()  # (B, ...)
        return x.relu()  # (B, ...)

    @staticmethod
    def backward(ctx, signal: Tensor) -> tuple[Tensor, None]:
        return signal.relu(), None  # (B, ...) the forward mask is deliberately not used


class _DeconvReLUs(TorchFunctionMode):
    """Routes every ReLU call made while active through `DeconvReLU`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RELUS or func in RELUS_INPLACE:
            inplace = func in RELUS_INPLACE or bool(kwargs.get("inplace", False))
            return DeconvReLU.apply(args[0], inplace)
        return func(*args, **kwargs)


def _check_inputs(images: Tensor, units: Tensor, ys: Tensor, xs: Tensor) -> None:
    """Shapes and dtypes: images (B, C, H, W) float, units / ys / xs (B,) integer."""
    if not (isinstance(images, Tensor) and images.dim() == 4 and images.is_floating_point()):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"images must be a float tensor of shape (B, C, H, W); got {got}")
    for name, index in (("units", units), ("ys", ys), ("xs", xs)):
        if not isinstance(index, Tensor) or index.is_floating_point() or index.is_complex():
            raise ConfigError(f"{name} must be an integer tensor of shape (B,)")
        if tuple(index.shape) != (images.shape[0],):
            raise ConfigError(
                f"{name} must have shape ({images.shape[0]},) to match images of shape "
                f"{tuple(images.shape)}; got {tuple(index.shape)}"
            )


def _forward_to(model: nn.Module, module: nn.Module, layer: str, pixels: Tensor) -> Tensor:
    """Run the forward with deconvnet ReLUs until `layer` has produced its output."""
    with stop_after(module) as outputs, _DeconvReLUs():
        try:
            model(pixels)
        except StopForward:
            pass
    if not outputs:
        raise ConfigError(f"layer {layer!r} is not called by the model's forward")
    output = outputs[0]
    if not isinstance(output, Tensor) or output.dim() not in (2, 4):
        raise ConfigError(f"layer {layer!r} must output a (B, C) or (B, C, H, W) tensor")
    return output


def check_range(name: str, index: Tensor, size: int, layer: str, shape: tuple) -> None:
    """Each entry of `index` must lie in [0, size)."""
    bad = (index < 0) | (index >= size)  # (B,)
    if bool(bad.any()):
        raise ConfigError(
            f"{name} must be in [0, {size - 1}] for layer {layer!r} with output shape {shape}; "
            f"got {index[bad][:5].tolist()}"
        )


def _select(output: Tensor, layer: str, units: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """The activation output[b, units[b], ys[b], xs[b]] of every sample, (B,)."""
    shape = tuple(output.shape)
    units, ys, xs = (index.to(output.device, torch.long) for index in (units, ys, xs))  # (B,)
    height, width = shape[2:] if output.dim() == 4 else (1, 1)
    check_range("unit", units, shape[1], layer, shape)
    check_range("y", ys, height, layer, shape)
    check_range("x", xs, width, layer, shape)
    batch = torch.arange(shape[0], device=output.device)  # (B,)
    if output.dim() == 2:
        return output[batch, units]  # (B,)
    return output[batch, units, ys, xs]  # (B,)


def project(
    model: nn.Module,
    layer: str,
    images: Tensor,
    units: Tensor,
    ys: Tensor,
    xs: Tensor,
    *,
    return_activations: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Deconvnet projection of activation (units[b], ys[b], xs[b]) of `layer` for each image b.

    images: (B, C, H, W) preprocessed model input; units, ys, xs: (B,) integer, (y, x) in the
    layer's output grid; ys and xs must be 0 for a layer whose output is (B, K). The layer's
    output is that of the module's first call (indexing rejects modules called more than once,
    like ResNet's shared `relu`); the forward stops there. Returns projections (B, C, H, W) in
    input space, and with `return_activations` also the recomputed activations (B,), which are
    the seeds. Samples are independent: the model runs in eval mode.
    """
    module = find_layer(model, layer)
    _check_inputs(images, units, ys, xs)
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        pixels = images.clone().requires_grad_(True)  # (B, C, H, W) also from inference mode
        # A second copy as input: in-place ops of the model must not hit the leaf.
        output = _forward_to(model, module, layer, pixels.clone())  # (B, K, h, w) or (B, K)
        activations = _select(output, layer, units, ys, xs)  # (B,)
        seed = activations.detach()  # (B,) the paper keeps the activation's own value
        (projections,) = torch.autograd.grad(activations, pixels, grad_outputs=seed)  # (B, C, H, W)
    if return_activations:
        return projections, seed
    return projections
