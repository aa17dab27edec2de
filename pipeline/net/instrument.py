"""Shared instrumentation of a model: the one copy of each helper the stages use.

eval_mode:    run in eval mode, then restore every module's own `training` flag.
stop_after:   collect a module's first output and stop the forward there (StopForward).
find_layer(s): dotted names -> modules, unknown names answered with the closest valid ones.
pair:         a 2-D size argument (int, or a sequence of one or two ints) as (height, width).
Hooks are only ever installed inside context managers, and always removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError, closest


class StopForward(Exception):
    """Raised by a forward hook to skip the layers after the last one a caller needs."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode, then restore each module's own `training` flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            if module.training != training:  # skips nn.Module.__setattr__ for unchanged ones
                module.training = training


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[list]:
    """Collect `module`'s first output and stop the forward there; the hook is always removed."""
    outputs: list = []

    def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
        outputs.append(output)
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def find_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map each dotted layer name to its module; unknown names list the closest valid ones."""
    modules = dict(model.named_modules())
    valid = [n for n in modules if n]
    found = {}
    for name in names:
        if name not in modules or not name:
            raise ConfigError(
                f"unknown layer {name!r}; closest valid names: {closest(name, valid)}"
            )
        found[name] = modules[name]
    return found


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule named `name` (dotted, as in `model.named_modules()`)."""
    return find_layers(model, (name,))[name]


def pair(value: int | Sequence[int] | torch.Size) -> tuple[int, int]:
    """A kernel, stride, padding or dilation argument of a 2-D op as (height, width)."""
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ConfigError(f"expected a 2-D size (an int or two ints), got {values}")
