"""What makes two of a unit's top-k "the same picture": `--distinct id|content|perceptual`.

- id: distinct `image_id` (the behaviour before content hashes were used).
- content: one row per content hash (sha256 of the file's bytes). The rows of one content are
  merged into its best row in the total order (activation descending, then image_id ascending);
  identical bytes give identical activations, so the smallest image_id represents them.
- perceptual: content, then near-duplicates dropped by pHash (64 bits, `imagehash.phash`). For
  each unit, take the exact global list of its top-`depth` contents (depth = k + buffer), and walk
  it in the total order, keeping a row unless its pHash lies within Hamming distance `near` of a
  row already kept, until k are kept. The list is the same under any sharding (see `topk.merge`),
  so the result is too. A unit whose top-`depth` contents hold fewer than k mutually distant
  pictures gets fewer than k rows (counted in the manifest as `perceptual_short`); a larger
  `--buffer` deepens the list.

`first_positions` gives the map stage each image's ident within a shard (the position of the
shard's first image with the same hash); `select_perceptual` runs the walk on the reduced list.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

MODES = ("id", "content", "perceptual")
NEAR = 8  # default --near: Hamming distance (of 64 bits) at most this is a near-duplicate


def by_column(mode: str) -> str:
    """The partial column whose equal values are one picture in the per-shard merge."""
    return "image_id" if mode == "id" else "image_hash"


def phash(image: Image.Image) -> int:
    """The image's 64-bit perceptual hash (imagehash's DCT pHash) as a signed int64."""
    import imagehash  # imported here: only --distinct perceptual pays for scipy

    bits = np.packbits(imagehash.phash(image).hash.ravel())  # (8,) uint8
    return int.from_bytes(bits.tobytes(), "big", signed=True)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between int64 hashes (broadcasting; all 64 bits, sign too)."""
    return np.bitwise_count(np.bitwise_xor(a, b).view(np.uint64)).astype(np.int64)


class Firsts:
    """Each image's ident in its shard: the position of the first image with its content hash.

    Positions arrive in ascending order (the shard's image_id order), so the first image of a
    content is also its smallest id, and a repeat always comes after its first image.
    """

    def __init__(self) -> None:
        self.first: dict[str, int] = {}

    def idents(self, hashes: list[str], positions: list[int]) -> tuple[list[int], bool]:
        """(ident per image, whether any image repeats an earlier content)."""
        idents = [self.first.setdefault(h, p) for h, p in zip(hashes, positions, strict=True)]
        return idents, idents != positions


def select_perceptual(
    table: pa.Table, phashes: dict[str, int], k: int, near: int, depth: int
) -> tuple[pa.Table, int]:
    """Walk each (layer, unit)'s rows (its top-`depth` contents, sorted by layer, unit, rank)
    keeping at most k rows no two of which are within `near`; return (kept rows re-ranked 1..,
    units left short of k although their list was cut at `depth`)."""
    if table.num_rows == 0:
        return table, 0
    layer = table["layer"].to_numpy(zero_copy_only=False)
    unit = table["unit"].to_numpy()
    hashes = np.array([phashes[h] for h in table["image_hash"].to_pylist()], dtype=np.int64)
    start = np.ones(len(unit), dtype=bool)
    start[1:] = (unit[1:] != unit[:-1]) | (layer[1:] != layer[:-1])
    bounds = [*np.flatnonzero(start), len(unit)]
    keep: list[int] = []
    ranks: list[int] = []
    short = 0
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        kept = _walk(hashes[lo:hi], k, near)
        short += len(kept) < k and hi - lo >= depth  # the list was cut: more may exist
        keep.extend(lo + i for i in kept)
        ranks.extend(range(1, len(kept) + 1))
    out = table.take(pa.array(keep, pa.int64()))
    column = out.schema.get_field_index("rank")
    out = out.set_column(column, out.schema.field(column), pa.array(ranks, pa.int16()))
    return out, short


def _walk(hashes: np.ndarray, k: int, near: int) -> list[int]:
    """Indices kept by the greedy walk over one unit's rows, best first."""
    close = hamming(hashes[:, None], hashes[None, :]) <= near  # (n, n)
    kept: list[int] = []
    for i in range(len(hashes)):
        if len(kept) == k:
            break
        if not close[i, kept].any():
            kept.append(i)
    return kept


def needed_hashes(table: pa.Table) -> pa.Array:
    """The distinct content hashes of `table` (whose pHashes the walk needs)."""
    return pc.unique(table["image_hash"].combine_chunks())
