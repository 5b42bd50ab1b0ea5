#!/usr/bin/env bash
# One prepared GPU session (NVIDIA H100/H200; torch with CUDA, transformers and triton present; no fastapi,
# uvicorn or pydantic; no network). Installs nothing. Imports only model/ and service/engine/ (+ transformers).
# Budget: well inside 15 minutes (a hard cap of 12 below); the results land in $OUT (or bench/results).
#   bash bench/gpu.sh              # on the GPU machine
#   bash bench/gpu.sh --cpu-smoke  # anywhere: the same script on the CPU with small sizes
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
timeout 720 "$PY" bench/gpu_bench.py --out-dir "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
