"""Brute-force oracle for the index: plain torch, whole dataset, no Ray, no pipeline code.

Images are decoded with PIL and preprocessed with torchvision's own transforms (`load`), or, for
`--decode device`, JPEGs are decoded by torchvision with its own EXIF handling and transformed as
tensors (`load_device`); plain forward hooks clone every chosen layer's output; each unit's
images are sorted by (activation descending, image_id ascending) in Python. Given each image's
content hash (`--distinct content`, the default), only the first row of each content in that
order is kept.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.io
import torchvision.transforms.v2 as T
from PIL import Image, ImageOps

TRANSFORM = T.Compose(
    [
        T.Resize(256, antialias=True),
        T.CenterCrop(224),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


def load(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return TRANSFORM(ImageOps.exif_transpose(image).convert("RGB"))  # (3, 224, 224)


def load_device(path: Path) -> torch.Tensor:
    """As `--decode device` decodes: RGB and grayscale JPEGs by torchvision, the rest by PIL."""
    with Image.open(path) as image:
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        image = torchvision.io.decode_image(
            str(path), mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True
        )  # (3, H, W) uint8
    return TRANSFORM(image)  # (3, 224, 224)


def activations(model, layers, images: torch.Tensor, batch: int = 16) -> dict[str, torch.Tensor]:
    """Every layer's full output for `images` (N, 3, H, W), cloned at hook time."""
    modules = dict(model.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        modules[name].register_forward_hook(
            lambda m, i, o, name=name: outputs[name].append(o.detach().clone())
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            for chunk in images.split(batch):
                model(chunk)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(chunks) for name, chunks in outputs.items()}


def content_hashes(root: Path, ids: list[str]) -> list[str]:
    """sha256 of each image file's bytes (the content the index dedupes by)."""
    import hashlib

    return [hashlib.sha256((root / i).read_bytes()).hexdigest() for i in ids]


def top_k(
    outputs: dict[str, torch.Tensor], ids: list[str], k: int, hashes: list[str] | None = None
) -> dict:
    """{(layer, unit): [(image_id, activation, y, x), ...]} by brute force; one row per hash
    when `hashes` are given."""
    result = {}
    for layer, out in outputs.items():
        if out.dim() == 2:
            out = out[:, :, None, None]  # (N, C, 1, 1)
        n, c, h, w = out.shape
        flat = out.reshape(n, c, h * w).numpy()
        for unit in range(c):
            rows = []
            for i in range(n):
                pos = int(np.argmax(flat[i, unit]))  # first maximum, row-major
                rows.append((float(flat[i, unit, pos]), ids[i], pos // w, pos % w))
            rows.sort(key=lambda r: (-r[0], r[1]))
            if hashes is not None:
                content = dict(zip(ids, hashes, strict=True))
                seen: set[str] = set()
                rows = [r for r in rows if not (content[r[1]] in seen or seen.add(content[r[1]]))]
            result[(layer, unit)] = [(r[1], r[0], r[2], r[3]) for r in rows[:k]]
    return result


def compare(
    index_rows: list[dict],
    outputs: dict[str, torch.Tensor],
    ids: list[str],
    k: int,
    hashes: list[str] | None = None,
):
    """Assert the index equals the brute-force top-k of `outputs` (one row per hash if given;
    then any image of the oracle's content may stand for it: identical files get activations
    apart by batch noise, and the stronger represents them).

    Image ids, ranks and positions must match exactly, activations within float tolerance. A
    batched forward pass is not bit-identical across batch compositions, so two images (or two
    positions) whose activations differ by less than that noise may legitimately swap; such
    near-ties are allowed, and their activations must still agree with the oracle.
    """
    expected = top_k(outputs, ids, k, hashes)
    content = dict(zip(ids, hashes, strict=True)) if hashes is not None else {}
    got: dict = {}
    for row in index_rows:
        got.setdefault((row["layer"], row["unit"]), []).append(row)
    assert set(got) == set(expected), "index covers other (layer, unit) pairs than the oracle"
    swaps = 0
    for (layer, unit), want in expected.items():
        rows = sorted(got[(layer, unit)], key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == list(range(1, len(want) + 1)), (layer, unit)
        out = outputs[layer]
        for row, (image_id, value, y, x) in zip(rows, want, strict=True):
            tol = 1e-4 * max(1.0, abs(value))
            assert abs(row["activation"] - value) <= tol, (layer, unit, row, value)
            if content and content.get(row["image_id"]) == content[image_id]:
                image_id = row["image_id"]  # identical bytes, activations apart by batch noise
            if (row["image_id"], row["y"], row["x"]) != (image_id, y, x):
                swaps += 1
                i = ids.index(row["image_id"])
                there = out[i, unit, row["y"], row["x"]] if out.dim() == 4 else out[i, unit]
                assert abs(float(there) - value) <= tol, (layer, unit, row, image_id, value)
    assert swaps <= max(2, len(expected) // 100), f"{swaps} near-tie swaps"
