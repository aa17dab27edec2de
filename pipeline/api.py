"""The Python API for notebooks: a finished index as pandas DataFrames, PIL images and HTML.

    import pipeline
    run = pipeline.open("runs/x")          # a folder or fsspec URL; follows LATEST after a reindex
    run.top("layer4", 7)                   # OUT/index/<layer>.parquet, the unit's rows by rank
    run.stats("layer4")                    # OUT/stats/<layer>.parquet, quantiles as q0.5, q0.99...
    run.samples("layer4", 7)               # OUT/samples/<layer>.parquet, bands in manifest order
    run.bottom("layer4", 7)                # OUT/bottom/<layer>.parquet, rank 1 the lowest
    run.grid("layer4", 7)                  # a PIL image of the unit's patches
    run.unit("layer4", 7)                  # shows grid, stats line and top table in a notebook

Every read goes through `store.storage.Store` (local folders and URLs alike) and reads one layer's
file, filtered to the unit by pyarrow (row groups of other units are skipped), never the whole
index. `grid` returns the export's grid PNG when an export holds the unit; otherwise it cuts the
receptive-field boxes from the original images (no forward pass) and lays the patches out as the
export's grid lays out its patch panel. Bad input raises the project's one-line errors, naming
the valid options and the fix. HTML from `_repr_html_` escapes every string.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, overload

import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from pipeline.dataset.containers import read_bytes
from pipeline.dataset.decode import BadImage, decode
from pipeline.dataset.preprocess import geometry
from pipeline.errors import ConfigError, DataError, InputNotFoundError
from pipeline.export import render
from pipeline.export.page import text
from pipeline.export.plan import choose, preprocess_of, read_manifest
from pipeline.net.models import load_model
from pipeline.net.receptive_field import ReceptiveField, receptive_field
from pipeline.store import versions
from pipeline.store.layout import (
    BOTTOM_DIR,
    EXPORT_DIR,
    EXPORT_SUMMARY,
    IMAGES,
    INDEX_DIR,
    SAMPLES_DIR,
    STATS_DIR,
    grid_path,
    layer_file,
)
from pipeline.store.storage import Store

TOP_COLUMNS = ["rank", "activation", "image_id", "y", "x"]  # the unit table in HTML
RERUN = {  # an optional output -> the flag that makes `ninebest index` write it
    STATS_DIR: "--stats on",
    SAMPLES_DIR: "--samples N (with --stats on)",
    BOTTOM_DIR: "--bottom K",
}
WHAT = {STATS_DIR: "statistics", SAMPLES_DIR: "samples", BOTTOM_DIR: "bottom-K rows"}


def open_run(url: str | os.PathLike, storage_options: dict | None = None) -> Run:
    """The finished index at `url` (its LATEST version after `ninebest reindex`)."""
    root = Store(os.fspath(url), storage_options)
    if not root.exists(""):
        raise InputNotFoundError(
            f"{root.url!r} does not exist; pass the --out folder or URL of a `ninebest index` run"
        )
    store = versions.newest(root)
    return Run(root.url, store, read_manifest(store))


@dataclass(frozen=True, repr=False)
class Run:
    """One complete index: its Store (the newest version) and manifest.json."""

    url: str  # what was opened
    store: Store  # where the index's files are: OUT, or OUT/versions/<LATEST>
    manifest: dict[str, Any]
    fields: dict[str, ReceptiveField] = field(default_factory=dict, repr=False, compare=False)
    # layer -> receptive field at the crop size, filled on first use by `field_of`

    @property
    def layers(self) -> dict[str, int]:
        """Indexed layer -> its number of units, in the index's order."""
        return {
            layer: self.manifest["layers"][layer][0] for layer in self.manifest["config"]["layers"]
        }

    def top(self, layer: str, unit: int) -> pd.DataFrame:
        """The unit's top-k rows of OUT/index/<layer>.parquet, rank 1 (strongest) first."""
        return self._rows(INDEX_DIR, layer, unit).sort_values("rank", ignore_index=True)

    def bottom(self, layer: str, unit: int) -> pd.DataFrame:
        """The unit's bottom-K rows (`--bottom K`), rank 1 the least activating."""
        return self._rows(BOTTOM_DIR, layer, unit).sort_values("rank", ignore_index=True)

    def samples(self, layer: str, unit: int) -> pd.DataFrame:
        """The unit's examples across the range, by band in manifest order (`band` is ordered);
        `band_low` and `band_high` are the band's percentile range from `samples.bands`."""
        rows = self._rows(SAMPLES_DIR, layer, unit)
        bands = self.manifest["samples"]["bands"]  # name -> [low, high], in order
        rows["band"] = pd.Categorical(rows["band"], categories=list(bands), ordered=True)
        rows["band_low"] = rows["band"].map(lambda b: bands[b][0]).astype(float)
        rows["band_high"] = rows["band"].map(lambda b: bands[b][1]).astype(float)
        return rows.sort_values("band", kind="stable", ignore_index=True)  # stored: by priority

    def stats(self, layer: str, unit: int | None = None) -> pd.DataFrame:
        """OUT/stats/<layer>.parquet (one row per unit, or the one `unit`): the quantiles in
        columns named by their probability (q0.5, q0.99, ...), the histogram kept as a list."""
        if unit is None:
            self._check(layer, None)
            rows = self._read(STATS_DIR, layer, None)
        else:
            rows = self._rows(STATS_DIR, layer, unit)
        names = quantile_names(self.manifest["stats"]["probabilities"])
        values = pd.DataFrame(
            [list(q) if q is not None else [math.nan] * len(names) for q in rows["quantiles"]],
            columns=names,
            index=rows.index,
        )
        histogram = rows.pop("histogram")
        rows = pd.concat([rows.drop(columns="quantiles"), values], axis=1)
        rows["histogram"] = histogram
        return rows.sort_values("unit", ignore_index=True)

    def grid(self, layer: str, unit: int) -> Image.Image:
        """The unit's grid: the export's PNG if an export holds the unit, else its patches cut
        from the original images (`patch_grid`)."""
        unit = self._check(layer, unit)
        export = self.store.child(EXPORT_DIR)
        rel = grid_path(layer, unit)
        if export.exists(EXPORT_SUMMARY) and export.exists(rel):
            return _png(export.read_bytes(rel))
        return patch_grid(self, layer, unit)

    def unit(self, layer: str, unit: int) -> UnitView:
        """One unit, shown in a notebook as its grid, stats line and top table."""
        return UnitView(self, layer, self._check(layer, unit))

    def has(self, folder: str) -> bool:
        """Whether the index wrote the optional output `folder` (stats, samples, bottom)."""
        return bool(self.manifest.get("outputs", {}).get(folder))

    def _rows(self, folder: str, layer: str, unit: int) -> pd.DataFrame:
        return self._read(folder, layer, self._check(layer, unit))

    def _read(self, folder: str, layer: str, unit: int | None) -> pd.DataFrame:
        """One layer's file of `folder`, only the row groups and rows of `unit` (None: all)."""
        if folder != INDEX_DIR and not self.has(folder):
            raise DataError(
                f"the index at {self.store.url!r} has no {WHAT[folder]}; rerun `ninebest index` "
                f"(or `reindex`) with {RERUN[folder]} to write {folder}/"
            )
        filters = None if unit is None else [("unit", "==", unit)]
        path = self.store.path(layer_file(folder, layer))
        return pq.read_table(path, filesystem=self.store.fs, filters=filters).to_pandas()

    @overload
    def _check(self, layer: str, unit: int) -> int: ...
    @overload
    def _check(self, layer: str, unit: None) -> None: ...
    def _check(self, layer: str, unit: int | None) -> int | None:
        """The unit as an int (NumPy integers from a DataFrame welcome); ConfigError naming the
        indexed layers, or the unit range, for a bad selection."""
        if not isinstance(layer, str):
            raise ConfigError(f"layer must be a name such as {next(iter(self.layers))!r}")
        if isinstance(unit, numbers.Integral) and not isinstance(unit, bool):
            unit = int(unit)
        choose(self.manifest, (layer,), None if unit is None else (unit,))
        return unit

    def field_of(self, layer: str) -> ReceptiveField:
        """The layer's receptive field; the architecture only (weights are not needed)."""
        if layer not in self.fields:
            model = load_model(self.manifest["model"]["spec"], None).module
            crop = preprocess_of(self.manifest).crop
            self.fields[layer] = receptive_field(model, layer, (crop, crop))
        return self.fields[layer]

    def __repr__(self) -> str:
        images = self.manifest.get("counts", {}).get("indexed", "?")
        layers = ", ".join(f"{name} ({units})" for name, units in self.layers.items())
        return f"Run({self.store.uri('')!r}: {images} images; layers {layers})"

    def _repr_html_(self) -> str:
        counts = self.manifest.get("counts", {})
        outputs = [INDEX_DIR, *(f for f in (STATS_DIR, SAMPLES_DIR, BOTTOM_DIR) if self.has(f))]
        if self.store.child(EXPORT_DIR).exists(EXPORT_SUMMARY):
            outputs.append(EXPORT_DIR)
        model = self.manifest["model"]
        layers = [[name, units] for name, units in self.layers.items()]
        return (
            f"<div><b>ninebest run</b> {text(self.store.uri(''))}<br>"
            f"model {text(model['spec'])}, weights {text(model.get('weights') or 'seeded init')}, "
            f"{text(counts.get('indexed', '?'))} images indexed, "
            f"k = {text(self.manifest['config']['k'])}; outputs: {text(', '.join(outputs))}"
            f"{_table(['layer', 'units'], layers)}</div>"
        )


