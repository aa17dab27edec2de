"""A unit's activation histogram as inline SVG: a picture with no script, escaped like any text.

`svg(counts, edges, marks)` draws the bins of stats.v1's histogram (bin i holds edges[i-1] <= v <
edges[i]; bin 0 is below edges[0], the last bin at or above edges[-1]) from the first to the last
non-empty bin, one bar each, equally wide: the manifest's edges are log-spaced around 0, so the
x axis is the bin index (labelled with the shown range's ends), not the value. Bar heights are on
a log scale, log(1 + count) over log(1 + the largest count), since a ReLU's silent images (the bin
[0, 1e-3)) can outnumber the rest a hundredfold. Each bar carries a <title> (its range and count,
a tooltip) and `marks` (label -> value, e.g. quantiles) are drawn as labelled vertical lines in
the bin holding the value.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

from pipeline.export.page import text

WIDTH, HEIGHT = 480, 140  # the picture, in CSS pixels
AXIS = 16  # below the bars: the range's labels
TOP = 14  # above the bars: the marks' labels
BAR = "#4a78b5"
MARK = "#c0392b"


def bin_range(edges: Sequence[float], i: int) -> str:
    """Bin i's range as text, e.g. '[0.1, 0.126)'."""
    lo = f"{edges[i - 1]:.3g}" if i > 0 else "-inf"
    hi = f"{edges[i]:.3g}" if i < len(edges) else "inf"
    return f"[{lo}, {hi})"


def svg(
    counts: Sequence[int], edges: Sequence[float], marks: Mapping[str, float] | None = None
) -> str:
    """The histogram as an <svg> element (empty bins at both ends left out)."""
    assert len(counts) == len(edges) + 1, (len(counts), len(edges))
    filled = [i for i, count in enumerate(counts) if count]
    if not filled:
        return '<p class="muted">no images in the histogram</p>\n'
    first, last = filled[0], filled[-1]
    shown = last - first + 1
    bar = WIDTH / shown
    tallest = math.log1p(max(counts))
    plot = HEIGHT - AXIS - TOP
    parts = [
        f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">\n'
        f"<title>activation histogram, {sum(counts)} images</title>\n"
    ]
    for i in range(first, last + 1):
        height = plot * math.log1p(counts[i]) / tallest
        x, y = (i - first) * bar, TOP + plot - height
        parts.append(
            f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(bar - 0.5, 0.5):.2f}" '
            f'height="{height:.2f}" fill="{BAR}"><title>{text(bin_range(edges, i))}: '
            f"{counts[i]} images</title></rect>\n"
        )
    for label, value in (marks or {}).items():
        if value is None or not math.isfinite(value):
            continue
        where = min(max(bisect.bisect_right(list(edges), value), first), last)  # its bin
        x = (where - first + 0.5) * bar
        parts.append(
            f'<line x1="{x:.2f}" y1="{TOP}" x2="{x:.2f}" y2="{TOP + plot}" stroke="{MARK}" '
            f'stroke-width="1"/><text x="{x:.2f}" y="{TOP - 3}" font-size="10" '
            f'text-anchor="middle" fill="{MARK}">{text(label)}</text>\n'
        )
    base = HEIGHT - 4
    parts.append(
        f'<text x="0" y="{base}" font-size="10">{text(bin_range(edges, first))}</text>\n'
        f'<text x="{WIDTH}" y="{base}" font-size="10" text-anchor="end">'
        f"{text(bin_range(edges, last))}</text>\n</svg>\n"
    )
    return "".join(parts)
