"""Receptive fields of ConvNet layers, computed analytically from the traced module graph.

`receptive_field(model, layer, input_size)` traces `model` with torch.fx (in eval mode) and runs
the graph once on meta tensors (shapes only, nothing is computed). Node by node it composes, per
axis, the kernel, stride, padding and dilation of every convolution and pooling; where branches
meet (residual additions, Inception concatenations) it takes the union of their paths.

Coordinate convention: model-input pixels, per axis; y is the row axis, x the column axis.

* Unit i of the layer has the unclipped span ``[i*stride - padding, i*stride - padding + size)``.
* ``box(y, x)`` is ``(top, left, bottom, right)``, half-open (rows ``top <= r < bottom``, columns
  ``left <= c < right``) and clipped to the image ``[0, H) x [0, W)``. It is exact: the bounding
  box of the pixels some path of the network connects to the unit. Inside the image it equals the
  clipped span; at the border it may be smaller, where the span reaches pixels only through an
  intermediate layer's zero padding. A unit that sees nothing but padding has an empty box
  (``top == bottom`` or ``left == right``). Boxes are tracked per axis, so where branches merge
  they are exact only if every unit of each branch sees some pixel (true unless a layer pads
  beyond its kernel's reach, as no torchvision model does); otherwise they may be too large.
* Layers without spatial dims (a Linear layer, anything after flatten or a mean over H and W) have
  one unit, y = x = 0, whose box holds every pixel the flattened map saw: the whole input
  ``(0, 0, H, W)`` for any usual network. They report ``size = stride = input_size`` and
  ``padding = (0, 0)``, i.e. one tile covering the image, and ``output_size = (1, 1)``. A map
  pooled down to 1x1 (SqueezeNet's classifier) keeps its spatial form: one unit whose span covers
  the input.

Policies: a module called several times (ResNet blocks reuse one ReLU) is described by its last
call, as a forward hook keeping the latest output would see it. Normalisation layers count as
pointwise. A 1x1 or flattened input broadcast over a map (a squeeze-and-excitation gate) carries
global context and does not widen the field. Adaptive pooling with unequal bins (e.g. VGG's 5x6 to
7x7 at a 160x192 input) has no single size/stride/padding: spatial layers at or after it raise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeline.errors import ConfigError, DataError, closest
from pipeline.net.instrument import eval_mode, pair

Span = tuple[int, int]  # [start, end) in input pixels along one axis; empty when start >= end
EMPTY: Span = (0, 0)
# Ops that move pixels: unless followed as a window or adaptive pool they make the field unknown,
# even when they keep the shape, rather than pass as elementwise.
SPATIAL_NAMES = re.compile(r"conv|pool|pad|interpolate|upsampl|unfold|fold|roll|grid|pixel", re.I)
# Ops that may merge the spatial dims away (flatten, means over H and W): the field becomes global.
GLOBAL_NAMES = frozenset("flatten Flatten view reshape mean sum amax amin max min".split())
# Positional parameter names of the functional windows we follow.
SIGNATURES = {
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation"),
    F.max_pool2d: ("input", "kernel_size", "stride", "padding", "dilation"),
    F.avg_pool2d: ("input", "kernel_size", "stride", "padding"),
}
UNDERSTOOD = "conv, pooling, adaptive pooling, elementwise ops, cat, permute, flatten, means"
ADAPTIVE_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ADAPTIVE_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)


@dataclass(frozen=True)
class ReceptiveField:
    """Where each unit of `layer` looks in the model input; conventions in the module docstring."""

    layer: str  # dotted module name
    size: tuple[int, int]  # (h, w) unclipped span of one unit, in input pixels
    stride: tuple[int, int]  # (h, w) input pixels between neighbouring units
    padding: tuple[int, int]  # (h, w) offset: unit i starts at i * stride - padding
    input_size: tuple[int, int]  # (H, W) model input this field was computed for
    output_size: tuple[int, int]  # (h, w) the layer's map; (1, 1) without spatial dims
    # exact box edges per axis per unit: spans[0][y] = (top, bottom), spans[1][x] = (left, right)
    spans: tuple[tuple[Span, ...], tuple[Span, ...]] = field(repr=False)

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """Half-open (top, left, bottom, right) of unit (y, x), clipped to the image."""
        (h, w), (height, width) = self.output_size, self.input_size
        if not (0 <= y < h and 0 <= x < w):
            raise DataError(
                f"unit (y={y}, x={x}) is outside layer {self.layer!r}'s {h}x{w} map at input "
                f"{height}x{width}; valid: 0 <= y < {h}, 0 <= x < {w}"
            )
        (top, bottom), (left, right) = self.spans[0][y], self.spans[1][x]
        return top, left, bottom, right


def receptive_field(
    model: nn.Module, layer: str, input_size: tuple[int, int] = (224, 224)
) -> ReceptiveField:
    """Receptive field of every unit of `layer` for an (H, W) = `input_size` model input."""
    size = pair(input_size)
    if min(size) < 1:
        raise ConfigError(f"input_size {input_size!r} must be two positive ints (H, W)")
    with eval_mode(model), torch.no_grad():
        graph, outputs = _trace(model)
        if layer not in outputs:
            known = layer in dict(model.named_modules())  # e.g. an auxiliary head skipped in eval
            raise ConfigError(
                f"{type(model).__name__} "
                + ("does not call" if known else "has no")
                + f" layer {layer!r} in an eval-mode forward; closest valid names: "
                f"{closest(layer, outputs)}"
            )
        fields = _walk(model, graph, size)
    found = fields.get(outputs[layer])
    if found is None or found.axes is None or None in (found.axes[0].affine, found.axes[1].affine):
        why = found.why if found is not None else "its output does not depend on the input"
        raise ConfigError(f"no receptive field for layer {layer!r} at input {size}: {why}")
    y, x = found.axes
    assert y.affine is not None and x.affine is not None  # refused above
    return ReceptiveField(
        layer=layer,
        size=(y.affine[0], x.affine[0]),
        stride=(y.affine[1], x.affine[1]),
        padding=(y.affine[2], x.affine[2]),
        input_size=size,
        output_size=(len(y.spans), len(x.spans)),
        spans=(y.spans, x.spans),
    )


@dataclass(frozen=True)
class _Axis:
    """One spatial axis of a traced tensor: the exact span of each index, and its affine form."""

    spans: tuple[Span, ...]  # per index along this axis
    affine: tuple[int, int, int] | None  # (size, stride, padding); None: not affine, see _Field.why


@dataclass(frozen=True)
class _Field:
    """What one traced tensor sees of the model input."""

    dims: tuple[int, int] | None  # negative positions of its (H, W) dims; None: no spatial dims
    axes: tuple[_Axis, _Axis] | None  # (y, x); None: unknown, an op we cannot follow
    why: str = ""  # why axes or an affine form is missing

    @property
    def known_axes(self) -> tuple[_Axis, _Axis]:
        """`axes` of a field its caller has already found not unknown."""
        assert self.axes is not None, self.why
        return self.axes

    @property
    def sizes(self) -> tuple[int, int]:
        y, x = self.known_axes
        return len(y.spans), len(x.spans)


class _Tracer(fx.Tracer):
    """fx tracer that remembers the node each module call returned (the last call wins)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, fx.Node] = {}  # dotted module name -> output node

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.outputs[self.path_of_module(m)] = out.node
        return out


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, fx.Node]]:
    """The model's fx graph and the output node of every called module."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # tracing runs arbitrary user code; any failure means "not traceable"
        raise ConfigError(
            f"cannot trace {type(model).__name__} with torch.fx ({e}); receptive fields need a "
            "forward without data-dependent control flow"
        ) from e
    return graph, tracer.outputs


class _Walk(fx.Interpreter):
    """Runs the graph once, deriving each tensor's field from its inputs' fields and shapes."""

    def __init__(self, module: fx.GraphModule, input_size: tuple[int, int]) -> None:
        super().__init__(module)
        self.input_size = input_size  # (H, W)
        self.fields: dict[fx.Node, _Field] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        out = _first_tensor(value)
        inputs = [self.fields[a] for a in n.all_input_nodes if a in self.fields]
        if n.op == "placeholder":
            height, width = self.input_size
            self.fields[n] = _Field((-2, -1), (_identity(height), _identity(width)))
        elif inputs and out is not None:
            op = n.target
            if n.op == "call_module":
                assert isinstance(n.target, str)  # fx: a module call's target is its dotted name
                op = self.fetch_attr(n.target)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.fields[n] = self._derive(n, op, inputs, args, kwargs, out)
        return value

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        state = dict(module.named_parameters()) | dict(module.named_buffers())
        return torch.func.functional_call(
            module, {k: v.to("meta") for k, v in state.items()}, args, kwargs
        )

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    def _derive(self, n, op, inputs: list[_Field], args, kwargs, out: torch.Tensor) -> _Field:
        unknown = [f for f in inputs if f.axes is None]
        if unknown:  # stays unknown until a (N, F) output surely has no spatial dims left
            return self._global(inputs) if out.dim() <= 2 else unknown[0]
        if all(f.dims is None for f in inputs):
            return self._global(inputs)
        name = _name(op)
        data = inputs[0]
        if data.dims == (-2, -1):  # NCHW, as conv and pooling need
            window = _window_args(op, args, kwargs)
            if window is not None:
                y, x = (
                    _window(a, o, *w)
                    for a, o, w in zip(data.known_axes, out.shape[-2:], window, strict=True)
                )
                return _Field(data.dims, (y, x), data.why)
            if isinstance(op, ADAPTIVE_MODULES) or op in ADAPTIVE_FUNCTIONS:
                height, width = out.shape[-2:]
                return _adaptive(data, (height, width), n.name)
        if name in ("permute", "transpose") and data.dims is not None:
            return _Field(_moved(data.dims, name, args, kwargs), data.axes, data.why)
        return self._elementwise(n, name, inputs, out)

    def _elementwise(self, n, name: str, inputs: list[_Field], out: torch.Tensor) -> _Field:
        """Union over inputs whose map `out` keeps; broadcast 1x1 or global inputs add nothing."""
        same = [f for f in inputs if f.dims and _sizes_at(out, f.dims) == f.sizes]
        context = [f for f in inputs if f.dims is None or f.sizes == (1, 1)]  # broadcast gates
        kept = {id(f) for f in same + context}
        if same and len(kept) == len(inputs) and not SPATIAL_NAMES.search(name):
            (y, y_why), (x, x_why) = (_union([f.known_axes[i] for f in same]) for i in (0, 1))
            return _Field(same[0].dims, (y, x), y_why or x_why or _first_why(same))
        if name in GLOBAL_NAMES:
            return self._global(inputs)
        maps = [f.sizes for f in inputs if f.dims]
        why = f"cannot follow node {n.name!r} ({name}) from maps {maps} to shape {tuple(out.shape)}"
        return _Field(None, None, why + "; understood are " + UNDERSTOOD)

    def _global(self, inputs: list[_Field]) -> _Field:
        """A field without spatial dims: one unit seeing everything its inputs saw."""
        height, width = self.input_size
        if any(f.axes is None for f in inputs):
            y, x = (0, height), (0, width)
        else:
            y, x = (_hull(s for f in inputs for s in f.known_axes[i].spans) for i in (0, 1))
        return _Field(None, (_Axis((y,), (height, height, 0)), _Axis((x,), (width, width, 0))))


def _walk(model: nn.Module, graph: fx.Graph, size: tuple[int, int]) -> dict[fx.Node, _Field]:
    """Run `graph` on a meta-device image of `size` and return the field of every tensor node."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    image = torch.zeros(1, conv.in_channels if conv else 3, *size, device="meta", dtype=dtype)
    walker = _Walk(fx.GraphModule(model, graph), size)
    try:
        walker.run(image)  # (1, C, H, W), shapes only: nothing is computed
    except RuntimeError as e:
        raise ConfigError(f"{type(model).__name__} cannot run on a {size} input ({e})") from e
    return walker.fields


