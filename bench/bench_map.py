"""Map-stage throughput against a bare forward pass; decode-only and end-to-end throughput.

    python bench/bench_map.py [--model alexnet] [--layers features.3,features.10,classifier.4]
                              [--images 256] [--batch-size 32] [--threads 2] [--write BENCHMARKS.md]
                              [--decode auto|pil|device] [--precision auto|float32|bfloat16]
                              [--summary runs.jsonl]

Runs on the device a worker would use (CUDA when present, with the worker's precision: bfloat16
autocast and channels-last on a GPU; float32 on CPU) and the worker's decode (`--decode`: auto
is the device path, nvJPEG, on a GPU; Pillow on CPU). Given `--decode` or `--precision`, the
section is named after the model, device, precision and decode, so variants sit side by side.
`--summary FILE` appends this run's figures to FILE (JSON lines) and rewrites the "GPU runs"
section of `--write` from every line in it (`bench/gpu.sh` runs the variants).

- bare: `model(x)` over pre-decoded, pre-normalised batches already on the device.
- map stage: the worker's per-batch path over the same pre-decoded uint8 batches: copy to the
  device, normalise, forward with `Capture` hooks reducing each layer to spatial maxima,
  `RunningTopK.add`, and with the run's defaults (`--distinct content --stats on`) each image's
  content ident, the per-unit statistics and sketches (every value flushed into them) and the
  samples (every image of a small dataset); the partial tables are built and written in the
  end-to-end figure (`--stats off --distinct id` measures the top-k alone). The two loops alternate over 9 rounds in one process; the best round of
  each is shown, and the headline is the median of the 9 paired (same round) ratios, which
  varies less from run to run than a ratio of two bests on a shared machine.
- decode: read + decode + resize/crop as the worker does it (the thread pool; with the device
  path, header checks on the pool and batched decoding on the device), real photographs.
- end to end: `ShardIndexer.index_shard` (decode, forward, top-k, Parquet commit), no Ray.

On CPU, decoding and the forward pass compete for the same cores, so end to end is measured with
the cores split between them (`--threads` minus one torch thread for the forward pass, the rest
decoding) and compared with decode-only and forward-only at that same split: the ratio shows how
well the pipeline overlaps the two. On a GPU the forward pass runs on the device and every thread
decodes. The device-busy fraction is estimated as bare-forward time over end-to-end wall time
(end-to-end images/s over bare images/s); on CUDA, NVML's utilisation is also sampled every
50 ms during the end-to-end runs when `torch.cuda.utilization` works (it needs pynvml).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

from report import environment, write_section  # noqa: E402

from pipeline.config import IndexConfig, Preprocess  # noqa: E402
from pipeline.dataset.listing import list_images  # noqa: E402
from pipeline.dataset.refs import plan_shards  # noqa: E402
from pipeline.index.distinct import Firsts  # noqa: E402
from pipeline.index.map import ShardIndexer  # noqa: E402
from pipeline.net.hooks import Capture, probe  # noqa: E402
from pipeline.net.instrument import find_layers  # noqa: E402
from pipeline.net.models import load_model  # noqa: E402


def rate(images: int, fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def bench_forward(worker: ShardIndexer, batches_u8, pre: Preprocess, k: int, rounds: int = 9):
    """Images/s of the bare forward and of the map stage on the worker's device and precision
    (best of interleaved rounds), and each round's map / bare ratio, sorted."""
    model, layers, device = worker.model, worker.layers, worker.device
    floats = [worker._to_device(b) for b in batches_u8]  # each (B, 3, crop, crop) on the device
    n = sum(len(b) for b in batches_u8)
    units = {name: shape[0] for name, shape in probe(model, layers, pre.crop).items()}
    bf16 = worker.precision == "bfloat16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def bare():
        with torch.inference_mode(), autocast():
            for x in floats:
                model(x)

    def mapped():
        running = worker._running(units)  # the worker's settings: distinct, stats, bottom
        firsts = Firsts() if worker.cfg.distinct != "id" else None
        idents, repeats = None, False
        offset = 0
        with torch.inference_mode(), autocast(), Capture(model, layers) as capture:
            for b in batches_u8:
                where = list(range(offset, offset + len(b)))
                positions = torch.tensor(where)  # (B,)
                offset += len(b)
                if firsts is not None:  # every image its own content, as after hashing
                    first, repeats = firsts.idents([str(i) for i in where], where)
                    idents = torch.tensor(first).to(device, non_blocking=True)  # (B,)
                maxima = capture.run(worker._to_device(b))
                positions = positions.to(device, non_blocking=True)  # (B,)
                running.add(maxima, positions, idents, repeats, [str(i) for i in where], where)
        for stats in running.stats.values():
            stats.flush()  # the values still waiting for the sketches

    bare(), mapped()  # warm-up
    bares, maps = [], []
    for _ in range(rounds):  # alternating, so slow drifts of the machine hit both alike
        bares.append(rate(n, bare, device))
        maps.append(rate(n, mapped, device))
    ratios = sorted(m / b for b, m in zip(bares, maps, strict=True))
    return max(bares), max(maps), ratios


