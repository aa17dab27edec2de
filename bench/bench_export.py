"""Export cost per indexed row, end to end on a local Ray instance.

    python bench/bench_export.py [--units 32] [--write BENCHMARKS.md]

Indexes the bundled demo photographs with AlexNet (seeded weights) at `features.10`, then
exports `--units` units (9 rows each): patches cut from the originals, batched deconv
projections, grids, atlas. Reports seconds per exported row, actor start-up included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from report import environment, write_section  # noqa: E402

from pipeline.cli import DEMO_IMAGES  # noqa: E402
from pipeline.cluster.connect import ray_session  # noqa: E402
from pipeline.config import IndexConfig  # noqa: E402
from pipeline.export.run import export  # noqa: E402
from pipeline.index.run import index  # noqa: E402
from pipeline.progress import Progress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--write", default=None)
    a = ap.parse_args()
    quiet = Progress(quiet=True)
    with tempfile.TemporaryDirectory() as tmp, ray_session(None):
        cfg = IndexConfig(
            model="torchvision:alexnet", data=str(DEMO_IMAGES), layers=("features.10",),
            out=f"{tmp}/out", workers=a.workers, shard_size=16,
        )  # fmt: skip
        index(cfg, quiet)
        start = time.perf_counter()
        summary = export(cfg.out, units=tuple(range(a.units)), workers=a.workers, progress=quiet)
        seconds = time.perf_counter() - start
    rows = summary["counts"]["rows"]
    body = f"""## Export cost per indexed row

Command: `python bench/bench_export.py --units {a.units} --workers {a.workers} --write BENCHMARKS.md`
Machine: {environment()}; AlexNet (seeded weights) `features.10`, {a.units} units x 9 rows over the
48 bundled photographs, {a.workers} CPU actors on a local Ray instance.

| rows | images | seconds (incl. actor start) | seconds per row | rows per second |
| ---: | ---: | ---: | ---: | ---: |
| {rows} | {summary["counts"]["images"]} | {seconds:.1f} | {seconds / rows:.3f} | {rows / seconds:.1f} |
"""
    print(body)
    if a.write:
        write_section(a.write, "export", body)


if __name__ == "__main__":
    main()
