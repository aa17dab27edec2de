"""pipeline/export/unit_stats.py: the mask threshold is the quantile at probability 0.99, found by
value; an index without statistics (or without a 0.99 quantile) gives no thresholds and a note."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.errors import DataError
from pipeline.export.unit_stats import NO_STATS, read_unit_stats
from pipeline.store.layout import STATS_DIR, layer_file
from pipeline.store.schemas import conform
from pipeline.store.storage import Store

PROBABILITIES = [0.5, 0.999, 0.99, 0.01]  # 0.99 is not where the default list has it


def write_stats(store: Store, layer: str, quantiles: list[list[float] | None]) -> None:
    count = len(quantiles)
    table = pa.table({
        "layer": [layer] * count, "unit": list(range(count)), "count": [10] * count,
        "mean": [0.5] * count, "std": [0.1] * count, "min": [0.0] * count, "max": [1.0] * count,
        "fire_rate": [0.9] * count, "quantiles": quantiles, "histogram": [[1, 9]] * count,
    })  # fmt: skip
    store.write_parquet(layer_file(STATS_DIR, layer), conform(table, "stats"))


def manifest(probabilities=PROBABILITIES) -> dict:
    return {"stats": {"probabilities": probabilities, "histogram_edges": [0.5], "rank_error": 0.01}}


def test_threshold_is_the_quantile_at_0_99_by_value(tmp_path):
    store = Store(str(tmp_path))
    write_stats(store, "conv1", [[0.1, 0.9, 0.7, 0.0], None, [0.2, 0.8, 0.6, 0.1]])
    stats = read_unit_stats(store, manifest(), {"conv1": [0, 1, 2]})
    assert stats.note is None and stats.mask_at == 2
    assert stats.threshold("conv1", 0) == pytest.approx(0.7)
    assert stats.threshold("conv1", 2) == pytest.approx(0.6)
    assert stats.threshold("conv1", 1) is None  # a unit without images
    assert stats.threshold("conv2", 0) is None
    assert stats.edges == (0.5,) and stats.rank_error == 0.01
    only = read_unit_stats(store, manifest(), {"conv1": [2]})
    assert set(only.rows) == {("conv1", 2)}


def test_no_statistics_means_no_masks_and_says_why(tmp_path):
    stats = read_unit_stats(Store(str(tmp_path)), {"config": {}}, {"conv1": [0]})
    assert stats.threshold("conv1", 0) is None and stats.note == NO_STATS
    assert "--stats off" in NO_STATS and "--stats on" in NO_STATS


def test_statistics_without_a_0_99_quantile(tmp_path):
    store = Store(str(tmp_path))
    write_stats(store, "fc", [[0.1, 0.2]])
    stats = read_unit_stats(store, manifest([0.5, 0.9]), {"fc": [0]})
    assert stats.threshold("fc", 0) is None
    assert stats.note is not None and "0.5, 0.9" in stats.note
    assert ("fc", 0) in stats.rows  # the atlas still shows the statistics


def test_listed_statistics_that_are_missing_are_an_error(tmp_path):
    with pytest.raises(
        DataError, match=r"lists stats/fc\.parquet but it is missing.*rerun `ninebest index`"
    ):
        read_unit_stats(Store(str(tmp_path)), manifest(), {"fc": [0]})
