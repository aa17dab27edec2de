"""The scale model of docs/SCALE.md, section 4: counts, time and cost for three datasets on 8, 64
and 512 GPUs, computed from the parameters of its section 1 and the code as it is now.

    python bench/scale_model.py [--write docs/SCALE.md]

Partial sizes are computed with the repository's own code and schemas (a `topk` partial shaped
like bench_reduce.py's, the `stats_state` table of `index.stats.RunningStats`, both written
with pyarrow as `Store.write_parquet` does) [C]; every other input is a named parameter below,
tagged as in SCALE.md ([M] measured, [C] from the code, [A] assumed). The tables go between the
`<!-- scale-tables -->` markers of the file given to --write.
"""

from __future__ import annotations

import argparse
import io
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.index.stats import RunningStats  # noqa: E402
from pipeline.store.schemas import conform  # noqa: E402

# ---------------------------------------------------------------- parameters (SCALE.md section 1)
R = 1_480  # images/s per GPU: decode-bound at 8 Pillow threads (c·D) [M D, A2]
T_FIX = 0.2  # s per shard outside compute; two shards in flight overlap it [A3]
T_REQ = 0.020  # s, one request from one thread [A4]
T_LIST = 0.1  # s, one LIST page of 1,000 keys [A4]
BW = 100e6  # B/s, one stream [A4]
T_START = 60.0  # s, actors start and load weights [A5]
T_DRV = 0.003  # s of driver time per finished shard [A6]
R_RED = 15e6  # partial top-k rows merged per second per core, from Parquet [M]
T_KLL = 14e-6  # s per (unit, shard) sketch merge, one core [M, 2 loaded cores]
READERS = 8  # partial reads in flight per reduce process [C: reduce.READERS]
CORES = 32  # CPU cores the reduce's tasks get once the GPUs are released [A9]
U, K, DEPTH = 3_840, 9, 18  # ResNet-50 layer1..4 units; index k; partial rows per unit [C]
LAYERS = (256, 512, 1024, 2048)
B_ROW = 170  # bytes per image in images.parquet [C]
TABLES = 4  # partial tables read per shard with the defaults: topk, images, stats, samples [C]
TREE_TABLES = 3  # of which the reduce's tasks read topk, stats, samples; the driver images [C]
PUTS = 5  # per shard: those 4 tables and _COMMIT.json [C]
GPU_PRICES = (3.0, 7.0)  # $ per GPU-hour [A7]
PUT_PRICE, GET_PRICE, GB_MONTH = 0.005 / 1000, 0.0004 / 1000, 0.023  # S3 Standard [A7]
GPUS = (8, 64, 512)


@dataclass(frozen=True)
class Dataset:
    name: str
    images: int
    per_shard: int  # images per shard (a container's images, or --shard-size)
    loose: bool
    file_bytes: int  # bytes per image file [A8]

    @property
    def shards(self) -> int:
        return math.ceil(self.images / self.per_shard)


DATASETS = [
    Dataset("ImageNet-1k, loose, S = 256", 1_281_167, 256, True, 110_000),
    Dataset("ImageNet-1k, loose, S = 2,048", 1_281_167, 2_048, True, 110_000),
    Dataset("ImageNet-1k, 1,024 tars", 1_281_167, 1_252, False, 110_000),
    Dataset("ImageNet-21k, tars of 10,000", 14_000_000, 10_000, False, 92_000),
    Dataset("LAION-400M, tars of 10,000", 400_000_000, 10_000, False, 25_000),
    Dataset("ImageNet-21k, loose, S = 256", 14_000_000, 256, True, 92_000),
    Dataset("LAION-400M, loose, S = 256", 400_000_000, 256, True, 25_000),
]


# ---------------------------------------------------------------- partial sizes [C]
def stats_bytes(per_shard: int) -> int:
    """Bytes of one shard's stats_state table for ResNet-50's 3,840 units (ReLU activations)."""
    total = 0
    torch.manual_seed(0)
    for units in LAYERS:
        running = RunningStats(units)
        for start in range(0, per_shard, 512):
            running.add(torch.relu(torch.randn(min(512, per_shard - start), units)))
        total += parquet_bytes(conform(running.table(f"layer{units}"), "stats_state"))
    return total


def topk_bytes(per_shard: int) -> int:
    """Bytes of one shard's topk table: U·DEPTH rows, ImageNet-like ids, random sha256 hashes."""
    rng = np.random.default_rng(0)
    rows = U * DEPTH
    ids = [f"n{rng.integers(10**7, 10**8)}/n{rng.integers(10**7, 10**8)}_{i}.JPEG" for i in
           range(per_shard)]  # fmt: skip
    hashes = [rng.bytes(32).hex() for _ in range(per_shard)]
    pick = rng.integers(0, per_shard, rows)
    table = pa.table({
        "layer": pa.array(np.repeat([f"layer{i}" for i in range(1, 5)],
                                    [u * DEPTH for u in LAYERS])),
        "unit": pa.array(np.concatenate([np.repeat(np.arange(u), DEPTH) for u in LAYERS]),
                         pa.int32()),
        "rank": pa.array(np.tile(np.arange(1, DEPTH + 1), U), pa.int32()),
        "activation": pa.array(rng.random(rows).astype(np.float32)),
        "image_id": pa.array([ids[i] for i in pick]),
        "image_hash": pa.array([hashes[i] for i in pick]),
        "y": pa.array(rng.integers(0, 56, rows).astype(np.int32)),
        "x": pa.array(rng.integers(0, 56, rows).astype(np.int32)),
    })  # fmt: skip
    return parquet_bytes(conform(table, "partial"))


def parquet_bytes(table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf)  # Store.write_parquet's settings
    return buf.tell()


