"""Where a worker computes, in what precision, and where it decodes JPEGs."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bfloat16 on a GPU that supports it (autocast: convolutions and matmuls in
    bfloat16, reductions in float32), float32 elsewhere; other values are kept."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def resolve_decode(decode: str, device: torch.device) -> str:
    """'auto' is 'device' on a CUDA worker (nvJPEG), 'pil' elsewhere; other values are kept."""
    if decode != "auto":
        return decode
    return "device" if device.type == "cuda" else "pil"
