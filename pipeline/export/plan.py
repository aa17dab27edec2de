"""What the export driver decides before any write: the selection, one row per (layer, unit,
kind, band, rank) with its boxes and file names, and the tasks the actors run.

Rows are the unit's top-k (the index), and where the index has them its examples across the
range (samples/) and its bottom (bottom/), all rendered alike but for the deconvnet (top only).

Rows are grouped by image and packed into tasks of about TASK_ROWS rows, so each image is read
and decoded once; the grid pass takes UNITS_PER_GRID_TASK units a task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from pipeline.config import Preprocess
from pipeline.dataset.preprocess import geometry
from pipeline.errors import ConfigError, DataError
from pipeline.export.records import ImageJob, PlanRow, UnitGrid
from pipeline.export.unit_stats import UnitStats, read_units
from pipeline.net.receptive_field import receptive_field
from pipeline.store.layout import (
    BOTTOM_DIR,
    IMAGES,
    MANIFEST,
    ROW_KINDS,
    SAMPLES_DIR,
    grid_path,
    index_file,
    layer_file,
    row_files,
)
from pipeline.store.storage import Store

TASK_ROWS = 64  # rows per task (images are never split between tasks)


UNITS_PER_GRID_TASK = 16


@dataclass(frozen=True)
class Task:
    key: str  # for retry messages, as a shard's key
    items: tuple[ImageJob, ...] | tuple[UnitGrid, ...]  # the image pass; the grid pass


def read_manifest(store: Store) -> dict[str, Any]:
    if not store.exists(MANIFEST):
        raise DataError(
            f"{store.url!r} holds no {MANIFEST}, so it is not a finished ninebest index; "
            f"pass the --out of a completed `ninebest index` run (or rerun it to finish)"
        )
    return store.read_json(MANIFEST)


def choose(
    manifest: dict, layers: tuple[str, ...] | None, units: tuple[int, ...] | None
) -> dict[str, list[int]]:
    """Layer -> sorted units to export; unknown layers and out-of-range units raise ConfigError."""
    indexed = list(manifest["config"]["layers"])
    chosen = indexed if layers is None else list(dict.fromkeys(layers))
    if not chosen:
        raise ConfigError(f"no layers given; indexed layers: {', '.join(indexed)}")
    for layer in chosen:
        if layer not in indexed:
            raise ConfigError(f"layer {layer!r} is not in the index; indexed: {', '.join(indexed)}")
    if units is not None and not all(isinstance(u, int) and not isinstance(u, bool) for u in units):
        raise ConfigError(f"units must be whole numbers (channel indices), got {list(units)!r}")
    out = {}
    for layer in chosen:
        count = manifest["layers"][layer][0]
        picked = range(count) if units is None else sorted(set(units))
        bad = [u for u in picked if not 0 <= u < count]
        if bad:
            raise ConfigError(
                f"unit {bad[0]} is out of range for layer {layer!r}, which has {count} units; "
                f"valid units: 0..{count - 1}"
            )
        out[layer] = list(picked)
    return out


def preprocess_of(manifest: dict) -> Preprocess:
    pre = dict(manifest["preprocess"])
    return Preprocess(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])})


def plan_rows(
    store: Store,
    chosen: dict[str, list[int]],
    model: nn.Module,
    pre: Preprocess,
    manifest: dict | None = None,
    stats: UnitStats | None = None,
) -> list[PlanRow]:
    """Every row of the chosen units with its boxes and output paths, in export.v2 order.

    The rows are the index's (top), and where the index has them (manifest.json outputs) its
    samples and bottom; masks get the unit's threshold from `stats` (none without statistics).
    """
    tables, sizes = read_rows(store, chosen, manifest or {})
    bands = list((manifest or {}).get("samples", {}).get("bands", {}))
    stats = stats or UnitStats()
    rows: list[PlanRow] = []
    for layer, found in tables.items():
        field = receptive_field(model, layer, (pre.crop, pre.crop))
        scale = {r["unit"]: r["activation"] for r in found if r["kind"] == "top" and r["rank"] == 1}
        for row in sorted(found, key=lambda r: _order(r, bands)):
            image = sizes[row["image_id"]]
            box = field.box(row["y"], row["x"])  # (top, left, bottom, right) in the crop
            original = geometry(image["height"], image["width"], pre).to_original(*box)
            files = row_files(layer, row["unit"], row["rank"], row["image_id"], row["kind"],
                              row["band"])  # fmt: skip
            empty = _empty(box) or _empty(original)  # a unit that sees only padding
            threshold = stats.threshold(layer, row["unit"])
            top_scale = scale.get(row["unit"])
            rows.append(
                PlanRow(
                    layer=row["layer"], unit=row["unit"], kind=row["kind"], band=row["band"],
                    rank=row["rank"], activation=row["activation"], image_id=row["image_id"],
                    image_hash=row["image_hash"], y=row["y"], x=row["x"],
                    row=len(rows), uri=image["uri"], offset=image.get("offset"),
                    size=image.get("bytes"), input_box=box, box=original,
                    patch_path=None if empty else files.patch,
                    projection_path=None if empty or row["kind"] != "top" else files.projection,
                    overlay_path=None if empty else files.overlay,
                    mask_path=None if empty or threshold is None else files.mask,
                    mask_threshold=threshold,
                    heat_scale=top_scale if top_scale is not None and top_scale > 0 else None,
                    grid_path=grid_path(layer, row["unit"]),
                )
            )  # fmt: skip
    return rows


def _order(row: dict, bands: list[str]) -> tuple:
    """export.v2 order within a layer: unit, kind (top, sample, bottom), band, rank."""
    band = bands.index(row["band"]) if row["band"] in bands else len(bands)
    return row["unit"], ROW_KINDS.index(row["kind"]), band, row["band"] or "", row["rank"]


def read_rows(
    store: Store, chosen: dict[str, list[int]], manifest: dict | None = None
) -> tuple[dict[str, list[dict]], dict]:
    """The rows of the chosen units per layer (each with its kind, band and rank), and each of
    their images' uri and size. Samples and bottom are read where manifest.json lists them."""
    listed = (manifest or {}).get("outputs", {})
    tables: dict[str, list[dict]] = {}
    for layer, units in chosen.items():
        tables[layer] = _kind_rows(store, index_file(layer), units, "top")
        for kind, folder in (("sample", SAMPLES_DIR), ("bottom", BOTTOM_DIR)):
            path = layer_file(folder, layer)
            if path in (listed.get(OUTPUT_KEYS[kind]) or ()):
                tables[layer] += _kind_rows(store, path, units, kind)
    if not any(row["kind"] == "top" for rows in tables.values() for row in rows):
        raise DataError(f"the index at {store.url!r} holds no rows for the chosen units")
    needed = pa.array(sorted({row["image_id"] for rows in tables.values() for row in rows}))
    images = store.read_parquet(IMAGES)
    where = [name for name in ("offset", "bytes") if name in images.column_names]  # images v2
    images = images.select(["image_id", "uri", "height", "width", *where])
    images = images.filter(pc.is_in(images["image_id"], needed))
    return tables, {image["image_id"]: image for image in images.to_pylist()}