def decode_rate(worker: ShardIndexer, shard) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    decoded = [item.pixels for item in worker._decoded(shard)]
    if worker.device.type == "cuda":
        torch.cuda.synchronize()
    return len(decoded) / (time.perf_counter() - start), decoded


class Utilisation:
    """NVML's GPU utilisation sampled every 50 ms on a thread, where torch can read it."""

    def __init__(self, device: torch.device):
        self.samples: list[int] = []
        self.running = device.type == "cuda" and _nvml_works(device)
        self.device = device

    def __enter__(self) -> Utilisation:
        if self.running:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.samples.append(torch.cuda.utilization(self.device))
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.running:
            self.running = False
            self.thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def _nvml_works(device: torch.device) -> bool:
    try:
        torch.cuda.utilization(device)
    except Exception:  # no pynvml, or NVML unavailable: the estimate stands alone
        return False
    return True


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_summary(path: str, record: dict, benchmarks: str | None) -> None:
    """Append `record` to the JSON-lines file; redraw the GPU runs table from all of it."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if not benchmarks:
        return
    runs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = "\n".join(
        f"| {r['model']} | {r['device']} | {r['precision']} | {r['decode']} | {r['bare']:.1f} | "
        f"{r['e2e']:.1f} | **{r['e2e'] / r['bare']:.3f}** | {_fraction(r['nvml'])} |"
        for r in runs
    )
    body = f"""## GPU runs: end to end vs bare forward, by model, precision and decode

Command: `bash bench/gpu.sh` (or `make bench-gpu`), one `bench/bench_map.py` run per row; each
row's full table is in its own section below. Machine: {runs[-1]["machine"]}.

| model | device | precision | decode | bare images/s | end to end images/s | end to end / bare (device-busy estimate) | NVML busy |
| --- | --- | --- | --- | ---: | ---: | ---: | ---: |
{rows}

