"""Benchmark `pipeline.deconv.project`: batched projections vs one at a time, on CPU.

AlexNet with seeded random weights, layer `features.10`, 224x224 inputs. Both rates are measured
in the same process with a fixed thread count; the result is printed as a markdown snippet.

    .venv/bin/python bench/bench_deconv.py [--quick] [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable

import torch
import torchvision

from pipeline.deconv import project

LAYER = "features.10"
SIZE = 224


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    parser.add_argument("--batch", type=int, default=32, help="projections per batched call")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed batched calls (best kept)")
    return parser.parse_args()


def make_inputs(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Seeded AlexNet, images (B, 3, 224, 224) and the (B,) unit / y / x of each projection."""
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    images = torch.randn(batch, 3, SIZE, SIZE)  # (B, 3, H, W)
    coords = torch.stack([torch.randint(0, 256, (batch,)), torch.randint(0, 13, (batch,))])  # (2, B)
    return model, images, coords


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def rates(batch: int, repeats: int) -> tuple[float, float]:
    """Projections per second: one batched call of B, and B calls of one."""
    model, images, (units, ys) = make_inputs(batch)
    xs = ys.flip(0)  # (B,)

    def batched() -> None:
        project(model, LAYER, images, units, ys, xs)

    def one_at_a_time() -> None:
        for b in range(batch):
            s = slice(b, b + 1)
            project(model, LAYER, images[s], units[s], ys[s], xs[s])

    return batch / best_seconds(batched, repeats), batch / best_seconds(one_at_a_time, repeats)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    batch = min(args.batch, 8) if args.quick else args.batch
    repeats = 1 if args.quick else args.repeats
    batched, single = rates(batch, repeats)
    print(f"### deconv `project` benchmark (AlexNet `{LAYER}`, {SIZE}x{SIZE}, CPU)\n")
    print("| mode | projections/s |")
    print("|---|---|")
    print(f"| batched (B={batch}, one call) | {batched:.1f} |")
    print(f"| one at a time (B=1 calls) | {single:.1f} |")
    print(f"| ratio batched / one at a time | {batched / single:.2f}x |\n")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, ", end="")
    print(f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, ", end="")
    print(f"best of {repeats}. Command: `{' '.join([sys.executable.split('/')[-1]] + sys.argv)}`")


if __name__ == "__main__":
    main()
