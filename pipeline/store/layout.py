"""Every path under OUT, in one place: what each stage writes and the next one reads.

    OUT/run.json                          the run's fingerprint and config (index: first write)
    OUT/partials/<shard>/<attempt>/topk.parquet, images.parquet   one map attempt's tables
                                          (and bottom, stats, phash, samples.parquet if kept)
    OUT/partials/<shard>/_COMMIT.json     names the attempt that counts (written last)
    OUT/manifest.json                     written last: its presence means the index is complete
    OUT/index/<layer>.parquet             the nine-best index (schema index.v1)
    OUT/stats/<layer>.parquet             per-unit statistics (--stats on, schema stats.v1)
    OUT/bottom/<layer>.parquet            the bottom-K (--bottom K, schema index.v1)
    OUT/samples/<layer>.parquet           examples across the range (--samples, schema samples.v1)
    OUT/images.parquet, OUT/errors.parquet every listed image; the skipped ones and why
    OUT/versions/<run-id>/...             a reindex's immutable version: the files above, plus
                                          report.parquet and drift.parquet
    OUT/LATEST, OUT/_LOCK                 the newest complete version; the reindex lock
    <index>/export/...                    the export step: export.parquet, export.json,
                                          patches/, projections/, overlays/, masks/, grids/,
                                          filters.png, atlas/

Paths are relative to a `Store` (OUT, or one version of it) and use forward slashes. Export file
names never contain image ids: `safe_name` keeps plainly safe layer names and hashes the rest,
`image_key` is 16 hex digits of the id's sha256, and `checked` refuses anything else.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import NamedTuple

RUN_FILE = "run.json"
MANIFEST = "manifest.json"
IMAGES = "images.parquet"
ERRORS = "errors.parquet"
INDEX_DIR = "index"
STATS_DIR = "stats"
BOTTOM_DIR = "bottom"
SAMPLES_DIR = "samples"
REPORT = "report.parquet"
DRIFT = "drift.parquet"

PARTIALS = "partials"
COMMIT = "_COMMIT.json"

VERSIONS = "versions"
LATEST = "LATEST"
LOCK = "_LOCK"

EXPORT_DIR = "export"
EXPORT_TABLE = "export.parquet"
EXPORT_SUMMARY = "export.json"
FILTERS = "filters.png"
ATLAS_INDEX = "atlas/index.html"

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
SAFE_PATH = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*")


def index_file(layer: str) -> str:
    """OUT/index/<layer>.parquet: the layer's dotted name as torch spells it."""
    return layer_file(INDEX_DIR, layer)


def layer_file(folder: str, layer: str) -> str:
    """OUT/<folder>/<layer>.parquet: one layer's file of a per-layer output (index, stats, ...)."""
    return f"{folder}/{layer}.parquet"


def partial_commit(shard_key: str) -> str:
    return posixpath.join(PARTIALS, shard_key, COMMIT)


def partial_folder(shard_key: str, attempt: str) -> str:
    return posixpath.join(PARTIALS, shard_key, attempt)


def partial_table(shard_key: str, attempt: str, table: str) -> str:
    """One table ('topk', 'images', or an optional one: partials.EXTRA) of one attempt."""
    return posixpath.join(PARTIALS, shard_key, attempt, f"{table}.parquet")


def version_folder(run_id: str) -> str:
    return posixpath.join(VERSIONS, run_id)


def atlas_page(page: str) -> str:
    return f"atlas/layer-{page}.html"


def safe_name(name: str) -> str:
    """`name` as one path component: kept when plainly safe, else cleaned plus a hash of it."""
    if SAFE_NAME.fullmatch(name) and ".." not in name:
        return name
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-")[:40] or "x"
    return f"{cleaned}-{_digest(name)[:12]}"


def image_key(image_id: str) -> str:
    """16 hex digits of the image id's sha256: the only part of a file name an id decides."""
    return _digest(image_id)[:16]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def checked(rel: str) -> str:
    """`rel` if it is a relative path of safe components with no '..'; refuse anything else."""
    if not SAFE_PATH.fullmatch(rel) or any(part == ".." for part in rel.split("/")):
        raise AssertionError(f"unsafe export path {rel!r}")  # our own names must never get here
    return rel


def output_paths(layer: str, unit: int, rank: int, image_id: str) -> tuple[str, str]:
    """(patch, projection) paths of a top row, relative to the export folder."""
    files = row_files(layer, unit, rank, image_id)
    return files.patch, files.projection


class RowFiles(NamedTuple):
    """One export row's PNGs, relative to the export folder."""

    patch: str  # the box cut from the original
    projection: str  # its deconvnet projection
    overlay: str  # the patch under the unit's activation map as heat
    mask: str  # the patch with the map's above-threshold region outlined, the rest dimmed


ROW_KINDS = ("top", "sample", "bottom")  # export rows: the index, samples/, bottom/


def row_files(
    layer: str, unit: int, rank: int, image_id: str, kind: str = "top", band: str | None = None
) -> RowFiles:
    """The PNGs of one export row: <folder>/<layer>/<unit>/<stem>.png for each of patches,
    projections, overlays and masks; the stem is `<rank>-<id hash>` for a top row,
    `sample-<band>-<rank>-<id hash>` for a sample, `bottom-<rank>-<id hash>` for the bottom."""
    stems = {
        "top": f"{rank}-{image_key(image_id)}",
        "sample": f"sample-{safe_name(band or '')}-{rank}-{image_key(image_id)}",
        "bottom": f"bottom-{rank}-{image_key(image_id)}",
    }
    if kind not in stems:
        raise ValueError(f"unknown export row kind {kind!r}; known: {', '.join(ROW_KINDS)}")
    name = f"{safe_name(layer)}/{unit}/{stems[kind]}.png"
    folders = ("patches", "projections", "overlays", "masks")
    return RowFiles(*(checked(f"{folder}/{name}") for folder in folders))


def unit_page(page: str, unit: int) -> str:
    """atlas/unit-<layer page>-<unit>.html: one unit's page (`page` is the layer's safe name)."""
    return checked(f"atlas/unit-{page}-{unit}.html")


def grid_path(layer: str, unit: int) -> str:
    return checked(f"grids/{safe_name(layer)}/{unit}.png")
