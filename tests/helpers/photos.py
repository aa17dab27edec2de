"""Real photographs for tests and the demo: crops and flips of scikit-image's sample photos.

`make_photos(root)` writes a deterministic folder tree (several folders, JPEG and PNG, colour and
grayscale, several sizes and aspect ratios) and returns the written paths sorted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FOLDERS = {
    "people": ["astronaut"],
    "animals": ["chelsea", "cat"],
    "objects": ["coffee", "rocket", "clock", "coins", "colorwheel"],
    "science": ["hubble_deep_field", "immunohistochemistry", "retina", "moon", "camera"],
    "textures": ["brick", "grass", "gravel"],
}


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()  # (H, W, 3) or (H, W) uint8


def _variants(array: np.ndarray, count: int) -> list[np.ndarray]:
    h, w = array.shape[:2]
    views = [
        array,
        array[:, ::-1],  # horizontal flip
        array[: int(h * 0.8), int(w * 0.1) :],  # top-right crop, another aspect ratio
        array[int(h * 0.25) : int(h * 0.85), : int(w * 0.7)],  # wide crop
        array[::-1, :],  # vertical flip
    ]
    return [np.ascontiguousarray(v) for v in views[:count]]


def make_photos(
    root: Path, variants: int = 3, max_side: int | None = None, png: bool = True
) -> list[Path]:
    """Write `variants` crops/flips of each sample photo under root/<folder>/; return the paths."""
    written = []
    for folder, names in FOLDERS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            for i, view in enumerate(_variants(_photo(name), variants)):
                image = Image.fromarray(view)
                if max_side and max(image.size) > max_side:
                    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                suffix = ".png" if png and (i + len(name)) % 3 == 0 else ".jpg"
                path = root / folder / f"{name}_{i}{suffix}"
                image.save(path, quality=90) if suffix == ".jpg" else image.save(path)
                written.append(path)
    return sorted(written)
