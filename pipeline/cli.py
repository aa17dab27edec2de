"""The `ninebest` command: `index`, `demo`, `export`, `reindex`, `history`.

Each subcommand is a subparser whose `handler` takes the parsed arguments and returns an exit
status. User errors (`NinebestError`) become one line on stderr and exit status 2; nothing is
written to the output folder before the inputs are validated.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cluster.submit import add_commands as submit_commands
from pipeline.config import IndexConfig, build_index_config, load_spec, parse_list, storage_options
from pipeline.errors import ConfigError, NinebestError
from pipeline.store.layout import ATLAS_INDEX, ERRORS, INDEX_DIR

DEMO_IMAGES = Path(__file__).resolve().parent / "demo_images"
DEMO_LAYERS = ("layer1", "layer2", "layer3", "layer4", "fc")
DEMO_EXPORT = ("layer1", "layer3", "layer4", "fc")  # the atlas: a few layers, shallow to deep
DEMO_UNITS = 8  # the first units of each exported layer
DEMO_BOTTOM = 4  # least-activating images kept per unit (the atlas shows them beside the top)


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> Parser:
    parser = Parser(prog="ninebest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    idx = sub.add_parser("index", help="index the top-k images of every unit of some layers")
    add_index_flags(idx)
    idx.set_defaults(handler=lambda args: run_index(index_config(args)))
    demo = sub.add_parser("demo", help="index the bundled photographs with a small model")
    demo.add_argument("--out", default="ninebest-demo", help="output folder (default %(default)s)")
    demo.add_argument("--workers", type=int, default=2, help="CPU actors (default %(default)s)")
    demo.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    demo.set_defaults(handler=run_demo)
    add_export_command(sub)
    submit_commands(sub)
    add_reindex_commands(sub)
    return parser


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="patches, deconv projections, grids and an atlas of an index")
    p.add_argument("out", help="the index's output folder or URL (holds manifest.json)")
    p.add_argument("--layers", help="comma-separated subset of the indexed layers (default: all)")
    p.add_argument("--units", help="comma-separated unit numbers, for every chosen layer")
    p.add_argument("--workers", type=int, help="CPU actors without GPUs (default: the index's)")
    p.add_argument("--address", help="Ray address (default: the index's, RAY_ADDRESS, or local)")
    p.add_argument("--storage-options", help="fsspec storage options as a JSON object")
    p.set_defaults(handler=run_export)


def add_reindex_commands(sub) -> None:
    p = sub.add_parser("reindex", help="a new index version, recomputing only what changed")
    add_index_flags(p)
    p.add_argument("--keep", type=int, help="keep only the newest N versions (and their partials)")
    p.add_argument("--full", action="store_true", help="index from scratch (needed after a change "
                   "of layers, k, preprocessing or data source)")  # fmt: skip
    p.set_defaults(handler=run_reindex)
    h = sub.add_parser("history", help="one unit's top images in every version (Fig. 4 view)")
    h.add_argument("out", help="the reindexed output folder or URL")
    h.add_argument("--layer", required=True, help="dotted layer name")
    h.add_argument("--unit", type=int, required=True, help="unit (channel) number")
    h.add_argument("--storage-options", help="fsspec storage options as a JSON object")
    h.set_defaults(handler=run_history)


def run_reindex(args: argparse.Namespace) -> int:
    from pipeline.index.reindex import reindex

    keep, full = args.keep, args.full
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("keep", "full")})
    report = reindex(index_config(flags), keep=keep, full=full)
    print(f"latest: {args.out or 'OUT'}/versions/{report['run_id']}  (OUT/LATEST updated)")
    return 0


def run_history(args: argparse.Namespace) -> int:
    from pipeline.store.storage import Store
    from pipeline.store.versions import history

    table = history(Store(args.out, storage_options(args.storage_options)), args.layer, args.unit)
    frame = table.drop_columns(["unit"]).to_pandas()
    print(f"{args.layer} unit {args.unit}: top images in each version, oldest first")
    print(frame.to_string(index=False))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pipeline.export.run import export  # imports Ray and the model code

    units = None
    if args.units:
        try:
            units = tuple(int(u) for u in parse_list(args.units))
        except ValueError as e:
            raise ConfigError(
                f"--units must be comma-separated whole numbers, got {args.units!r}"
            ) from e
    summary = export(
        args.out,
        layers=parse_list(args.layers) if args.layers else None,
        units=units,
        workers=args.workers,
        address=args.address,
        storage_options=storage_options(args.storage_options),
    )
    print(f"atlas: {summary['export'].rstrip('/')}/{summary['outputs']['atlas']}")
    return 0


def add_index_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `index`; every default is None so a --config value is not overridden."""
    p.add_argument("--config", help="job spec file (YAML or TOML) with keys named like the flags")
    p.add_argument("--model", help="torchvision:NAME or pkg.module:factory")
    p.add_argument("--weights", help="state-dict file/URL, or a torchvision weights name (DEFAULT)")
    p.add_argument(
        "--data",
        help="image folder, fsspec URL, brace/glob pattern, manifest (.txt/.parquet of URIs), "
        "or .tar / .parquet files of images",
    )
    p.add_argument(
        "--layers", help="comma-separated dotted module names, e.g. features.10,classifier.4"
    )
    p.add_argument("--out", help="output folder or fsspec URL")
    p.add_argument("--k", type=int, help="images kept per unit (default 9)")
    p.add_argument("--workers", type=int, help="CPU actors when the cluster has no GPU (default 2)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 32)")
    p.add_argument("--shard-size", type=int, help="images per shard (default 256)")
    p.add_argument("--resize", type=int, help="shorter side resized to this (default 256)")
    p.add_argument("--crop", type=int, help="centre crop size (default 224)")
    p.add_argument("--max-pixels", type=int, help="skip larger images (default 89478485)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--max-bad-fraction", type=float, help="fail above this share of bad images")
    p.add_argument("--decode-threads", type=int, help="decoding threads per actor (default 4)")
    p.add_argument("--buffer", type=int, help="extra rows per unit kept per shard (default k)")
    p.add_argument(
        "--precision",
        help="forward pass: auto (bfloat16 on GPUs that support it, else float32), float32 or "
        "bfloat16",
    )
    p.add_argument(
        "--distinct",
        help="one row per: content (sha256 of the bytes; default), id (image_id), or perceptual "
        "(content, then pHash near-duplicates dropped)",
    )
    p.add_argument("--near", type=int, help="--distinct perceptual: pHash Hamming distance at "
                   "most this is a near-duplicate (default 8 of 64 bits)")  # fmt: skip
    p.add_argument("--stats", help="per-unit statistics, quantiles and histogram: on (default) "
                   "or off")  # fmt: skip
    p.add_argument("--bottom", type=int, help="least-activating images kept per unit (default 0)")
    p.add_argument("--samples", type=int, help="images per activation band per unit (default 4 "
                   "with --stats on; 0: none)")  # fmt: skip
    p.add_argument(
        "--decode",
        help="JPEG decoding: auto (on the device for CUDA workers, else pil), pil (Pillow on the "
        "decode threads) or device (batched on the worker's device; nvJPEG on CUDA)",
    )
    p.add_argument(
        "--draft",
        action="store_true",
        default=None,
        help="decode JPEGs at least 4x the resize size at 1/2, 1/4 or 1/8 scale (Pillow path; "
        "faster, pixels within a few levels of a full decode; see README)",
    )
    p.add_argument("--storage-options", help="fsspec storage options as a JSON object")
    p.add_argument(
        "--worker-wait",
        type=float,
        help="seconds work may wait with no worker up (nodes lost) before the run fails, "
        "keeping finished shards (default 300)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        help="GPU actors to ask for even while fewer GPUs are up, so an autoscaler adds GPU "
        "nodes (default 0: one actor per GPU that is up)",
    )