@dataclass(frozen=True, repr=False)
class UnitView:
    """A unit for a notebook cell: `_repr_html_` shows its grid, stats line and top rows."""

    run: Run
    layer: str
    unit: int

    def __repr__(self) -> str:
        top = self.run.top(self.layer, self.unit)[TOP_COLUMNS].to_string(index=False)
        return f"{self.layer} unit {self.unit}: {self.stats_line()}\n{top}"

    def _repr_html_(self) -> str:
        image = base64.b64encode(render.png(self.run.grid(self.layer, self.unit))).decode()
        top = self.run.top(self.layer, self.unit)
        rows = top[TOP_COLUMNS].itertuples(index=False)
        return (
            f"<div><b>{text(self.layer)}</b> unit {text(self.unit)}<br>"
            f'<img src="data:image/png;base64,{image}" alt="grid of {text(self.layer)} unit '
            f'{text(self.unit)}"><br>{text(self.stats_line())}{_table(TOP_COLUMNS, rows)}</div>'
        )

    def stats_line(self) -> str:
        """'49 images, mean 1.35, std 0.8, fire rate 100.0%, min 0.45, q0.001 ..., max 3.4' (or
        why there is none)."""
        if not self.run.has(STATS_DIR):
            return f"no statistics: index with {RERUN[STATS_DIR]}"
        row = self.run.stats(self.layer, self.unit).iloc[0]
        names = quantile_names(self.run.manifest["stats"]["probabilities"])
        parts = [f"{row['count']} images", f"mean {row['mean']:.4g}", f"std {row['std']:.4g}"]
        parts += [f"fire rate {row['fire_rate']:.1%}", f"min {row['min']:.4g}"]
        parts += [f"{name} {row[name]:.4g}" for name in names] + [f"max {row['max']:.4g}"]
        return ", ".join(parts)