OUTPUT_KEYS = {"sample": "samples", "bottom": "bottom"}  # manifest.json outputs


def _kind_rows(store: Store, path: str, units: list[int], kind: str) -> list[dict]:
    """One file's rows of `units`, marked with `kind`; samples ranked within (unit, band) in
    the file's order (lowest priority first), as samples.v1 sorts them."""
    rows = read_units(store, path, units).to_pylist()
    seen: dict[tuple[int, str], int] = {}
    for row in rows:
        row["kind"] = kind
        row.setdefault("band", None)
        if kind == "sample":
            key = (row["unit"], row["band"])
            seen[key] = row["rank"] = seen.get(key, 0) + 1
    return rows


def _empty(box: tuple[int, int, int, int]) -> bool:
    return box[0] >= box[2] or box[1] >= box[3]


def pack(rows: list[PlanRow]) -> list[Task]:
    """Group rows by image (sorted by image id) and pack whole images into tasks of ~TASK_ROWS."""
    by_image: dict[str, list[PlanRow]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    tasks: list[Task] = []
    current: list[ImageJob] = []
    count = 0
    for image_id in sorted(by_image):
        group = by_image[image_id]
        first = group[0]
        current.append(
            ImageJob(
                image_id,
                first["uri"],
                first["image_hash"],
                tuple(group),
                first["offset"],
                first["size"],
            )  # fmt: skip
        )
        count += len(group)
        if count >= TASK_ROWS:
            tasks.append(Task(f"images-{len(tasks):06d}", tuple(current)))
            current, count = [], 0
    if current:
        tasks.append(Task(f"images-{len(tasks):06d}", tuple(current)))
    return tasks


def grid_tasks(rows: Sequence[Mapping[str, Any]]) -> list[Task]:
    """One item per unit: its grid path and its top rows' patch / projection paths in rank
    order. `rows` are the export table's, whose paths are null where a row could not be rendered."""
    units: dict[str, UnitGrid] = {}
    for row in rows:
        if row["kind"] != "top":
            continue
        unit = units.setdefault(
            row["grid_path"], UnitGrid(grid_path=row["grid_path"], patches=[], projections=[])
        )
        unit["patches"].append(row["patch_path"])
        unit["projections"].append(row["projection_path"])
    items = list(units.values())
    step = UNITS_PER_GRID_TASK
    return [Task(f"grids-{i:06d}", tuple(items[i : i + step])) for i in range(0, len(items), step)]
