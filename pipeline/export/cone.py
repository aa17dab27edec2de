"""Deconvnet projections of many activations from one forward pass, computed inside their cones.

`project_rows` returns what `deconv.project` returns for R rows (image, unit, y, x) over N images,
equal up to float rounding, with far less work, for two reasons:

* One forward per image. The deconvnet's backward needs from the forward only the max-pool
  switches (its ReLU ignores the forward input, a transposed convolution needs only weights) and
  the seeds, so every row of an image reuses one forward, run without autograd.
* Cones. A seed at (y, x) reaches, at each earlier layer, only the window its receptive field
  passes through. Each backward step runs on that window (the row's *frame*) instead of the full
  map: for AlexNet `features.10` about a fifth of the full backward's multiply-adds.

The forward runs under a `tape.Tape`, which records each op with what its backward needs (see
`tape`). The backward walks the tape in reverse from the layer's node. A signal is a batch
(R, C, ly, lx) plus, per row, the frame's top-left corner in the node's map; the rules, in the
deconvnet's terms (see `deconv`):

* conv2d: transposed convolution of the frame; the frame becomes the input window it reads;
* max_pool2d: each value goes to its switch, recorded in the forward;
* avg_pool2d with a fixed divisor: a depthwise convolution with a uniform kernel;
* every ReLU form: ReLU of the signal; batch_norm in eval mode: per-channel scale; a product with
  a number: scale; dropout in eval, clone, contiguous, the sum with a constant: identity;
* the sum of two traced tensors: the signal goes to both; cat along channels: split.

After each step the frame is clipped to its map: what falls outside is the gradient of the
forward's zero padding, which autograd drops too. Where paths meet (residual blocks, Inception
branches) the frames merge into their hull. An opaque node on the way back, an in-place change
the tape cannot follow, or a layer without spatial dims makes `project_rows` fall back to
`deconv.project` on the rows' images, so the result is always the deconvnet projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.export.deconv import check_range, project
from pipeline.export.tape import INPUT, Step, Tape, watching_functions
from pipeline.net.instrument import StopForward, eval_mode, find_layer, stop_after

__all__ = ["project_rows"]


class _Unsupported(Exception):
    """The backward met an op without a rule; `project_rows` falls back to `deconv.project`."""


# ---------------------------------------------------------------- the backward on frames


@dataclass(frozen=True)
class Signal:
    """Per row a frame of the node's map: values (R, C, ly, lx) whose [0, 0] is (top, left)."""

    values: Tensor  # (R, C, ly, lx)
    top: Tensor  # (R,) first row of the frame in the node's map
    left: Tensor  # (R,) first column


def _reframe(values: Tensor, dy: Tensor, dx: Tensor, ly: int, lx: int) -> Tensor:
    """new[r, :, i, j] = values[r, :, i + dy[r], j + dx[r]], zero where that is outside."""
    count, channels, height, width = values.shape
    if ly == height and lx == width and not (dy.any() or dx.any()):
        return values
    out = values.new_zeros(count, channels, ly, lx)  # (R, C, ly, lx)
    for r, (a, b) in enumerate(zip(dy.tolist(), dx.tolist(), strict=True)):
        top, bottom, left, right = max(0, -a), min(ly, height - a), max(0, -b), min(lx, width - b)
        if top < bottom and left < right:
            out[r, :, top:bottom, left:right] = values[
                r, :, top + a : bottom + a, left + b : right + b
            ]
    return out


def _merge(signals: list[Signal], size: tuple[int, int]) -> Signal:
    """The sum of `signals` on one frame per row: their hull, clipped to the (H, W) map."""
    tops = torch.stack([s.top for s in signals])  # (S, R)
    lefts = torch.stack([s.left for s in signals])  # (S, R)
    bottoms = torch.stack([s.top + s.values.shape[2] for s in signals])  # (S, R)
    rights = torch.stack([s.left + s.values.shape[3] for s in signals])  # (S, R)
    top, left = tops.min(0).values.clamp(min=0), lefts.min(0).values.clamp(min=0)  # (R,)
    ly = max(1, min(int((bottoms.max(0).values.clamp(max=size[0]) - top).max()), size[0]))
    lx = max(1, min(int((rights.max(0).values.clamp(max=size[1]) - left).max()), size[1]))
    top, left = top.clamp(max=size[0] - ly), left.clamp(max=size[1] - lx)  # (R,) inside the map
    values = _reframe(signals[0].values, top - signals[0].top, left - signals[0].left, ly, lx)
    for s in signals[1:]:
        values = values + _reframe(s.values, top - s.top, left - s.left, ly, lx)  # (R, C, ly, lx)
    return Signal(values, top, left)


