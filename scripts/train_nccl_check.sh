#!/usr/bin/env bash
# 2-GPU data-parallel check of `python -m smoa_mlx.train` over NCCL (needs an NVIDIA host with 2 GPUs and
# mlx[cuda]). Runs the same 20 steps on 1 GPU and on 2 GPUs (mlx.launch --backend nccl), then compares losses and
# throughput. Exercises the workaround in smoa_mlx/train/loop.py (nccl_safe_mx): mlx-lm's trainer sums reported
# losses with all_sum(..., stream=mx.cpu), which NCCL cannot do; under NCCL those sums go to the GPU stream.
#
#   bash scripts/train_nccl_check.sh [OUT_DIR]        (default: ${OUT:-/tmp}/nccl_check)
#
# MODEL and DATA (optional) pass --model / --data (default: the embedded model and data); BACKEND=ring runs the
# same check on the CPU (a dry run of this script where no GPUs are).
set -euo pipefail
OUT_DIR="${1:-${OUT:-/tmp}/nccl_check}"
PY="${PYTHON:-python}"
BACKEND="${BACKEND:-nccl}"
mkdir -p "$OUT_DIR"
COMMON=(--iters "${ITERS:-20}" --batch-size 8 --steps-per-report 1 --steps-per-eval 10 --val-batches 4 --save-every 10
        --dropout 0 --warmup 2 --seed 0 --force)
if [ -n "${MODEL:-}" ]; then COMMON+=(--model "$MODEL"); fi
if [ -n "${DATA:-}" ]; then COMMON+=(--data "$DATA"); fi

"$PY" -c "import mlx.core as mx; print('mlx', mx.__version__, 'cuda:', mx.cuda.is_available())"
echo "== 1 GPU"
CUDA_VISIBLE_DEVICES=0 "$PY" -m smoa_mlx.train "${COMMON[@]}" --adapter-path "$OUT_DIR/single" 2>"$OUT_DIR/single.err" \
  | tee "$OUT_DIR/single.log"
echo "== 2 GPUs, $BACKEND"
"$PY" -c "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; main()" \
  --backend "$BACKEND" --hosts 127.0.0.1 -n 2 -- \
  "$PY" -m smoa_mlx.train "${COMMON[@]}" --adapter-path "$OUT_DIR/nccl" 2>"$OUT_DIR/nccl.err" | tee "$OUT_DIR/nccl.log"

"$PY" - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
a = json.loads((out / "single" / "train_result.json").read_text())
b = json.loads((out / "nccl" / "train_result.json").read_text())
assert b["world_size"] == 2, f"the NCCL run had world_size {b['world_size']}: mx.distributed did not pick NCCL"
diff = max(abs(x[1] - y[1]) / abs(x[1]) for x, y in zip(a["train_losses"], b["train_losses"]))
report = {
    "max_relative_train_loss_difference": diff,
    "final_val_loss": [a["final_val_loss"], b["final_val_loss"]],
    "tokens_per_second": [a["tokens_per_second"], b["tokens_per_second"]],
    "speedup_2gpu": b["tokens_per_second"] / a["tokens_per_second"],
    "peak_memory_gb_rank0": [a["peak_memory_gb"], b["peak_memory_gb"]],
    "wall_time_s": [a["wall_time_s"], b["wall_time_s"]],
}
print(json.dumps(report, indent=2))
(out / "nccl_check.json").write_text(json.dumps(report, indent=2) + "\n")
assert diff < 1e-3, "2-GPU losses differ from 1-GPU losses on the same global batches"
print("OK: 2-rank training matches 1-process training")
PY
