"""Exact per-unit top-k: a running top-k on the device, and an associative merge of partials.

The order is total, so every result is deterministic: activation descending, then `image_id`
ascending. Each image contributes one candidate per unit (its spatial maximum), so a unit's
top-k always holds distinct images.

- `RunningTopK` keeps a (units, k) state on the model's device and folds in one batch of spatial
  maxima at a time without a host sync. Images are identified by their position in the shard;
  shards list images sorted by `image_id`, so position order is `image_id` order. Each candidate
  is one int64 key encoding (activation, position), so one `topk` per batch is exact.
- `merge` combines any number of partial top-k tables (Arrow) into one. It is exact, associative
  and commutative, and idempotent (a duplicated partial changes nothing): every sharding and every
  grouping of partials gives the same index.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
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
    """Per-unit top-k over a stream of (B, U) batches, kept on one device."""

    def __init__(self, units: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.keys = torch.full((units, k), EMPTY, dtype=torch.int64, device=device)  # (U, k)
        self.ys = torch.zeros((units, k), dtype=torch.int64, device=device)  # (U, k)
        self.xs = torch.zeros((units, k), dtype=torch.int64, device=device)  # (U, k)

    def add(self, values: Tensor, positions: Tensor, ys: Tensor, xs: Tensor) -> None:
        """Fold in a batch: `values`, `ys`, `xs` are (B, U); `positions` (B,) in the stream."""
        keys = encode(values, positions[:, None])  # (B, U)
        candidates = torch.cat([self.keys, keys.T], dim=1)  # (U, k + B)
        self.keys, keep = candidates.topk(self.k, dim=1)  # (U, k), (U, k): best first
        self.ys = torch.cat([self.ys, ys.T], dim=1).gather(1, keep)  # (U, k)
        self.xs = torch.cat([self.xs, xs.T], dim=1).gather(1, keep)  # (U, k)

    def state_dict(self) -> dict[str, Tensor]:
        return {"keys": self.keys, "ys": self.ys, "xs": self.xs}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in ("keys", "ys", "xs"):
            setattr(self, name, state[name].to(self.keys.device))
        self.k = self.keys.shape[1]

    def table(self, layer: str, image_ids: list[str], image_hashes: list[str]) -> pa.Table:
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


def merge(tables: list[pa.Table], k: int) -> pa.Table:
    """Merge partial top-k tables into one: each (layer, unit) keeps its k best distinct images."""
    table = pa.concat_tables(tables).combine_chunks()
    if table.num_rows == 0:
        return table
    table = table.sort_by(SORT_KEYS)
    table = table.filter(pa.array(_first_of_image(table)))
    rank = _rank_in_group(table)
    column = table.schema.get_field_index("rank")
    table = table.set_column(column, table.schema.field(column), pa.array(rank, pa.int16()))
    return table.filter(pc.less_equal(table["rank"], k))


def _first_of_image(table: pa.Table) -> np.ndarray:
    """Mask keeping the best row of each (layer, unit, image_id) in a sorted table."""
    keys = pd.DataFrame(
        {
            "layer": table["layer"].to_numpy(zero_copy_only=False),
            "unit": table["unit"].to_numpy(),
            "image_id": table["image_id"].to_numpy(zero_copy_only=False),
        }
    )
    return ~keys.duplicated(keep="first").to_numpy()


def _rank_in_group(table: pa.Table) -> np.ndarray:
    """1-based position of each row within its (layer, unit) run of a sorted table."""
    layer = pc.dictionary_encode(table["layer"]).combine_chunks().indices.to_numpy()
    unit = table["unit"].to_numpy()
    start = np.ones(len(unit), dtype=bool)
    start[1:] = (layer[1:] != layer[:-1]) | (unit[1:] != unit[:-1])
    starts = np.flatnonzero(start)
    group = np.cumsum(start) - 1
    return np.arange(len(unit)) - starts[group] + 1
