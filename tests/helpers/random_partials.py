"""Random partial top-k tables as map workers write them, for reduce and merge tests."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from pipeline.store.schemas import conform, schema

LAYERS = {"conv1": 3, "fc": 5, "block.2": 1}  # several layers, different unit counts


def random_partials(
    seed: int, shards: int, depth: int, levels: int, contents: int | None = None
) -> list[pa.Table]:
    """Partials as workers write them: per unit up to `depth` distinct images ranked by
    (activation desc, image_id asc); few activation levels (exact ties); images recur across
    partials (a re-run or derived shard) with the same y, x; some units have no or few rows.

    contents: None gives every image its own content hash; a number N gives only N hashes, so
    different images share a hash within and across partials (duplicate files)."""
    rng = np.random.default_rng(seed)
    images = [f"img/{i:03d}" for i in range(4 * depth + 4)]
    parts = []
    for _ in range(shards):
        rows = []
        for layer, units in LAYERS.items():
            for unit in range(units):
                n = int(rng.integers(0, depth + 1))
                ids = rng.choice(images, size=n, replace=False)
                values = rng.integers(0, levels, size=n).astype(np.float32) / 2
                ranked = sorted(
                    zip(values.tolist(), ids.tolist(), strict=True), key=lambda r: (-r[0], r[1])
                )
                for rank, (value, image) in enumerate(ranked, start=1):
                    where = zlib.crc32(f"{image}{layer}{unit}".encode())
                    content = (
                        f"h-{image}" if contents is None
                        else f"c{zlib.crc32(image.encode()) % contents}"
                    )  # fmt: skip
                    rows.append((layer, unit, rank, value, image, content, where % 7, where % 5))
        columns = list(zip(*rows, strict=True)) if rows else [[]] * 8
        table = pa.table(dict(zip(schema("partial").names, columns, strict=True)))
        parts.append(conform(table.cast(schema("partial")), "partial"))
    return parts