# ---------------------------------------------------------------- the model (SCALE.md section 2)
@dataclass(frozen=True)
class Counts:
    shards: int
    partial_rows: int
    lists: int
    gets: int
    puts: int
    partial_bytes: int  # one shard's partial tables
    storage: float  # bytes

    @property
    def dollars(self) -> float:
        return (self.lists + self.puts) * PUT_PRICE + self.gets * GET_PRICE


def counts(d: Dataset, sizes: dict[int, tuple[int, int]]) -> Counts:
    n = d.shards
    topk, stats = sizes[d.per_shard]
    partial = topk + stats + d.per_shard * B_ROW
    listing = math.ceil(d.images / 1000) if d.loose else math.ceil(n / 1000)
    lists = listing + 1  # + the one listing of partials/ that answers every commit check
    reads = d.images if d.loose else n * (1 + math.ceil(d.per_shard * d.file_bytes / 50 * 2**-20))
    gets = reads + TABLES * n  # images or containers, then the reduce's partial tables
    puts = PUTS * n + 3 * len(LAYERS) + 6  # + index, stats, samples per layer; images, ...
    storage = n * partial + d.images * B_ROW + 3.4e6
    return Counts(n, n * U * DEPTH, lists, gets, puts, partial, storage)


@dataclass(frozen=True)
class Times:
    before: float
    map: float
    reduce: float
    busy_gpu_h: float
    billed_gpu_h: float

    @property
    def total(self) -> float:
        return self.before + self.map + self.reduce


def times(d: Dataset, c: Counts, gpus: int) -> Times:
    n = c.shards
    listing = (math.ceil(d.images / 1000) if d.loose else math.ceil(n / 1000)) * T_LIST
    before = listing + T_LIST + T_START  # listing, one partials/ listing, actor start
    t_shard = max(d.per_shard / R, T_FIX)  # two in flight: the fixed cost hides behind compute
    map_ = max(math.ceil(n / gpus) * t_shard, n * T_DRV)
    # reduce: the driver streams every shard's images table into images.parquet (READERS reads in
    # flight, one write stream); then one-CPU tasks on CORES cores read their groups' topk, stats
    # and samples (READERS at a time on object stores) and merge, the driver folding the results
    images = n * T_REQ / READERS + 2 * d.images * B_ROW / BW
    tree_bytes = c.partial_bytes - d.per_shard * B_ROW
    reads = n * TREE_TABLES * T_REQ / (CORES * READERS) + n * tree_bytes / (BW * CORES)
    merge = (c.partial_rows / R_RED + n * U * T_KLL) / CORES
    reduce = images + reads + merge
    busy = n * (d.per_shard / R) / 3600
    billed = gpus * (T_START + map_) / 3600  # GPU nodes scale from zero when the pool asks for
    # them, after the listing, and the actors are released before the reduce
    return Times(before, map_, reduce, busy, billed)


# ---------------------------------------------------------------- tables
def fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_count(value: float) -> str:
    for limit, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if value >= limit:
            return f"{value / limit:.{2 if value < 10 * limit else 1 if value < 100 * limit else 0}f}{suffix}"
    return f"{value:.0f}"


def fmt_bytes(value: float) -> str:
    for limit, suffix in ((1e12, " TB"), (1e9, " GB"), (1e6, " MB"), (1e3, " kB")):
        if value >= limit:
            return f"{value / limit:.{1 if value < 100 * limit else 0}f}{suffix}"
    return f"{value:.0f} B"


def tables() -> str:
    sizes = {s: (topk_bytes(s), stats_bytes(s)) for s in sorted({d.per_shard for d in DATASETS})}
    lines = [
        "Partial tables per shard [C] (ResNet-50, defaults: `--stats on`, samples): "
        + "; ".join(
            f"S = {s:,}: topk {fmt_bytes(t)}, stats {fmt_bytes(st)}" for s, (t, st) in sizes.items()
        )
        + ".",  # fmt: skip
        "",
        "| dataset, layout | shards n | partial rows | LIST | GET | PUT | requests $ | storage |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    all_counts = {d.name: counts(d, sizes) for d in DATASETS}
    for d in DATASETS:
        c = all_counts[d.name]
        lines.append(
            f"| {d.name} | {c.shards:,} | {fmt_count(c.partial_rows)} | {fmt_count(c.lists)} | "
            f"{fmt_count(c.gets)} | {fmt_count(c.puts)} | ${c.dollars:,.2f} | "
            f"{fmt_bytes(c.storage)} |"
        )
    lines += [
        "",
        "| dataset, layout | GPUs | before map | map | reduce (CPU) | total | GPU-h busy / billed "
        "| GPU cost at $3 / $7 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in DATASETS:
        for i, gpus in enumerate(GPUS):
            t = times(d, all_counts[d.name], gpus)
            low, high = (t.billed_gpu_h * p for p in GPU_PRICES)
            lines.append(
                f"| {d.name if i == 0 else ''} | {gpus} | {fmt_time(t.before)} | "
                f"{fmt_time(t.map)} | {fmt_time(t.reduce)} | {fmt_time(t.total)} | "
                f"{t.busy_gpu_h:,.1f} / {t.billed_gpu_h:,.1f} | ${low:,.0f} / ${high:,.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", default=None, help="docs/SCALE.md: replace its scale-tables block")
    a = ap.parse_args()
    body = tables()
    print(body)
    if a.write:
        path = Path(a.write)
        text = path.read_text()
        block = f"<!-- scale-tables -->\n{body}\n<!-- /scale-tables -->"
        pattern = re.compile(r"<!-- scale-tables -->.*?<!-- /scale-tables -->", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{a.write} has no <!-- scale-tables --> block to replace")
        path.write_text(pattern.sub(lambda _: block, text))


if __name__ == "__main__":
    main()
