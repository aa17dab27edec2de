"""The records the export driver plans and its actors render: typed, so a misspelled key fails
the type check instead of a run.

PlanRow:   one row of a chosen unit (top, sample or bottom), with its boxes, output paths and
           what its heat overlay and mask are drawn against (see `plan.plan_rows`).
ImageJob:  one image and all its rows: the unit of work of the image pass (read and decode once).
UnitGrid:  one unit's grid and the PNGs it is composed from, in rank order: the grid pass.
Outcome:   what an actor reports for a row: the recomputed activation, or why there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom and right exclusive


class PlanRow(TypedDict):
    layer: str  # the row as OUT/index/, samples/ or bottom/<layer>.parquet holds it
    unit: int
    kind: str  # top, sample or bottom (layout.ROW_KINDS)
    band: str | None  # a sample's band (manifest.json samples.bands); None otherwise
    rank: int  # within kind (and band): see schemas/export.v2.json
    activation: float
    image_id: str
    image_hash: str
    y: int
    x: int
    row: int  # position in the plan: outcomes are matched back by it
    uri: str  # where the original's bytes are (images.parquet)
    offset: int | None  # a tar member: where its bytes start in the tar
    size: int | None  # and how many
    input_box: Box  # the receptive field of (y, x) in model-input pixels
    box: Box  # the same box in the original (oriented) image's pixels
    patch_path: str | None  # under OUT/export; None where the box sees only padding
    projection_path: str | None  # top rows only: samples and bottom get no deconvnet
    overlay_path: str | None  # None where the box sees only padding
    mask_path: str | None  # None also where the unit has no 0.99 quantile (no statistics)
    mask_threshold: float | None  # the unit's 0.99 quantile from OUT/stats
    heat_scale: float | None  # the activation drawn as full heat: the unit's top-1; None if <= 0
    grid_path: str


@dataclass(frozen=True)
class ImageJob:
    image_id: str
    uri: str
    image_hash: str
    rows: tuple[PlanRow, ...]  # plan rows of this image
    offset: int | None = None  # a tar member's bytes: where they start in the tar
    size: int | None = None  # and how many (one ranged read instead of a header scan)


class UnitGrid(TypedDict):
    grid_path: str
    patches: list[str | None]  # rank order; None where a row has no patch
    projections: list[str | None]


class Outcome(TypedDict):
    row: int
    recomputed: float | None  # the activation recomputed from the original file
    mask_fraction: float | None  # share of the patch inside the mask; None without a mask
    error: str | None  # why the row could not be rendered (unreadable image, ...)