Target (issue 13): end to end at least 0.9 of a bare bfloat16 forward for ResNet-50 with device
decode.
"""
    write_section(benchmarks, "gpu-runs", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--layers", default="features.3,features.10,classifier.4")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stats", default="on", help="per-unit statistics in the map stage: on/off")
    ap.add_argument("--distinct", default="content", help="content (default), id or perceptual")
    ap.add_argument("--write", default=None, help="BENCHMARKS.md to update")
    ap.add_argument("--decode", default=None, help="auto (default), pil or device")
    ap.add_argument("--precision", default=None, help="auto (default), float32 or bfloat16")
    ap.add_argument("--summary", default=None, help="JSON-lines file of runs to append to")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    machine = environment()  # before the end-to-end part changes the thread count
    from photos import make_photos

    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp) / "photos", variants=5)

        def config(decode_threads: int) -> IndexConfig:
            return IndexConfig(
                model=f"torchvision:{a.model}", data=f"{tmp}/photos",
                layers=tuple(a.layers.split(",")), out=f"{tmp}/out", batch_size=a.batch_size,
                shard_size=a.images, decode_threads=decode_threads,
                stats=a.stats == "on", distinct=a.distinct,
                decode=a.decode or "auto", precision=a.precision or "auto",
            )  # fmt: skip

        cfg = config(a.threads)
        loaded = load_model(cfg.model)
        layers = find_layers(loaded.module, cfg.layers)
        refs = list_images(cfg.data)
        refs = (refs * (a.images // len(refs) + 1))[: a.images]
        refs = [type(r)(f"{i:05d}/{r.image_id}", r.uri, r.size) for i, r in enumerate(refs)]
        shard = plan_shards(refs, a.images)[0]
        units = {n: s[0] for n, s in probe(loaded.module, layers, 224).items()}

        # all threads: the forward pass alone, and decoding alone
        worker = ShardIndexer(cfg, "bench", loaded.fingerprint, a.threads)
        device = worker.device
        decode_all, decoded = decode_rate(worker, shard)
        batches = [
            torch.stack(decoded[i : i + a.batch_size]) for i in range(0, len(decoded), a.batch_size)
        ]
        bare, mapped, ratios = bench_forward(worker, batches, Preprocess(), cfg.k)

        # end to end, with the CPU split between decoding and (on CPU) the forward pass
        forward_threads = 1 if device.type == "cpu" and a.threads > 1 else a.threads
        decode_threads = a.threads - 1 if device.type == "cpu" and a.threads > 1 else a.threads
        split = ShardIndexer(config(decode_threads), "bench", loaded.fingerprint, forward_threads)
        decode_split, _ = decode_rate(split, shard)
        bare_split = bare
        if device.type == "cpu":
            bare_split = bench_forward(split, batches, Preprocess(), cfg.k, rounds=3)[0]
        split.index_shard(shard, units)  # warm-up
        with Utilisation(device) as busy:
            e2e = max(
                rate(len(refs), lambda: split.index_shard(shard, units), device) for _ in range(3)
            )
    slower = min(decode_split, bare_split)
    variant = "".join(
        f" --{flag} {value}" for flag, value in (("decode", a.decode), ("precision", a.precision))
        if value
    )  # fmt: skip
    median = ratios[len(ratios) // 2]
    where = f"{device.type.upper()}, {worker.precision}, decode {worker.decode}"
    keeps = f"--distinct {a.distinct} --stats {a.stats}"
    body = f"""## Map stage vs bare forward ({a.model}, {len(cfg.layers)} layers, {where}, {keeps})

Command: `python bench/bench_map.py --model {a.model} --layers {a.layers} --images {a.images} --batch-size {a.batch_size} --threads {a.threads}{variant} {keeps} --write BENCHMARKS.md`
Machine: {machine}; {a.images} images (real photographs, 224x224 crops), batch {a.batch_size}, device {device}.

| measure | images/s | ratio |
| --- | ---: | ---: |
| bare `model(x)`, pre-decoded batches on the device ({a.threads} threads) | {bare:.1f} | 1.00 |
| map stage (copy + normalise + hooks + spatial max + top-k{" + content idents" if a.distinct != "id" else ""}{" + statistics, sketches and samples" if a.stats == "on" else ""}), same batches | {mapped:.1f} | {mapped / bare:.3f} of bare (best vs best) |
| map / bare, paired rounds: median (range) of {len(ratios)} | | **{median:.3f}** ({ratios[0]:.3f} to {ratios[-1]:.3f}) |
| decode only (read + decode + resize/crop, {a.threads} threads) | {decode_all:.1f} | {decode_all / bare:.2f} of bare |

End to end (`ShardIndexer.index_shard`: decode, forward, top-k, Parquet commit; one worker, no
Ray), with {decode_threads} decode thread(s) and {forward_threads} torch thread(s):

| measure | images/s | ratio |
| --- | ---: | ---: |
| decode only, {decode_threads} thread(s) | {decode_split:.1f} | |
| bare forward, {forward_threads} thread(s) | {bare_split:.1f} | |
| end to end | {e2e:.1f} | **{e2e / slower:.3f}** of the slower |
| device-busy fraction, estimated (end to end / bare forward) | | {e2e / bare_split:.3f} |
| device-busy fraction, NVML samples during end to end | | {_fraction(busy.mean())} |

Targets (issue 6): map stage at least 0.95 of bare; end to end at least 0.9 of the slower of
decode-only and forward-only.
"""
    print(body)
    name = f"map-{a.model}"
    if a.decode or a.precision:
        name += f"-{device.type}-{worker.precision}-{worker.decode}"
    if a.write:
        legacy = a.distinct == "id" and a.stats == "off"
        write_section(a.write, name + ("" if legacy else f"-{a.distinct}-stats"), body)
    if a.summary:
        record = {
            "model": a.model, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "precision": worker.precision,
            "decode": worker.decode, "bare": bare_split, "e2e": e2e, "decode_only": decode_split,
            "nvml": busy.mean(), "machine": machine,
        }  # fmt: skip
        write_summary(a.summary, record, a.write)


if __name__ == "__main__":
    main()
