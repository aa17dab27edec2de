"""One atlas page per unit (atlas/unit-<layer>-<unit>.html): everything the export knows of it.

In order: the statistics line (count, mean, std, min, max, fire rate) and the quantiles, the
histogram as inline SVG (`histogram.svg`, the median and the mask threshold marked), the top-k
grid and, per top image, its patch, heat overlay and mask; the examples across the range grouped
by band (with each band's percentile range from manifest.json samples.bands), then the bottom,
each image with its activation and its recomputed one. Without statistics the page says why
there are no stats and no masks. The same rules as the rest of the atlas (see `atlas`): no
script, every string escaped, every URL one of our own file names.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.export import histogram
from pipeline.export.page import HEAD, TAIL, text, url
from pipeline.export.unit_stats import MASK_PROBABILITY, UnitStats

TILE = 96  # each picture is shown this tall (CSS pixels) ...
MAX_TILE_WIDTH = 3 * TILE  # ... and at most this wide
KIND_TITLES = {"top": "Top images", "sample": "Examples across the range", "bottom": "Bottom"}


def unit_page(
    layer: str,
    unit: int,
    rows: list[dict],
    layer_href: str,
    grid: tuple[str, tuple[int, int]] | None,
    stats: UnitStats,
    bands: dict[str, list[float]],
) -> str:
    """The page of one unit. rows: its export rows (all kinds, export.v2 order); layer_href:
    the layer page's file name; grid: its path and (width, height)."""
    parts = [
        HEAD.format(title=f"ninebest: {text(layer)} unit {unit}"),
        f'<p><a href="index.html">all layers</a> &middot; <a href="{url(layer_href)}'
        f'#unit-{unit}">layer {text(layer)}</a></p>\n',
        f"<h1>Layer {text(layer)}, unit {unit}</h1>\n",
        stats_section(layer, unit, stats),
    ]
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    parts.append(f'<section id="top">\n<h2>{KIND_TITLES["top"]}</h2>\n')
    if grid is not None:
        path, (width, height) = grid
        size = f' width="{width}" height="{height}"' if width else ""
        parts.append(
            f'<p><img class="grid" src="{url("../" + path)}"{size} loading="lazy" '
            f'alt="{text(f"{layer} unit {unit}: top patches and their projections")}"></p>\n'
        )
    parts.append(tiles(by_kind.get("top", [])) + "</section>\n")
    if "sample" in by_kind:
        parts.append(samples_section(by_kind["sample"], bands))
    if "bottom" in by_kind:
        parts.append(
            f'<section id="bottom">\n<h2>{KIND_TITLES["bottom"]}</h2>\n'
            '<p class="muted">The least activating images, rank 1 the lowest.</p>\n'
            + tiles(by_kind["bottom"])
            + "</section>\n"
        )
    parts.append(TAIL)
    return "".join(parts)


def number(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"


def stats_line(row: dict[str, Any]) -> str:
    """count, mean, std, min, max and fire rate of one stats.v1 row, as one line of HTML."""
    return (
        f'<p class="stats">{row["count"]} images &middot; mean {number(row["mean"])} &middot; '
        f"std {number(row['std'])} &middot; min {number(row['min'])} &middot; "
        f"max {number(row['max'])} &middot; fire rate {100 * row['fire_rate']:.3g}%</p>\n"
    )


def stats_section(layer: str, unit: int, stats: UnitStats) -> str:
    row = stats.rows.get((layer, unit))
    if row is None:
        why = text(stats.note or "no statistics for this unit")
        return (
            f'<section id="stats">\n<h2>Statistics</h2>\n<p class="muted">{why}</p>\n</section>\n'
        )
    quantiles = row["quantiles"] or [None] * len(stats.probabilities)
    head = "".join(f"<th>p{100 * p:g}</th>" for p in stats.probabilities)
    cells = "".join(f'<td class="num">{number(q)}</td>' for q in quantiles)
    error = f" (sketch rank error {stats.rank_error:.2%})" if stats.rank_error else ""
    marks = {
        f"p{100 * p:g}": q
        for p, q in zip(stats.probabilities, quantiles, strict=True)
        if q is not None and (math.isclose(p, 0.5) or math.isclose(p, MASK_PROBABILITY))
    }
    note = f'<p class="muted">{text(stats.note)}</p>\n' if stats.note else ""
    threshold = stats.threshold(layer, unit)
    masks = (
        f"<p>Masks: the activation map above the p{100 * MASK_PROBABILITY:g} quantile, "
        f"{number(threshold)}.</p>\n"
        if threshold is not None
        else ""
    )
    return (
        '<section id="stats">\n<h2>Statistics</h2>\n'
        + stats_line(row)
        + f"<table>\n<tr><th>quantile{text(error)}</th>{head}</tr>\n"
        f"<tr><td>activation</td>{cells}</tr>\n</table>\n"
        + histogram.svg(row["histogram"], stats.edges, marks)
        + masks
        + note
        + "</section>\n"
    )


def samples_section(rows: list[dict], bands: dict[str, list[float]]) -> str:
    by_band: dict[str, list[dict]] = {}
    for row in rows:
        by_band.setdefault(row["band"], []).append(row)
    parts = [f'<section id="samples">\n<h2>{KIND_TITLES["sample"]}</h2>\n']
    for band, band_rows in by_band.items():
        span = bands.get(band)
        where = f" (percentiles {100 * span[0]:g} to {100 * span[1]:g})" if span else ""
        parts.append(f"<h3>Band {text(band)}{text(where)}</h3>\n" + tiles(band_rows))
    parts.append("</section>\n")
    return "".join(parts)


def tiles(rows: list[dict]) -> str:
    if not rows:
        return '<p class="muted">none</p>\n'
    return '<div class="tiles">\n' + "".join(tile(row) for row in rows) + "</div>\n"


def display_size(row: dict) -> tuple[int, int]:
    """(width, height) to show a row's patch at: TILE tall, at most MAX_TILE_WIDTH wide."""
    width, height = row["right"] - row["left"], row["bottom"] - row["top"]
    if width <= 0 or height <= 0:
        return TILE, TILE
    shown_w = round(TILE * width / height)
    if shown_w <= MAX_TILE_WIDTH:
        return max(shown_w, 1), TILE
    return MAX_TILE_WIDTH, max(1, round(MAX_TILE_WIDTH * height / width))


def tile(row: dict) -> str:
    """One image of the unit: patch, overlay and mask, with its activation and id."""
    width, height = display_size(row)
    pictures = "".join(
        f'<img class="{kind}" src="{url("../" + row[key])}" width="{width}" height="{height}" '
        f'loading="lazy" alt="{kind}">'
        for key, kind in (
            ("patch_path", "patch"),
            ("overlay_path", "overlay"),
            ("mask_path", "mask"),
        )
        if row[key] is not None
    )
    recomputed = row["recomputed_activation"]
    flag = ' class="bad"' if row["activation_ok"] is False else ""
    again = "" if recomputed is None else f" <span{flag}>(recomputed {recomputed:.4g})</span>"
    fraction = row["mask_fraction"]
    masked = "" if fraction is None else f" &middot; mask {100 * fraction:.3g}% of the patch"
    error = f'<br><span class="bad">{text(row["error"])}</span>' if row["error"] else ""
    return (
        f'<figure class="tile {text(row["kind"])}">{pictures}<figcaption>'
        f"{row['rank']}. activation {row['activation']:.4g}{again}{masked}<br>"
        f'<bdi class="id">{text(row["image_id"])}</bdi>{error}</figcaption></figure>\n'
    )
