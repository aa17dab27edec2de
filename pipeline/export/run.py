"""`ninebest export`: patches, deconvnet projections, unit grids and an atlas from a finished index.

The driver reads OUT/manifest.json (model, weights, preprocessing, layers: nothing is restated),
validates the selection, and plans one row per (layer, unit, rank): the receptive-field box of
(y, x) in model-input pixels (`receptive_field` at the crop size), the same box in original pixels
(`geometry().to_original`), and the file names of its outputs. The rows are the index's top-k
and, where the index has them, its samples (examples across the range) and bottom-K; masks take
the unit's 0.99 quantile from OUT/stats (`unit_stats`; skipped, with a note in export.json, when
the index has no statistics). Rows are grouped by image and packed into tasks, so each image is
read and decoded once. A pool of Ray actors (one per GPU, else `workers` CPU actors) cuts every
patch from the full-resolution oriented original, runs the model to each layer to recompute each
activation and draw its map as a heat overlay and a mask (`heat`), runs the deconvnet for the top
rows, batched per layer, and writes the PNGs; a second pass on the same actors composes one grid
per unit from the top rows' PNGs. The driver then writes filters.png, the atlas, export.parquet
(schema `schemas/export.v2.json`) and, last, export.json: its presence means the export is
complete. A new export replaces OUT/export.

Layout under OUT/export/. File names come from the layer name (made safe), unit, rank and a hash
of the image id, never from the id itself, so no image id can steer a write:

    patches/<layer>/<unit>/<stem>.png      the box cut from the original, exactly
    projections/<layer>/<unit>/<stem>.png  the projection in the box, model-input pixels (top)
    overlays/<layer>/<unit>/<stem>.png     the patch under the unit's map as heat (heat.overlay)
    masks/<layer>/<unit>/<stem>.png        the map above the unit's 0.99 quantile (heat.mask)
    grids/<layer>/<unit>.png               top patches beside projections (see render.grid)
    filters.png                            the first convolution's filters
    atlas/index.html                       static site, one page per layer and one per unit

where <stem> is <rank>-<id hash> for a top row, sample-<band>-<rank>-<id hash> for a sample and
bottom-<rank>-<id hash> for a bottom row (`layout.row_files`).
    export.parquet, export.json                      the rows; a summary with the resolved config
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from pipeline.cluster.connect import ray_session
from pipeline.cluster.pool import Pool
from pipeline.errors import ConfigError, DataError
from pipeline.export import atlas, render
from pipeline.export.plan import choose, grid_tasks, pack, plan_rows, preprocess_of, read_manifest
from pipeline.export.records import Outcome, PlanRow
from pipeline.export.unit_stats import MASK_PROBABILITY, UnitStats, read_unit_stats
from pipeline.net.models import load_model
from pipeline.progress import Progress
from pipeline.store import versions
from pipeline.store.layout import (
    ATLAS_INDEX,
    EXPORT_DIR,
    EXPORT_SUMMARY,
    EXPORT_TABLE,
    FILTERS,
    ROW_KINDS,
    safe_name,
)
from pipeline.store.schemas import VERSIONS, conform, schema
from pipeline.store.storage import Store

REL_TOL, ABS_TOL = 1e-3, 1e-5  # recomputed (float32) vs stored activation
BF16_REL_TOL = 5e-2  # when the index ran under bfloat16 autocast (8 bits of mantissa)


# ---------------------------------------------------------------- file names


# ---------------------------------------------------------------- validation and plan


# ---------------------------------------------------------------- the pool


# ---------------------------------------------------------------- the driver


@dataclass(frozen=True)
class Job:
    """What the driver validated and planned before any write."""

    manifest: dict
    chosen: dict[str, list[int]]  # layer -> units
    model: nn.Module
    settings: render.Settings  # threads filled in once the pool is sized
    rows: list[PlanRow]  # see plan.plan_rows
    stats: UnitStats  # the chosen units' statistics and mask thresholds


def export(
    out: str,
    layers: tuple[str, ...] | None = None,
    units: tuple[int, ...] | None = None,
    workers: int | None = None,
    address: str | None = None,
    storage_options: dict | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export patches, projections, grids, filters and the atlas of index OUT; return the summary.

    layers / units: a subset (default: every indexed layer, every unit; `units` apply to each
    layer). workers: CPU actors without GPUs (default: the index's). address: Ray address
    (default: the index's, else RAY_ADDRESS, else a local instance). After `ninebest reindex`, OUT
    means its LATEST version, and the export goes into that version's folder. The summary is also
    written to <index>/export/export.json.
    """
    started = time.time()
    progress = progress or Progress()
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers must be a whole number of at least 1, got {workers!r}")
    job = prepare(out, layers, units, storage_options)
    target = Store(job.settings.export_url, storage_options)
    target.remove("")  # a new export replaces the old one, so no stale file is left linked
    config = job.manifest["config"]
    with ray_session(address or config.get("address")):
        table, grids = run_pool(job, workers or config["workers"], progress)
    exported = table.to_pylist()
    filters = write_filters(target, job.model)
    summary = _summary(target, job, table, filters, units)
    pages = {name: safe_name(name) for name in job.chosen}
    history = unit_history(out, job, storage_options)
    atlas.write(target, exported, summary, grids, pages, history, job.stats, job.manifest)
    target.write_parquet(EXPORT_TABLE, table)
    summary["timings"] = {"total_seconds": round(time.time() - started, 3)}
    target.write_json(EXPORT_SUMMARY, summary)
    progress.say(_line(summary))
    return summary


