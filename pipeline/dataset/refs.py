"""What the dataset is made of: image references, shards, and the shard-key grammar.

An `ImageRef` names one image (or one container of many) by a stable `image_id`, the tie-breaker
of every ordering. A `Shard` is the unit of map work: consecutive loose images, or one container.
Shard keys are derived from the content they cover (ids, sizes, stamps), so a rerun over the same
files finds the same keys and reuses their partials:
    <ordinal>-<digest>          loose images
    c-<digest>                  one container (tar or Parquet of image bytes)
    c-<digest>~<attempt>        a container read again after a failed read (reindex)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)  # fmt: skip
CONTAINER_KINDS = {".tar": "tar", ".parquet": "parquet"}  # suffix -> kind of container
CONTAINER_KEY = "c-"  # shard keys of containers start with this


@dataclass(frozen=True)
class ImageRef:
    image_id: str  # stable id, the tie-breaker of every ordering
    uri: str  # local path or fsspec URL to read the bytes from
    size: int | None = None  # bytes, when the listing knows it
    stamp: str | None = None  # modification time or ETag, when the listing knows it
    kind: str = "image"  # "image", or a container of many images: "tar" or "parquet"
    offset: int | None = None  # where a tar member's bytes start inside its container

    @property
    def is_container(self) -> bool:
        return self.kind != "image"


@dataclass(frozen=True)
class Shard:
    key: str  # "<ordinal>-<digest>": unique for these images at these sizes
    refs: tuple[ImageRef, ...]  # sorted by image_id; a container shard holds one container

    @property
    def container(self) -> ImageRef | None:
        """The container this shard streams, or None for a shard of loose images."""
        return self.refs[0] if self.key.startswith(CONTAINER_KEY) else None

    def load(self) -> Shard:
        """The shard with its refs: itself (a `spill.SpilledShard` reads them back from disk)."""
        return self


def kind_of(path: str) -> str | None:
    """'image', a container kind ('tar', 'parquet'), or None for any other file."""
    lower = path.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    return next((kind for suffix, kind in CONTAINER_KINDS.items() if lower.endswith(suffix)), None)


def plan_shards(refs: list[ImageRef], shard_size: int) -> list[Shard]:
    """Cut sorted loose images into consecutive shards of `shard_size`, and give each container
    a shard of its own; every key is derived from the content it covers."""
    loose = [ref for ref in refs if not ref.is_container]
    shards = []
    for ordinal, start in enumerate(range(0, len(loose), shard_size)):
        chunk = tuple(loose[start : start + shard_size])
        shards.append(Shard(loose_key(ordinal, chunk), chunk))
    return shards + [container_shard(ref) for ref in refs if ref.is_container]


def loose_key(ordinal: int, chunk: list[ImageRef] | tuple[ImageRef, ...]) -> str:
    """The key of the `ordinal`-th shard of loose images, holding `chunk`."""
    return f"{ordinal:06d}-{data_fingerprint(chunk)[:16]}"


def container_shard(ref: ImageRef) -> Shard:
    """The shard of one container: the same key for as long as the file is unchanged."""
    return Shard(f"{CONTAINER_KEY}{data_fingerprint([ref])[:16]}", (ref,))


def shard_of(refs: list[ImageRef] | tuple[ImageRef, ...], prefix: str) -> Shard:
    """A shard of exactly these refs (sorted by image_id), keyed `<prefix>-<digest>`."""
    chunk = tuple(sorted(refs, key=lambda r: r.image_id))
    return Shard(f"{prefix}-{data_fingerprint(chunk)[:16]}", chunk)


def data_fingerprint(refs: list[ImageRef] | tuple[ImageRef, ...]) -> str:
    """sha256 over every (image_id, size, stamp): changes when an image is added, removed or
    rewritten."""
    fingerprint = DataFingerprint()
    for ref in refs:
        fingerprint.update(ref)
    return fingerprint.hexdigest()


class DataFingerprint:
    """`data_fingerprint` hashed one ref at a time, for a listing that is never held whole."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def update(self, ref: ImageRef) -> None:
        self._digest.update(f"{ref.image_id}\0{ref.size}\0{ref.stamp}\n".encode())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
