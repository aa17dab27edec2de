"""Bytes per shard partial under each setting: what --distinct, --stats, --samples, --bottom add.

    python bench/bench_partials.py [--model alexnet] [--layers features.3,features.10,classifier.4]
                                   [--images 256] [--write BENCHMARKS.md]

One shard of `--images` real photographs (the test photographs repeated under distinct ids, so
each content appears a few times) through `ShardIndexer.index_shard` (no Ray), once per setting;
the samples are measured for a dataset as small as the shard (every image in the sample S) and
as large as ImageNet-1k's train set (1,281,167 images: S keeps about 1 image in 512).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

from report import environment, write_section  # noqa: E402

from pipeline.config import IndexConfig  # noqa: E402
from pipeline.dataset.listing import list_images  # noqa: E402
from pipeline.dataset.refs import plan_shards  # noqa: E402
from pipeline.index.map import ShardIndexer  # noqa: E402
from pipeline.net.hooks import probe  # noqa: E402
from pipeline.net.instrument import find_layers  # noqa: E402
from pipeline.net.models import load_model  # noqa: E402

SETTINGS = {  # name -> (IndexConfig settings, listed images)
    "legacy: `--distinct id --stats off`": ({"distinct": "id", "stats": False}, None),
    "`--distinct content --stats off`": ({"distinct": "content", "stats": False}, None),
    "`--stats on --samples 0`": ({"samples": 0}, None),
    "defaults (content, stats, samples 4), small dataset": ({}, None),
    "defaults, ImageNet-1k-sized dataset": ({}, 1_281_167),
    "defaults + `--bottom 9`, ImageNet-1k-sized dataset": ({"bottom": 9}, 1_281_167),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--layers", default="features.3,features.10,classifier.4")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--write", default=None, help="BENCHMARKS.md to update")
    a = ap.parse_args()
    from photos import make_photos

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp) / "photos", variants=5)
        refs = list_images(f"{tmp}/photos")
        refs = (refs * (a.images // len(refs) + 1))[: a.images]
        refs = [type(r)(f"{i:05d}/{r.image_id}", r.uri, r.size) for i, r in enumerate(refs)]
        shard = plan_shards(refs, a.images)[0]
        loaded = load_model(f"torchvision:{a.model}")
        layers = tuple(a.layers.split(","))
        shapes = probe(loaded.module, find_layers(loaded.module, layers), 224)
        units = {name: shape[0] for name, shape in shapes.items()}
        for n, (name, (settings, listed)) in enumerate(SETTINGS.items()):
            out = Path(tmp) / f"out-{n}"
            cfg = IndexConfig(
                model=f"torchvision:{a.model}", data=f"{tmp}/photos", layers=layers,
                out=str(out), **settings,
            )  # fmt: skip
            record = ShardIndexer(cfg, "bench", loaded.fingerprint, threads=2).index_shard(
                shard, units, listed
            )
            folder = out / "partials" / shard.key / record["attempt"]
            sizes = {p.stem: p.stat().st_size for p in folder.iterdir()}
            rows.append((name, sizes))
            print(name, sizes, flush=True)
    base = rows[0][1]["topk"] + rows[0][1]["images"]
    lines = [
        f"| {name} | {s.get('topk', 0) / 1e3:.0f} | {s.get('stats', 0) / 1e3:.0f} | "
        f"{s.get('samples', 0) / 1e3:.0f} | {s.get('bottom', 0) / 1e3:.0f} | "
        f"{sum(s.values()) / 1e3:.0f} | {sum(s.values()) / base:.1f}x |"
        for name, s in rows
    ]
    total_units = sum(units.values())
    body = f"""## Partial size per shard ({a.model}, {len(layers)} layers, {total_units} units)

Command: `python bench/bench_partials.py --model {a.model} --layers {a.layers} --images {a.images} --write BENCHMARKS.md`
Machine: {environment()}; one shard of {a.images} images.

| setting | topk kB | stats kB | samples kB | bottom kB | all tables kB | vs legacy |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(lines)}

The statistics are dominated by the KLL sketches (k = 200: about 150 values per unit kept from a
256-image shard, some 600 bytes a unit); the top-k of distinct contents holds more distinct
strings than the legacy top-k here because each photograph repeats under several ids. The issue's
target of at most 2x is met only without statistics; see README (Statistics) for the trade-off.
"""
    print(body)
    if a.write:
        write_section(a.write, f"partials-{a.model}", body)


if __name__ == "__main__":
    main()
