"""Decode throughput per core: Pillow, the device path (torchvision's CPU decoder here) and
Pillow with reduced-size (draft) decoding, on ImageNet-sized and large JPEGs, in one run.

    python bench/bench_decode.py [--rounds 7] [--write BENCHMARKS.md]

Each measure is bytes in memory -> (3, 224, 224) uint8 model input on one thread (one torch
thread, no pool): what one decode thread of a worker does per image. The device path is timed
as the worker runs it: `jpeg.inspect` per image (the reader thread's part) plus `jpeg.to_uint8`
on batches of 32. Photographs: the 16 scikit-image samples, resized (Lanczos) to about 500x375
and 2000x1500 (portrait ones to 375x500 and 1500x2000), JPEG quality 90. Best of `--rounds`,
the paths alternating within each round.
The difference columns compare each path's model inputs with Pillow's, in grey levels.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

from report import environment, write_section  # noqa: E402

from pipeline.config import Preprocess  # noqa: E402
from pipeline.dataset import jpeg  # noqa: E402
from pipeline.dataset.decode import decode  # noqa: E402
from pipeline.dataset.preprocess import to_uint8  # noqa: E402

PRE = Preprocess()
CPU = torch.device("cpu")
BATCH = 32
SETS = {"~500x375": (500, 375), "~2000x1500": (2000, 1500)}


def photographs(size: tuple[int, int]) -> list[bytes]:
    from photos import FOLDERS, _photo

    out = []
    for name in (n for names in FOLDERS.values() for n in names):
        image = Image.fromarray(_photo(name))
        wide = image.width >= image.height
        image = image.resize(size if wide else size[::-1], Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def pil(datas: list[bytes], draft: bool = False) -> list[torch.Tensor]:
    out = []
    for data in datas:
        decoded = decode(data, PRE.max_pixels, PRE.resize, draft)
        out.append(to_uint8(decoded.image, PRE, decoded.box))
    return out


def device(datas: list[bytes]) -> list[torch.Tensor]:
    headers = [jpeg.inspect(data, PRE.max_pixels, PRE.resize) for data in datas]
    out = []
    for i in range(0, len(headers), BATCH):
        out.extend(jpeg.to_uint8(headers[i : i + BATCH], PRE, CPU))
    return out


def best_rates(paths: dict, datas: list[bytes], rounds: int) -> dict[str, tuple[float, list]]:
    """Each path's best images/s over `rounds` and its outputs; the paths alternate within each
    round, so a busy spell of the machine slows all of them alike."""
    best = {name: (0.0, []) for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            out = fn(datas)
            rate = len(datas) / (time.perf_counter() - start)
            best[name] = (max(best[name][0], rate), out)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--write", default=None, help="BENCHMARKS.md to update")
    a = ap.parse_args()
    torch.set_num_threads(1)
    paths = {"pil": pil, "device (CPU decoder)": device, "pil + draft": lambda d: pil(d, True)}
    rows = []
    for label, size in SETS.items():
        datas = photographs(size)
        measured = best_rates(paths, datas, a.rounds)
        rates = {name: rate for name, (rate, _) in measured.items()}
        reference = measured["pil"][1]
        for name, (_, out) in measured.items():
            diffs = [(x.int() - r.int()).abs() for x, r in zip(out, reference, strict=True)]
            worst = max(float(d.float().mean()) for d in diffs)
            biggest = max(int(d.max()) for d in diffs)
            rows.append((label, name, rates[name], rates[name] / rates["pil"], biggest, worst))
        print(label, {k: round(v, 1) for k, v in rates.items()})
    table = "\n".join(
        f"| {label} | {name} | {rate:.1f} | {ratio:.2f}x | {biggest} | {worst:.3f} |"
        for label, name, rate, ratio, biggest, worst in rows
    )
    body = f"""## Decode per core: Pillow, device path, reduced-size decode

Command: `python bench/bench_decode.py --rounds {a.rounds} --write BENCHMARKS.md`
Machine: {environment()}; bytes in memory -> (3, 224, 224) uint8 on one thread; 16 real
photographs per size (scikit-image samples resized, JPEG quality 90); best of {a.rounds} rounds,
the three paths alternating within each round.

| JPEGs | path | images/s per core | vs pil | max diff vs pil | worst mean diff |
| --- | --- | ---: | ---: | ---: | ---: |
{table}

The device path on CPU runs the same code a CUDA worker runs, with torchvision's libjpeg-turbo
decoder instead of nvJPEG: its speed here says nothing about a GPU's (see the GPU section).
`--draft` decodes a JPEG whose shorter side is at least 4x `--resize` (1024 pixels by default)
at 1/2, 1/4 or 1/8 scale, keeping at least 2x `--resize`: the ~500x375 set is never reduced.
Differences are grey levels (0-255) of the model input against Pillow's full decode; the mean is
the worst image's mean over its pixels.
"""
    print(body)
    if a.write:
        write_section(a.write, "decode", body)


if __name__ == "__main__":
    main()
