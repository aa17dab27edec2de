"""The reduce as a tree of merges (`index/reduce_tree.py`) on 1, 2 and 4 CPU nodes of a local
multi-node Ray cluster, against the single-process merge (`reduce.merge_partials`), same run.

    python bench/bench_reduce_cluster.py [--partials 10000] [--divide 32] [--nodes 1,2,4]
        [--write FILE]

Partials are shaped like a ResNet-50 run over layer1..layer4 (256, 512, 1,024 and 2,048
channels) divided by `--divide` (so that 10,000 partials fit this machine's disk and minutes),
with 18 rows per unit (k = 9 plus the reindex buffer) as real partials carry. Every partial has
its own i.i.d. activations (per unit 18 Gamma(2) draws, best first) and 256 image ids of its
own, so pruning behaves as on real data (about k ln N rows per unit survive the floors). Each is one Parquet file at its attempt's path under a
local folder, written once (not timed) with the run stamp `partials.read_table` checks, and
read back by the reduce (warm page cache).

The cluster is `ray.cluster_utils.Cluster` on 127.0.0.1 (tests/helpers/multinode.py): a head
without CPUs (the driver: this process) and worker nodes of one CPU each, added between the
configurations. On one node the group-size rule would merge in this process; the benchmark
forces TASKS_PER_CPU tasks there, to show the task path's own cost. Before each timed reduce
a small warm-up reduce starts the nodes' worker processes (a fresh worker imports torch, seconds
that a real run pays once). Each tree result is checked equal to the single-process one.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT))
from report import environment, write_section  # noqa: E402

from pipeline.index import reduce_tree  # noqa: E402
from pipeline.index.reduce import merge_partials  # noqa: E402
from pipeline.index.reduce_tree import TopKJob, TreeReport  # noqa: E402
from pipeline.store.layout import partial_table  # noqa: E402
from pipeline.store.partials import RUN_KEY  # noqa: E402
from pipeline.store.schemas import conform  # noqa: E402
from pipeline.store.storage import ROW_GROUP_SIZE, Store  # noqa: E402

RESNET50 = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
K, DEPTH, IMAGES, RUN = 9, 18, 256, "bench"


def layers(divide: int) -> dict[str, int]:
    return {name: max(1, units // divide) for name, units in RESNET50.items()}


def partial(s: int, sizes: dict[str, int]) -> pa.Table:
    """Partial `s`: per unit DEPTH i.i.d. Gamma(2) activations, best first, on DEPTH distinct
    images of the shard's IMAGES (the image of rank r of unit u: (7 r + 13 u) mod IMAGES)."""
    rng = np.random.default_rng(s)
    units = sum(sizes.values())
    values = -np.sort(-rng.gamma(2.0, size=(units, DEPTH)).astype(np.float32), axis=1)  # (U, D)
    image = (np.arange(DEPTH)[None, :] * 7 + np.arange(units)[:, None] * 13) % IMAGES  # (U, D)
    ids = pa.array([f"train/{s:05d}/{i:03d}.jpg" for i in range(IMAGES)], pa.string())
    names = pa.array(list(sizes), pa.string())
    which = np.repeat(np.arange(len(sizes), dtype=np.int32), [n * DEPTH for n in sizes.values()])
    unit = np.concatenate([np.repeat(np.arange(n), DEPTH) for n in sizes.values()])
    image_ids = pa.DictionaryArray.from_arrays(pa.array(image.ravel().astype(np.int32)), ids)
    table = pa.table(
        {
            "layer": pa.DictionaryArray.from_arrays(pa.array(which), names).cast(pa.string()),
            "unit": pa.array(unit, pa.int32()),
            "rank": pa.array(np.tile(np.arange(1, DEPTH + 1), units), pa.int16()),
            "activation": pa.array(values.ravel()),
            "image_id": image_ids.cast(pa.string()),
            "image_hash": image_ids.cast(pa.string()),
            "y": pa.array(rng.integers(0, 56, units * DEPTH), pa.int32()),
            "x": pa.array(rng.integers(0, 56, units * DEPTH), pa.int32()),
        }
    )
    table = conform(table, "partial")
    return table.replace_schema_metadata({**table.schema.metadata, RUN_KEY: RUN.encode()})


def write_range(args: tuple[str, int, int, int]) -> None:
    root, start, stop, divide = args
    sizes = layers(divide)
    for s in range(start, stop):
        path = Path(root) / partial_table(f"{s:05d}", "a", "topk")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(partial(s, sizes), path, row_group_size=ROW_GROUP_SIZE)