def _window(axis: _Axis, n_out: int, k: int, s: int, p: int, d: int) -> _Axis:
    """`axis` after a sliding window (conv or pool): kernel k, stride s, padding p, dilation d."""
    taps = [range(i * s - p, i * s - p + d * (k - 1) + 1, d) for i in range(n_out)]
    affine = None
    if axis.affine is not None:
        size, stride, pad = axis.affine
        affine = (size + d * (k - 1) * stride, s * stride, pad + p * stride)
    return _Axis(_gather(axis.spans, taps), affine)


def _adaptive(data: _Field, out_sizes: tuple[int, int], node: str) -> _Field:
    """Adaptive pooling: bin i of n -> m is [floor(i*n/m), ceil((i+1)*n/m)); affine if uniform."""
    axes, whys = [], []
    for axis, m in zip(data.known_axes, out_sizes, strict=True):
        n = len(axis.spans)
        bins = [range(i * n // m, -(-(i + 1) * n // m)) for i in range(m)]
        widths = {len(b) for b in bins}
        steps = {b.start - a.start for a, b in zip(bins, bins[1:], strict=False)}
        if len(widths) == 1 and len(steps) <= 1:
            k = widths.pop()
            axes.append(_window(axis, m, k, steps.pop() if steps else k, 0, 1))
        else:
            axes.append(_Axis(_gather(axis.spans, bins), None))
            whys.append(f"adaptive pooling {node!r} maps {n} to {m} with unequal bins")
    why = "; ".join(whys) + ("; pick an input size whose map divides evenly" if whys else "")
    y, x = axes
    return _Field(data.dims, (y, x), why or data.why)


def _union(axes: list[_Axis]) -> tuple[_Axis, str]:
    """Union of branches over the same map: per index, min start and max end."""
    spans = tuple(_hull(group) for group in zip(*(a.spans for a in axes), strict=True))
    affines = [a.affine for a in axes if a.affine is not None]
    if len(affines) < len(axes):
        return _Axis(spans, None), ""
    strides = sorted({stride for _, stride, _ in affines})
    if len(strides) > 1:
        return _Axis(spans, None), f"branches with strides {strides} merge into one map"
    pad = max(p for _, _, p in affines)
    end = max(size - p for size, _, p in affines)
    return _Axis(spans, (end + pad, strides[0], pad)), ""


def _gather(spans: tuple[Span, ...], taps: Iterable[range]) -> tuple[Span, ...]:
    """For each tap list, the hull of the spans it reaches; indices off the map are padding."""
    return tuple(_hull(spans[j] for j in tap if 0 <= j < len(spans)) for tap in taps)


def _hull(spans: Iterable[Span]) -> Span:
    """Smallest span holding every non-empty one; EMPTY when none is."""
    full = [s for s in spans if s[0] < s[1]]
    return (min(s for s, _ in full), max(e for _, e in full)) if full else EMPTY


def _window_args(op, args, kwargs) -> list[tuple[int, int, int, int]] | None:
    """Per axis (kernel, stride, padding, dilation) of a conv or pooling call; None for others."""
    bound: dict[str, Any]  # argument name -> value, as the model passed it
    if isinstance(op, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        bound = {"kernel_size": op.kernel_size, "stride": op.stride, "padding": op.padding}
        bound["dilation"] = getattr(op, "dilation", 1)
    elif isinstance(op, str) or op not in SIGNATURES:
        return None
    else:
        bound = dict(zip(SIGNATURES[op], args, strict=False)) | kwargs
        if "weight" in bound:  # functional conv: kernel from the weight, stride 1 by default
            bound |= {"kernel_size": tuple(bound["weight"].shape[-2:])}
            bound.setdefault("stride", 1)
    k, d = pair(bound["kernel_size"]), pair(bound.get("dilation", 1))
    s = pair(bound.get("stride") or k)  # pooling: stride None or () means the kernel
    p = bound.get("padding", 0)
    if isinstance(p, str):  # conv "valid" / "same"; "same" pads d*(k-1)//2 before
        p = tuple(0 if p == "valid" else di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
    return list(zip(k, s, pair(p), d, strict=True))


def _moved(dims: tuple[int, int], name: str, args: tuple, kwargs: dict) -> tuple[int, int]:
    """Where the (H, W) dims go under permute or transpose, as negative positions."""
    ndim = args[0].dim()
    if name == "permute":
        order = kwargs.get("dims") or (args[1] if len(args) == 2 else args[1:])
    else:
        a, b = [*args[1:3], *(kwargs[k] for k in ("dim0", "dim1") if k in kwargs)]
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
    order = [o % ndim for o in order]
    return order.index(dims[0] % ndim) - ndim, order.index(dims[1] % ndim) - ndim


def _first_why(fields: list[_Field]) -> str:
    return next((f.why for f in fields if f.why), "")


def _identity(n: int) -> _Axis:
    return _Axis(tuple((i, i + 1) for i in range(n)), (1, 1, 0))


def _sizes_at(t: torch.Tensor, dims: tuple[int, int]) -> tuple[int, int] | None:
    return (t.shape[dims[0]], t.shape[dims[1]]) if t.dim() >= -min(dims) else None


def _first_tensor(value) -> torch.Tensor | None:
    """The value itself, or the first tensor of a tuple/list output (chunk, split)."""
    if isinstance(value, tuple | list) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def _name(op) -> str:
    if isinstance(op, nn.Module):
        return type(op).__name__
    return op if isinstance(op, str) else getattr(op, "__name__", str(op))
