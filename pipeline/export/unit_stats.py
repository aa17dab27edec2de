"""The index's per-unit statistics as the export uses them: mask thresholds and the atlas's
stats line and histogram.

`read_unit_stats(store, manifest, chosen)` reads OUT/stats/<layer>.parquet (schema stats.v1) for
the chosen units. A mask's threshold is the unit's quantile at MASK_PROBABILITY, found in
manifest.json `stats.probabilities` by value (not by position). When the index has no statistics
(indexed with `--stats off`, or before statistics existed) or its probabilities lack 0.99, there
are no thresholds and `note` says why: the export skips masks and writes the note to export.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError
from pipeline.store.layout import STATS_DIR, layer_file
from pipeline.store.storage import Store

MASK_PROBABILITY = 0.99  # NetDissect's top-1% threshold, on the per-image activation

NO_STATS = (
    "masks skipped: the index has no per-unit statistics (indexed with --stats off, or before "
    "statistics existed), and a mask thresholds at the unit's 0.99 quantile; index again with "
    "--stats on (into a new --out) to get masks. Overlays do not need statistics."
)


@dataclass(frozen=True)
class UnitStats:
    """Statistics of the chosen units, and what masks are thresholded at."""

    rows: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)  # stats.v1 rows
    probabilities: tuple[float, ...] = ()  # manifest stats.probabilities
    edges: tuple[float, ...] = ()  # manifest stats.histogram_edges
    rank_error: float | None = None  # the sketch's normalised rank error
    mask_at: int | None = None  # position of MASK_PROBABILITY in `probabilities`
    note: str | None = NO_STATS  # why there are no masks; None when there are

    def threshold(self, layer: str, unit: int) -> float | None:
        """The unit's 0.99 quantile, or None (no statistics, or a unit without images)."""
        row = self.rows.get((layer, unit))
        if self.mask_at is None or row is None or row["quantiles"] is None:
            return None
        value = row["quantiles"][self.mask_at]
        return None if value is None or not math.isfinite(value) else float(value)


def read_unit_stats(store: Store, manifest: dict, chosen: dict[str, list[int]]) -> UnitStats:
    """The chosen units' statistics from OUT/stats (empty, with a note, when there are none)."""
    section = manifest.get("stats")
    if not section:
        return UnitStats()
    probabilities = tuple(float(p) for p in section["probabilities"])
    found = [i for i, p in enumerate(probabilities) if math.isclose(p, MASK_PROBABILITY)]
    note = None
    if not found:
        listed = ", ".join(f"{p:g}" for p in probabilities)
        note = (
            f"masks skipped: the index's statistics hold no {MASK_PROBABILITY} quantile "
            f"(stats.probabilities: {listed}), which a mask thresholds at"
        )
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for layer, units in chosen.items():
        table = read_units(store, layer_file(STATS_DIR, layer), units)
        rows.update(((layer, row["unit"]), row) for row in table.to_pylist())
    return UnitStats(
        rows=rows, probabilities=probabilities,
        edges=tuple(float(e) for e in section.get("histogram_edges", ())),
        rank_error=section.get("rank_error"), mask_at=found[0] if found else None, note=note,
    )  # fmt: skip


def read_units(store: Store, path: str, units: list[int]) -> pa.Table:
    """The rows of `units` in one per-layer file the manifest lists (index, stats, samples,
    bottom); a listed file that is missing means an unfinished index, and says so."""
    if not store.exists(path):
        raise DataError(
            f"the index at {store.url!r} lists {path} but it is missing; the index is "
            f"incomplete: rerun `ninebest index` with the same --out to finish it"
        )
    table = store.read_parquet(path)
    return table.filter(pc.is_in(table["unit"], pa.array(units, pa.int32())))
