"""Per-unit statistics of the per-image activation (spatial max), in the same pass as the top-k.

Over every indexed image (duplicates included): count, mean, population std, min, max,
fire_rate (share of images with activation > 0), quantiles from an Apache DataSketches KLL
sketch (k = SKETCH_K) and a histogram over fixed bins (EDGES, the same for every shard).

    map:    RunningStats.add((B, U) values) per batch; on the device: count, mean and M2 (Chan's
            parallel update, float64), min, max, fires, histogram; the values wait on the device
            and go to the host sketches FLUSH rows at a time. `table` -> schema "stats_state".
    reduce: StatsMerge.add(state table) per shard, in shard order; `table` -> schema "stats";
            `state` -> schema "stats_state" again (a group's merge, passed up a tree).

Every field but the quantiles is exact (float64 sums: equal to numpy up to rounding). Each
quantile's normalised rank is within RANK_ERROR of its probability (99% confidence, DataSketches'
bound for k = SKETCH_K, whatever the merge order). NaN activations are counted as -inf, as in
the index.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from datasketches import kll_floats_sketch
from torch import Tensor

SKETCH_K = 200  # KLL accuracy parameter: 1.33% normalised rank error (99% confidence)
RANK_ERROR = kll_floats_sketch.get_normalized_rank_error(SKETCH_K, False)
PROBABILITIES = (0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999)
FLUSH = 256  # rows of values held on the device before they go to the sketches
DECADES = (-3, 4)  # |activation| from 1e-3 to 1e4 in log bins, 10 per decade
PER_DECADE = 10


def histogram_edges() -> np.ndarray:
    """Fixed bin edges (float32, ascending): -1e4 .. -1e-3, 0, 1e-3 .. 1e4, log spaced.

    Bin i holds values v with edges[i-1] <= v < edges[i] (bin 0: below edges[0]; the last bin:
    edges[-1] and above), so exact zeros (a ReLU's silence) fall in [0, 1e-3).
    """
    lo, hi = DECADES
    positive = 10.0 ** (np.arange(lo * PER_DECADE, hi * PER_DECADE + 1) / PER_DECADE)
    return np.concatenate([-positive[::-1], [0.0], positive]).astype(np.float32)


EDGES = histogram_edges()
BINS = len(EDGES) + 1


def bins_of(values: np.ndarray) -> np.ndarray:
    """Histogram bin of each value (numpy, as `RunningStats` bins on the device)."""
    return np.searchsorted(EDGES, values, side="right")


class RunningStats:
    """Mergeable per-unit statistics of a stream of (B, U) activations on one device."""

    def __init__(self, units: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.mean = torch.zeros(units, dtype=torch.float64, device=device)  # (U,)
        self.m2 = torch.zeros(units, dtype=torch.float64, device=device)  # (U,) sum of squares
        self.min = torch.full((units,), float("inf"), device=device)  # (U,)
        self.max = torch.full((units,), float("-inf"), device=device)  # (U,)
        self.fires = torch.zeros(units, dtype=torch.int64, device=device)  # (U,)
        self.histogram = torch.zeros(units * BINS, dtype=torch.int64, device=device)  # (U * BINS,)
        self.edges = torch.from_numpy(EDGES).to(device)  # (BINS - 1,)
        self.offsets = torch.arange(units, device=device) * BINS  # (U,)
        self.pending: list[Tensor] = []
        self.pending_rows = 0
        self.sketches = [kll_floats_sketch(SKETCH_K) for _ in range(units)]

    def add(self, values: Tensor) -> None:
        """Fold in one batch of activations (B, U)."""
        batch = values.shape[0]
        v = values.double()  # (B, U)
        batch_mean = v.mean(dim=0)  # (U,)
        batch_m2 = (v - batch_mean).square().sum(dim=0)  # (U,)
        total = self.count + batch
        delta = batch_mean - self.mean  # (U,)
        self.mean += delta * (batch / total)
        self.m2 += batch_m2 + delta.square() * (self.count * batch / total)
        self.count = total
        self.min = torch.minimum(self.min, values.amin(dim=0))  # (U,)
        self.max = torch.maximum(self.max, values.amax(dim=0))  # (U,)
        self.fires += (values > 0).sum(dim=0)
        cell = torch.bucketize(values, self.edges, right=True) + self.offsets  # (B, U)
        self.histogram += torch.bincount(cell.flatten(), minlength=len(self.histogram))
        self.pending.append(values.float())
        self.pending_rows += batch
        if self.pending_rows >= FLUSH:
            self.flush()

    def flush(self) -> None:
        """Move the values waiting on the device into the per-unit sketches."""
        if not self.pending:
            return
        block = torch.cat(self.pending).T.contiguous().cpu().numpy()  # (U, n)
        for sketch, column in zip(self.sketches, block, strict=True):
            sketch.update(column)
        self.pending, self.pending_rows = [], 0

    def table(self, layer: str) -> pa.Table:
        """The state in schema "stats_state", one row per unit."""
        self.flush()
        units = len(self.sketches)
        histogram = self.histogram.reshape(units, BINS).cpu().numpy()  # (U, BINS)
        return pa.table(
            {
                "layer": pa.array([layer] * units, pa.string()),
                "unit": pa.array(np.arange(units), pa.int32()),
                "count": pa.array(np.full(units, self.count), pa.int64()),
                "mean": pa.array(self.mean.cpu().numpy(), pa.float64()),
                "m2": pa.array(self.m2.cpu().numpy(), pa.float64()),
                "min": pa.array(self.min.cpu().numpy(), pa.float32()),
                "max": pa.array(self.max.cpu().numpy(), pa.float32()),
                "fires": pa.array(self.fires.cpu().numpy(), pa.int64()),
                "histogram": pa.array(list(histogram), pa.list_(pa.int64())),
                "sketch": pa.array([s.serialize() for s in self.sketches], pa.binary()),
            }
        )


class StatsMerge:
    """Merges per-shard "stats_state" tables into per-layer statistics (schema "stats")."""

    def __init__(self) -> None:
        self.layers: dict[str, _LayerState] = {}

    def add(self, table: pa.Table) -> None:
        layer_column = table["layer"].to_numpy(zero_copy_only=False)
        for name in dict.fromkeys(layer_column):
            rows = table.filter(pa.array(layer_column == name))
            units = int(np.max(rows["unit"].to_numpy())) + 1
            state = self.layers.setdefault(name, _LayerState(units))
            state.add(rows)

    def table(self, layer: str) -> pa.Table:
        """Layer `layer`'s statistics, one row per unit (empty if no shard indexed an image)."""
        if layer not in self.layers:
            return _finish(layer, _LayerState(0))
        return _finish(layer, self.layers[layer])

    def state(self) -> pa.Table:
        """Everything merged so far as one "stats_state" table (every layer, one row per unit),
        which `add` takes back: a tree of merges (index/reduce_tree.py) passes it up."""
        parts = [_state(name, state) for name, state in self.layers.items()]
        return pa.concat_tables(parts) if parts else _state("", _LayerState(0))

    def quantiles(self, layer: str, probabilities: list[float]) -> np.ndarray:
        """(U, P) sketch quantiles of each unit of `layer` (NaN for a unit without images)."""
        sketches = self.layers[layer].sketches if layer in self.layers else []
        out = np.full((len(sketches), len(probabilities)), np.nan)
        for u, sketch in enumerate(sketches):
            if not sketch.is_empty():
                out[u] = sketch.get_quantiles(probabilities)
        return out


class _LayerState:
    def __init__(self, units: int):
        self.count = np.zeros(units, dtype=np.int64)
        self.mean = np.zeros(units)
        self.m2 = np.zeros(units)
        self.min = np.full(units, np.inf, dtype=np.float32)
        self.max = np.full(units, -np.inf, dtype=np.float32)
        self.fires = np.zeros(units, dtype=np.int64)
        self.histogram = np.zeros((units, BINS), dtype=np.int64)
        self.sketches = [kll_floats_sketch(SKETCH_K) for _ in range(units)]

    def add(self, rows: pa.Table) -> None:
        unit = rows["unit"].to_numpy()
        count = rows["count"].to_numpy()
        if count.max(initial=0) == 0:
            return  # a shard without indexed images
        n, m = self.count[unit], count
        total = n + m
        delta = rows["mean"].to_numpy() - self.mean[unit]
        self.mean[unit] += delta * (m / total)
        self.m2[unit] += rows["m2"].to_numpy() + delta**2 * (n * m / total)
        self.count[unit] = total
        self.min[unit] = np.minimum(self.min[unit], rows["min"].to_numpy())
        self.max[unit] = np.maximum(self.max[unit], rows["max"].to_numpy())
        self.fires[unit] += rows["fires"].to_numpy()
        flat = rows["histogram"].combine_chunks().flatten().to_numpy()
        self.histogram[unit] += flat.reshape(len(unit), BINS)
        for u, blob in zip(unit, rows["sketch"].to_pylist(), strict=True):
            self.sketches[u].merge(kll_floats_sketch.deserialize(blob))


def _state(layer: str, state: _LayerState) -> pa.Table:
    units = len(state.count)
    return pa.table(
        {
            "layer": pa.array([layer] * units, pa.string()),
            "unit": pa.array(np.arange(units), pa.int32()),
            "count": pa.array(state.count, pa.int64()),
            "mean": pa.array(state.mean, pa.float64()),
            "m2": pa.array(state.m2, pa.float64()),
            "min": pa.array(state.min, pa.float32()),
            "max": pa.array(state.max, pa.float32()),
            "fires": pa.array(state.fires, pa.int64()),
            "histogram": pa.array(list(state.histogram), pa.list_(pa.int64())),
            "sketch": pa.array([s.serialize() for s in state.sketches], pa.binary()),
        }
    )


def _finish(layer: str, state: _LayerState) -> pa.Table:
    units = len(state.count)
    count = state.count
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(state.m2 / count)
        fire_rate = state.fires / count
    quantiles = [
        s.get_quantiles(list(PROBABILITIES)) if not s.is_empty() else [None] * len(PROBABILITIES)
        for s in state.sketches
    ]
    empty = count == 0
    return pa.table(
        {
            "layer": pa.array([layer] * units, pa.string()),
            "unit": pa.array(np.arange(units), pa.int32()),
            "count": pa.array(count, pa.int64()),
            "mean": pa.array(np.where(empty, np.nan, state.mean), pa.float64()),
            "std": pa.array(std, pa.float64()),
            "min": pa.array(state.min, pa.float32()),
            "max": pa.array(state.max, pa.float32()),
            "fire_rate": pa.array(fire_rate, pa.float64()),
            "quantiles": pa.array(quantiles, pa.list_(pa.float64())),
            "histogram": pa.array(list(state.histogram), pa.list_(pa.int64())),
        }
    )
