#!/usr/bin/env bash
# The GPU suite (titan_flow/bench/gpu.py): every missing speed and memory figure in one unattended run
# on one H100/H200 (about 8 minutes), written to OUT_DIR/gpu_suite.json and OUT_DIR/gpu_suite.md.
#   ./launch/gpu_suite.sh [OUT_DIR] [--only CASES] [--time-limit SECONDS] [--dry-run]
# Needs the CUDA build of torch, triton, diffusers and transformers (pip install -e '.[gpu]' adds flash-attn).
set -euo pipefail
OUT_DIR="$(realpath -m "${1:-${OUT:-gpu_suite_out}}")"
shift $(( $# > 0 ? 1 : 0 ))
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m titan_flow.bench.gpu --out "$OUT_DIR" "$@"
