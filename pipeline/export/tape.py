"""A tape of the forward pass: what the deconvnet backward in `cone` needs, recorded as it runs.

`Tape` is a `TorchFunctionMode` that swaps nothing but records: the input is tagged as node
`INPUT`, and every tensor derived from it is tagged with its node (`Tape.node`) and the (H, W) of
its map (`Tape.sizes`; (1, 1) for a tensor that is not 4-d). Each op that reads a tagged tensor
appends a `Step` (rule, traced inputs, output node, params); the rules and what they keep:

* conv: conv2d of a 4-d map with numeric padding and constant weight and bias (weight, stride,
  padding, dilation, groups), and avg_pool2d with a fixed divisor, recorded as a depthwise
  conv2d with a uniform kernel;
* pool: max_pool2d of a 4-d map, run with indices so the switches are kept (flat positions in
  the input map, its width, kernel, stride, padding, dilation);
* relu: every ReLU form in `deconv` (functional, method, in-place; `nn.ReLU` calls `F.relu`);
* scale: batch_norm in eval mode (a per-channel factor), a product with a number (the number);
* same: dropout in eval, clone, contiguous, the sum with a constant;
* add: the sum of two traced tensors of one shape; cat: concatenation along channels (the sizes);
* opaque: any other op (its name), which the backward cannot follow.

An op with no tensor output other than a shape query, or an in-place change that the tape cannot
follow (of a view, of an opaque node's output, or by an op without a rule), is named in
`Tape.mutated`; the backward then refuses the tape. So is a custom `torch.autograd.Function`
applied to a traced tensor (`watching_functions`): the tape would see the ops of its forward, but
its backward is its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import Function
from torch.overrides import TorchFunctionMode

from pipeline.export.deconv import RELUS, RELUS_INPLACE
from pipeline.net.instrument import pair

__all__ = ["INPUT", "Step", "Tape", "watching_functions"]

INPUT = 0  # node of the model input
_ADDS = {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__}
_MULS = {torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__}
_SAME: set[Callable[..., Tensor]] = {torch.clone, Tensor.clone, Tensor.contiguous}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_POOLS = {F.max_pool2d, F.max_pool2d_with_indices}
# Functions that return no tensor and change nothing: shape and dtype queries.
_QUERIES = {"__get__", "dim", "size", "numel", "__len__", "is_floating_point", "is_contiguous"}
_TAG = "_ninebest_cone"  # attribute that holds (tape, node) on a traced tensor
# (rule, traced inputs, params) of an op the backward can follow; see `Step`.
_Rule = tuple[str, tuple, dict[str, Any]]


@dataclass(frozen=True)
class Step:
    """One recorded op: its rule, traced inputs (None for constants) and output node."""

    rule: str  # conv, pool, relu, scale, same, add, cat or opaque
    inputs: tuple[int | None, ...]
    output: int
    params: dict = field(default_factory=dict)  # what the rule's backward needs


class Tape(TorchFunctionMode):
    """Records the ops of a forward that touch tensors derived from the input (see module doc)."""

    def __init__(self, pixels: Tensor) -> None:
        super().__init__()
        self.steps: list[Step] = []
        self.sizes: dict[int, tuple[int, int]] = {}  # node -> (H, W) of its map
        self.mutated = ""  # names an in-place change the tape cannot follow
        self._tag(pixels, INPUT)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _POOLS and self.node(args[0]) is not None:
            return self._pool(func, *args, **kwargs)
        out = func(*args, **kwargs)
        traced = [self.node(t) for t in _tensors((args, kwargs))]
        if any(node is not None for node in traced):
            self._record(func, args, kwargs, out)
        return out

    def node(self, value: object) -> int | None:
        """The node of a tensor tagged by this tape, else None (a constant)."""
        tag = getattr(value, _TAG, None) if isinstance(value, Tensor) else None
        return tag[1] if tag is not None and tag[0] is self else None

    def _tag(self, tensor: Tensor, node: int) -> None:
        setattr(tensor, _TAG, (self, node))
        self.sizes[node] = (tensor.shape[-2], tensor.shape[-1]) if tensor.dim() == 4 else (1, 1)

    def _add(self, rule: str, inputs: tuple, out: Tensor, **params) -> None:
        step = Step(rule, tuple(self.node(t) for t in inputs), len(self.sizes), params)
        self.steps.append(step)
        self._tag(out, step.output)

    def _record(self, func: Callable, args: tuple, kwargs: dict, out: object) -> None:
        outputs = list(_tensors(out))
        if not outputs:
            if getattr(func, "__name__", "") not in _QUERIES:
                self.mutated = self.mutated or _name(func)  # e.g. __setitem__ on a traced map
            return
        inputs = tuple(_tensors((args, kwargs)))
        rule = _rule(self, func, args, kwargs, out)
        in_place = [t for t in inputs if any(t is o for o in outputs)]
        if in_place and (rule is None or any(t._is_view() or self._opaque(t) for t in in_place)):
            self.mutated = self.mutated or _name(func)  # the change may reach other tensors
        if rule is None:
            for tensor in outputs:
                self._add("opaque", inputs, tensor, name=_name(func))
        else:
            assert isinstance(out, Tensor)  # `_rule` follows tensor outputs only
            self._add(rule[0], rule[1], out, **rule[2])

    def _opaque(self, tensor: Tensor) -> bool:
        """Whether `tensor` comes from an op without a rule (it may be a view of another)."""
        node = self.node(tensor)
        return node is not None and any(s.output == node and s.rule == "opaque" for s in self.steps)

    def _pool(self, func: Callable, *args, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
        """Max-pool recording its switches; returns what `func` would."""
        names = (
            "input",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "ceil_mode",
            "return_indices",
        )
        p: dict[str, Any] = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
        p |= dict(zip(names, args, strict=False)) | kwargs
        kernel = pair(p["kernel_size"])
        stride = kernel if p["stride"] in (None, []) else pair(p["stride"])
        pixels = p["input"]
        out, indices = F.max_pool2d_with_indices(
            pixels, kernel, stride, p["padding"], p["dilation"], p["ceil_mode"], True
        )  # (N, C, h, w), (N, C, h, w) flat positions in the input map
        if pixels.dim() == 4:
            params = {"switches": indices, "width": pixels.shape[3], "kernel": kernel}
            params |= {"stride": stride, "padding": pair(p["padding"])}
            self._add("pool", (pixels,), out, dilation=pair(p["dilation"]), **params)
        else:
            self._add("opaque", (pixels,), out, name="max_pool2d")
        wanted = p.get("return_indices", False) or func is F.max_pool2d_with_indices
        return (out, indices) if wanted else out


@contextlib.contextmanager
def watching_functions(tape: Tape) -> Iterator[None]:
    """While recording, name in `tape.mutated` any custom autograd.Function applied to a traced
    tensor (Function.apply does not pass through a TorchFunctionMode)."""
    original = Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if any(tape.node(t) is not None for t in _tensors((args, kwargs))):
            tape.mutated = tape.mutated or f"{cls.__name__}.apply (a custom autograd.Function)"
        return original.__get__(None, cls)(*args, **kwargs)

    Function.apply = classmethod(apply)
    try:
        yield
    finally:
        Function.apply = original


def _rule(tape: Tape, func: Callable, args: tuple, kwargs: dict, out: object) -> _Rule | None:
    """(rule, inputs, params) for an op we can follow back exactly, else None."""
    if not isinstance(out, Tensor):
        return None
    if func in RELUS or func in RELUS_INPLACE:
        return "relu", (args[0],), {}
    if func is F.conv2d:
        return _conv(tape, args, kwargs)
    if func is F.avg_pool2d:
        return _avg_pool(args, kwargs)
    if func is F.batch_norm:
        return _batch_norm(tape, args, kwargs)
    if func in _DROPOUTS:
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        return None if training else ("same", (args[0],), {})
    if func in _SAME and out.shape == args[0].shape:
        return "same", (args[0],), {}
    if func in _ADDS and len(args) == 2 and kwargs.get("alpha", 1) == 1:
        traced = [a for a in args if tape.node(a) is not None]
        if all(a.shape == out.shape for a in traced):  # no traced tensor is broadcast
            return ("add", tuple(traced), {}) if len(traced) == 2 else ("same", tuple(traced), {})
    if func in _MULS and len(args) == 2 and not kwargs:
        traced = [a for a in args if tape.node(a) is not None]
        number = [a for a in args if isinstance(a, int | float) and not isinstance(a, bool)]
        if len(traced) == 1 and number:
            return "scale", tuple(traced), {"factor": float(number[0])}
    if func is torch.cat:
        return _cat(args, kwargs)
    return None


def _conv(tape: Tape, args: tuple, kwargs: dict) -> _Rule | None:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    p: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    p |= dict(zip(names, args, strict=False)) | kwargs
    if isinstance(p["padding"], str) or p["input"].dim() != 4:
        return None
    if tape.node(p["weight"]) is not None or tape.node(p["bias"]) is not None:
        return None  # weights computed from the input: not a fixed linear map
    conv = {key: pair(p[key]) for key in ("stride", "padding", "dilation")}
    return "conv", (p["input"],), {"weight": p["weight"], "groups": p["groups"], **conv}


def _avg_pool(args: tuple, kwargs: dict) -> _Rule | None:
    """Average pooling with a fixed divisor is a depthwise convolution with a uniform kernel."""
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    p: dict[str, Any] = {
        "stride": None,
        "padding": 0,
        "ceil_mode": False,
        "count_include_pad": True,
    }
    p |= dict(zip((*names, "divisor_override"), args, strict=False)) | kwargs
    (ky, kx), padding = pair(p["kernel_size"]), pair(p["padding"])
    fixed = p["count_include_pad"] or padding == (0, 0)  # else the border windows divide by less
    if p["ceil_mode"] or not fixed or p.get("divisor_override") or p["input"].dim() != 4:
        return None
    channels = p["input"].shape[1]
    weight = p["input"].new_full((channels, 1, ky, kx), 1.0 / (ky * kx))  # (C, 1, ky, kx)
    stride = (ky, kx) if p["stride"] in (None, []) else pair(p["stride"])
    conv = {"weight": weight, "groups": channels, "stride": stride, "padding": padding}
    return "conv", (p["input"],), {**conv, "dilation": (1, 1)}


def _batch_norm(tape: Tape, args: tuple, kwargs: dict) -> _Rule | None:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum")
    p: dict[str, Any] = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
    p |= dict(zip((*names, "eps"), args, strict=False)) | kwargs
    constants = [p[key] for key in ("running_mean", "running_var", "weight", "bias")]
    if p["training"] or p["running_var"] is None or p["input"].dim() != 4:
        return None
    if any(tape.node(c) is not None for c in constants):
        return None
    factor = torch.rsqrt(p["running_var"] + p["eps"])  # (C,)
    factor = factor if p["weight"] is None else factor * p["weight"]  # (C,)
    return "scale", (p["input"],), {"factor": factor.detach().view(1, -1, 1, 1)}


def _cat(args: tuple, kwargs: dict) -> _Rule | None:
    tensors = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in tensors) or dim not in (1, -3):
        return None
    return "cat", tuple(tensors), {"channels": [t.shape[1] for t in tensors]}


def _tensors(value: object) -> Iterator[Tensor]:
    """Every tensor in `value`, looking into tuples, lists and dicts."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        yield from _tensors(list(value.values()))


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", "") or getattr(func, "__name__", repr(func))