def quantile_names(probabilities: Iterable[float]) -> list[str]:
    """Column names of the quantiles: 'q' and the probability as Python prints it (q0.999)."""
    return [f"q{float(p)!r}" for p in probabilities]


def patch_grid(run: Run, layer: str, unit: int) -> Image.Image:
    """The unit's top-k patches cut from the originals, laid out as the export's patch panel:
    each patch at the size the network saw it (its model-input box), blank where a box sees
    only padding or the image is unreadable or changed since indexing (with a warning)."""
    rows = run.top(layer, unit)
    boxes, pre = run.field_of(layer), preprocess_of(run.manifest)
    images = _images(run, list(rows["image_id"]))
    patches: list[Image.Image | None] = []
    frames: list[Image.Image | None] = []  # stand-ins for the projections: only their size counts
    for row in rows.itertuples(index=False):
        box = boxes.box(row.y, row.x)  # (top, left, bottom, right) in the crop
        image = images.get(row.image_id)
        patch = None if image is None or _empty(box) else _patch(run, image, box, row, pre)
        patches.append(patch)
        frames.append(
            None if patch is None else Image.new("RGB", (box[3] - box[1], box[2] - box[0]))
        )
    canvas = render.grid(patches, frames)  # patches left, stand-ins right
    return canvas.crop((0, 0, (canvas.width - render.PANEL_GAP) // 2, canvas.height))


def _patch(run: Run, image: dict, box: tuple[int, int, int, int], row, pre) -> Image.Image | None:
    """The original pixels of the model-input `box` of `row`'s image (None, warned, if unusable)."""
    original = geometry(image["height"], image["width"], pre).to_original(*box)
    if _empty(original):
        return None
    try:
        data = read_bytes(
            image["uri"], run.store.storage_options, image.get("offset"), image.get("bytes")
        )
        decoded = decode(data, pre.max_pixels, pre.resize)
    except (BadImage, OSError, DataError) as e:
        warnings.warn(f"{row.image_id!r} is unreadable now ({e}); its tile is blank", stacklevel=3)
        return None
    if decoded.image_hash != row.image_hash:
        warnings.warn(f"{row.image_id!r} changed since indexing; its tile is blank", stacklevel=3)
        return None
    return render.cut(decoded.image, original)


def _images(run: Run, ids: list[str]) -> dict[str, dict]:
    """images.parquet rows (uri, size, offset) of `ids` only, read with a pyarrow filter."""
    if not ids:
        return {}
    path = run.store.path(IMAGES)
    present = pq.read_schema(path, filesystem=run.store.fs).names  # offset, bytes: images v2
    columns = [c for c in ("image_id", "uri", "height", "width", "offset", "bytes") if c in present]
    table = pq.read_table(
        path, filesystem=run.store.fs, columns=columns, filters=[("image_id", "in", ids)]
    )
    return {row["image_id"]: row for row in table.to_pylist()}


def _empty(box: tuple[int, int, int, int]) -> bool:
    return box[0] >= box[2] or box[1] >= box[3]


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _table(columns: list[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{text(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{text(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
