"""The atlas: a static site over an export, readable from file:// or any static server.

`write(store, rows, summary, grids, pages, history, stats, manifest)` writes, under the export
folder:

    atlas/index.html               the model, the first-layer filters, and one link per layer
    atlas/layer-<name>.html        one section per unit: its stats line, its grid (top patches
                                   beside projections), a table of rank, activation, recomputed
                                   activation, image id, box, and links to the row's PNGs, and a
                                   link to the unit's page
    atlas/unit-<name>-<unit>.html  one page per unit (`unit_page`): statistics and histogram,
                                   the top images with their heat overlays and masks, the
                                   examples across the range by band, and the bottom

No JavaScript and no framework: plain HTML with inline CSS, relative URLs, `loading="lazy"` images
with their sizes given (so the page does not jump), and a Content-Security-Policy that forbids
scripts. Every data string (image ids above all: they may hold `<script>`) is HTML-escaped, and
every URL is built from the export's own safe file names, percent-encoded.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.export.page import HEAD, TAIL, text, url
from pipeline.export.unit_page import stats_line, unit_page
from pipeline.export.unit_stats import UnitStats
from pipeline.store.layout import ATLAS_INDEX, atlas_page
from pipeline.store.layout import unit_page as unit_page_path
from pipeline.store.storage import Store

__all__ = ["HEAD", "TAIL", "text", "url", "write"]


def write(
    store: Store,
    rows: list[dict],
    summary: dict,
    grids: dict[str, tuple[int, int]],
    pages: dict[str, str],
    history: dict[tuple[str, int], list[dict]] | None = None,
    stats: UnitStats | None = None,
    manifest: dict | None = None,
) -> str:
    """Write the atlas under `store` (the export folder); return the index page's path.

    rows: export rows (schema "export"); grids: grid path -> (width, height); pages: layer ->
    its safe file name part; history: (layer, unit) -> that unit's rows in every version of a
    reindexed output (`versions.history`), shown under the unit when there are several; stats:
    the units' statistics; manifest: the index's (for the samples' band ranges).
    """
    stats = stats or UnitStats()
    bands = (manifest or {}).get("samples", {}).get("bands", {})
    by_layer: dict[str, list[dict]] = {layer: [] for layer in pages}
    for row in rows:
        by_layer[row["layer"]].append(row)
    for layer, layer_rows in by_layer.items():
        page = layer_page(layer, layer_rows, grids, history or {}, stats, pages[layer])
        store.write_bytes(atlas_page(pages[layer]), page.encode("utf-8"))
        units: dict[int, list[dict]] = {}
        for row in layer_rows:
            units.setdefault(row["unit"], []).append(row)
        href = atlas_page(pages[layer]).rsplit("/", 1)[-1]
        for unit, unit_rows in units.items():
            path = unit_rows[0]["grid_path"]
            grid = (path, grids[path]) if path in grids else None
            html_ = unit_page(layer, unit, unit_rows, href, grid, stats, bands)
            store.write_bytes(unit_page_path(pages[layer], unit), html_.encode("utf-8"))
    store.write_bytes(ATLAS_INDEX, index_page(summary, by_layer, pages).encode("utf-8"))
    return ATLAS_INDEX


def index_page(summary: dict, by_layer: dict[str, list[dict]], pages: dict[str, str]) -> str:
    model = summary["model"]
    parts = [
        HEAD.format(title="ninebest atlas"),
        "<h1>ninebest atlas</h1>\n",
        f"<p>Model <code>{text(model['spec'])}</code>, "
        f"weights <code>{text(model['weights'])}</code> "
        f"(fingerprint <code>{text(model['fingerprint'][:12])}</code>). For each unit, the images "
        "that excite it most: the receptive field cut from the original (left grid) and its "
        "deconvnet projection (right grid, 0 shown as grey). Each unit's own page adds its "
        "statistics and histogram, where in each patch it fires (a heat overlay, and a mask "
        "at its 0.99 quantile), examples from across its range and its weakest images.</p>\n",
        "<h2>Layers</h2>\n<table>\n<tr><th>layer</th><th>units</th><th>rows</th>"
        "<th>activation mismatches</th><th>errors</th></tr>\n",
    ]
    for layer, rows in by_layer.items():
        units = len({row["unit"] for row in rows})
        bad = sum(row["activation_ok"] is False for row in rows)
        errors = sum(row["error"] is not None for row in rows)
        parts.append(
            f'<tr><td><a href="{url(f"layer-{pages[layer]}.html")}">{text(layer)}</a></td>'
            f'<td class="num">{units}</td><td class="num">{len(rows)}</td>'
            f'<td class="num{" bad" if bad else ""}">{bad}</td>'
            f'<td class="num{" bad" if errors else ""}">{errors}</td></tr>\n'
        )
    parts.append("</table>\n")
    if summary["outputs"]["filters"]:
        parts.append(
            "<h2>First-layer filters</h2>\n"
            f'<p><img src="{url("../" + summary["outputs"]["filters"])}" loading="lazy" '
            'alt="first convolution filters"></p>\n'
        )
    parts.append(TAIL)
    return "".join(parts)


def layer_page(
    layer: str,
    rows: list[dict],
    grids: dict[str, tuple[int, int]],
    history,
    stats: UnitStats,
    page: str,
) -> str:
    """The layer's page: per unit its stats line, grid and top rows, and a link to its page."""
    units: dict[int, list[dict]] = {}
    for row in rows:
        if row["kind"] == "top":
            units.setdefault(row["unit"], []).append(row)
    links = " ".join(f'<a href="#unit-{unit}">{unit}</a>' for unit in units)
    parts = [
        HEAD.format(title=f"ninebest: {text(layer)}"),
        '<p><a href="index.html">all layers</a></p>\n',
        f"<h1>Layer {text(layer)}</h1>\n",
        f'<nav class="units">Units: {links}</nav>\n',
    ]
    parts.extend(
        unit_section(layer, unit, unit_rows, grids, stats, page)
        + history_table(history.get((layer, unit), []))
        for unit, unit_rows in units.items()
    )
    parts.append(TAIL)
    return "".join(parts)


def unit_section(
    layer: str, unit: int, rows: list[dict], grids: dict, stats: UnitStats, page: str
) -> str:
    path = rows[0]["grid_path"]
    row = stats.rows.get((layer, unit))
    line = stats_line(row) if row is not None else ""
    own = unit_page_path(page, unit).rsplit("/", 1)[-1]
    width, height = grids.get(path, (0, 0))
    size = f' width="{width}" height="{height}"' if width else ""
    alt = f"{layer} unit {unit}: top images (left) and their deconvnet projections (right)"
    return (
        f'<section id="unit-{unit}">\n<h2>Unit {unit}</h2>\n{line}'
        f'<p><a class="unit-page" href="{url(own)}">unit {unit}: statistics, where it fires, '
        "examples across the range, bottom</a></p>\n"
        f'<p><a href="{url("../" + path)}"><img class="grid" src="{url("../" + path)}"{size} '
        f'loading="lazy" alt="{text(alt)}"></a></p>\n'
        "<table>\n<tr><th>rank</th><th>activation</th><th>recomputed</th><th>image</th>"
        "<th>box (top, left, bottom, right)</th><th>files</th></tr>\n"
        + "".join(row_html(row) for row in rows)
        + "</table>\n</section>\n"
    )


def history_table(rows: list[dict]) -> str:
    """The unit's top images in each version (Zeiler & Fergus Fig. 4), if there are several."""
    by_version: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["version"], r["rank"])):
        by_version.setdefault(row["version"], []).append(row)
    if len(by_version) < 2:
        return ""
    lines = "".join(
        f"<tr><td><code>{text(version)}</code></td><td>"
        + "<br>".join(
            f"{r['rank']}. <bdi>{text(r['image_id'])}</bdi> ({r['activation']:.4g})" for r in ranked
        )
        + "</td></tr>\n"
        for version, ranked in by_version.items()
    )
    return (
        "<details><summary>History across versions (oldest first)</summary>\n"
        f"<table>\n<tr><th>version</th><th>top images (activation)</th></tr>\n{lines}</table>\n"
        "</details>\n"
    )


def row_html(row: dict) -> str:
    recomputed = row["recomputed_activation"]
    flag = ' class="num bad"' if row["activation_ok"] is False else ' class="num"'
    files = " ".join(_links(row)) or f'<span class="bad">{text(row["error"] or "no box")}</span>'
    return (
        f'<tr><td class="num">{row["rank"]}</td><td class="num">{row["activation"]:.6g}</td>'
        f"<td{flag}>{'' if recomputed is None else f'{recomputed:.6g}'}</td>"
        f'<td class="id"><bdi>{text(row["image_id"])}</bdi></td>'
        f"<td>{row['top']}, {row['left']}, {row['bottom']}, {row['right']}</td>"
        f"<td>{files}</td></tr>\n"
    )


def _links(row: dict) -> Iterable[str]:
    labels = (
        ("patch_path", "patch"), ("projection_path", "projection"),
        ("overlay_path", "overlay"), ("mask_path", "mask"),
    )  # fmt: skip
    for key, label in labels:
        if row[key] is not None:
            yield f'<a href="{url("../" + row[key])}">{label}</a>'
