"""Reduce throughput: rows/s of the exact streaming top-k (`reduce.GlobalTopK`) over simulated
partials, in memory and from Parquet files on local disk.

    python bench/bench_reduce.py [--shards 1000,10000] [--disk 300] [--repeat 3] [--write FILE]

Partials are shaped like a ResNet-50 run over layer1..layer4 (256 + 512 + 1,024 + 2,048 = 3,840
units) with 18 rows per unit as real partials carry (k = 9 plus the reindex buffer of 9). Each
shard has 256 distinct images and its own activations: 64 base partials are drawn up front (per
unit, the 18 best of 256 Gamma(2) draws, on 18 distinct images) and shard s takes base s mod 64
with its activation rows rolled by s // 64 units and its image ids renamed, so every unit sees
i.i.d. values in every shard and no image twice (pruning behaves as on real data, not on repeated
partials). Building a shard's table is not timed. Rows/s counts the k = 9 rows per unit the index
is made of (34,560 per shard); the stored 18-row count is shown too.

In memory, tables are as `reduce.read_topk` returns them (written to Parquet and read back once,
strings dictionary-encoded), so Parquet decoding is not timed; the disk run times
`reduce.merge_partials` over partials written with `partials.write` (warm page cache), decoding
included. Every run is one fresh process with one Arrow and one torch thread; peak RSS is that
process's. Each configuration runs `--repeat` times and the fastest run is kept.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from report import environment, write_section  # noqa: E402

from pipeline.index.reduce import MAX_PENDING, STRINGS, GlobalTopK, merge_partials, read_topk  # noqa: E402
from pipeline.store import partials  # noqa: E402
from pipeline.store.schemas import conform  # noqa: E402
from pipeline.store.storage import ROW_GROUP_SIZE, Store  # noqa: E402

LAYERS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
UNITS = sum(LAYERS.values())
K = 9
DEPTH = 18  # k plus the default buffer
IMAGES = 256  # per shard
BASES = 64


def base(b: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    """Base partial `b` (schema "partial") and its activations, (UNITS, DEPTH) best first."""
    draws = rng.gamma(2.0, size=(UNITS, IMAGES)).astype(np.float32)  # (U, 256)
    values = -np.sort(-draws, axis=1)[:, :DEPTH]  # (U, DEPTH) each unit's best, descending
    images = np.argsort(rng.random((UNITS, IMAGES)), axis=1)[:, :DEPTH]  # (U, DEPTH) distinct
    ids = np.array([f"train/{b:05d}/{i:03d}.jpg" for i in range(IMAGES)], dtype=object)
    hashes = np.array([f"{b:05d}{i:03d}".ljust(64, "0") for i in range(IMAGES)], dtype=object)
    names = np.concatenate([np.full(n * DEPTH, name, dtype=object) for name, n in LAYERS.items()])
    unit = np.concatenate([np.repeat(np.arange(n), DEPTH) for n in LAYERS.values()])
    table = pa.table(
        {
            "layer": pa.array(names, pa.string()),
            "unit": pa.array(unit, pa.int32()),
            "rank": pa.array(np.tile(np.arange(1, DEPTH + 1), UNITS), pa.int16()),
            "activation": pa.array(values.ravel()),
            "image_id": pa.array(ids[images.ravel()], pa.string()),
            "image_hash": pa.array(hashes[images.ravel()], pa.string()),
            "y": pa.array(rng.integers(0, 56, UNITS * DEPTH), pa.int32()),
            "x": pa.array(rng.integers(0, 56, UNITS * DEPTH), pa.int32()),
        }
    )
    return conform(table, "partial"), values


def as_read(table: pa.Table) -> pa.Table:
    """`table` written to Parquet as `partials.write` does and read back as `read_topk` does."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_SIZE)
    return pq.read_table(io.BytesIO(buffer.getvalue()), read_dictionary=STRINGS)


