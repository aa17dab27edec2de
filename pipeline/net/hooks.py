"""Forward hooks that reduce each chosen layer's output to its per-unit spatial maximum.

`with Capture(model, layers) as cap: maxima = cap.run(x)` registers one forward hook per layer,
runs the forward pass, and removes every hook on exit, even when the forward raises. The hook
reduces the output immediately, inside the forward pass: torchvision's in-place ReLUs overwrite a
convolution's output right after it returns, so anything kept for later would be wrong, and the
reduction keeps O(B x C) per layer instead of the full feature map. Once every chosen layer has
fired, the rest of the forward pass is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.net.instrument import StopForward


@dataclass(frozen=True)
class LayerMax:
    """Per image and unit: the maximum over spatial positions and where it is."""

    values: Tensor  # (B, C) float32; NaN becomes -inf so that the order stays total
    ys: Tensor  # (B, C) int64 row of the maximum (0 for [N, C] outputs)
    xs: Tensor  # (B, C) int64 column of the maximum (0 for [N, C] outputs)


def spatial_max(name: str, output: Tensor) -> LayerMax:
    """Reduce `output` (N, C, H, W) or (N, C) to per-unit maxima; ties go to the first (y, x)."""
    if not isinstance(output, Tensor) or output.dim() not in (2, 4):
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ConfigError(
            f"layer {name!r} outputs {shape}; ninebest indexes layers whose output is "
            "[N, C, H, W] or [N, C] (pick a convolution, pooling, activation or linear layer)"
        )
    if output.dim() == 2:
        values = output.float()  # (B, C)
        zeros = torch.zeros_like(values, dtype=torch.int64)  # (B, C)
        return LayerMax(_canonical(values), zeros, zeros)
    width = output.shape[3]
    values, flat = output.flatten(2).max(dim=2)  # (B, C), (B, C): first maximum in row-major order
    return LayerMax(_canonical(values.float()), flat // width, flat % width)


def _canonical(values: Tensor) -> Tensor:
    """NaN becomes -inf and -0.0 becomes 0.0, so that every sort sees one total order."""
    return values.nan_to_num(nan=float("-inf")) + 0.0  # (B, C)


class Capture:
    """Context manager: forward hooks on `layers` that reduce their outputs with `spatial_max`."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], stop_early: bool = True):
        self.model = model
        self.layers = layers
        self.stop_early = stop_early
        self.maxima: dict[str, LayerMax] = {}
        self.calls: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._handles: list = []

    def __enter__(self) -> Capture:
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.shapes[name] = tuple(output.shape) if isinstance(output, Tensor) else ()
            self.maxima[name] = spatial_max(name, output)
            if self.stop_early and len(self.maxima) == len(self.layers):
                raise StopForward

        return hook

    def run(self, x: Tensor) -> dict[str, LayerMax]:
        """Forward `x` (B, 3, H, W) and return each layer's maxima."""
        self.maxima, self.calls = {}, {}
        try:
            self.model(x)
        except StopForward:
            pass
        missing = [name for name in self.layers if name not in self.maxima]
        if missing:
            raise ConfigError(
                f"layer {missing[0]!r} never ran in the forward pass; pick a module the model "
                "calls in forward()"
            )
        return self.maxima


def probe(model: nn.Module, layers: dict[str, nn.Module], crop: int) -> dict[str, tuple[int, ...]]:
    """Run one blank image through the whole model; return each layer's output shape (C[, H, W]).

    Fails with a clear message for layers that do not run, run more than once per forward pass
    (a reused module, such as the ReLU of a torchvision ResNet block), or have unsupported shapes.
    """
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.zeros(1, 3, crop, crop, device=device)  # (1, 3, crop, crop)
    with torch.inference_mode(), Capture(model, layers, stop_early=False) as cap:
        cap.run(x)
    for name, count in cap.calls.items():
        if count > 1:
            raise ConfigError(
                f"layer {name!r} runs {count} times per forward pass (one module reused); "
                "its output is ambiguous; pick a module that runs once (e.g. the enclosing block)"
            )
    return {name: cap.shapes[name][1:] for name in layers}
