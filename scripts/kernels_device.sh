#!/usr/bin/env bash
# One device round of issue #11's measurements on an H200 (MLX CUDA), in the order that answers the open questions
# first, each phase under its own time limit so one slow phase cannot eat the others (a session has 30 device
# minutes and a call at most 10). After `bash .mlxcuda-b/install.sh` (see ../shared/device/pack-mlx-cuda.sh):
#     . /tmp/mlxcuda/env.sh && PHASES=graph,kernels bash scripts/kernels_device.sh      # one call (< 600 s)
#     . /tmp/mlxcuda/env.sh && PHASES=split bash scripts/kernels_device.sh              # the next, while warm
#     . /tmp/mlxcuda/env.sh && PHASES=train bash scripts/kernels_device.sh              # and the next
# Phases (measured durations on the H200, December 2026):
#   graph    bench_graph: nodes and kernels per adapted layer, the tiny-model step (the per-node cost on the GPU),
#            peak memory (about 60 s on the CPU; first run on the GPU)
#   split    bench_train --split, lora and smoa at K=2 and K=4, bf16: where the end-to-end step's time goes
#            (about 100 s per configuration)
#   kernels  bench_kernels, per layer + memory-bound steps, no verification (about 190 s)
#   train    bench_train, lora and smoa, bf16 and 4-bit, K=2 and K=4 (about 40-50 s per configuration)
#   verify   bench_kernels verification, one process per case (about 90-120 s per case)
#   qmm      the quantized-layer stall: a bare nn.QuantizedLinear, 4-bit then 2-bit, 3-D input, VJP, 300 s each
# Everything lands in $OUT (the device tool's output folder) as JSON and logs, with times.txt.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/.kernels-out}
PHASES=${PHASES:-graph,kernels}
mkdir -p "$OUT"

phase() {  # phase NAME LIMIT_S command...: run under a limit, log its exit status and duration
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$OUT/times.txt"
}

for p in ${PHASES//,/ }; do
  case $p in
    graph)
      phase graph 200 "$PY" scripts/bench_graph.py --out "$OUT/bench_graph.json" ;;
    split)
      phase split 560 "$PY" scripts/bench_train.py --split --iters 4 --bits 0 --blocks 2,4 --methods lora,smoa \
        --out "$OUT/split.json" ;;
    kernels)
      phase kernels 300 "$PY" scripts/bench_kernels.py --skip-verify --skip-breakdown --out "$OUT/bench_kernels.json" ;;
    train)
      phase train 560 "$PY" scripts/bench_train.py --iters 8 --bits 0,4 --methods lora,smoa --out "$OUT/bench_train.json" ;;
    verify)
      for c in 0 1 2 3 4 5; do
        phase "verify_$c" 150 "$PY" -X faulthandler scripts/bench_kernels.py --skip-bench --no-probe --cases "$c" \
          --stall-s 130 --out "$OUT/verify_$c.json"
      done ;;
    qmm)
      for bits in 4 2; do
        phase "qmm_$bits" 300 "$PY" -c "
import mlx.core as mx, mlx.nn as nn
base = nn.Linear(512, 256, bias=False); base.set_dtype(mx.bfloat16)
q = nn.QuantizedLinear.from_linear(base, group_size=64, bits=$bits)
x = mx.random.normal((2, 32, 512)).astype(mx.bfloat16)
mx.eval(mx.vjp(lambda x: q(x), [x], [mx.ones((2, 32, 256), mx.bfloat16)]))
print('done: $bits-bit QuantizedLinear VJP on a 3-D input')"
      done ;;
    *) echo "unknown phase $p (graph, split, kernels, train, verify, qmm)" >&2; exit 2 ;;
  esac
done
cat "$OUT/times.txt"