def _back_conv(step: Step, signal: Signal, which: Tensor) -> list[tuple[int | None, Signal]]:
    p = step.params
    if p["groups"] == 1 and p["dilation"] == (1, 1) and p["stride"] != (1, 1):
        values = _transpose_by_phases(signal.values, p["weight"], p["stride"])  # (R, C_in, ly, lx)
    else:
        values = F.conv_transpose2d(
            signal.values,
            p["weight"],
            stride=p["stride"],
            dilation=p["dilation"],
            groups=p["groups"],
        )  # (R, C_in, ly, lx): every input position the frame reads, padding included
    top = signal.top * p["stride"][0] - p["padding"][0]  # (R,)
    left = signal.left * p["stride"][1] - p["padding"][1]  # (R,)
    return [(step.inputs[0], Signal(values, top, left))]


def _transpose_by_phases(values: Tensor, weight: Tensor, stride: tuple[int, int]) -> Tensor:
    """`F.conv_transpose2d(values, weight, stride=stride)` as one stride-1 convolution.

    Output pixel i * s + t (0 <= t < s) gets taps t, t + s, t + 2s, ... of the kernel: each of the
    sy * sx phases is a small stride-1 convolution, and all of them together are one conv2d with
    sy * sx * C_in output channels, interleaved afterwards. Same sums, and on CPU several
    times faster than the transposed kernel when C_in is small (the first layer: C_in = 3).
    """
    count, _, height, width = values.shape  # (R, C_out, h, w)
    c_out, c_in, ky, kx = weight.shape
    (sy, sx), qy, qx = stride, -(-ky // stride[0]), -(-kx // stride[1])  # taps per phase
    taps = F.pad(weight, (0, qx * sx - kx, 0, qy * sy - ky))  # (C_out, C_in, qy * sy, qx * sx)
    taps = taps.view(c_out, c_in, qy, sy, qx, sx).permute(
        3, 5, 1, 0, 2, 4
    )  # (sy, sx, C_in, C_out, qy, qx)
    taps = taps.flip(-2, -1).reshape(sy * sx * c_in, c_out, qy, qx)  # correlation = flipped conv
    phases = F.conv2d(values, taps, padding=(qy - 1, qx - 1))  # (R, sy*sx*C_in, h+qy-1, w+qx-1)
    rows, cols = phases.shape[2:]
    out = phases.view(count, sy, sx, c_in, rows, cols).permute(0, 3, 4, 1, 5, 2)
    out = out.reshape(count, c_in, rows * sy, cols * sx)  # (R, C_in, rows * sy, cols * sx)
    return out[:, :, : (height - 1) * sy + ky, : (width - 1) * sx + kx]  # (R, C_in, ly, lx)


def _back_pool(step: Step, signal: Signal, which: Tensor) -> list[tuple[int | None, Signal]]:
    p = step.params
    count, channels, ly, lx = signal.values.shape
    (sy, sx), (py, px), (dy, dx), (ky, kx) = p["stride"], p["padding"], p["dilation"], p["kernel"]
    device = signal.values.device
    rows = signal.top[:, None] + torch.arange(ly, device=device)  # (R, ly) in the pooled map
    cols = signal.left[:, None] + torch.arange(lx, device=device)  # (R, lx)
    switches = p["switches"][
        which[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # (R, C, ly, lx) flat positions in the input map
    top, left = signal.top * sy - py, signal.left * sx - px  # (R,)
    height, width = (ly - 1) * sy + dy * (ky - 1) + 1, (lx - 1) * sx + dx * (kx - 1) + 1
    local = (switches // p["width"] - top.view(-1, 1, 1, 1)) * width  # (R, C, ly, lx)
    local += switches % p["width"] - left.view(-1, 1, 1, 1)  # (R, C, ly, lx) in the input frame
    values = signal.values.new_zeros(count, channels, height * width)  # (R, C, height * width)
    values.scatter_add_(2, local.flatten(2), signal.values.flatten(2))
    return [(step.inputs[0], Signal(values.view(count, channels, height, width), top, left))]


def _back_pointwise(step: Step, signal: Signal, which: Tensor) -> list[tuple[int | None, Signal]]:
    if step.rule == "relu":
        values = signal.values.relu()  # (R, C, ly, lx) the deconvnet rule, as in `deconv`
    elif step.rule == "scale":
        values = signal.values * step.params["factor"]  # (R, C, ly, lx)
    else:  # same, add
        values = signal.values  # (R, C, ly, lx)
    return [(node, Signal(values, signal.top, signal.left)) for node in step.inputs]


def _back_cat(step: Step, signal: Signal, which: Tensor) -> list[tuple[int | None, Signal]]:
    parts = signal.values.split(step.params["channels"], dim=1)  # [(R, C_i, ly, lx)]
    return [
        (node, Signal(part, signal.top, signal.left))
        for node, part in zip(step.inputs, parts, strict=True)
    ]


_BACKWARD = {
    "conv": _back_conv,
    "pool": _back_pool,
    "relu": _back_pointwise,
    "scale": _back_pointwise,
    "same": _back_pointwise,
    "add": _back_pointwise,
    "cat": _back_cat,
}


def backward(tape: Tape, target: int, seeds: Signal, which: Tensor) -> Signal:
    """Walk the tape back from `target`; the signal at the input, clipped to its map."""
    if tape.mutated:
        raise _Unsupported(tape.mutated)
    pending: dict[int, list[Signal]] = {target: [seeds]}
    for step in reversed(tape.steps):
        if step.output not in pending:
            continue
        if step.rule == "opaque":
            raise _Unsupported(step.params["name"])
        signal = _merge(pending.pop(step.output), tape.sizes[step.output])
        for node, contribution in _BACKWARD[step.rule](step, signal, which):
            if node is not None:
                pending.setdefault(node, []).append(contribution)
    assert set(pending) <= {INPUT}, pending.keys()
    return _merge(pending[INPUT], tape.sizes[INPUT])


# ---------------------------------------------------------------- the public call


def _record(model: nn.Module, module: nn.Module, images: Tensor) -> tuple[Tape, Tensor | None]:
    """Forward `images` (no autograd) until `module` has run; the tape and the module's output."""
    pixels = images.clone()  # (N, C, H, W) tagged as the input; the caller's tensor is untouched
    tape = Tape(pixels)
    with stop_after(module) as outputs, tape, watching_functions(tape), torch.no_grad():
        try:
            model(pixels)
        except StopForward:
            pass
    return tape, outputs[0] if outputs else None


def _check_rows(images: Tensor, which: Tensor, units: Tensor, ys: Tensor, xs: Tensor) -> None:
    if not (isinstance(images, Tensor) and images.dim() == 4 and images.is_floating_point()):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"images must be a float tensor of shape (N, C, H, W); got {got}")
    for name, index in (("which", which), ("units", units), ("ys", ys), ("xs", xs)):
        if not isinstance(index, Tensor) or index.is_floating_point() or index.is_complex():
            raise ConfigError(f"{name} must be an integer tensor of shape (R,)")
        if tuple(index.shape) != tuple(which.shape) or index.dim() != 1:
            raise ConfigError(
                f"which, units, ys and xs must all have shape (R,); got {name} of shape "
                f"{tuple(index.shape)} and which of shape {tuple(which.shape)}"
            )
    bad = (which < 0) | (which >= len(images))  # (R,)
    if bool(bad.any()):
        raise ConfigError(
            f"which must index the {len(images)} images, in [0, {len(images) - 1}]; "
            f"got {which[bad][:5].tolist()}"
        )


def _seeds(output: Tensor, layer: str, rows: tuple[Tensor, ...]) -> tuple[Tensor, Signal]:
    """The activations (R,) and the one-hot seed of each row on a 1x1 frame at (y, x)."""
    which, units, ys, xs = rows
    shape = tuple(output.shape)
    check_range("unit", units, shape[1], layer, shape)
    check_range("y", ys, shape[2], layer, shape)
    check_range("x", xs, shape[3], layer, shape)
    activations = output[which, units, ys, xs]  # (R,)
    values = output.new_zeros(len(which), shape[1], 1, 1)  # (R, K, 1, 1)
    values[torch.arange(len(which), device=output.device), units, 0, 0] = activations
    return activations, Signal(values, ys, xs)


def project_rows(
    model: nn.Module,
    layer: str,
    images: Tensor,
    which: Tensor,
    units: Tensor,
    ys: Tensor,
    xs: Tensor,
) -> tuple[Tensor, Tensor]:
    """Deconvnet projections of activation (units[r], ys[r], xs[r]) of `layer` in images[which[r]].

    images: (N, C, H, W) preprocessed model input, each image once; which, units, ys, xs: (R,)
    integer, `which` indexes `images`. Returns projections (R, C, H, W) and activations (R,), as
    `deconv.project(model, layer, images[which], units, ys, xs, return_activations=True)` does.
    """
    module = find_layer(model, layer)
    _check_rows(images, which, units, ys, xs)
    rows = tuple(index.to(images.device, torch.long) for index in (which, units, ys, xs))
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return _fallback(model, layer, images, rows)  # scripted code is invisible to the tape
    with eval_mode(model):
        tape, output = _record(model, module, images)
        target = tape.node(output)  # None for no output or one not derived from the input
        if output is None or target is None or output.dim() != 4:
            return _fallback(model, layer, images, rows)
        try:
            with torch.no_grad():  # the weights require grad; nothing here needs a graph
                activations, seeds = _seeds(output, layer, rows)
                signal = backward(tape, target, seeds, rows[0])
        except _Unsupported:
            return _fallback(model, layer, images, rows)
    height, width = images.shape[2:]
    with torch.no_grad():
        projections = _reframe(signal.values, -signal.top, -signal.left, height, width)
    return projections, activations  # (R, C, H, W), (R,)


def _fallback(model: nn.Module, layer: str, images: Tensor, rows: tuple) -> tuple[Tensor, Tensor]:
    """`deconv.project` on each row's image: autograd over full maps."""
    which, units, ys, xs = rows
    both = project(model, layer, images[which], units, ys, xs, return_activations=True)
    assert isinstance(both, tuple)  # return_activations: (projections, activations)
    return both
