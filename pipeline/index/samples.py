"""Examples across the range: per unit, a few images from each activation band, chosen by a
hash of image_id so that any sharding gives the same samples.

Every image has a priority, 62 bits of blake2b(image_id). The run keeps a uniform sample S of
the dataset: the images with priority below a threshold that keeps between SAMPLE and 2 SAMPLE
of them (all of them when the dataset is smaller), the same images for every unit.

    map:    each shard keeps its images of S with every unit's activation (schema
            "samples_state"); its threshold goes in its commit record.
    reduce: the threshold is the smallest any shard used (every shard kept all of S below it).
            For each unit, S is sorted by (activation, image_id); image i of n has mid-rank
            (i + 0.5) / n. A band (BANDS: a name and a range of percentiles, in the manifest as
            `samples.bands`) holds S's images whose mid-rank lies in its range, and its samples
            are the `--samples` of them with the lowest (priority, image_id), one per picture
            (`--distinct`).

Guarantee: deterministic, the same under any sharding and merge order (S and its order do not
depend on them). With at most SAMPLE images in the dataset, S is the whole dataset and each
sample's rank lies in its band exactly; above, up to the sampling error of a uniform sample of
at least SAMPLE images (99% confidence: +-2.9% of rank at the median, +-0.6% at p99, +-0.2% at
p99.9). A band of few images (the top 0.2% of a small dataset) may give fewer samples.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from pipeline.store.partials import CommitRecord
from pipeline.store.schemas import conform, empty

BANDS = (("p50", 0.40, 0.60), ("p90", 0.85, 0.95), ("p99", 0.985, 0.995), ("p99.9", 0.998, 1.0))
SAMPLE = 2048  # images in the uniform sample S, at least (all of them in a smaller dataset);
# the reduce holds S's rows for every unit, so S stays small
PRIORITY_BITS = 62


def priority(image_id: str) -> int:
    """The image's sampling priority: 62 bits of blake2b(image_id), the same in every run."""
    digest = hashlib.blake2b(image_id.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - PRIORITY_BITS)


def threshold(images: int) -> int:
    """The priority threshold of S for a dataset of `images`: a power of two, so that a reindex
    that changes the dataset a little keeps it."""
    level = max(0, math.floor(math.log2(max(1, images) / SAMPLE)))
    return 1 << (PRIORITY_BITS - level)


class RunningSamples:
    """One layer's rows of S in a shard: the images with priority below `limit`, every unit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.rows: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # positions, values, ys, xs

    def add(self, priorities: list[int], positions: list[int], m) -> None:
        """Keep the batch's images of S (m: hooks.LayerMax of (B, U))."""
        picked = [i for i, p in enumerate(priorities) if p < self.limit]
        if not picked:
            return
        index = torch.tensor(picked, device=m.values.device)  # (S,)
        where = torch.tensor([positions[i] for i in picked])  # (S,)
        self.rows.append((where, m.values[index], m.ys[index], m.xs[index]))  # (S, U) each

    def table(
        self, layer: str, ids: list[str | None], hashes: list[str | None], priorities: dict
    ) -> pa.Table:
        """Rows (layer, unit, activation, image_id, image_hash, y, x, priority), image-major."""
        if not self.rows:
            return empty("samples_state")
        where = torch.cat([r[0] for r in self.rows]).numpy()  # (S,)
        values, ys, xs = (torch.cat([r[i] for r in self.rows]).cpu().numpy() for i in (1, 2, 3))
        units = values.shape[1]
        image = pa.array(np.repeat(np.arange(len(where), dtype=np.int32), units))  # (S * U,)
        shard_ids = [ids[p] for p in where]

        def repeated(names: list) -> pa.Array:  # each image's string, once per unit, no Python loop
            return pa.DictionaryArray.from_arrays(image, pa.array(names, pa.string())).cast(
                pa.string()
            )

        prio = np.array([priorities[i] for i in shard_ids], dtype=np.int64)  # (S,)
        return pa.table(
            {
                "layer": repeated([layer] * len(where)),
                "unit": pa.array(np.tile(np.arange(units, dtype=np.int32), len(where))),
                "activation": pa.array(values.ravel(), pa.float32()),
                "image_id": repeated(shard_ids),
                "image_hash": repeated([hashes[p] for p in where]),
                "y": pa.array(ys.ravel().astype(np.int32)),
                "x": pa.array(xs.ravel().astype(np.int32)),
                "priority": pa.array(np.repeat(prio, units)),
            }
        )


