"""Exact per-unit top-k: a running top-k on the device, and an associative merge of partials.

The order is total, so every result is deterministic: activation descending, then `image_id`
ascending. Each image contributes one candidate per unit (its spatial maximum), so a unit's
top-k always holds distinct images; with a distinct key other than `image_id` (the content
hash, `--distinct content`) it holds one row per key: the key's best row in the total order.

- `RunningTopK` keeps a (units, k) state on the model's device and folds in one batch of spatial
  maxima at a time without a host sync. Images are identified by their position in the shard;
  shards list images sorted by `image_id`, so position order is `image_id` order. Each candidate
  is one int64 key encoding (activation, position), so one `topk` per batch is exact. With
  `distinct=True` each image also carries an ident (the position of the shard's first image of
  the same content); a batch holding a repeated ident keeps only each ident's best candidate.
- `merge` combines any number of partial top-k tables (Arrow) into one. It is exact, associative
  and commutative, and idempotent (a duplicated partial changes nothing): every sharding and every
  grouping of partials gives the same index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

MAX_POSITION = 2**31 - 1  # stream positions must stay below this (they fill 31 key bits)
SORT_KEYS = [
    ("layer", "ascending"),
    ("unit", "ascending"),
    ("activation", "descending"),
    ("image_id", "ascending"),
]


def encode(values: Tensor, positions: Tensor) -> Tensor:
    """One int64 key per candidate whose order is the total order: value desc, then position asc.

    The high 32 bits are the float32 bits made order-preserving as signed integers (negative
    floats have their magnitude bits flipped); the low 31 bits are MAX_POSITION - position.
    Keys are unique per position, so `topk` needs no tie-breaking and is deterministic.
    """
    bits = values.float().contiguous().view(torch.int32)  # (..., U)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # (..., U) signed order == float order
    return (ordered.to(torch.int64) << 32) | (MAX_POSITION - positions.to(torch.int64))


def decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `encode`: (values float32, positions int64)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), MAX_POSITION - (keys & 0xFFFFFFFF)


EMPTY = int(encode(torch.tensor(float("-inf")), torch.tensor(MAX_POSITION)))  # loses every tie


class RunningTopK:
    """Per-unit top-k over a stream of (B, U) batches, kept on one device.

    With `distinct`, `add` takes each image's ident and the state keeps one row per ident.
    Exact: a repeated ident within the shard always arrives after its first image (positions
    ascend), so only a batch holding a repeat can collide with the state, and that batch takes
    the slow path (one sort by key, one by ident) that keeps each ident's best candidate.
    """

    def __init__(
        self, units: int, k: int, device: torch.device | str = "cpu", distinct: bool = False
    ):
        self.k = k
        self.keys = torch.full((units, k), EMPTY, dtype=torch.int64, device=device)  # (U, k)
        self.ys = torch.zeros((units, k), dtype=torch.int64, device=device)  # (U, k)
        self.xs = torch.zeros((units, k), dtype=torch.int64, device=device)  # (U, k)
        self.idents = (  # (U, k) the ident of each kept row; -1 in empty slots
            torch.full((units, k), -1, dtype=torch.int64, device=device) if distinct else None
        )

    def add(
        self,
        values: Tensor,
        positions: Tensor,
        ys: Tensor,
        xs: Tensor,
        idents: Tensor | None = None,
        repeats: bool = False,
    ) -> None:
        """Fold in a batch: `values`, `ys`, `xs` are (B, U); `positions` (B,) in the stream.

        `idents` (B,) is required with `distinct` (each image's ident: its own position, or the
        position of the shard's first image with the same content); `repeats` says whether any
        ident differs from its position (the caller knows on the host: no device sync here).
        """
        keys = encode(values, positions[:, None])  # (B, U)
        candidates = torch.cat([self.keys, keys.T], dim=1)  # (U, k + B)
        if self.idents is None:
            self.keys, keep = candidates.topk(self.k, dim=1)  # (U, k), (U, k): best first
        else:
            assert idents is not None, "a distinct RunningTopK needs each image's ident"
            ident = torch.cat([self.idents, idents[None, :].expand(len(self.keys), -1)], dim=1)
            if repeats:
                candidates = _best_per_ident(candidates, ident)  # (U, k + B)
            self.keys, keep = candidates.topk(self.k, dim=1)  # (U, k), (U, k): best first
            self.idents = ident.gather(1, keep)  # (U, k)
        self.ys = torch.cat([self.ys, ys.T], dim=1).gather(1, keep)  # (U, k)
        self.xs = torch.cat([self.xs, xs.T], dim=1).gather(1, keep)  # (U, k)

    def table(
        self, layer: str, image_ids: Sequence[str | None], image_hashes: Sequence[str | None]
    ) -> pa.Table:
        """The state as partial rows (layer, unit, rank, activation, image_id, image_hash, y, x)."""
        keys = self.keys.cpu()
        values, positions = (t.numpy() for t in decode(keys))  # (U, k), (U, k)
        units, rank = np.nonzero(keys.numpy() != EMPTY)  # row-major: unit, then rank
        pos = positions[units, rank]
        ids = np.asarray(image_ids, dtype=object)
        hashes = np.asarray(image_hashes, dtype=object)
        return pa.table(
            {
                "layer": pa.array(np.full(len(units), layer, dtype=object), pa.string()),
                "unit": pa.array(units, pa.int32()),
                "rank": pa.array(rank + 1, pa.int16()),
                "activation": pa.array(values[units, rank], pa.float32()),
                "image_id": pa.array(ids[pos], pa.string()),
                "image_hash": pa.array(hashes[pos], pa.string()),
                "y": pa.array(self.ys.cpu().numpy()[units, rank], pa.int32()),
                "x": pa.array(self.xs.cpu().numpy()[units, rank], pa.int32()),
            }
        )


def _best_per_ident(keys: Tensor, idents: Tensor) -> Tensor:
    """`keys` (U, n) with every candidate but the best of each ident (per row) set to EMPTY."""
    ordered, order = keys.sort(dim=1, descending=True)  # (U, n), (U, n): best first
    ident = idents.gather(1, order)  # (U, n) in key order
    by_ident, regroup = ident.sort(dim=1, stable=True)  # (U, n): equal idents, best first
    first = torch.ones_like(by_ident, dtype=torch.bool)  # (U, n)
    first[:, 1:] = by_ident[:, 1:] != by_ident[:, :-1]
    best = torch.zeros_like(first).scatter_(1, regroup, first)  # (U, n) in key order
    kept = torch.where(best, ordered, torch.full_like(ordered, EMPTY))  # (U, n)
    return torch.empty_like(keys).scatter_(1, order, kept)  # (U, n) back in input order


def negated(table: pa.Table) -> pa.Table:
    """`table` with its activations negated: the bottom kept as the top of -activation, and back."""
    column = table.schema.get_field_index("activation")
    return table.set_column(column, table.schema.field(column), pc.negate(table["activation"]))


def merge(tables: list[pa.Table], k: int, by: str = "image_id") -> pa.Table:
    """Merge partial top-k tables into one: each (layer, unit) keeps its k best distinct rows.

    Rows are ordered by one int64 key per row, (layer, unit) group then activation descending,
    with image_id breaking ties; rows equal in column `by` (`image_id`: one image; `image_hash`:
    one content) keep only their best row. Only the kept rows' strings are ever copied.
    """
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        return table.combine_chunks()
    group = _sorted_codes(table["layer"]) * (int(pc.max(table["unit"]).as_py()) + 1)
    group += table["unit"].to_numpy()  # (N,) ordered by layer name, then unit
    image = _sorted_codes(table["image_id"])  # (N,) ordered like image_id
    key = (group << 32) | _descending(table["activation"].to_numpy())  # (N,)
    order = _total_order(key, image)  # (N,)
    ident = image if by == "image_id" else _sorted_codes(table[by])  # (N,) the distinct key
    pair = group * (int(ident.max()) + 1) + ident  # (N,) one code per (group, ident)
    order = order[_not_repeated(pair[order])]  # a partial seen twice: its rows sort together
    rank = _rank_in_runs(group[order])
    if _has_repeats(pair[order[rank <= k]]):  # an image twice in a top-k with other values
        order = order[_first_of_each(pair[order])]
        rank = _rank_in_runs(group[order])
    kept = order[rank <= k]
    out = table.take(kept)
    column = out.schema.get_field_index("rank")
    return out.set_column(column, out.schema.field(column), pa.array(rank[rank <= k], pa.int16()))


def _sorted_codes(column: pa.ChunkedArray) -> np.ndarray:
    """int64 code of each string whose order is the strings' order (one hash pass)."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    code = np.empty(len(encoded.dictionary), dtype=np.int64)  # (D,) sorted position
    code[pc.array_sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(code))
    return np.take(code, encoded.indices.to_numpy())  # (N,) np.take: 3x faster than []


def _total_order(key: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Stable order by `key`, then `image` (both >= 0): one packed int64 sort when it fits."""
    shift = int(image.max()).bit_length()
    if key.min() >= 0 and int(key.max()).bit_length() + shift <= 63:
        return np.argsort((key << shift) | image, kind="stable")  # ~10x faster than lexsort
    return np.lexsort((image, key))


def order_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> int32 whose signed order is the merge's activation order (as `encode`'s high
    bits: positive NaN above +inf, +0.0 above -0.0), so thresholds compare like the merge."""
    bits = values.astype(np.float32, copy=False).view(np.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _descending(values: np.ndarray) -> np.ndarray:
    """float32 -> int64 in [0, 2**32) whose ascending order is the floats' descending order."""
    return (~order_bits(values)).astype(np.int64) + 2**31


def _not_repeated(pair: np.ndarray) -> np.ndarray:
    """Mask dropping rows equal to the row before (sorted: the same image's equal rows)."""
    keep = np.ones(len(pair), dtype=bool)
    keep[1:] = pair[1:] != pair[:-1]
    return keep


def _has_repeats(pair: np.ndarray) -> bool:
    ordered = np.sort(pair)
    return bool((ordered[1:] == ordered[:-1]).any())


def _first_of_each(pair: np.ndarray) -> np.ndarray:
    """Mask keeping the first row of each pair code anywhere in sorted order."""
    _, first = np.unique(pair, return_index=True)
    keep = np.zeros(len(pair), dtype=bool)
    keep[first] = True
    return keep


def _rank_in_runs(group: np.ndarray) -> np.ndarray:
    """1-based position of each row within its run of equal `group` values."""
    start = np.ones(len(group), dtype=bool)
    start[1:] = group[1:] != group[:-1]
    starts = np.flatnonzero(start)
    return np.arange(len(group)) - starts[np.cumsum(start) - 1] + 1
