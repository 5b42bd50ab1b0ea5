#!/usr/bin/env bash
# Train the default model on a lent GPU in one call (bench/README.md, "Training the default model on a GPU").
# The corpus is built here (it derives from this interpreter's stdlib; the GPU machine's Python differs),
# tokenized, and packed:
#   make runs-gpu/tokenizer/tokenizer.json RUNS=runs-gpu CORPUS_ARGS="--tool-docs 48000"   # corpus, tokenizer
#   bash bench/gpu_train.sh --prepare runs-gpu   # tokenizes, packs into .gpu_carry (about 4 MB)
# then, on the GPU machine, with .gpu_carry carried:
#   bash bench/gpu_train.sh              # trains to a wall-clock budget, exports, splits the weights into $OUT
#   bash bench/gpu_train.sh --cpu-smoke  # the same script on the CPU, a few tiny steps (checks it end to end)
#   MTP=1 bash bench/gpu_train.sh        # only the shipped model's MTP layer, towards the main model (below)
# Installs nothing. Back here: cat model.safetensors.part* > model.safetensors, beside the carried tokenizer.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
CARRY="${GPU_CARRY:-.gpu_carry}"
if [[ "${1:-}" == --prepare ]]; then
  RUNS="${2:?--prepare RUNS}"
  rm -rf "$CARRY" && mkdir -p "$CARRY/data" && cp -r "$RUNS/tokenizer" "$CARRY/tokenizer"
  # int16 ids (vocabulary <= 8K) and xz: 22M tokens are 89 MB as saved, 4 MB packed
  exec "$PY" - "$RUNS" "$CARRY" <<'EOF'
import lzma, sys, io, torch
from model.tokenizer import Tokenizer
from model.train_data import TokenStream
runs, dst = sys.argv[1:]
tok = Tokenizer.from_dir(f"{runs}/tokenizer")
for split in ("train", "heldout"):  # the caches model.train would write
    name = f"{split}_tokens.pt"
    TokenStream.from_jsonl(f"{runs}/data/{split}.jsonl", tok, f"{runs}/train/{name}")
    t = torch.load(f"{runs}/train/{name}")
    assert int(t["tokens"].max()) < 2**15
    buf = io.BytesIO()
    torch.save({"tokens": t["tokens"].to(torch.int16), "anchors": t["anchors"]}, buf)
    with lzma.open(f"{dst}/{name}.xz", "wb", preset=6) as f:
        f.write(buf.getvalue())
    print(name, len(t["tokens"]), "tokens")
EOF
fi
SMOKE=0
[[ "${1:-}" == --cpu-smoke ]] && SMOKE=1
OUT_DIR="${OUT:-bench/results/gpu_train}"
RUN="${RUN_DIR:-/tmp/gpu_train}"
mkdir -p "$OUT_DIR" "$RUN/train"
START=$(date +%s)
if [[ $SMOKE == 1 ]]; then
  DEADLINE=120; BUDGET=0.3; ARGS=(--device cpu --batch 2 --seq-len 160 --steps 12 --threads 1)
else
  # 540 s for the trainer inside a 600-s call; the budget fits the steps to 8.5 min x 0.85 at the measured rate
  DEADLINE="${DEADLINE_S:-540}"; BUDGET="${BUDGET_MIN:-8.5}"; ARGS=(--device cuda --autocast bf16 --batch 64 --steps 20000)
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
fi
"$PY" - "$CARRY" "$RUN/train" <<'EOF' || exit 1
import lzma, sys, io, torch
src, dst = sys.argv[1:]
for name in ("train_tokens.pt", "heldout_tokens.pt"):
    with lzma.open(f"{src}/{name}.xz") as f:
        torch.save(torch.load(io.BytesIO(f.read())), f"{dst}/{name}")