def unit_history(out: str, job: Job, storage_options) -> dict[tuple[str, int], list[dict]]:
    """Every chosen unit's rows in every version, when OUT was built by `ninebest reindex`."""
    root = Store(out, storage_options)
    if not versions.complete(root):
        return {}
    found: dict[tuple[str, int], list[dict]] = {}
    for layer, units in job.chosen.items():
        for row in versions.history(root, layer, units).to_pylist():
            found.setdefault((layer, row["unit"]), []).append(row)
    return found


def prepare(out: str, layers, units, storage_options: dict | None) -> Job:
    """Read and check the manifest, the selection and the weights; plan every row."""
    store = versions.newest(Store(out, storage_options))  # follows LATEST after a reindex
    manifest = read_manifest(store)
    chosen = choose(manifest, layers, units)
    pre = preprocess_of(manifest)
    spec, weights = manifest["model"]["spec"], manifest["model"]["weights"]
    loaded = load_model(spec, weights, storage_options)
    indexed = manifest["model"]["fingerprint"]
    if loaded.fingerprint != indexed:
        raise DataError(
            f"the weights {weights!r} changed since {out!r} was indexed (fingerprint "
            f"{loaded.fingerprint[:12]}, indexed {indexed[:12]}); export with the index's weights"
        )
    stats = read_unit_stats(store, manifest, chosen)
    rows = plan_rows(store, chosen, loaded.module, pre, manifest, stats)
    settings = render.Settings(
        spec, weights, indexed, pre, f"{store.url}/{EXPORT_DIR}", dict(storage_options or {}),
        manifest["config"]["batch_size"], threads=1,
        decode=manifest["environment"].get("decodes", ["pil"])[0],
        draft=manifest["config"].get("draft", False),
    )  # fmt: skip
    return Job(manifest, chosen, loaded.module, settings, rows, stats)


def run_pool(job: Job, workers: int, progress: Progress) -> tuple[pa.Table, dict]:
    """Both passes on one actor pool: images to PNGs, then unit grids; the table, grid sizes."""
    tasks = pack(job.rows)
    threads = job.manifest["config"]["decode_threads"]
    outcomes: dict[int, Outcome] = {}
    grids: dict[str, tuple[int, int]] = {}
    last = time.time()
    items, name = (lambda t: (t.items,)), (lambda t: f"export task of {len(t.items)} rows")
    with Pool(render.Renderer, (job.settings,), workers, threads, len(tasks)) as pool:
        for done, result in enumerate(pool.map("export_images", tasks, items, name), 1):
            outcomes.update((r["row"], r) for r in result)
            if done == len(tasks) or time.time() - last >= progress.interval:
                last = time.time()
                progress.say(f"export: {done}/{len(tasks)} tasks, {len(outcomes)} rows")
        table = finish_rows(job.rows, outcomes, tolerance(job.manifest))  # unreadable: null paths
        for result in pool.map("render_grids", grid_tasks(table.to_pylist()), items, name):
            grids.update((g["grid_path"], (g["width"], g["height"])) for g in result)
        progress.say(f"export: {len(grids)} unit grids")
    return table, grids


