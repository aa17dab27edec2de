"""Benchmark deconvnet projections on CPU: the export's passes vs one projection at a time.

AlexNet `features.10`, 224x224 inputs, fixed thread count; every rate is measured in the same
process, modes interleaved round by round (best round kept), and printed as a markdown snippet.
The baseline is the natural unbatched call: `deconv.project` with B=1 per row (a forward of the
row's image to the layer, one seed, the backward). Two workloads:

* synthetic: B random images, one random (unit, y, x) each; `project` batched (B=1 vs B), plain
  autograd as the ceiling of batching the same computation, and `cone.project_rows`;
* index rows: the bundled demo photographs, preprocessed as the index does, and the top-9 images
  of each of `--units` units of the index's seeded AlexNet (spatial max per image, as
  `ninebest index` keeps them), projected in the export's passes (`render.passes`, 32 rows):
  one forward per image of a pass, each row's backward inside its cone. Every projection is
  checked against the baseline's.

    .venv/bin/python bench/bench_deconv.py [--quick] [--batch 32] [--units 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from pipeline.cli import DEMO_IMAGES
from pipeline.config import Preprocess
from pipeline.dataset.decode import decode
from pipeline.dataset.preprocess import normalize, to_uint8
from pipeline.export.cone import project_rows
from pipeline.export.deconv import project
from pipeline.export.render import passes
from pipeline.net.models import load_model

LAYER = "features.10"
SIZE = 224
K = 9  # rows per unit, as the index keeps them
PASS_ROWS = 32  # the export's rows per pass (the index's default batch_size)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=8, 4 units, one timed round")
    parser.add_argument("--batch", type=int, default=32, help="synthetic: projections per call")
    parser.add_argument("--units", type=int, default=32, help="index rows: units of features.10")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    parser.add_argument("--write", default=None, help="BENCHMARKS.md to update")
    return parser.parse_args()


def best_times(modes: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds per mode; modes interleave so that load spikes hit all of them."""
    best = dict.fromkeys(modes, float("inf"))
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


# ---------------------------------------------------------------- synthetic


def synthetic(batch: int, repeats: int) -> dict[str, float]:
    """Projections per second of each mode on B random images, one projection each."""
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    images = torch.randn(batch, 3, SIZE, SIZE)  # (B, 3, H, W)
    units = torch.randint(0, 256, (batch,))  # (B,)
    ys, xs = torch.randint(0, 13, (2, batch))  # (B,), (B,) in the 13x13 grid of features.10
    which = torch.arange(batch)  # (B,) row b projects in image b
    one = torch.zeros(1, dtype=torch.long)  # (1,)

    def each(step: Callable[[int], object]) -> Callable[[], None]:
        return lambda: [step(b) for b in range(batch)]

    def sl(t: Tensor, b: int) -> Tensor:
        return t[b : b + 1]

    modes = {
        "project B=1": each(
            lambda b: project(model, LAYER, sl(images, b), *_row(units, ys, xs, b))
        ),
        "project batched": lambda: project(model, LAYER, images, units, ys, xs),
        "plain B=1": each(lambda b: plain(model, sl(images, b), *_row(units, ys, xs, b))),
        "plain batched": lambda: plain(model, images, units, ys, xs),
        "project_rows R=1": each(
            lambda b: project_rows(model, LAYER, sl(images, b), one, *_row(units, ys, xs, b))
        ),
        "project_rows batched": lambda: project_rows(model, LAYER, images, which, units, ys, xs),
    }
    return {name: batch / seconds for name, seconds in best_times(modes, repeats).items()}


def _row(units: Tensor, ys: Tensor, xs: Tensor, b: int) -> tuple[Tensor, Tensor, Tensor]:
    return units[b : b + 1], ys[b : b + 1], xs[b : b + 1]  # (1,) each


def plain(model: nn.Module, images: Tensor, units: Tensor, ys: Tensor, xs: Tensor) -> None:
    """Plain forward to features.10 and input-gradient backward of the chosen activations."""
    pixels = images.detach().requires_grad_(True)  # (B, 3, H, W)
    output = model.features[:11](pixels)  # (B, 256, 13, 13)
    chosen = output[torch.arange(len(units)), units, ys, xs]  # (B,)
    torch.autograd.grad(chosen, pixels, grad_outputs=chosen.detach())  # (B, 3, H, W)


# ---------------------------------------------------------------- index rows


def demo_inputs() -> Tensor:
    """The bundled photographs as the index feeds them to the model, (N, 3, 224, 224)."""
    pre = Preprocess()
    paths = sorted(p for p in DEMO_IMAGES.rglob("*") if p.is_file())
    pixels = [
        to_uint8(decode(p.read_bytes(), pre.max_pixels, pre.resize).image, pre) for p in paths
    ]
    return normalize(torch.stack(pixels), pre)  # (N, 3, 224, 224)


def index_rows(model: nn.Module, images: Tensor, units: int) -> list[tuple[dict, int]]:
    """(row, image) pairs: top-9 images of units 0..units-1 by spatial max, grouped by image."""
    with torch.no_grad():
        output = model.features[:11](images)  # (N, 256, 13, 13)
    peak, where = output[:, :units].flatten(2).max(dim=2)  # (N, U), (N, U)
    top = peak.topk(K, dim=0).indices  # (K, U) image indices per unit, strongest first
    pairs = []
    for unit in range(units):
        for image in top[:, unit].tolist():
            y, x = divmod(int(where[image, unit]), output.shape[3])
            pairs.append(({"unit": unit, "y": y, "x": x}, image))
    return sorted(pairs, key=lambda pair: pair[1])  # as `pack` and `export_images` order them


