#!/usr/bin/env bash
# One prepared GPU session (NVIDIA H100/H200; torch with CUDA, transformers and triton present; no fastapi,
# uvicorn or pydantic; no network). Installs nothing. Imports only model/ and service/engine/ (+ transformers).
# Budget: well inside 15 minutes (a hard cap of 12 below: 9:10 for gpu_bench.py, 0:50 for moe.py and 2:00 for
# gpu_graphs.py, the first shared with the tensor-parallel run when there is one; gpu_bench.py took 126 s on an H200);
# the results land in $OUT (or bench/results). BENCH_S=N caps gpu_bench.py at N seconds instead.
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
# Tensor parallelism (bench/tp_bench.py) runs only with >= 2 GPUs (every one of them), or on the CPU in the smoke
# (gloo, world 2); it then takes 200 s of the 720.
NGPU=0
if command -v nvidia-smi >/dev/null; then NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true); fi
SMOKE=0
for a in "$@"; do [[ "$a" == --cpu-smoke ]] && SMOKE=1; done
TP=0
if [[ $SMOKE == 1 || $NGPU -ge 2 ]]; then TP=1; fi
rc=0
timeout "${BENCH_S:-$((TP ? 350 : 550))}" "$PY" bench/gpu_bench.py --out-dir "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log" || rc=$?
# Routed experts, per-expert loop vs grouped GEMM (bench/moe.py), up to GLM-5's own layer shape on the GPU: 50 s.
if [[ $SMOKE == 1 ]]; then MOE_ARGS=(--tokens 1 16 --repeats 2 --shapes shipped --name moe_gpu-smoke)
else MOE_ARGS=(--device cuda --dtype bfloat16 --repeats 20 --shapes shipped glm5-scaled glm5 --name moe_gpu); fi
timeout 50 "$PY" bench/moe.py --out-dir "$OUT_DIR" "${MOE_ARGS[@]}" 2>&1 | tee "$OUT_DIR/moe.log" || rc=$?
# The engine's CUDA graphs against --enforce-eager (bench/gpu_graphs.py): tokens in fp32, speed in bf16; 120 s.
GRAPH_ARGS=()
[[ $SMOKE == 1 ]] && GRAPH_ARGS=(--cpu-smoke)
timeout 120 "$PY" bench/gpu_graphs.py --out-dir "$OUT_DIR" "${GRAPH_ARGS[@]}" 2>&1 | tee "$OUT_DIR/gpu_graphs.log" || rc=$?
if [[ $TP == 1 ]]; then
  TP_ARGS=(--budget-s 190)
  [[ $SMOKE == 1 ]] && TP_ARGS+=(--cpu-smoke)
  timeout 200 "$PY" bench/tp_bench.py --out-dir "$OUT_DIR" "${TP_ARGS[@]}" 2>&1 | tee "$OUT_DIR/tp_bench.log" || rc=$?
fi
exit $rc
