#!/usr/bin/env bash
# The GPU measurements of issue 13, on a machine with a CUDA GPU (a few minutes):
# AlexNet and ResNet-50, Pillow vs device (nvJPEG) decode, float32 vs bfloat16; each run is end
# to end (ShardIndexer.index_shard) against a bare forward on the same device, with images/s per
# GPU and the device-busy fraction. Writes one section per run and the "GPU runs" summary table
# into BENCHMARKS.md (bench/bench_map.py --summary).
#
#   bash bench/gpu.sh                 # or: make bench-gpu
#   IMAGES=2048 THREADS=8 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
IMAGES=${IMAGES:-1024}     # per run; a GPU at thousands of images/s needs more than the CPU's 256
THREADS=${THREADS:-4}      # decode threads, the default --decode-threads
BATCH=${BATCH:-128}
OUT=${OUT:-BENCHMARKS.md}
SUMMARY=$(mktemp /tmp/ninebest-gpu-runs.XXXXXX.jsonl)
trap 'rm -f "$SUMMARY"' EXIT

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA GPU visible to torch; run it on a GPU node" >&2
    exit 2
fi
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

declare -A LAYERS=(
    [alexnet]="features.3,features.10,classifier.4"
    [resnet50]="layer1,layer2,layer3,layer4"
)
for model in alexnet resnet50; do
    for precision in float32 bfloat16; do
        for decode in pil device; do
            echo "== $model $precision $decode"
            "$PY" bench/bench_map.py --model "$model" --layers "${LAYERS[$model]}" \
                --images "$IMAGES" --batch-size "$BATCH" --threads "$THREADS" \
                --precision "$precision" --decode "$decode" \
                --summary "$SUMMARY" --write "$OUT"
        done
    done
done
echo "bench/gpu.sh: wrote $OUT (section gpu-runs and one map-* section per run)"