def finish_rows(
    rows: list[PlanRow], outcomes: dict[int, Outcome], rel_tol: float = REL_TOL
) -> pa.Table:
    """The export table: plan rows plus recomputed activations, checks and errors."""
    columns: dict[str, list] = {name: [] for name in schema("export").names}
    for row in rows:
        outcome = outcomes[row["row"]]
        value, error = outcome["recomputed"], outcome["error"]
        record: dict[str, Any] = {
            **row,
            "recomputed_activation": value,
            "activation_ok": None if value is None else close(value, row["activation"], rel_tol),
            "mask_fraction": outcome["mask_fraction"],
            "error": error,
        }
        if error is not None:
            for name in ("patch_path", "projection_path", "overlay_path", "mask_path"):
                record[name] = None
        record.update(zip(("top", "left", "bottom", "right"), row["box"], strict=True))
        inputs = ("input_top", "input_left", "input_bottom", "input_right")
        record.update(zip(inputs, row["input_box"], strict=True))
        for name, values in columns.items():
            values.append(record[name])
    return conform(pa.table(columns, schema=schema("export")), "export")


def close(recomputed: float, stored: float, rel_tol: float = REL_TOL) -> bool:
    return math.isclose(recomputed, stored, rel_tol=rel_tol, abs_tol=ABS_TOL)


def tolerance(manifest: dict) -> float:
    """Relative tolerance of the activation check: looser for an index run in bfloat16."""
    precisions = manifest.get("environment", {}).get("precisions", ["float32"])
    return BF16_REL_TOL if "bfloat16" in precisions else REL_TOL


def write_filters(target: Store, model: nn.Module) -> str | None:
    """filters.png from the first RGB convolution, if the model has one."""
    conv = render.first_conv(model)
    if conv is None:
        return None
    target.write_bytes(FILTERS, render.png(render.filters_image(conv.weight)))
    return FILTERS


def _summary(target: Store, job: Job, table: pa.Table, filters: str | None, units) -> dict:
    ok = table["activation_ok"]
    counts = Counter(table["kind"].to_pylist())
    return {
        "export": target.uri(""),
        "index_run": job.manifest["run"],
        "model": job.manifest["model"],
        "preprocess": job.manifest["preprocess"],
        "selection": {"layers": list(job.chosen), "units": None if units is None else list(units)},
        "layers": {layer: {"units": len(units)} for layer, units in job.chosen.items()},
        "counts": {
            "rows": table.num_rows,
            "images": len(set(table["image_id"].to_pylist())),
            "activation_mismatches": pc.sum(pc.invert(ok.fill_null(True))).as_py() or 0,
            "errors": table.num_rows - table["error"].null_count,
        },
        "tolerance": {"relative": tolerance(job.manifest), "absolute": ABS_TOL},
        "kinds": {kind: counts.get(kind, 0) for kind in ROW_KINDS},
        "projections": "top rows only; samples and bottom rows have patches, overlays and masks",
        "masks": {
            "probability": MASK_PROBABILITY,
            "threshold": "the unit's quantile at this probability (OUT/stats)",
            "rule": "upsampled activation map > threshold",
            "written": table.num_rows - table["mask_path"].null_count,
            "note": job.stats.note,
        },
        "outputs": {"table": EXPORT_TABLE, "atlas": ATLAS_INDEX, "filters": filters},
        "schemas": {"export": VERSIONS["export"]},
    }


def _line(summary: dict) -> str:
    counts = summary["counts"]
    return (
        f"exported {counts['rows']} rows from {counts['images']} images "
        f"({counts['activation_mismatches']} activation mismatches, {counts['errors']} errors) "
        f"to {summary['export']}"
    )