EOF
# MTP=1: fine-tune only the MTP layer of the shipped model (model/train_mtp.py) instead, to a time budget; back
# come its tensors alone (mtp.safetensors, a few MB) and report.json. Here: python -m model.train_mtp --merge.
if [[ "${MTP:-0}" == 1 ]]; then
  if [[ $SMOKE == 1 ]]; then M_ARGS=(--device cpu --batch 2 --seq-len 160 --steps 4 --eval-sequences 4)
  else M_ARGS=(--device cuda --batch 64 --steps 100000 --time-budget-s "${MTP_BUDGET_S:-450}"); fi
  PYTHONUNBUFFERED=1 timeout $((DEADLINE - ($(date +%s) - START))) "$PY" -m model.train_mtp --tokens "$RUN/train" \
    --model "${MTP_MODEL:-model/weights/glm-5-tiny-py}" --out "$RUN/mtp" "${M_ARGS[@]}" 2>&1 | tee "$OUT_DIR/train_mtp.log"
  rc=${PIPESTATUS[0]}
  cp "$RUN/mtp/mtp.safetensors" "$RUN/mtp/report.json" "$OUT_DIR/" 2>/dev/null
  echo "train_mtp rc $rc, $(($(date +%s) - START)) s in all"
  exit "$rc"
fi
# A run cut short (a crash, a spent lease) continues from its exported weights, carried in $CARRY/init (the parts
# and meta.tar this script wrote): CONTINUE="STEP TOTAL" rebuilds the step-STEP checkpoint of a TOTAL-step run. Its
# optimizer moments start afresh (only bf16 weights come back from a lent GPU).
if [[ -n "${CONTINUE:-}" ]]; then
  mkdir -p "$RUN/init" && tar -C "$RUN/init" -xf "$CARRY/init/meta.tar" && cat "$CARRY"/init/model.safetensors.part* \
    > "$RUN/init/model.safetensors" || exit 1
  read -r CONT_STEP CONT_TOTAL <<< "$CONTINUE"
  "$PY" - "$RUN/init" "$RUN/train/train_state.pt" "$CONT_STEP" "$CONT_TOTAL" <<'EOF' || exit 1
import json, sys, torch
from model.loader import load_model
src, dst, step, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = load_model(src)
before = json.load(open(f"{src}/report.json"))
groups = [[p for n, p in model.named_parameters() if (".indexer." in n) == idx] for idx in (False, True)]
opt = torch.optim.AdamW([{"params": g} for g in groups])
report = {**before["report"], "budget_steps": total, "continued_at": step}
torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": before["log_tail"],
            "report": report, "seconds": before["seconds"], "bf16": True}, dst)
print(f"continuing at step {step} of {total}")
EOF
  ARGS+=(--resume)
fi
train() {
  local left=$((DEADLINE - ($(date +%s) - START)))
  PYTHONUNBUFFERED=1 timeout "$left" "$PY" -m model.train --data "$CARRY/data" --tokenizer "$CARRY/tokenizer" \
    --out "$RUN/train" --time-budget-minutes "$BUDGET" --save-minutes 1 --restart-minutes 0 --log-every 50 \
    "${ARGS[@]}" "$@" 2>&1 | tee -a "$OUT_DIR/train.log"
  return "${PIPESTATUS[0]}"
}
train; rc=$?
if [[ $rc != 0 && $rc != 124 && ! -f "$RUN/train/train_state.pt" ]]; then
  echo "trainer failed before its first checkpoint (rc $rc): again with the per-expert loop" | tee -a "$OUT_DIR/train.log"
  train --moe-impl loop; rc=$?
fi
"$PY" -m model.train --data "$CARRY/data" --tokenizer "$CARRY/tokenizer" --out "$RUN/train" \
  --export "$RUN/export" --export-only 2>&1 | tee -a "$OUT_DIR/train.log" || exit 1
"$PY" - "$RUN/train/train_state.pt" "$RUN/export/report.json" <<'EOF'
import json, sys, torch
st = torch.load(sys.argv[1], weights_only=False, map_location="cpu")
json.dump({"step": st["step"], "seconds": st["seconds"], "report": st["report"], "log_tail": st["log"][-20:]},
          open(sys.argv[2], "w"), indent=1)
EOF
cp "$RUN/train/report.json" "$RUN/export/final_report.json" 2>/dev/null
tar -C "$RUN/export" -cf "$OUT_DIR/meta.tar" --exclude model.safetensors .
split -b 15m -d "$RUN/export/model.safetensors" "$OUT_DIR/model.safetensors.part"
ls -la "$OUT_DIR"
echo "trainer rc $rc, $(($(date +%s) - START)) s in all"
exit $rc
