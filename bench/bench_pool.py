"""Device-busy fraction of the map stage on a simulated 4-node GPU cluster with small shards.

Four worker nodes on 127.0.0.1 (tests/multinode.py: Ray's own harness, each node 1 CPU and one
declared GPU, no CUDA: the actors run on the CPU) index the same images with one and then two
shards in flight per actor. Busy fraction = sum of the shards' `device_seconds` (time an actor
holds its device: forward passes) / the actors' working windows (first shard start to last
commit, from the commit records and their files' times). With one shard in flight the
device waits between shards for the result to reach the driver, the next shard's first reads and
decodes, and the commit's writes; with two, those overlap the other shard's forward passes.

    .venv/bin/python bench/bench_pool.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from report import environment, write_section  # noqa: E402

import pipeline.index.run  # noqa: E402
from multinode import LocalCluster  # noqa: E402
from pipeline.cli import DEMO_IMAGES  # noqa: E402
from pipeline.config import IndexConfig, Preprocess  # noqa: E402
from pipeline.progress import Progress  # noqa: E402
from pipeline.store import layout, partials  # noqa: E402
from pipeline.store.storage import Store  # noqa: E402


def measure(data: Path, out: Path, in_flight: int, args) -> dict:
    pipeline.index.run.SHARDS_IN_FLIGHT = in_flight
    cfg = IndexConfig(
        model=args.model, data=str(data), out=str(out), layers=tuple(args.layers.split(",")),
        batch_size=args.batch_size, shard_size=args.shard_size, decode_threads=1,
        preprocess=Preprocess(resize=args.crop, crop=args.crop),
    )  # fmt: skip
    started = time.perf_counter()
    manifest = pipeline.index.run.index(cfg, Progress(quiet=True))
    wall = time.perf_counter() - started
    store = Store(str(out))
    spans: dict[str, list[tuple[float, float]]] = {}  # actor -> (start, end) of its shards
    busy = 0.0
    for shard in manifest["shards"]:
        record = partials.read_commit(store, shard["key"], manifest["run"])
        end = (out / layout.partial_commit(shard["key"])).stat()
        spans.setdefault(record["actor"], []).append((end.st_mtime - record["seconds"],
                                                      end.st_mtime))  # fmt: skip
        busy += record["device_seconds"]
    windows = sum(max(e for _, e in s) - min(b for b, _ in s) for s in spans.values())
    map_seconds = manifest["timings"]["map_seconds"]
    return {"in_flight": in_flight, "actors": len(spans), "map": map_seconds, "wall": wall,
            "busy": busy, "windows": windows, "fraction": busy / windows,
            "shards": len(manifest["shards"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--layers", default="layer3,fc")
    parser.add_argument("--copies", type=int, default=3, help="copies of the demo images")
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=160)
    parser.add_argument("--write", help="BENCHMARKS.md to update")
    args = parser.parse_args()
    cluster = LocalCluster()
    try:
        cluster.resize(args.nodes)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            for i in range(args.copies):
                shutil.copytree(DEMO_IMAGES, data / f"copy{i}")
            rows = [measure(data, Path(tmp) / f"out{n}", n, args) for n in (1, 2)]
    finally:
        cluster.shutdown()
    lines = [
        f"| {r['in_flight']} | {r['actors']} | {r['shards']} | {r['map']:.1f} | "
        f"{r['windows']:.1f} | {r['busy']:.1f} | {r['fraction']:.2f} |"
        for r in rows
    ]
    body = f"""## Map actors: device-busy fraction, simulated {args.nodes}-node cluster

`{" ".join(["python", *sys.argv])}`

{args.nodes} worker nodes of Ray's `cluster_utils.Cluster` on 127.0.0.1 (1 CPU and one declared
GPU each, no CUDA: actors fall back to the CPU), {args.model} ({args.layers}) at {args.crop} px,
shards of {args.shard_size} images, batches of {args.batch_size}. Busy fraction = sum of the
shards' time holding the device / sum over actors of the actor's working window (its first
shard's start to its last shard's commit; actor start-up, a fixed cost, is left out; map s
includes it). {environment()}; all nodes share this machine's cores, so "holding the device"
includes time a forward pass waits for a core.

| shards in flight per actor | actors | shards | map s | actor windows s | device-busy s | busy fraction |
| --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, "pool-busy", body)


if __name__ == "__main__":
    main()