def write_partials(root: str, count: int, divide: int) -> list[dict]:
    """`count` partial files under `root` on every core; their commit records (in memory)."""
    step = math.ceil(count / 16)
    chunks = [(root, i, min(count, i + step), divide) for i in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:  # before Ray
        pool.map(write_range, chunks)
    return [{"shard": f"{s:05d}", "attempt": "a", "run": RUN} for s in range(count)]


def forced_size(partials: int, cpus: int) -> int:
    """The rule's group size with at least two CPUs counted (one node: TASKS_PER_CPU tasks)."""
    groups = min(reduce_tree.TASKS_PER_CPU * cpus, reduce_tree.MAX_GROUPS, partials)
    return max(1, math.ceil(partials / max(1, groups)))


def tree(store: Store, records: list[dict], cpus: int) -> tuple[float, pa.Table, TreeReport]:
    reduce_tree.group_size = lambda n, c: forced_size(n, cpus)  # type: ignore[assignment]
    reduce_tree.TREE_PARTIALS = 2
    report = TreeReport()
    started, cpu = time.perf_counter(), time.process_time()
    table, _ = reduce_tree.merge_topk(store, records, TopKJob(K, "image_id"), report)
    report.driver_cpu = time.process_time() - cpu  # type: ignore[attr-defined]
    return time.perf_counter() - started, table, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partials", type=int, default=10_000)
    ap.add_argument("--divide", type=int, default=32, help="ResNet-50's channels divided by this")
    ap.add_argument("--nodes", default="1,2,4", help="one-CPU worker nodes, comma-separated")
    ap.add_argument("--write", default=None, help="write the section into this markdown file")
    a = ap.parse_args()
    sizes = layers(a.divide)
    units = sum(sizes.values())
    rows = a.partials * units * K
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        records = write_partials(tmp, a.partials, a.divide)
        setup = time.perf_counter() - started
        store = Store(tmp)
        merge_partials(store, records[:8], K)  # warm-up: first calls of Arrow's kernels
        started, cpu = time.perf_counter(), time.process_time()
        single = merge_partials(store, records, K)
        baseline = time.perf_counter() - started
        results.append(("single process (driver)", "-", baseline, time.process_time() - cpu))
        print(f"written in {setup:.1f} s; single process {baseline:.1f} s", flush=True)
        from multinode import LocalCluster

        cluster = LocalCluster(head_cpus=0)
        try:
            for count in (int(n) for n in a.nodes.split(",")):
                while len(cluster.workers) < count:
                    cluster.add(num_gpus=0, num_cpus=1)
                cluster.wait_alive(count)
                tree(store, records[: 8 * count], count)  # warm-up: start the workers
                wall, table, report = tree(store, records, count)
                same = conform(table, "index").equals(single)
                assert same, "the tree's index differs from the single-process merge"
                tasks_line = f"{report.groups} x {report.group_size}"
                name = f"{count} node{'s' if count > 1 else ''}"
                results.append((name, tasks_line, wall, report.driver_cpu))  # type: ignore
                print(results[-1], flush=True)
        finally:
            cluster.shutdown()
    table_rows = "\n".join(
        f"| {name} | {groups} | {wall:.1f} | {rows / wall / 1e6:.2f} M | {baseline / wall:.2f} | "
        f"{driver:.1f} |"
        for name, groups, wall, driver in results
    )
    body = f"""## Reduce on the cluster: a tree of merges on 1, 2 and 4 CPU nodes

Command: `python bench/bench_reduce_cluster.py --partials {a.partials} --divide {a.divide} --nodes {a.nodes} --write BENCHMARKS.md`
Machine: {environment()}; {os.cpu_count()} cores shared with other work (load average at the
end: {os.getloadavg()[0]:.1f}), so 4 one-CPU nodes are over-subscribed: their tasks share two
cores with each other, the driver and the other work, and the 4-node figure is not a measure of
4 cores. Partials: {a.partials:,} simulated ResNet-50 partials, layer1..layer4 with the channel
counts divided by {a.divide} ({units} units in all, {", ".join(f"{n} {c}" for n, c in sizes.items())}),
18 rows per unit (k = 9 plus the reindex buffer), one Parquet file each on local disk (warm page
cache; written in {setup:.0f} s, not timed). Rows counts the k = 9 rows per unit the index is
made of ({rows / 1e6:.1f} M in all). The cluster: `ray.cluster_utils.Cluster` on 127.0.0.1, a head
without CPUs (the driver) and one-CPU worker nodes; each tree's first tasks are warmed up (a fresh
worker imports torch: seconds, paid once per run). Groups: TASKS_PER_CPU = {reduce_tree.TASKS_PER_CPU}
tasks per CPU (on one node the rule would merge in process; forced to tasks here). Every tree
result equals the single-process index.

| reduce | tasks x partials | wall s | rows/s | speed-up over single process | driver CPU s |
| --- | ---: | ---: | ---: | ---: | ---: |
{table_rows}
"""
    print(body)
    if a.write:
        write_section(a.write, "reduce-cluster", body)


if __name__ == "__main__":
    main()
