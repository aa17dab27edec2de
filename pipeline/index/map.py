"""The map stage: one worker holds the model on its device and turns shards into partials.

`ShardIndexer` is a plain class so tests can run it without Ray; the orchestrator wraps it in a
Ray actor. For each shard: read and decode images on a thread pool (bounded, ordered prefetch so
I/O overlaps compute), batch them as uint8, copy to the device, normalise there, run the forward
pass under inference mode with `Capture` hooks, and fold each layer's spatial maxima into a
`RunningTopK` on the device. State is O(units x k) per layer, whatever the shard size.

A container shard (a tar or Parquet file of images, see `sources`) is streamed by one reader
thread into the same decode pool; positions come from the container, in image_id order.

With `--decode device` the pool only reads the bytes and checks each JPEG's header; one more
thread decodes JPEGs in batches on the worker's device (`jpeg.to_uint8`), ahead of the forward
pass, and other files (or JPEGs the device decoder refuses) with Pillow, so images reach
`_batched` in the same order either way.
"""

from __future__ import annotations

import dataclasses
import itertools
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import torch

from pipeline.config import IndexConfig
from pipeline.dataset import containers, jpeg
from pipeline.dataset.containers import READ_FAILED, Member
from pipeline.dataset.decode import BadImage, content_hash, decode
from pipeline.dataset.preprocess import normalize, to_uint8
from pipeline.dataset.refs import ImageRef, Shard
from pipeline.index import faults
from pipeline.index.distinct import Firsts, phash
from pipeline.index.samples import RunningSamples, priority, threshold
from pipeline.index.stats import RunningStats
from pipeline.index.topk import RunningTopK, negated
from pipeline.net.device import pick_device, resolve_decode, resolve_precision
from pipeline.net.hooks import Capture
from pipeline.net.instrument import find_layers
from pipeline.net.models import load_expected
from pipeline.store import partials
from pipeline.store.prefetch import background, prefetch
from pipeline.store.storage import Store


@dataclass(frozen=True)
class Loaded:
    """One image after reading and decoding: a tensor, or the reason it was skipped."""

    position: int  # index within the shard (image_id order)
    ref: ImageRef
    pixels: torch.Tensor | None  # (3, crop, crop) uint8
    image_hash: str | None = None
    nbytes: int | None = None
    height: int | None = None
    width: int | None = None
    error: str | None = None
    phash: int | None = None  # --distinct perceptual only
    pending: jpeg.Jpeg | None = None  # --decode device: a JPEG still to decode on the device


@dataclass
class Running:
    """One shard's running state per layer: the top-k, and what the run also keeps."""

    topks: dict[str, RunningTopK]
    bottoms: dict[str, RunningTopK]  # values negated: the top of -activation is the bottom
    stats: dict[str, RunningStats]
    samples: dict[str, RunningSamples]
    limit: int  # the samples' priority threshold (samples.threshold)
    priorities: dict[str, int]  # image_id -> samples.priority, of the images kept

    def add(
        self,
        maxima: dict,
        positions: torch.Tensor,
        idents: torch.Tensor | None,
        repeats: bool,
        ids: list[str] | None = None,
        where: list[int] | None = None,
    ) -> None:
        """Fold one batch's maxima (layer -> hooks.LayerMax) into every layer's state; `ids`
        and `where` (the batch's image ids and positions, on the host) feed the samples."""
        if self.samples:
            assert ids is not None and where is not None, "samples need the batch's ids"
            ranks = [priority(i) for i in ids]
            self.priorities.update(zip(ids, ranks, strict=True))
            for name, m in maxima.items():
                self.samples[name].add(ranks, where, m)
        for name, m in maxima.items():
            self.topks[name].add(m.values, positions, m.ys, m.xs, idents, repeats)
            if self.bottoms:
                low = -m.values  # (B, U)
                self.bottoms[name].add(low, positions, m.ys, m.xs, idents, repeats)
            if self.stats:
                self.stats[name].add(m.values)

    def extra(self, ids: list[str | None], hashes: list[str | None]) -> dict[str, pa.Table]:
        """The optional partial tables (partials.EXTRA) this run keeps."""
        out: dict[str, pa.Table] = {}
        if self.bottoms:
            parts = [negated(t.table(n, ids, hashes)) for n, t in self.bottoms.items()]
            out["bottom"] = pa.concat_tables(parts)
        if self.stats:
            out["stats"] = pa.concat_tables([s.table(n) for n, s in self.stats.items()])
        if self.samples:
            tables = [s.table(n, ids, hashes, self.priorities) for n, s in self.samples.items()]
            out["samples"] = pa.concat_tables(tables)
        return out


