"""Job configuration: one frozen dataclass per command, loaded from a spec file and CLI flags.

A job spec (`--config job.yaml` or `.toml`) uses the flag names as keys (dashes or underscores);
flags given on the command line override it. The resolved config is written into every run's
manifest, so a run can be repeated or extended without the user restating it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError, InputNotFoundError, closest

PRECISIONS = ("auto", "float32", "bfloat16")
DISTINCT = ("content", "id", "perceptual")  # see pipeline/index/distinct.py
SAMPLES = 4  # default images per band with statistics on
LEGACY = {"distinct": "id", "stats": False, "bottom": 0, "samples": 0}  # before these existed
DECODES = ("auto", "pil", "device")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Geometry and normalisation from image file to model input (timm's PretrainedCfg idea)."""

    resize: int = 256  # shorter side resized to this many pixels (bilinear, antialiased)
    crop: int = 224  # then a centred square crop of this size
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean on [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel std on [0, 1] pixels
    max_pixels: int = 89_478_485  # images with more pixels are skipped (decompression bombs)


@dataclass(frozen=True)
class IndexConfig:
    """Everything `ninebest index` needs; written resolved into `OUT/manifest.json`."""

    model: str  # "torchvision:NAME" or "pkg.module:factory"
    data: str  # folder, fsspec URL, or manifest (.txt / .parquet) of image URIs
    layers: tuple[str, ...]  # dotted module names whose units are indexed
    out: str  # output folder or fsspec URL
    weights: str | None = (
        None  # state-dict file/URL, a torchvision weights name, or None (seeded init)
    )
    k: int = 9  # images kept per unit
    buffer: int | None = None  # extra rows per unit in each shard's partial (default k), so a
    # reindex can drop removed images from a partial without recomputing the shard
    workers: int = 2  # CPU actors when the cluster has no GPU (one actor per GPU otherwise)
    batch_size: int = 32  # images per forward pass
    shard_size: int = 256  # images per shard (the unit of work, resume and retry)
    preprocess: Preprocess = field(default_factory=Preprocess)
    address: str | None = None  # Ray address; None starts a local instance (or uses RAY_ADDRESS)
    max_bad_fraction: float = (
        0.01  # fail the run when more than this fraction of images is unreadable
    )
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # fsspec options; may hold credentials, so never printed or written
    decode_threads: int = 4  # decoding threads per actor
    precision: str = "auto"  # forward pass: "float32", "bfloat16" (autocast), or "auto":
    # bfloat16 on GPUs that support it, float32 elsewhere
    worker_wait: float = 300.0  # seconds work may wait with no worker up (nodes lost, none
    # joined) before the run fails; finished shards are kept for the rerun
    gpus: int = 0  # GPU actors to ask for even while the cluster has fewer GPUs up (an
    # autoscaler adds GPU nodes for them); 0: one actor per GPU that is up
    distinct: str = "content"  # one row per: "id" (image_id), "content" (sha256 of the bytes),
    # or "perceptual" (content, then pHash near-duplicates dropped)
    near: int = 8  # --distinct perceptual: pHash Hamming distance (of 64) at most this is a
    # near-duplicate
    stats: bool = True  # per-unit statistics, quantile sketch and histogram (OUT/stats/)
    bottom: int = 0  # least-activating distinct images kept per unit (OUT/bottom/); 0: none
    samples: int | None = None  # images per activation band per unit (OUT/samples/); 0: none;
    # None: 4 with --stats on, 0 with --stats off (the legacy settings)
    decode: str = "auto"  # JPEG decoding: "pil" (reader threads), "device" (batched on the
    # worker's device: nvJPEG on CUDA), or "auto": device on CUDA workers, pil elsewhere
    draft: bool = False  # reduced-size (DCT-domain) decode of large JPEGs decoded by Pillow

    def __post_init__(self) -> None:
        # Ray workers run in other folders: a relative local path must mean the driver's.
        object.__setattr__(self, "data", absolute(self.data))
        object.__setattr__(self, "out", absolute(self.out))
        object.__setattr__(self, "weights", absolute(self.weights, names_allowed=True))
        _check_positive(self, "k", "batch_size", "shard_size", "workers", "decode_threads")
        if not self.worker_wait > 0:
            raise ConfigError(
                f"--worker-wait must be a number of seconds above 0, got {self.worker_wait}"
            )
        if not isinstance(self.gpus, int) or self.gpus < 0:
            raise ConfigError(f"--gpus must be a whole number of at least 0, got {self.gpus!r}")
        if self.k > 10_000:
            raise ConfigError(f"--k must be at most 10000, got {self.k}")
        if self.buffer is not None and not 0 <= self.buffer <= 10_000:
            raise ConfigError(f"--buffer must be between 0 and 10000, got {self.buffer}")
        if self.distinct not in DISTINCT:
            raise ConfigError(f"--distinct {self.distinct!r} is not one of {', '.join(DISTINCT)}")
        if not isinstance(self.near, int) or not 0 <= self.near <= 64:
            raise ConfigError(f"--near must be a whole number from 0 to 64, got {self.near!r}")
        if not isinstance(self.stats, bool):
            raise ConfigError(f"--stats must be on or off, got {self.stats!r}")
        if self.samples is None:
            object.__setattr__(self, "samples", SAMPLES if self.stats else 0)
        for name in ("bottom", "samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 10_000:
                raise ConfigError(f"--{name} must be between 0 and 10000, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        if self.decode not in DECODES:
            raise ConfigError(f"--decode {self.decode!r} is not one of {', '.join(DECODES)}")
        if self.decode == "device" and self.distinct == "perceptual":
            raise ConfigError(
                "--distinct perceptual hashes the images as Pillow decodes them; use --decode pil "
                "or auto (auto decodes with Pillow under --distinct perceptual)"
            )
        if not isinstance(self.draft, bool):
            raise ConfigError(f"--draft must be true or false, got {self.draft!r}")
        if not self.layers:
            raise ConfigError("no layers given; pass --layers a,b (dotted module names)")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"--layers names a layer twice: {','.join(self.layers)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(
                f"--max-bad-fraction must be between 0 and 1, got {self.max_bad_fraction}"
            )
        pre = self.preprocess
        if pre.resize < 1 or pre.crop < 1 or pre.crop > pre.resize:
            raise ConfigError(
                f"--crop {pre.crop} must be between 1 and --resize {pre.resize}; "
                "the crop is cut from the resized image"
            )

    def new_features(self) -> dict[str, Any]:
        """The settings that differ from what ninebest did before they existed (LEGACY)."""
        return {key: getattr(self, key) for key, old in LEGACY.items() if getattr(self, key) != old}

    @property
    def depth(self) -> int:
        """Rows kept per unit in each shard's partial: k plus the buffer."""
        return self.k + (self.k if self.buffer is None else self.buffer)

    def to_json(self) -> dict[str, Any]:
        """The config as it reads back from a JSON file (tuples become lists), without storage
        options (they may hold credentials)."""
        out = dataclasses.asdict(self)
        out.pop("storage_options")
        return json.loads(json.dumps(out))


def absolute(location: str | None, names_allowed: bool = False) -> str | None:
    """A local path made absolute; URLs, None and (if allowed) bare weights names unchanged."""
    if location is None or "://" in location or os.path.isabs(location):
        return location
    bare = os.sep not in location and "." not in location and not os.path.exists(location)
    if names_allowed and bare:
        return location  # a torchvision weights name such as DEFAULT or IMAGENET1K_V1
    return os.path.abspath(location)


def _check_positive(cfg: IndexConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be a whole number of at least 1, got {value!r}")


PREPROCESS_KEYS = {f.name for f in dataclasses.fields(Preprocess)}
INDEX_KEYS = {f.name for f in dataclasses.fields(IndexConfig)} - {"preprocess"}


def load_spec(path: str | None) -> dict[str, Any]:
    """Read a YAML or TOML job spec into a dict with underscore keys ({} when path is None)."""
    if path is None:
        return {}
    spec_path = Path(path)
    if not spec_path.is_file():
        raise InputNotFoundError(
            f"job spec {path!r} does not exist; pass an existing --config file"
        )
    text = spec_path.read_text()
    try:
        if spec_path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif spec_path.suffix in (".yaml", ".yml", ".json"):
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"job spec {path!r} must end in .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"job spec {path!r} is not valid: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"job spec {path!r} must be a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def build_index_config(spec: dict[str, Any], flags: dict[str, Any]) -> IndexConfig:
    """Merge a job spec with CLI flags (flags win; None means 'not given') into an IndexConfig."""
    merged = {**spec, **{k: v for k, v in flags.items() if v is not None}}
    unknown = set(merged) - INDEX_KEYS - PREPROCESS_KEYS - {"config"}
    for key in sorted(unknown):
        valid = sorted(INDEX_KEYS | PREPROCESS_KEYS)
        raise ConfigError(f"unknown setting {key!r}; valid settings: {closest(key, valid, n=8)}")
    merged = {key: _typed(key, value) for key, value in merged.items()}
    for required in ("model", "data", "layers", "out"):
        if merged.get(required) in (None, "", []):
            raise ConfigError(f"--{required} is required (on the command line or in --config)")
    pre = Preprocess(**{k: merged.pop(k) for k in list(merged) if k in PREPROCESS_KEYS})
    merged.pop("config", None)
    merged["layers"] = parse_list(merged["layers"])
    merged["storage_options"] = storage_options(merged.get("storage_options"))
    return IndexConfig(preprocess=pre, **merged)


def _number_settings(*configs: type) -> dict[str, type]:
    """Setting name -> int or float, for every field typed `int`, `float` or `X | None`."""
    kinds: dict[str, type] = {}
    for config in configs:
        for name, hint in typing.get_type_hints(config).items():
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                options = set(typing.get_args(hint)) - {type(None)}
                hint = options.pop() if len(options) == 1 else None
            if hint in (int, float):
                kinds[name] = hint
    return kinds


NUMBERS = _number_settings(IndexConfig, Preprocess)  # what a spec's strings are converted to
BOOLS = {"stats"}  # on/off settings
SWITCH = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def _typed(key: str, value: Any) -> Any:
    """A spec value converted to its setting's type, or a one-line error naming the setting."""
    if key in BOOLS and not isinstance(value, bool) and value is not None:
        if str(value).lower() not in SWITCH:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} must be on or off, got {value!r}")
        return SWITCH[str(value).lower()]
    kind = NUMBERS.get(key)
    if kind is None or value is None or (type(value) is kind and not isinstance(value, bool)):
        return value
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        flag = "--" + key.replace("_", "-")
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{flag} must be {what}, got {value!r}") from None


def parse_list(value: str | list | tuple) -> tuple[str, ...]:
    """Parse 'a,b' or a list into a tuple of stripped, non-empty names."""
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(item.strip() for item in items if item.strip())


def storage_options(value: Any) -> dict[str, Any]:
    """Parse --storage-options (a JSON object, or a dict from a spec file)."""
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'") from e
    if not isinstance(parsed, dict):
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return parsed