def index_workload(units: int, repeats: int) -> dict[str, float]:
    """Projections per second: the export's passes vs `project` one row at a time."""
    model = load_model("torchvision:alexnet").module  # the seeded model `ninebest index` uses
    images = demo_inputs()  # (N, 3, 224, 224)
    pairs = index_rows(model, images, units)
    chunks = passes(pairs, PASS_ROWS)
    results: dict[str, list[Tensor]] = {"passes": [], "single": []}

    def by_passes() -> None:
        results["passes"] = [export_pass(model, images, chunk) for chunk in chunks]

    def one_at_a_time() -> None:
        results["single"] = [
            project(model, LAYER, images[image][None], *_tensors([row]))[0] for row, image in pairs
        ]

    best = best_times({"passes": by_passes, "single": one_at_a_time}, repeats)
    got, want = torch.cat(results["passes"]), torch.stack(results["single"])  # (R, 3, H, W)
    scale = want.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-30)  # (R, 1, 1, 1)
    error = float(((got - want).abs() / scale).max())
    assert error < 1e-5, f"passes differ from one-at-a-time projections: {error}"
    per_image = torch.bincount(torch.tensor([image for _, image in pairs]))  # (N,)
    shown = per_image[per_image > 0].float()  # (images with rows,)
    return {
        "rows": len(pairs),
        "images": len(shown),
        "rows per image": float(shown.mean()),
        "max rows per image": int(shown.max()),
        "passes": len(chunks),
        "passes proj/s": len(pairs) / best["passes"],
        "single proj/s": len(pairs) / best["single"],
        "max error": error,
    }


def export_pass(model: nn.Module, images: Tensor, chunk: list[tuple[dict, int]]) -> Tensor:
    """One pass as `Renderer._project` runs it: each image once, (R, 3, H, W) projections."""
    rows, positions = zip(*chunk, strict=True)
    distinct = sorted(set(positions))
    which = torch.tensor([distinct.index(p) for p in positions])  # (R,)
    return project_rows(model, LAYER, images[distinct], which, *_tensors(rows))[0]


def _tensors(rows) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.tensor([row[k] for row in rows]) for k in ("unit", "y", "x"))


# ---------------------------------------------------------------- report


def report(batch: int, repeats: int, rates: dict[str, float], index: dict) -> str:
    """Markdown snippet: both workloads, ratios to `project` one at a time."""
    base = rates["project B=1"]
    lines = [
        f"### Deconvnet projections (AlexNet `{LAYER}`, {SIZE}x{SIZE}, CPU)",
        "",
        f"Synthetic: {batch} random images, one random (unit, y, x) each; ratios to `project` "
        "one row at a time.",
        "",
        "| code | one at a time (B=1) proj/s | batched proj/s | batched / `project` B=1 |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (
        ("project", "`deconv.project` (autograd, full maps)"),
        ("plain", "plain autograd, no ninebest code"),
        ("project_rows", "`cone.project_rows` (cones)"),
    ):
        single = rates[f"{name} B=1" if name != "project_rows" else "project_rows R=1"]
        batched = rates[f"{name} batched"]
        lines.append(f"| {label} | {single:.1f} | {batched:.1f} | {batched / base:.2f}x |")
    ratio = index["passes proj/s"] / index["single proj/s"]
    lines += [
        "",
        f"Index rows: top-{K} of {index['rows'] // K} units over the {len(demo_paths())} bundled "
        f"photographs: {index['rows']} rows on {index['images']} images, "
        f"{index['rows per image']:.1f} rows per image (at most {index['max rows per image']}), "
        f"{index['passes']} passes of at most {PASS_ROWS} rows.",
        "",
        "| code | proj/s | ratio |",
        "|---|---:|---:|",
        f"| `deconv.project`, one row at a time (B=1) | {index['single proj/s']:.1f} | 1.00x |",
        f"| export passes (`render.passes` + `cone.project_rows`) | "
        f"{index['passes proj/s']:.1f} | **{ratio:.2f}x** |",
        "",
        f"Largest difference to the one-at-a-time projections: {index['max error']:.1e} of each "
        f"projection's peak. torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"threads {torch.get_num_threads()}, {platform.machine()}, 2-core machine shared with "
        f"other work, best of {repeats} interleaved rounds.",
        f"Command: `{shlex.join(['.venv/bin/python', *sys.argv])}`",
        "",
        "Where the gain comes from. Batching alone buys little on CPU (first two rows): the "
        "convolutions already run near full efficiency at B=1. Two exact algorithmic changes do: "
        "(1) the deconvnet backward needs from the forward only the max-pool switches and the "
        "seed, so each image of a pass runs forward once, without autograd, for all of its rows; "
        "(2) a one-hot seed at (y, x) only reaches the windows its receptive field passes "
        "through, so each row's backward runs on those windows (about a fifth of the "
        "multiply-adds of the full-map backward for `features.10`; the stride-4 first layer is "
        "transposed as one stride-1 convolution over its 16 phases). With one row per image "
        "(synthetic) only (2) applies and the forward is most of the remaining cost; index rows "
        "share images (k = 9 rows per unit, many units), so (1) applies too.",
        "",
        f"Target (issue 3): export batched at least 5x one at a time. "
        f"{'Reached' if ratio >= 5 else 'Not reached'} on index rows ({ratio:.2f}x); "
        f"with one row per image {rates['project_rows batched'] / base:.2f}x.",
    ]
    return "\n".join(lines)


def demo_paths() -> list[Path]:
    return sorted(p for p in DEMO_IMAGES.rglob("*") if p.is_file())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    batch, units, repeats = (8, 4, 1) if args.quick else (args.batch, args.units, args.repeats)
    rates = synthetic(batch, repeats)
    index = index_workload(units, repeats)
    body = report(batch, repeats, rates, index)
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import write_section

        write_section(args.write, "deconv", body)


if __name__ == "__main__":
    main()
