"""pipeline/export/histogram.py: the SVG is well-formed, one bar per shown bin, heights on a log
scale, marks in their bins, every label escaped."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from pipeline.export.histogram import HEIGHT, TOP, WIDTH, bin_range, svg

NS = "{http://www.w3.org/2000/svg}"
EDGES = [-1.0, 0.0, 1.0, 2.0, 4.0]  # 6 bins: <-1, [-1, 0), [0, 1), [1, 2), [2, 4), >=4


def parse(text: str) -> ET.Element:
    return ET.fromstring(text)


def test_bars_span_the_non_empty_bins_with_log_heights():
    counts = [0, 0, 99, 0, 9, 0]  # bins 2..4 shown
    root = parse(svg(counts, EDGES))
    bars = root.findall(f"{NS}rect")
    assert len(bars) == 3
    assert [float(b.get("x")) for b in bars] == [0.0, WIDTH / 3, 2 * WIDTH / 3]
    heights = [float(b.get("height")) for b in bars]
    plot = heights[0]
    assert math.isclose(heights[1], 0, abs_tol=1e-9)
    assert math.isclose(heights[2] / plot, math.log(10) / math.log(100), rel_tol=1e-3)
    assert [b.find(f"{NS}title").text for b in bars] == [
        "[0, 1): 99 images", "[1, 2): 0 images", "[2, 4): 9 images",
    ]  # fmt: skip
    assert all(float(b.get("y")) + float(b.get("height")) <= HEIGHT for b in bars)
    assert root.find(f"{NS}title").text == "activation histogram, 108 images"


def test_ranges_of_the_end_bins():
    assert bin_range(EDGES, 0) == "[-inf, -1)"
    assert bin_range(EDGES, 5) == "[4, inf)"
    assert bin_range(EDGES, 3) == "[1, 2)"


def test_marks_sit_in_their_bins_and_labels_are_escaped():
    counts = [1, 0, 0, 0, 0, 1]
    root = parse(svg(counts, EDGES, {"p50": 1.5, "<b>&": 100.0, "nan": float("nan")}))
    lines = root.findall(f"{NS}line")
    bar = WIDTH / 6
    assert [float(line.get("x1")) for line in lines] == [3.5 * bar, 5.5 * bar]
    labels = [t.text for t in root.findall(f"{NS}text")]
    assert labels[:2] == ["p50", "<b>&"]  # parsed back: it was escaped in the source
    assert "<b>" not in svg(counts, EDGES, {"<b>&": 1.0})
    assert all(float(line.get("y1")) == TOP for line in lines)


def test_an_empty_histogram_says_so():
    assert "no images" in svg([0] * 6, EDGES)
