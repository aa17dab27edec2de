"""What the driver decides before the map stage: the validated plan and the run's fingerprint.

Everything a user can get wrong (model, weights, layers, data, output folder) is checked here,
before anything is written to OUT. The run fingerprint hashes everything that changes a partial's
content; a partial is reused (resume, reindex) only under the same fingerprint. OUT/run.json,
the first file written, records it, so an OUT holding another run is refused.

`stream_plan` (`ninebest index`) plans shards while a folder is listed and spills the loose
images to local scratch (`dataset.spill`): the driver holds O(shards) records, and a shard's
refs are read back when it is dispatched. `plan` holds the listing in memory (`reindex` compares
it image by image with the previous version's). Both make the same shards, keys and data
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import IndexConfig
from pipeline.dataset.listing import list_images, stream_images
from pipeline.dataset.refs import ImageRef, Shard, data_fingerprint, plan_shards
from pipeline.dataset.spill import SpilledShard, plan_streamed
from pipeline.errors import DataError
from pipeline.index.samples import BANDS, SAMPLE
from pipeline.index.stats import EDGES, SKETCH_K
from pipeline.net.hooks import probe
from pipeline.net.instrument import find_layers
from pipeline.net.models import LoadedModel, load_model
from pipeline.store.layout import RUN_FILE
from pipeline.store.schemas import VERSIONS
from pipeline.store.storage import Store


@dataclass(frozen=True)
class RunPlan:
    """What the driver validated and decided before the map stage: all that a run needs."""

    cfg: IndexConfig
    model_fingerprint: str
    run_fingerprint: str
    data_fingerprint: str
    shapes: dict[str, tuple[int, ...]]  # layer -> (C,) or (C, H, W)
    listed: int  # images and containers listed
    shards: Sequence[Shard | SpilledShard]  # loose images first, in image_id order


@dataclass(frozen=True)
class Plan(RunPlan):
    """A run plan that also holds the whole listing (reindex compares it with the last one)."""

    shards: list[Shard]
    refs: list[ImageRef]  # every listed image, sorted by image_id


def plan(cfg: IndexConfig) -> Plan:
    """Validate the config against the model and data, the listing held in memory; nothing is
    written."""
    loaded, shapes = _validate(cfg)
    refs = list_images(cfg.data, cfg.storage_options)
    _check_listed(cfg, len(refs))
    run_fp = run_fingerprint(cfg, loaded.fingerprint)
    shards = plan_shards(refs, cfg.shard_size)
    fingerprint = data_fingerprint(refs)
    return Plan(cfg, loaded.fingerprint, run_fp, fingerprint, shapes, len(refs), shards, refs)


def stream_plan(cfg: IndexConfig) -> RunPlan:
    """`plan` with the listing streamed: a folder's loose images are cut into shards as they are
    listed and spilled to local scratch, so the driver holds O(shards), not O(images)."""
    loaded, shapes = _validate(cfg)
    streamed = plan_streamed(stream_images(cfg.data, cfg.storage_options), cfg.shard_size)
    _check_listed(cfg, streamed.listed)
    run_fp = run_fingerprint(cfg, loaded.fingerprint)
    return RunPlan(
        cfg, loaded.fingerprint, run_fp, streamed.data_fingerprint, shapes, streamed.listed,
        streamed.shards,
    )  # fmt: skip


def _validate(cfg: IndexConfig) -> tuple[LoadedModel, dict[str, tuple[int, ...]]]:
    """The model, its weights and layers checked; the layers' output shapes."""
    loaded = load_model(cfg.model, cfg.weights, cfg.storage_options)
    layers = find_layers(loaded.module, cfg.layers)
    return loaded, probe(loaded.module, layers, cfg.preprocess.crop)


def _check_listed(cfg: IndexConfig, listed: int) -> None:
    if not listed:
        raise DataError(
            f"--data {cfg.data!r} holds no images (looked for common image extensions, .tar and "
            ".parquet files)"
        )


def run_fingerprint(cfg: IndexConfig, model_fingerprint: str) -> str:
    """Hash of everything that changes a partial's content: model, weights, layers, k, geometry,
    precision and decoding.

    Settings added later (config.LEGACY, decode, draft) enter the hash only when they differ from
    what ninebest did before them, so `--distinct id --stats off` (and no bottom or samples, and
    the default decoding) keeps the fingerprint, and the partials, of an index written before
    they existed.
    """
    key: dict[str, Any] = {
        "model": cfg.model,
        "weights": model_fingerprint,
        "layers": list(cfg.layers),
        "k": cfg.k,
        "depth": cfg.depth,
        "preprocess": cfg.to_json()["preprocess"],
        "precision": cfg.precision,
        "data": cfg.data,
        "schemas": {name: VERSIONS[name] for name in ("partial", "images")},
    }
    for name, value in cfg.new_features().items():
        key[name] = value
        if name == "distinct" and value == "perceptual":
            key["near"] = cfg.near
            key["schemas"]["phash"] = VERSIONS["phash"]
        if name == "samples":
            key["samples_bands"] = {"bands": BANDS, "sample": SAMPLE}
            key["schemas"]["samples_state"] = VERSIONS["samples_state"]
        if name == "stats":
            key["stats_sketch"] = {"kll_k": SKETCH_K, "edges": EDGES.tolist()}
            key["schemas"]["stats_state"] = VERSIONS["stats_state"]
    # decode settings change pixels slightly; keyed only when not the defaults, so the runs made
    # before they existed (decoded as the defaults do: Pillow on CPU, full size) still resume
    if cfg.decode != "auto":
        key["decode"] = cfg.decode
    if cfg.draft:
        key["draft"] = True
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def write_run_file(store: Store, p: RunPlan) -> None:
    """Record the run's fingerprint in OUT: the first write, so an unwritable OUT fails here."""
    try:
        store.write_json(RUN_FILE, {"run": p.run_fingerprint, "config": p.cfg.to_json()})
    except OSError as e:
        raise DataError(f"cannot write to --out {store.url!r} ({e}); check that it exists") from e


def check_out(store: Store, p: RunPlan) -> None:
    """Refuse an OUT that holds another run, or files that are not a ninebest run."""
    if store.exists(RUN_FILE):
        previous = store.read_json(RUN_FILE)
        if previous.get("run") == p.run_fingerprint:
            return
        old, new = previous.get("config", {}), p.cfg.to_json()
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        what = ", ".join(differ) if differ else "model weights or ninebest's partial format"
        legacy = "distinct" not in old and p.cfg.new_features()
        hint = (
            "; to resume it, pass --distinct id --stats off --samples 0 --bottom 0 (its settings)"
            if legacy
            else ""
        )
        raise DataError(
            f"--out {store.url!r} already holds a different run ({what} differ); "
            f"choose a new --out, or delete the old one{hint}"
        )
    if store.listdir(""):
        raise DataError(
            f"--out {store.url!r} is not empty and holds no ninebest run; "
            "choose a new or empty folder"
        )
