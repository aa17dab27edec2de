"""Peak memory against dataset size: driver and workers, at 2,000 and 20,000 images.

    python bench/bench_memory.py [--sizes 2000,20000] [--write BENCHMARKS.md]

Each size is a fresh `ninebest index` process (tiny test model, 2 CPU workers, shards of 256) over
small generated JPEGs (crops of real photographs, 64x64). The driver records its own peak RSS in
the manifest; each worker reports its peak RSS in every shard commit record, and the manifest
keeps the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from report import write_section  # noqa: E402


def make_images(root: Path, count: int) -> None:
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
        folder = root / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y : y + 64, x : x + 64]).save(folder / f"{i:06d}.jpg", quality=85)


def run(count: int, tmp: Path) -> dict:
    data, out = tmp / f"data{count}", tmp / f"out{count}"
    make_images(data, count)
    argv = [sys.executable, "-m", "pipeline", "index", "--model", "tiny_models:tiny", "--layers",
            "conv2,fc", "--data", str(data), "--out", str(out), "--workers", "2", "--shard-size",
            "256", "--batch-size", "64"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "tests" / "helpers"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "images": count,
        "seconds": seconds,
        "driver_mb": manifest["environment"]["driver_peak_rss_mb"],
        "worker_mb": manifest["environment"]["worker_peak_rss_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--write", default=None)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(s) for s in a.sizes.split(",")):
            rows.append(run(count, Path(tmp)))
            print(rows[-1], flush=True)
    table = "\n".join(
        f"| {r['images']:,} | {r['seconds']:.0f} | {r['images'] / r['seconds']:.0f} | "
        f"{r['driver_mb']:.0f} | {r['worker_mb']:.0f} |"
        for r in rows
    )
    body = f"""## Memory against dataset size

Command: `python bench/bench_memory.py --sizes {a.sizes} --write BENCHMARKS.md` (tiny test model,
2 CPU workers, shards of 256, 64x64 JPEGs; peak RSS as reported by getrusage).

| images | seconds | images/s | driver peak RSS (MB) | worker peak RSS (MB) |
| ---: | ---: | ---: | ---: | ---: |
{table}

Workers hold O(units x depth) top-k state and one batch in flight; the driver holds the listing
(O(images) short strings, or one entry per container) and one commit record per shard, and the
reduce streams the images table and merges partials one by one into a running result of
O(units x k) rows.
"""
    print(body)
    if a.write:
        write_section(a.write, "memory", body)


if __name__ == "__main__":
    main()