def effective_threshold(records: Sequence[CommitRecord]) -> int:
    """The smallest threshold any shard used: below it, every shard kept every image."""
    return min((r["sample_threshold"] for r in records if "sample_threshold" in r), default=0)


def select(rows: pa.Table, limit: int, per_band: int, by: str) -> pa.Table:
    """The samples (schema "samples", sorted by layer, unit, band, priority) from every shard's
    rows of S (schema "samples_state"), counting only priorities below `limit`."""
    rows = rows.filter(pc.less(rows["priority"], limit))
    if rows.num_rows == 0:
        return empty("samples")
    by_layer, by_image = _codes(rows["layer"]), _codes(rows["image_id"])  # order-keeping ints
    units = rows["unit"].to_numpy()
    order_rows = np.lexsort((by_image, rows["activation"].to_numpy(), units, by_layer))  # last 1st
    # from here on every array is in that order (layer, unit, activation, image_id); only the
    # chosen rows are taken from the table, at the end
    layer, unit = by_layer[order_rows], units[order_rows]
    start = np.ones(len(unit), dtype=bool)
    start[1:] = (unit[1:] != unit[:-1]) | (layer[1:] != layer[:-1])
    first = np.flatnonzero(start)
    group = np.cumsum(start) - 1  # (N,) which (layer, unit)
    size = np.diff([*first, len(unit)])[group]  # (N,) images of S for the unit
    rank = (np.arange(len(unit)) - first[group] + 0.5) / size  # (N,) mid-rank in [0, 1]
    prio = rows["priority"].to_numpy()[order_rows]
    image = by_image[order_rows]  # (N,) ordered like image_id: the tie-break
    ident = image if by == "image_id" else _codes(rows[by])[order_rows]  # (N,) one per picture
    picked, bands = [], []
    for b, (_, lo, hi) in enumerate(BANDS):
        inside = np.flatnonzero((rank >= lo) & (rank <= hi))
        inside = inside[np.lexsort((image[inside], prio[inside], group[inside]))]
        pair = group[inside] * (int(ident.max()) + 1) + ident[inside]  # (M,) (unit, picture)
        _, first = np.unique(pair, return_index=True)
        inside = inside[np.sort(first)]  # each picture's first (lowest priority) row
        keep = _rank_in_runs(group[inside]) <= per_band
        picked.append(inside[keep])
        bands.append(np.full(int(keep.sum()), b))
    chosen, band = np.concatenate(picked), np.concatenate(bands)
    order = np.lexsort((image[chosen], prio[chosen], band, group[chosen]))
    out = rows.take(pa.array(order_rows[chosen[order]], pa.int64()))
    names = pa.array([BANDS[b][0] for b in band[order]], pa.string())
    out = out.select(["layer", "unit", "activation", "image_id", "image_hash", "y", "x"])
    return conform(out.add_column(2, "band", names), "samples")


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    """int64 code of each string whose order is the strings' order."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    code = np.empty(len(encoded.dictionary), dtype=np.int64)
    code[pc.array_sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(code))
    return np.take(code, encoded.indices.to_numpy())


def _rank_in_runs(group: np.ndarray) -> np.ndarray:
    """1-based position of each row within its run of equal `group` values."""
    start = np.ones(len(group), dtype=bool)
    start[1:] = group[1:] != group[:-1]
    starts = np.flatnonzero(start)
    return np.arange(len(group)) - starts[np.cumsum(start) - 1] + 1


def manifest_section(per_band: int) -> dict[str, Any]:
    return {
        "per_band": per_band,
        "bands": {name: [lo, hi] for name, lo, hi in BANDS},
        "sample_images": SAMPLE,
        "priority": f"blake2b(image_id, 8 bytes) >> {64 - PRIORITY_BITS}",
    }
