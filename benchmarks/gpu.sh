#!/usr/bin/env bash
# Every GPU measurement in one run (benchmarks/bench_gpu.py): bf16 training-step throughput and
# MFU of the 64x64 ADM UNet, PDAE vs DDPM steps, classifier-guided sampling eager / compiled /
# CUDA graphs, host syncs per step. Writes one JSON (default gpu.json); about 8 minutes on one
# GPU. A CPU dry run: bash benchmarks/gpu.sh --device cpu --tiny --out /tmp/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/bench_gpu.py "$@"
