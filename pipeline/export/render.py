"""The export's worker side: original files and rows become patch, projection, overlay, mask and
grid PNGs.

`Renderer` is a plain class (tests can run it without Ray; `export` wraps it in a Ray actor). It
loads the model once; `export_images` reads, decodes (EXIF orientation applied) and verifies each
image once, cuts every row's patch from the full-resolution original, then per layer in passes of
whole images (`passes`) runs the model to the layer once (`heat.unit_maps`: each row's map gives
its recomputed activation at (y, x), its heat overlay and its mask, see `heat`) and, for the top
rows only, the deconvnet (`cone.project_rows` runs each image forward once and projects each row
inside its cone; samples and bottom rows get no projection: the backward is the export's main
cost, and a bottom row's seed is the unit's weakest response, often 0: a grey picture). It writes
the PNGs; `render_grids` composes unit grids from the top rows' PNGs. The image functions are pure:

* `cut(image, box)`: the exact pixels of a half-open (top, left, bottom, right) box.
* `projection_image(projection, std)`: a projection (3, h, w) in normalised-input space becomes a
  displayable RGB image. Multiplying by the per-channel std turns it into a change of [0, 1]
  pixels; it is then scaled by its own largest magnitude over the box and all three channels, so
  that 0 is mid-grey (128), +max is 255 and -max is 0 in the strongest channel:
  ``pixel = round(255 * (0.5 + 0.5 * signal / max|signal|))``. A zero projection is plain grey.
  Scaling each projection on its own, with 0 kept at grey, follows the paper's figures: the sign
  of every pixel is visible and the strongest projection does not wash out the weakest.
* `grid(patches, projections)`: a unit's k patches and k projections as two square grids side by
  side, patches left; each patch is shown at the scale the network saw it (resized to its
  projection's size, i.e. the model-input box) and every tile is padded to a common cell size.
* `filters_image(weight)`: first-layer filters (O, 3, kh, kw), each scaled like a projection.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.config import Preprocess
from pipeline.dataset.containers import read_bytes
from pipeline.dataset.decode import BadImage, decode
from pipeline.dataset.jpeg import model_input
from pipeline.dataset.preprocess import normalize, to_uint8
from pipeline.errors import DataError
from pipeline.export.cone import project_rows
from pipeline.export.heat import mask, mask_image, overlay, unit_maps, upsample
from pipeline.export.records import ImageJob, Outcome, PlanRow, UnitGrid
from pipeline.net.device import pick_device
from pipeline.net.models import load_expected
from pipeline.store.storage import Store

GREY = 128  # where 0 lands in a projection or filter image
BACKGROUND = (255, 255, 255)  # gaps and padding: white, distinct from a projection's grey
MIN_CELL = 64  # small receptive fields are enlarged (nearest neighbour) to at least this size
GAP = 2  # pixels between tiles
PANEL_GAP = 12  # pixels between the patch grid and the projection grid


@dataclass(frozen=True)
class Settings:
    """What every actor needs; storage options travel to the actors but are never written."""

    model: str  # model spec from the manifest
    weights: str | None
    model_fingerprint: str
    preprocess: Preprocess
    export_url: str  # OUT/export
    storage_options: dict
    batch_size: int  # rows per deconvnet pass (see `passes`)
    threads: int  # decode / encode threads, and torch threads on CPU
    decode: str = "pil"  # how the index decoded its model inputs (resolved: pil or device)
    draft: bool = False  # and whether large JPEGs were decoded at reduced size


class Renderer:
    """Loads the model once; exports images, then renders unit grids (see the module doc)."""

    def __init__(self, settings: Settings, threads: int | None = None):
        settings = dataclasses.replace(settings, threads=threads or settings.threads)
        torch.set_num_threads(settings.threads)
        self.s = settings
        self.device = pick_device()
        s = settings
        module = load_expected(s.model, s.weights, s.storage_options, s.model_fingerprint)
        self.model = module.to(self.device)
        self.store = Store(settings.export_url, settings.storage_options)

    def export_images(self, jobs: tuple[ImageJob, ...]) -> list[Outcome]:
        """Patches, projections, overlays and masks of every row of these images; per row, the
        outcome."""
        with ThreadPoolExecutor(self.s.threads) as pool:
            loaded = list(pool.map(self._load, jobs))  # [(ImageJob, pixels, image, error)]
            outcome = {
                row["row"]: Outcome(
                    row=row["row"], recomputed=None, mask_fraction=None, error=error
                )
                for job, _, _, error in loaded
                if error is not None
                for row in job.rows
            }
            # `_load` gives pixels and the image exactly when it gives no error
            good = [(job, px, im) for job, px, im, _ in loaded if px is not None and im is not None]
            if good:
                stack = torch.stack([pixels for _, pixels, _ in good])  # (N, 3, crop, crop) uint8
                originals = [image for _, _, image in good]
                pairs = [(row, i) for i, (job, _, _) in enumerate(good) for row in job.rows]
                for row, value, fraction in self._render(stack, originals, pairs, pool):
                    outcome[row["row"]] = Outcome(
                        row=row["row"], recomputed=value, mask_fraction=fraction, error=None
                    )
        return list(outcome.values())

    def _load(
        self, job: ImageJob
    ) -> tuple[ImageJob, torch.Tensor | None, Image.Image | None, str | None]:
        """Read, decode and verify one image, write its patches; return the model input and the
        oriented original (kept for the overlays: a task holds at most TASK_ROWS images)."""
        try:
            data = read_bytes(job.uri, self.s.storage_options, job.offset, job.size)
            decoded = decode(data, self.s.preprocess.max_pixels, self.s.preprocess.resize)
        except (BadImage, OSError, DataError) as e:
            return job, None, None, f"unreadable at export: {str(e) or type(e).__name__}"
        if decoded.image_hash != job.image_hash:
            changed = f"sha256 {decoded.image_hash[:12]}, indexed {job.image_hash[:12]}"
            return job, None, None, f"file changed since indexing ({changed}); re-run the index"
        for row in job.rows:
            if row["patch_path"] is not None:
                patch = cut(decoded.image, row["box"])
                self.store.write_bytes(row["patch_path"], png(patch))
        if self.s.decode == "pil" and not self.s.draft:
            return job, to_uint8(decoded.image, self.s.preprocess), decoded.image, None
        try:  # the model input decoded as the index decoded it
            pixels = model_input(data, self.s.preprocess, self.s.decode, self.s.draft, self.device)
        except BadImage as e:
            return job, None, None, f"unreadable at export: {e}"
        return job, pixels.cpu(), decoded.image, None  # (3, crop, crop)

    def _render(
        self,
        stack: torch.Tensor,
        originals: list[Image.Image],
        pairs: list[tuple[PlanRow, int]],
        pool: ThreadPoolExecutor,
    ) -> Iterator[tuple[PlanRow, float, float | None]]:
        """Per layer in passes: each row's map (overlay, mask, recomputed activation) and, for
        top rows, its deconvnet projection; yields (row, activation, mask fraction)."""
        layers: dict[str, list[tuple[PlanRow, int]]] = {}
        for pair in pairs:
            layers.setdefault(pair[0]["layer"], []).append(pair)
        for layer, group in layers.items():
            for chunk in passes(group, self.s.batch_size):
                rows, positions = zip(*chunk, strict=True)
                images = sorted(set(positions))  # each image of the pass runs forward once
                pixels = stack[images].to(self.device)  # (N, 3, crop, crop) uint8
                x = normalize(pixels, self.s.preprocess)  # (N, 3, crop, crop)
                slot = {position: i for i, position in enumerate(images)}
                which = torch.tensor([slot[position] for position in positions])  # (R,)
                units, ys, xs = (torch.tensor([r[k] for r in rows]) for k in ("unit", "y", "x"))
                maps = unit_maps(self.model, layer, x, which, units)  # (R, H', W')
                acts = maps[torch.arange(len(rows)), ys, xs].tolist()  # (R,)
                top = [i for i, row in enumerate(rows) if row["kind"] == "top"]
                if top:
                    at = torch.tensor(top)  # (T,)
                    proj, values = project_rows(
                        self.model, layer, x, which[at], units[at], ys[at], xs[at]
                    )  # (T, 3, crop, crop), (T,)
                    list(pool.map(self._write_projection, [rows[i] for i in top], proj.cpu()))
                    for i, value in zip(top, values.cpu().tolist(), strict=True):
                        acts[i] = value  # the deconvnet's forward: as before samples existed
                pictures = [originals[position] for position in positions]
                fractions = list(pool.map(self._write_heat, rows, maps, pictures))
                yield from zip(rows, acts, fractions, strict=True)

    def _write_heat(
        self, row: PlanRow, activation_map: torch.Tensor, original: Image.Image
    ) -> float | None:
        """Write the row's overlay and mask; return the mask's share of the patch (or None)."""
        if row["overlay_path"] is None:
            return None
        patch = cut(original, row["box"])
        heat = upsample(
            activation_map, self.s.preprocess.crop, row["input_box"], (patch.height, patch.width)
        )  # (h, w) fmt: skip
        self.store.write_bytes(row["overlay_path"], png(overlay(patch, heat, row["heat_scale"])))
        threshold = row["mask_threshold"]
        if row["mask_path"] is None or threshold is None:
            return None
        region = mask(heat, threshold)  # (h, w)
        self.store.write_bytes(row["mask_path"], png(mask_image(patch, region)))
        return float(region.mean())

    def _write_projection(self, row: PlanRow, projection: torch.Tensor) -> None:
        if row["projection_path"] is None:
            return
        top, left, bottom, right = row["input_box"]
        image = projection_image(projection[:, top:bottom, left:right], self.s.preprocess.std)
        self.store.write_bytes(row["projection_path"], png(image))

    def render_grids(self, units: tuple[UnitGrid, ...]) -> list[dict[str, Any]]:
        """Compose and write one grid per unit; return each grid's size."""
        with ThreadPoolExecutor(self.s.threads) as pool:
            return list(pool.map(self._grid, units))

    def _grid(self, unit: UnitGrid) -> dict[str, Any]:
        patches = [self._read_png(path) for path in unit["patches"]]
        projections = [self._read_png(path) for path in unit["projections"]]
        image = grid(patches, projections)
        self.store.write_bytes(unit["grid_path"], png(image))
        return {"grid_path": unit["grid_path"], "width": image.width, "height": image.height}

    def _read_png(self, rel: str | None) -> Image.Image | None:
        if rel is None:
            return None
        image = Image.open(io.BytesIO(self.store.read_bytes(rel)))
        image.load()
        return image