def bases() -> list[tuple[pa.Table, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(as_read(t), v) for t, v in (base(b, rng) for b in range(BASES))]


def shard(s: int, pool: list[tuple[pa.Table, np.ndarray]]) -> pa.Table:
    """Shard `s`: its base with activation rows rolled by s // BASES units and ids renamed."""
    table, values = pool[s % BASES]
    rolled = np.roll(values, s // BASES, axis=0).ravel()  # (U * DEPTH,) a unit's rows move whole
    lengths = np.cumsum([len(c) for c in table["activation"].chunks])[:-1]
    activation = pa.chunked_array(np.split(rolled, lengths), pa.float32())
    ids = pa.chunked_array(
        [
            pa.DictionaryArray.from_arrays(
                c.indices, pc.replace_substring(c.dictionary, f"/{s % BASES:05d}/", f"/{s:05d}/")
            )
            for c in table["image_id"].chunks
        ]
    )
    for name, column in (("activation", activation), ("image_id", ids)):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(name), column)
    return table


def single_core() -> None:
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory now (Linux /proc), or the peak so far elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return peak_mb()
    return pages * resource.getpagesize() / 2**20


def in_memory(shards: int) -> dict:
    """Fold `shards` in-memory partials into a GlobalTopK; time only `add` and the final merge."""
    single_core()
    pool = bases()
    setup_mb = rss_mb()
    reducer = GlobalTopK(K)
    wall = cpu = 0.0
    for s in range(shards):
        table = shard(s, pool)
        w, c = time.perf_counter(), time.process_time()
        reducer.add(table)
        wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
    w, c = time.perf_counter(), time.process_time()
    index = reducer.table()
    wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
    assert index.num_rows == UNITS * K
    return {
        "shards": shards, "wall": wall, "cpu": cpu, "setup_mb": setup_mb, "peak_mb": peak_mb(),
        "survivors": reducer.survivors, "merges": reducer.merges,
    }  # fmt: skip


def images_table(s: int) -> pa.Table:
    ids = [f"train/{s:05d}/{i:03d}.jpg" for i in range(IMAGES)]
    nulls = pa.nulls(IMAGES, pa.string())
    table = pa.table(
        {
            "image_id": ids, "uri": [f"/data/{i}" for i in ids], "stamp": nulls,
            "image_hash": ["0" * 64] * IMAGES, "bytes": pa.array([1000] * IMAGES, pa.int64()),
            "height": pa.array([224] * IMAGES, pa.int32()),
            "width": pa.array([224] * IMAGES, pa.int32()), "error": nulls,
            "shard": [f"{s:05d}"] * IMAGES,
            "offset": pa.array([None] * IMAGES, pa.int64()),
        }
    )  # fmt: skip
    return conform(table, "images")


def on_disk(shards: int) -> dict:
    """Write `shards` partials with `partials.write`, then time `merge_partials` over them."""
    single_core()
    pool = bases()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        records = [
            partials.write(store, f"{s:05d}", "a", "bench", shard(s, pool), images_table(s), {})
            for s in range(shards)
        ]
        setup_mb = rss_mb()
        w, c = time.perf_counter(), time.process_time()
        for record in records:
            read_topk(store, record)
        read_wall, read_cpu = time.perf_counter() - w, time.process_time() - c
        w, c = time.perf_counter(), time.process_time()
        index = merge_partials(store, records, K)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
    assert index.num_rows == UNITS * K
    return {
        "shards": shards, "wall": wall, "cpu": cpu, "read_wall": read_wall,
        "read_cpu": read_cpu, "setup_mb": setup_mb, "peak_mb": peak_mb(),
    }  # fmt: skip


def best(fn, shards: int, repeat: int) -> dict:
    """The fastest of `repeat` runs, each in a fresh process (so peak RSS is the run's own)."""
    runs = []
    for _ in range(repeat):
        with multiprocessing.get_context("spawn").Pool(1) as worker:
            runs.append(worker.apply(fn, (shards,)))
        print(runs[-1], flush=True)
    return min(runs, key=lambda r: r["wall"])


def rates(r: dict) -> str:
    rows = r["shards"] * UNITS * K
    return (
        f"{rows / 1e6:.1f} M | {r['wall']:.2f} | {r['cpu']:.2f} | {rows / r['wall'] / 1e6:.1f} M | "
        f"{rows / r['cpu'] / 1e6:.1f} M | {rows * DEPTH / K / r['wall'] / 1e6:.1f} M"
    )


def verdict(results: list[dict]) -> str:
    """Per core is rows per CPU second: the runs are single-threaded, and on a shared machine
    their wall clock also counts time spent waiting for a core."""
    low = [r for r in results if r["shards"] * UNITS * K / r["cpu"] < 10e6]
    if not low:
        return "Every run above meets it (rows per CPU second, k rows per unit)."
    names = ", ".join(f"{r['kind']} at {r['shards']:,} shards" for r in low)
    return f"Below it (rows per CPU second, k rows per unit): {names}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="1000,10000", help="in-memory runs, comma-separated")
    ap.add_argument("--disk", type=int, default=300, help="shards in the Parquet run (0: none)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration; best kept")
    ap.add_argument("--write", default=None, help="write the section into this markdown file")
    a = ap.parse_args()
    single_core()
    memory = [
        {**best(in_memory, int(s), a.repeat), "kind": "in memory"} for s in a.shards.split(",")
    ]
    disk = [{**best(on_disk, a.disk, a.repeat), "kind": "from Parquet"}] if a.disk else []
    memory_rows = "\n".join(
        f"| {r['shards']:,} | {rates(r)} | {r['survivors'] / r['shards'] / UNITS:.2f} | "
        f"{r['merges']} | {r['setup_mb']:.0f} | {r['peak_mb']:.0f} |"
        for r in memory
    )
    disk_rows = "\n".join(
        f"| {r['shards']:,} | {rates(r)} | {r['read_cpu']:.2f} | {r['setup_mb']:.0f} | "
        f"{r['peak_mb']:.0f} |"
        for r in disk
    )
    body = f"""## Reduce: exact streaming top-k merge

Command: `python bench/bench_reduce.py --shards {a.shards} --disk {a.disk} --repeat {a.repeat} --write BENCHMARKS.md`
Machine: {environment()}; a 2-core machine shared with other work, so each figure is the fastest
of {a.repeat} runs; every run is a fresh process with one Arrow and one torch thread (one core).
Partials: ResNet-50 layer1..layer4, 3,840 units x 18 rows (k = 9 plus the reindex buffer), 256
images per shard, every shard with its own i.i.d. activations and image ids (see the script).
Rows counts the k = 9 rows per unit the index is built from (34,560 per shard); "stored rows/s"
counts all 18 (69,120 per shard). `GlobalTopK` keeps each unit's floor (its k-th activation so
far), drops every row below it with one numpy mask over the numeric columns, and merges only the
survivors (strings decoded from Parquet dictionaries for them alone) with `topk.merge`.

In memory (tables as read from Parquet, decoding not timed):

| shards | rows | wall s | CPU s | rows/s (wall) | rows/s (CPU) | stored rows/s | survivors per unit per shard | merges | RSS after setup (MB) | peak RSS (MB) |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{memory_rows}

`reduce.merge_partials` over partials written with `partials.write` to local disk (warm page
cache), Parquet decoding included:

| shards | rows | wall s | CPU s | rows/s (wall) | rows/s (CPU) | stored rows/s | of which reading (CPU s) | RSS after setup (MB) | peak RSS (MB) |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{disk_rows}

Target (issue 6): 10 M rows/s per core with bounded memory. {verdict(memory + disk)}
Per core means rows per CPU second of the single-threaded run; wall clock is shown as well (it
is higher when other work on the machine holds the cores). Throughput rises with the number of
shards: the first shards' rows mostly survive (floors are still low) and go through the sorting
merge, later ones are almost entirely dropped by the mask, so a reduce of only tens of shards
runs at lower rates (and takes well under a second). Memory: the reducer holds the running
result (34,560 rows), survivors waiting for a merge (at most as many rows, and at most
{MAX_PENDING} batches) and one partial; peak RSS minus RSS after setup (which includes torch and
the 64 base partials) stays small and does not grow with the number of shards.
"""
    print(body)
    if a.write:
        write_section(a.write, "reduce", body)


if __name__ == "__main__":
    main()