def index_config(args: argparse.Namespace) -> IndexConfig:
    skip = ("command", "config", "handler")
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    return build_index_config(load_spec(args.config), flags)


def demo_config(args: argparse.Namespace, weights: str | None = None) -> IndexConfig:
    return IndexConfig(
        model="torchvision:resnet18",
        weights=weights,
        data=str(DEMO_IMAGES),
        layers=DEMO_LAYERS,
        out=args.out,
        workers=args.workers,
        batch_size=8,
        shard_size=8,
        bottom=DEMO_BOTTOM,
        address=args.address,
    )


def run_demo(args: argparse.Namespace) -> int:
    """Index the bundled photographs, export a few layers, print the atlas's address."""
    from pipeline.cluster.connect import ray_session  # imports Ray: keep `--help` fast
    from pipeline.export.run import export
    from pipeline.net.models import cached_weights

    count = sum(1 for p in DEMO_IMAGES.rglob("*") if p.is_file())
    weights = cached_weights("resnet18")
    if weights is not None:
        print(f"demo: torchvision resnet18 with ImageNet weights from the local torch cache "
              f"({weights}), on {count} bundled photographs")  # fmt: skip
    else:
        print(
            "demo: torchvision resnet18, randomly initialised (seed 0; no download needed), "
            f"on {count} bundled photographs; for trained features, download the ImageNet "
            'weights once on a machine with internet (python -c "import torchvision; '
            "torchvision.models.resnet18(weights='DEFAULT')\"), copy ~/.cache/torch to this "
            "machine, and rerun with a new --out"
        )
    cfg = demo_config(args, weights)
    with ray_session(args.address):  # one Ray instance for both steps
        status = run_index(cfg)
        units = tuple(range(DEMO_UNITS))
        summary = export(cfg.out, DEMO_EXPORT, units, args.workers, args.address)
    print(f"atlas: {atlas_address(summary['export'])}")
    return status


def atlas_address(export_folder: str) -> str:
    """The atlas's index page as a browser address: file:// for a local export, else its URL."""
    if "://" in export_folder:
        return f"{export_folder.rstrip('/')}/{ATLAS_INDEX}"
    return (Path(export_folder) / ATLAS_INDEX).resolve().as_uri()


def run_index(cfg: IndexConfig) -> int:
    from pipeline.index.run import index  # imports Ray: keep `ninebest --help` fast

    manifest = index(cfg)
    where = f"{cfg.out.rstrip('/')}/{INDEX_DIR}"
    print(f"index: {where}  ({manifest['counts']['index_rows']} rows)")
    if manifest["counts"]["bad"]:
        print(f"skipped images: {cfg.out.rstrip('/')}/{ERRORS}")
    print(f"query: python -c \"import pandas as pd; print(pd.read_parquet('{where}'))\"")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except NinebestError as e:
        print(f"ninebest: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage the user must fix: a missing bucket, no permission, no network
        print(f"ninebest: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ninebest: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