def passes(group: list[tuple[PlanRow, int]], size: int) -> list[list[tuple[PlanRow, int]]]:
    """Split (row, image position) pairs into passes of at most `size` rows, whole images first.

    An image's rows stay in one pass unless they alone exceed `size`: `project_rows` runs each
    image of a pass forward once, so splitting an image would repeat its forward.
    """
    images: dict[int, list[tuple[PlanRow, int]]] = {}
    for pair in group:
        images.setdefault(pair[1], []).append(pair)
    out: list[list[tuple[PlanRow, int]]] = [[]]
    for pairs in images.values():
        if out[-1] and len(out[-1]) + len(pairs) > size:
            out.append([])
        for pair in pairs:
            if len(out[-1]) == size:
                out.append([])
            out[-1].append(pair)
    return [chunk for chunk in out if chunk]


def cut(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The pixels rows top..bottom-1, columns left..right-1 of `image`, unchanged."""
    top, left, bottom, right = box
    assert 0 <= top <= bottom <= image.height and 0 <= left <= right <= image.width, box
    return image.crop((left, top, right, bottom))


def png(image: Image.Image) -> bytes:
    """Lossless PNG bytes; light compression, since patches can be large."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def signed_to_uint8(signal: np.ndarray) -> np.ndarray:
    """Scale by the largest magnitude so that 0 -> 128, +max -> 255, -max -> 0."""
    scale = float(np.abs(signal).max(initial=0.0))
    if not math.isfinite(scale) or scale == 0.0:
        return np.full(signal.shape, GREY, dtype=np.uint8)
    return np.clip(np.rint(255.0 * (0.5 + 0.5 * signal / scale)), 0, 255).astype(np.uint8)


def projection_image(projection: torch.Tensor, std: tuple[float, float, float]) -> Image.Image:
    """(3, h, w) projection in normalised-input space -> RGB image, 0 at mid-grey."""
    signal = projection.detach().to("cpu", torch.float64)  # (3, h, w)
    signal = signal * torch.tensor(std, dtype=torch.float64).view(3, 1, 1)  # [0, 1]-pixel units
    array = signed_to_uint8(signal.permute(1, 2, 0).numpy())  # (h, w, 3)
    return Image.fromarray(np.ascontiguousarray(array))


def grid(patches: list[Image.Image | None], projections: list[Image.Image | None]) -> Image.Image:
    """Patches (left) and projections (right), rank-ordered row by row in two square grids.

    A missing tile (unreadable image, empty box) stays blank. The cell is the largest projection,
    enlarged by an integer factor when smaller than MIN_CELL; patches take their projection's size.
    """
    assert len(patches) == len(projections)
    sizes = [p.size for p in projections if p is not None] or [(1, 1)]
    cell_w, cell_h = max(w for w, _ in sizes), max(h for _, h in sizes)  # (w, h)
    zoom = max(1, math.ceil(MIN_CELL / max(cell_w, cell_h)))
    cell_w, cell_h = cell_w * zoom, cell_h * zoom
    cols = max(1, math.ceil(math.sqrt(len(patches))))
    rows = max(1, math.ceil(len(patches) / cols))
    panel_w, panel_h = cols * cell_w + (cols - 1) * GAP, rows * cell_h + (rows - 1) * GAP
    canvas = Image.new("RGB", (2 * panel_w + PANEL_GAP, panel_h), BACKGROUND)
    for i, (patch, proj) in enumerate(zip(patches, projections, strict=True)):
        if proj is None:
            continue
        size = (proj.width * zoom, proj.height * zoom)
        x0 = (i % cols) * (cell_w + GAP) + (cell_w - size[0]) // 2
        y0 = (i // cols) * (cell_h + GAP) + (cell_h - size[1]) // 2
        if patch is not None:
            canvas.paste(patch.resize(size, Image.Resampling.BICUBIC), (x0, y0))
        canvas.paste(proj.resize(size, Image.Resampling.NEAREST), (panel_w + PANEL_GAP + x0, y0))
    return canvas


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first registered Conv2d that reads RGB pixels: the one whose filters are shown."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            return module
    return None


def filters_image(weight: torch.Tensor) -> Image.Image:
    """(O, 3, kh, kw) filters -> one RGB image, a square grid, each filter scaled on its own."""
    count, _, kh, kw = weight.shape
    zoom = max(1, math.ceil(32 / max(kh, kw)))
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    tile_h, tile_w = kh * zoom, kw * zoom
    canvas = Image.new(
        "RGB", (cols * tile_w + (cols + 1) * GAP, rows * tile_h + (rows + 1) * GAP), BACKGROUND
    )
    filters = weight.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()  # (O, kh, kw, 3)
    for i, f in enumerate(filters):
        tile = Image.fromarray(signed_to_uint8(f)).resize(
            (tile_w, tile_h), Image.Resampling.NEAREST
        )
        canvas.paste(tile, (GAP + (i % cols) * (tile_w + GAP), GAP + (i // cols) * (tile_h + GAP)))
    return canvas
