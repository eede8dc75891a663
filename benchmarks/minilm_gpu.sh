#!/usr/bin/env bash
# Issue 16: six-layer all-MiniLM-L6-v2 certificates by full CROWN on a GPU (benchmarks/minilm_gpu.py).
# Needs: carry .devrun/minilm (36 MB, written on the CPU machine by
#   python benchmarks/minilm_gpu_prepare.py), gmfast importable (PYTHONPATH = repo root), $OUT.
# Writes $OUT/smoke/minilm_gpu.json (1 layer, 3 tokens: device errors surface in seconds) and
# $OUT/minilm_gpu.json (six layers, whole sentences; rewritten after every pass, so a timeout
# keeps every radius already proved). Stops starting sentences after BUDGET seconds.
set -euo pipefail
OUT=${OUT:?set OUT}
BUDGET=${BUDGET:-360}
cd "$(dirname "$0")/.."
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
timeout 120 python3 benchmarks/minilm_gpu.py --out "$OUT/smoke" --device cuda --layers 1 --tokens 3 --n 1 \
    --steps 1 --start 1e-3 2>&1 | tail -n 3 || echo "smoke run failed (status above); the main run follows"
timeout $((BUDGET + 120)) python3 benchmarks/minilm_gpu.py --out "$OUT" --device cuda --n 3 --steps 4 \
    --start "${START:-2.5e-4}" --budget "$BUDGET" 2>&1 | tail -n 20
