"""Originals for export tests: real photographs of many sizes and aspect ratios, hostile names.

`make_originals(root)` writes the files under root/files/ and a manifest root/list.txt naming them
in the ways a user may: plain relative paths, a path through `..`, an absolute path; file names hold
spaces, backslashes, unicode, `..`, and HTML that would run if it were not escaped. It returns the
manifest's path. image_id is the manifest line, so ids keep all of that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT_ID = "files/<script>window.pwned=1;<" + "/script>.png"  # a folder "<script>…<" + a file
ONERROR_ID = 'files/"><img src=x onerror="window.pwned=2">.jpg'


def _photo(name: str) -> np.ndarray:
    import skimage.data

    array = getattr(skimage.data, name)()
    return array if array.ndim == 3 else np.stack([array] * 3, axis=-1)  # (H, W, 3) uint8


def _resized(array: np.ndarray, height: int, width: int) -> Image.Image:
    return Image.fromarray(array).resize((width, height), Image.Resampling.LANCZOS)


def make_originals(root: Path) -> Path:
    """Write the originals and root/list.txt; return the manifest's path."""
    files = root / "files"
    files.mkdir(parents=True)
    written: dict[str, Image.Image | None] = {
        "wide.jpg": _resized(_photo("coffee"), 200, 600),  # 1:3
        "tall.png": _resized(_photo("astronaut"), 520, 190),  # upright
        "small.jpg": _resized(_photo("chelsea"), 100, 150),  # upscaled by resize 256
        "small tall.png": _resized(_photo("rocket"), 150, 100),
        "big.jpg": Image.fromarray(_photo("rocket")),  # 427 x 640
        "gray.png": Image.fromarray(_photo("camera")[..., 0]),  # mode L
        "..dots..png": _resized(_photo("immunohistochemistry"), 300, 300),
        "back\\slash\\..\\name.png": _resized(_photo("cat"), 240, 360),
        "ünïcødé 名前 🙂.jpg": _resized(_photo("astronaut"), 333, 250),
        '"><img src=x onerror="window.pwned=2">.jpg': _resized(_photo("coffee"), 260, 300),
    }
    for name, image in written.items():
        image.save(files / name, quality=92) if name.endswith(".jpg") else image.save(files / name)
    script = files / "<script>window.pwned=1;<"
    script.mkdir()
    _resized(_photo("chelsea"), 280, 420).save(script / "script>.png")
    _rotated(files / "rotated.jpg")
    lines = [f"files/{name}" for name in written if name not in ("wide.jpg", "big.jpg")]
    lines += [
        "files/../files/wide.jpg",  # a path through ..
        str((files / "big.jpg").resolve()),  # an absolute path
        "files/rotated.jpg",
        SCRIPT_ID,
    ]
    manifest = root / "list.txt"
    manifest.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return manifest


def _rotated(path: Path) -> None:
    """A JPEG stored 300 x 451 with EXIF orientation 6: viewers (and ninebest) show it 451 x 300."""
    image = Image.fromarray(_photo("chelsea"))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, quality=92, exif=exif)


def oriented(path: Path) -> np.ndarray:
    """The oracle: the file as a viewer shows it, (H, W, 3) uint8."""
    from PIL import ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
