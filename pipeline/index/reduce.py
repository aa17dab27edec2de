"""The reduce stage: merge committed partials into the global index, images and errors tables.

`GlobalTopK` streams partials one at a time. Each unit keeps a floor, the activation of its k-th
row so far; a candidate row below its unit's floor can never win, so one vectorised mask over a
partial's numeric columns drops almost every row, and only the survivors' strings are decoded
(partials are read with dictionary-encoded strings) and merged into the running result with
`topk.merge`. Memory holds the running result (O(layers x units x k) rows), the survivors waiting
to be merged (at most as many rows, in at most MAX_PENDING batches) and the READ_AHEAD partials
read ahead on READERS threads from an object store (so its latency overlaps the merge), however
many shards there are. The images table streams shard by shard into one Parquet file. Outputs
(relative to OUT):

    index/<layer>.parquet   the nine-best index, one file per layer, sorted by unit and rank
    images.parquet          every listed image: hash, size, or the error that skipped it
    errors.parquet          the skipped images alone
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.index.topk import merge, order_bits
from pipeline.store import partials
from pipeline.store.layout import ERRORS, IMAGES, INDEX_DIR, layer_file
from pipeline.store.partials import AttemptRef
from pipeline.store.prefetch import prefetch
from pipeline.store.schemas import conform, empty, schema
from pipeline.store.storage import Store

READERS, READ_AHEAD = 8, 16  # partials read at once, and read ahead of the merge (latency)
STRINGS = ["layer", "image_id", "image_hash"]  # read dictionary-encoded: few distinct values
MIN_PENDING = 1 << 14  # survivors (rows) worth a merge while the running result is smaller
MAX_PENDING = 256  # survivor batches merged at the latest (each holds its partial's dictionaries)
NO_FLOOR = np.iinfo(np.int32).min  # a unit with fewer than k rows admits every candidate


def merge_partials(
    store: Store,
    records: Sequence[AttemptRef],
    k: int,
    by: str = "image_id",
    table: str = "topk",
) -> pa.Table:
    """The exact global top-k over every committed shard, streaming partials in order; rows
    equal in column `by` count once (see topk.merge). `table`: the partial table merged."""
    reducer = GlobalTopK(k, by=by)
    read = functools.partial(read_topk, store, table=table)
    for part in _read_ahead(read, records, store):
        reducer.add(part)
    return conform(reducer.table(), "index")


def _read_ahead(
    read: Callable[[AttemptRef], pa.Table], records: Sequence[AttemptRef], store: Store
) -> Iterator[pa.Table]:
    """`read` over `records` in order: on threads for object stores, whose latency they hide;
    in this thread for local disks, where threads would only add CPU time."""
    return map(read, records) if store.local else prefetch(read, records, READERS, READ_AHEAD)


def read_topk(store: Store, record: AttemptRef, table: str = "topk") -> pa.Table:
    """The committed attempt's top-k partial (or another table of its schema) with its string
    columns left dictionary-encoded: decoding every row's strings would cost more than pruning
    them."""
    return partials.read_table(store, record, table, read_dictionary=STRINGS)


class GlobalTopK:
    """Exact per-(layer, unit) top-k over a stream of partial tables, pruning rows that cannot win.

    The result equals `topk.merge` of every partial cut to rank <= k. It holds `state` (merged
    so far, schema "partial") and `floor[slot, unit]`, the order bits (`topk.order_bits`) of the
    unit's k-th row in `state`, NO_FLOOR while it has fewer. The state only ever improves, so a
    row strictly below its unit's floor stays out of the final top-k (and dropping a worse row of
    an image changes nothing); a row equal to the floor may still win on image_id and is kept.
    Survivors wait in `pending` until they are as many rows as the state (and `min_pending`),
    or `max_pending` batches, so merges get rarer as floors rise: over N i.i.d. shards about
    k ln N rows per unit survive.
    """

    def __init__(
        self,
        k: int,
        min_pending: int = MIN_PENDING,
        max_pending: int = MAX_PENDING,
        by: str = "image_id",
    ):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self.by = by  # rows equal in this column count once (topk.merge)
        self.min_pending = min_pending  # rows
        self.max_pending = max_pending  # batches
        self.state = empty("partial")
        self.pending: list[pa.RecordBatch] = []  # survivors, in the `candidates` schema
        self.pending_rows = 0
        self.survivors = self.merges = 0  # rows that passed the floors; merges run (for benchmarks)
        self.layers: dict[str, int] = {}  # layer name -> row of `floor`
        self.floor = np.full((0, 0), NO_FLOOR, dtype=np.int32)  # (layers, units)

    def add(self, table: pa.Table) -> None:
        """Fold in one partial (schema "partial"; string columns may be dictionary-encoded)."""
        for batch in _candidates(table).to_batches():
            rows = self._survivors(batch)
            if rows is not None:
                self.pending.append(rows)
                self.pending_rows += len(rows)
                self.survivors += len(rows)
        enough = self.pending_rows >= max(self.state.num_rows, self.min_pending)
        if enough or len(self.pending) >= self.max_pending:
            self._merge()

    def table(self) -> pa.Table:
        """The merged top-k so far (schema "partial", sorted by layer, unit, rank)."""
        if self.pending:
            self._merge()
        return self.state

    def _survivors(self, batch: pa.RecordBatch) -> pa.RecordBatch | None:
        """The rows of `batch` that may still enter the top-k: rank <= k and not below floor."""
        unit = batch.column("unit").to_numpy()  # (N,)
        if len(unit) == 0:
            return None
        if unit.min() < 0:
            raise ValueError(f"partial has a negative unit ({unit.min()}); units are channels")
        layer = batch.column("layer")
        slots = self._slots(layer.dictionary.to_pylist())  # (D,) one per distinct name
        self._grow(len(self.layers), int(unit.max()) + 1)
        cell = self._cells(slots, layer.indices.to_numpy(), unit)  # (N,) flat floor index
        bits = order_bits(batch.column("activation").to_numpy())  # (N,)
        keep = batch.column("rank").to_numpy() <= self.k  # (N,)
        keep &= bits >= np.take(self.floor.ravel(), cell)
        rows = np.flatnonzero(keep)
        return batch.take(rows) if len(rows) else None

    def _slots(self, names: list[str]) -> np.ndarray:
        """The floor row of each layer name, registering new ones."""
        for name in names:
            self.layers.setdefault(name, len(self.layers))
        return np.array([self.layers[name] for name in names], dtype=np.int64)  # (D,)

    def _cells(self, slots: np.ndarray, codes: np.ndarray, unit: np.ndarray) -> np.ndarray:
        """Each row's index into the flattened floor, from its layer's dictionary code."""
        width = self.floor.shape[1]
        if np.array_equal(slots, slots[0] + np.arange(len(slots))):  # usual: names in slot order
            return codes * np.int32(width) + (unit + np.int32(slots[0] * width))  # (N,)
        start = (slots * width).astype(np.int32)  # (D,) each name's first cell
        return np.take(start, codes) + unit  # (N,) np.take: 3x faster than []

    def _grow(self, layers: int, units: int) -> None:
        have_layers, have_units = self.floor.shape
        if layers > have_layers or units > have_units:
            shape = (max(layers, have_layers), max(units, have_units))
            floor = np.full(shape, NO_FLOOR, dtype=np.int32)  # (layers, units)
            floor[:have_layers, :have_units] = self.floor
            self.floor = floor
            assert floor.size < 2**31, "floor cells are indexed with int32"

    def _merge(self) -> None:
        survivors = pa.Table.from_batches(self.pending, candidates_schema())
        self.state = merge([self.state, conform(survivors, "partial")], self.k, self.by)
        self.pending, self.pending_rows = [], 0
        self.merges += 1
        last = self.state.filter(pc.equal(self.state["rank"], self.k))  # each full unit's k-th
        names = pa.array(list(self.layers), pa.string())
        slot = pc.index_in(last["layer"], value_set=names).to_numpy()  # (M,)
        self.floor.fill(NO_FLOOR)
        self.floor[slot, last["unit"].to_numpy()] = order_bits(last["activation"].to_numpy())


@functools.cache
def candidates_schema() -> pa.Schema:
    """Schema "partial" with its string columns dictionary-encoded, as `read_topk` reads them."""
    target = schema("partial")
    fields = [
        f.with_type(pa.dictionary(pa.int32(), f.type)) if f.name in STRINGS else f for f in target
    ]
    return pa.schema(fields, metadata=target.metadata)


def _candidates(table: pa.Table) -> pa.Table:
    """`table` (schema "partial", strings plain or dictionary-encoded) in `candidates_schema`."""
    target = candidates_schema()
    if table.column_names != target.names:
        raise ValueError(f"partial table has columns {table.column_names}, expected {target.names}")
    for name in target.names:
        if table[name].null_count:
            raise ValueError(f"partial table has nulls in non-nullable column {name!r}")
    return table if table.schema.equals(target) else table.cast(target, safe=True)


def write_images(root: Store, records: Sequence[AttemptRef], target: Store) -> tuple[int, int]:
    """Stream every shard's images table (partials under `root`) into images.parquet and
    errors.parquet under `target`; return (images, bad images)."""
    total = bad = 0
    with (
        target.parquet_writer(IMAGES, schema("images")) as images,
        target.parquet_writer(ERRORS, schema("errors")) as errors,
    ):
        read = functools.partial(partials.read_table, root, table="images")
        for table in _read_ahead(read, records, root):
            table = conform(table, "images")
            images.write_table(table)
            failed = table.filter(pc.is_valid(table["error"]))
            errors.write_table(conform(failed.select(["image_id", "uri", "error"]), "errors"))
            total += table.num_rows
            bad += failed.num_rows
    return total, bad


UNITS_PER_ROW_GROUP = 256  # an index file's row groups: a filter on `unit` reads one of them


def write_index(
    store: Store, index: pa.Table, layers: tuple[str, ...], folder: str = INDEX_DIR
) -> list[str]:
    """Write one Parquet file per layer under `folder`/; return their relative paths.

    Rows are sorted by unit and rank, in row groups of UNITS_PER_ROW_GROUP units, so a pandas
    or pyarrow filter on `unit` (or on `layer`, across the folder) reads only matching groups.
    """
    paths = []
    for layer in layers:
        rows = index.filter(pc.equal(index["layer"], layer))
        rows = rows.sort_by([("unit", "ascending"), ("rank", "ascending")])
        per_unit = int(pc.max(rows["rank"]).as_py() or 1) if rows.num_rows else 1
        rel = layer_file(folder, layer)
        store.write_parquet(rel, rows, row_group_size=UNITS_PER_ROW_GROUP * per_unit)
        paths.append(rel)
    return paths