class ShardIndexer:
    """Loads the model once; `index_shard` turns one shard into a committed partial."""

    def __init__(
        self, cfg: IndexConfig, run_fingerprint: str, model_fingerprint: str, threads: int = 0
    ):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.run_fingerprint = run_fingerprint
        self.device = pick_device()
        module = load_expected(cfg.model, cfg.weights, cfg.storage_options, model_fingerprint)
        self.model = module.to(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        # perceptual hashes are taken from Pillow's decode (config refuses --decode device)
        self.decode = (
            "pil" if cfg.distinct == "perceptual" else resolve_decode(cfg.decode, self.device)
        )
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.layers = find_layers(self.model, cfg.layers)
        self.store = Store(cfg.out, cfg.storage_options)
        self.placement: dict[str, str] = {}  # "node" and "actor" ids, when run as a Ray actor
        self.device_lock = threading.Lock()  # one shard at a time on the device (see _index)

    def index_shard(
        self, shard: Shard, units: dict[str, int], listed: int | None = None
    ) -> partials.CommitRecord:
        """Index one shard and commit its partial; return the commit record. `listed`: images
        in the whole dataset (the samples' threshold; default the shard's own count)."""
        start, started = time.perf_counter(), time.time()
        listed = listed or len(shard.refs)
        try:
            running, loaded, busy = self._index(shard, units, None, listed)
        except containers.Unsorted:  # a tar out of name order: learn the order, then index again
            assert shard.container is not None  # only containers can be out of order
            order = containers.tar_order(shard.container, self.cfg.storage_options)
            running, loaded, busy = self._index(shard, units, order, listed)
        size = 1 + max((item.position for item in loaded), default=-1)
        ids: list[str | None] = [None] * size  # by position; None where no image sits
        hashes: list[str | None] = [None] * size
        for item in loaded:
            if item.position >= 0:
                ids[item.position] = item.ref.image_id
                hashes[item.position] = item.image_hash
        topk_table = pa.concat_tables([t.table(n, ids, hashes) for n, t in running.topks.items()])
        extra = running.extra(ids, hashes)
        if self.cfg.distinct == "perceptual":
            extra["phash"] = _phash_table(loaded, topk_table)
        report: partials.ShardReport = {
            "images": len(loaded),
            "indexed": sum(item.error is None for item in loaded),
            "bad": sum(item.error is not None for item in loaded),
            "rows": topk_table.num_rows,
            "seconds": round(time.perf_counter() - start, 3),
            "started": round(started, 3),
            "device_seconds": round(busy, 3),  # holding the device (forward passes)
            "device": str(self.device),
            "precision": self.precision,
            "decode": self.decode,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if running.samples:
            report["sample_threshold"] = running.limit
        report.update(self.placement)  # type: ignore[typeddict-item]  # node and actor
        attempt = partials.new_attempt()
        return partials.write(
            self.store, shard.key, attempt, self.run_fingerprint, topk_table,
            _images_table(loaded, shard.key), report, extra,
        )  # fmt: skip

    def _running(self, units: dict[str, int], listed: int = 1) -> Running:
        cfg, device, distinct = self.cfg, self.device, self.cfg.distinct != "id"
        limit = threshold(listed)
        return Running(
            {n: RunningTopK(units[n], cfg.depth, device, distinct) for n in self.layers},
            {n: RunningTopK(units[n], cfg.bottom, device, distinct) for n in self.layers}
            if cfg.bottom
            else {},
            {n: RunningStats(units[n], device) for n in self.layers} if cfg.stats else {},
            {n: RunningSamples(limit) for n in self.layers} if cfg.samples else {},
            limit,
            {},
        )

    def _index(
        self, shard: Shard, units: dict[str, int], order: dict[str, int] | None, listed: int
    ) -> tuple[Running, list[Loaded], float]:
        """(per-layer running state, every image's metadata in storage order, seconds on the
        device) for one shard.

        Two shards may be in flight on one actor (threads): each starts reading and decoding at
        once, but only the holder of `device_lock` runs forward passes (the hooks and the model
        are shared), so the next shard's first batches are decoded while the current one runs,
        and a shard's commit (after this returns) overlaps the next one's forward passes.
        """
        running = self._running(units, listed)
        loaded: list[Loaded] = []
        stream = _started(self._decoded(shard, order))  # reads and decodes begin now
        with self.device_lock:
            began = time.perf_counter()
            self._forward(stream, running, loaded)
            busy = time.perf_counter() - began
        return running, loaded, busy

    def _forward(self, stream: Iterator[Loaded], running: Running, loaded: list[Loaded]) -> None:
        firsts = Firsts() if self.cfg.distinct != "id" else None
        idents, repeats = None, False
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"
        )
        with torch.inference_mode(), autocast, Capture(self.model, self.layers) as capture:
            for batch in _batched(stream, self.cfg.batch_size, loaded):
                where = [item.position for item in batch]
                positions = torch.tensor(where)  # (B,)
                if firsts is not None:
                    first, repeats = firsts.idents([_hash(item) for item in batch], where)
                    idents = torch.tensor(first).to(self.device, non_blocking=True)  # (B,)
                pixels = _stack([item.pixels for item in batch], self.device)  # (B, 3, crop, crop)
                x = self._to_device(pixels)  # (B, 3, crop, crop) float32
                maxima = capture.run(x)
                positions = positions.to(self.device, non_blocking=True)  # (B,)
                ids = [item.ref.image_id for item in batch]
                running.add(maxima, positions, idents, repeats, ids, where)
                faults.after_batch()

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            if not pixels.is_cuda:  # decoded on the host
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return normalize(pixels, self.cfg.preprocess)  # (B, 3, crop, crop)

    def _load_all(self, shard: Shard, order: dict[str, int] | None = None) -> Iterator[Loaded]:
        """Every image of `shard`, decoded on the thread pool, in storage order."""
        window = 2 * self.cfg.batch_size
        if shard.container is None:
            items: Iterator[Member] = (Member(i, ref, None) for i, ref in enumerate(shard.refs))
        else:  # one sequential read of the container, on its own thread
            stream = containers.members(shard.container, self.cfg.storage_options, order)
            items = background(stream, window)
        return prefetch(self._load_one, items, self.cfg.decode_threads, window)

    def _decoded(self, shard: Shard, order: dict[str, int] | None = None) -> Iterator[Loaded]:
        """`_load_all`, with `--decode device` its JPEGs decoded on the device a batch at a time,
        in order, on a thread of their own so that decoding overlaps the forward pass."""
        stream = self._load_all(shard, order)
        if self.decode != "device":
            return stream
        return background(self._decode_batches(stream), self.cfg.batch_size)

    def _decode_batches(self, stream: Iterator[Loaded]) -> Iterator[Loaded]:
        waiting: list[Loaded] = []  # in storage order; `count` of them hold JPEGs to decode
        count = 0
        for item in stream:
            waiting.append(item)
            count += item.pending is not None
            if count == self.cfg.batch_size:
                yield from self._decode_pending(waiting)
                waiting, count = [], 0
        yield from self._decode_pending(waiting)

    def _decode_pending(self, items: list[Loaded]) -> list[Loaded]:
        jpegs = [item.pending for item in items if item.pending is not None]
        decoded = iter(jpeg.to_uint8(jpegs, self.cfg.preprocess, self.device))
        out = []
        for item in items:
            if item.pending is None:
                out.append(item)
            elif (pixels := next(decoded)) is None:  # refused on the device: Pillow decides
                out.append(self._pillow(item.position, item.ref, item.pending.data))
            else:
                out.append(dataclasses.replace(item, pixels=pixels, pending=None))
        return out

    def _load_one(self, item: Member) -> Loaded:
        position, ref = item.position, item.ref
        if item.error is not None:
            return Loaded(position, ref, None, error=item.error)
        try:
            data = (
                item.data
                if item.data is not None
                else containers.read_bytes(ref.uri, self.cfg.storage_options)
            )
        except OSError as e:  # vanished, or still failing after retries
            return Loaded(position, ref, None, error=f"{READ_FAILED}{type(e).__name__}: {e}")
        pre = self.cfg.preprocess
        if self.decode == "device":
            try:
                header = jpeg.inspect(data, pre.max_pixels, pre.resize)
            except BadImage as e:
                return Loaded(position, ref, None, error=str(e))
            if header is not None:  # decoded later, in a batch on the device
                size = (header.height, header.width)
                return Loaded(
                    position, ref, None, content_hash(data), len(data), *size, pending=header
                )
        return self._pillow(position, ref, data)

    def _pillow(self, position: int, ref: ImageRef, data: bytes) -> Loaded:
        pre = self.cfg.preprocess
        try:
            decoded = decode(data, pre.max_pixels, pre.resize, self.cfg.draft)
        except BadImage as e:
            return Loaded(position, ref, None, error=str(e))
        pixels = to_uint8(decoded.image, pre, decoded.box)
        size = (decoded.height, decoded.width)  # the original's, also after a reduced decode
        perceptual = phash(decoded.image) if self.cfg.distinct == "perceptual" else None
        return Loaded(
            position, ref, pixels, decoded.image_hash, decoded.nbytes, *size, phash=perceptual
        )


def _hash(item: Loaded) -> str:
    assert item.image_hash is not None  # _batched keeps only decoded images
    return item.image_hash


def _started(stream: Iterator[Loaded]) -> Iterator[Loaded]:
    """`stream` with its first item already taken, so its read-ahead is running."""
    first = next(stream, None)
    return stream if first is None else itertools.chain([first], stream)


def _batched(stream: Iterator[Loaded], size: int, seen: list[Loaded]) -> Iterator[list[Loaded]]:
    """Group decodable images into batches of `size`; every item, bad or good, goes to `seen`."""
    batch: list[Loaded] = []
    for item in stream:
        seen.append(dataclasses.replace(item, pixels=None, pending=None))  # metadata only
        if item.error is not None:
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _phash_table(loaded: list[Loaded], topk: pa.Table) -> pa.Table:
    """The pHash of each content hash in `topk` (schema "phash")."""
    wanted = set(topk["image_hash"].to_pylist())
    found = {item.image_hash: item.phash for item in loaded if item.image_hash in wanted}
    return pa.table(
        {
            "image_hash": pa.array(list(found), pa.string()),
            "phash": pa.array(list(found.values()), pa.int64()),
        }
    )


def _stack(images: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """(B, 3, crop, crop) uint8: on the host when every image was decoded there (copied in one
    pinned transfer later), else on `device`, with Pillow's fallbacks moved there."""
    decoded = [image for image in images if image is not None]
    assert len(decoded) == len(images)  # _batched keeps only decoded images
    if all(image.device.type == "cpu" for image in decoded):
        return torch.stack(decoded)
    return torch.stack([image.to(device) for image in decoded])


def _images_table(loaded: list[Loaded], shard_key: str) -> pa.Table:
    return pa.table(
        {
            "image_id": [item.ref.image_id for item in loaded],
            "uri": [item.ref.uri for item in loaded],
            "stamp": pa.array([item.ref.stamp for item in loaded], pa.string()),
            "image_hash": [item.image_hash for item in loaded],
            "bytes": pa.array([item.nbytes for item in loaded], pa.int64()),
            "height": pa.array([item.height for item in loaded], pa.int32()),
            "width": pa.array([item.width for item in loaded], pa.int32()),
            "error": pa.array([item.error for item in loaded], pa.string()),
            "shard": [shard_key] * len(loaded),
            "offset": pa.array([item.ref.offset for item in loaded], pa.int64()),
        }
    )
