"""The records the export driver plans and its actors render: typed, so a misspelled key fails
the type check instead of a run.

PlanRow:   one index row of a chosen unit, with its boxes and output paths (see `plan.plan_rows`).
ImageJob:  one image and all its rows: the unit of work of the image pass (read and decode once).
UnitGrid:  one unit's grid and the PNGs it is composed from, in rank order: the grid pass.
Outcome:   what an actor reports for a row: the recomputed activation, or why there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom and right exclusive


class PlanRow(TypedDict):
    layer: str  # the index row, as OUT/index/<layer>.parquet holds it
    unit: int
    rank: int
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
    projection_path: str | None
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
    error: str | None  # why the row could not be rendered (unreadable image, ...)
