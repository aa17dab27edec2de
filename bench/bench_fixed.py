"""Fixed cost and marginal rate of `ninebest index`, end to end, from two run sizes.

    python bench/bench_fixed.py [--sizes 64,512] [--repeats 2] [--write BENCHMARKS.md]

Each run is a fresh `python -m pipeline index` process (AlexNet, seeded weights, 3 layers, the
embedded local Ray instance, 2 CPU workers, shards of 32) over real photographs (crops of
scikit-image's samples, 500x375 JPEGs). Measured from just before the process is spawned:
`first shard` is when the first shard began computing on an actor (the earliest `started` of the
shards' commit records), `total` is when the process exited. From the two sizes, the marginal
rate is (N2 - N1) / (T2 - T1) and the fixed cost T1 - N1 / rate: what every run pays whatever its
size (imports, planning, Ray and actor start-up, reduce and manifest). The median of `--repeats`
runs of each size is used. The phases are measured in one more fresh process that runs the
driver's steps one after another on 64 images: imports, plan (weights, probe, listing), Ray start
(the embedded local instance) and the actors' start (from creating the pool to the first shard
computing, which includes each actor process importing torch and torchvision and building the
model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

LAYERS = "features.3,features.10,classifier.4"
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def make_images(root: Path, count: int) -> None:
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)])
        left, top = int(rng.integers(0, 12)), int(rng.integers(0, 12))
        crop = photo.crop((left, top, left + 500, top + 375)) if photo.width >= 512 else photo
        crop.save(root / f"{i:05d}.jpg", quality=90)


def run(data: Path, out: Path) -> dict:
    argv = [sys.executable, "-m", "pipeline", "index", "--model", "torchvision:alexnet",
            "--layers", LAYERS, "--data", str(data), "--out", str(out), "--workers", "2",
            "--shard-size", "32", "--batch-size", "32"]  # fmt: skip
    spawned = time.time()
    subprocess.run(argv, env=ENV, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    total = time.time() - spawned
    records = [json.loads(p.read_text()) for p in out.glob("partials/*/_COMMIT.json")]
    first = min(r["started"] for r in records) - spawned
    manifest = json.loads((out / "manifest.json").read_text())
    return {"total": total, "first": first, "reduce": manifest["timings"]["reduce_seconds"]}


PHASES = """
import json, sys, time
t0 = time.time()
import pipeline.cli, pipeline.index.run
from pipeline.cluster.connect import ray_session
from pipeline.cluster.pool import Pool
from pipeline.config import IndexConfig
from pipeline.index.map import ShardIndexer
from pipeline.index.plan import stream_plan
t1 = time.time()
cfg = IndexConfig(model="torchvision:alexnet", data=sys.argv[1], layers=tuple(sys.argv[3].split(",")),
                  out=sys.argv[2], workers=2, shard_size=32, batch_size=32)
p = stream_plan(cfg)
t2 = time.time()
with ray_session(None):
    t3 = time.time()
    units = {name: shape[0] for name, shape in p.shapes.items()}
    args = (p.cfg, p.run_fingerprint, p.model_fingerprint)
    with Pool(ShardIndexer, args, 2, 1, 2, 300, 0, in_flight=2) as pool:
        shards = [s.load() for s in p.shards[:2]]
        records = list(pool.map("index_shard", shards, call=lambda s: (s, units, 64),
                                name=lambda s: s.key))
first = min(r["started"] for r in records)
print(json.dumps({"imports": t1 - t0, "plan": t2 - t1, "ray": t3 - t2, "actors": first - t3}))
"""


def phases(data: Path, out: Path) -> dict[str, float]:
    argv = [sys.executable, "-c", PHASES, str(data), str(out), LAYERS]
    done = subprocess.run(argv, env=ENV, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,512")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", default=None)
    a = ap.parse_args()
    small, large = (int(s) for s in a.sizes.split(","))
    runs: dict[int, list[dict]] = {small: [], large: []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for count in runs:
            make_images(Path(tmp) / f"data{count}", count)
        for repeat in range(a.repeats):
            for count in runs:
                out = Path(tmp) / f"out{count}-{repeat}"
                runs[count].append(run(Path(tmp) / f"data{count}", out))
                print(count, runs[count][-1], flush=True)
        steps = phases(Path(tmp) / f"data{small}", Path(tmp) / "phases")
    load_after = os.getloadavg()[0]
    t1, t2 = (statistics.median(r["total"] for r in runs[n]) for n in (small, large))
    first = statistics.median(r["first"] for r in runs[small])
    rate = (large - small) / (t2 - t1)
    fixed = t1 - small / rate
    body = f"""## Fixed cost and marginal rate (end to end)

Command: `python bench/bench_fixed.py --sizes {a.sizes} --repeats {a.repeats} --write BENCHMARKS.md`
(AlexNet with seeded weights, layers {LAYERS}, the embedded local Ray instance, 2 CPU workers,
shards of 32, 500x375 JPEGs; each run a fresh process; medians of {a.repeats} runs per size).
Machine: {os.cpu_count()} cores; 1-minute load average {load_before:.1f} before and {load_after:.1f}
after (anything above 0 is other work sharing the cores, which slows every row).

| measure | seconds |
| --- | ---: |
| process start to the first shard computing ({small} images) | {first:.1f} |
| of which: imports (`pipeline.cli`, `pipeline.index.run`: torch, torchvision, Ray, pyarrow) | {steps["imports"]:.1f} |
| of which: plan (weights, probe, listing) | {steps["plan"]:.1f} |
| of which: Ray start (the embedded local instance) | {steps["ray"]:.1f} |
| of which: actors start (2 processes importing torch and torchvision, building the model) | {steps["actors"]:.1f} |
| whole run, {small} images | {t1:.1f} |
| whole run, {large} images | {t2:.1f} |
| fixed cost (intercept: T1 - N1 / rate) | {fixed:.1f} |

The phases are from a separate process run step by step (see the script), so their sum differs
a little from the first row. Marginal rate: {rate:.0f} images/s. The issue's target, at most 6 s
from process start to the first shard computing on 2 cores, is not met: each actor is a fresh
process that imports torch and torchvision (torchvision's detection ops alone pull in
`torch._dynamo`, sympy and triton), and two actors, the driver and Ray's own processes share the
two cores. Reusing a running cluster (`--address`) saves the Ray start; actors kept warm across
runs would save the rest, and ninebest does not do that yet.
"""
    print(body)
    if a.write:
        write_section(a.write, "fixed-cost", body)


if __name__ == "__main__":
    main()
