#!/usr/bin/env bash
# One device round of issue #11's measurements on an H200 (MLX CUDA), in the order that answers the open questions
# first, each phase under its own time limit so one slow phase cannot eat the others (a session has 30 device
# minutes and a call at most 10). After `bash .mlxcuda-b/install.sh` (see ../shared/device/pack-mlx-cuda.sh):
#     . /tmp/mlxcuda/env.sh && METHODS=lora,smoa PHASES=train bash scripts/kernels_device.sh   # one call (< 600 s)
#     . /tmp/mlxcuda/env.sh && CASES=5 PHASES=train4,verify bash scripts/kernels_device.sh   # the next, while warm
#     . /tmp/mlxcuda/env.sh && PHASES=kernels,bandwidth bash scripts/kernels_device.sh       # and the next
# Phases (durations measured on the H200, December 2026, where known):
#   train    bench_train --rounds, bf16: METHODS (default LoRA, SMoA and SMoA with SMOA_MLX_MERGED_KEEP=1, the backward
#            reusing the forward's W0 + Delta W; smoa-mlx-merge: the default with MLX's merge instead of the merge
#            kernel) in alternating
#            windows, one process per K (4, then 2), with --split (forward + backward alone,
#            and the whole step): the end-to-end ratios with their spread, and where a step's time goes (422 s for
#            the three methods at f41889a, 465 s for lora,smoa at 5c61fce, most of it start-up; 240 s at fcfd872,
#            with the narrower probe; 301 s for lora,smoa,smoa-mlx-merge at e19b9e1, 243 s for
#            lora,smoa,smoa-gather-x at 4628c29: see docs/BENCHMARKS.md; TRAIN_LIMIT sets the limit)
#   train4   the same on a 4-bit base, 3 rounds, no split (232-241 s; 151 s at fcfd872; 296 s as a fresh machine's
#            first MLX process)
#   kernels  bench_kernels, per layer (the merged form with full and with block gradients, the other forms, MLX and
#            PyTorch LoRA, the reference-style PyTorch SMoA) + memory-bound steps, no verification (145-193 s), and
#            the amortized columns (8 layers of a shape per call: frozen, MLX LoRA, auto): at 4628c29, with the
#            gathers' blocks along z and x side by side, 183 s for 4096x4096,4096x14336 and 171 s for the other two
#            (KERNELS_ARGS="--shapes ..."), so the whole phase fits one call
#   gathers  bench_kernels --gathers at 8 and 16 tokens per thread (shipped: 8 for the gathers, 4 for the scatters;
#            `--tt 4,8` took 76 s at f45b8b6), each checked bit for bit, then its bandwidth; and the Hadamard kernel at 4 (shipped) and 16 rows per thread (137 s with a third mover
#            variant, since dropped)
#   merges   bench_kernels --merges: the merge kernel as shipped and as each of bench_kernels.TIMED_VARIANTS (none
#            now; at 78f3eb4 its rank loop unrolled at 8 and 4 rows per thread, 84 s; at ef65f8c its loop at 4 and 2
#            rows, 70 s), each variant checked bit for bit against the shipped merge, then all timed alone; the
#            kernels phase times the variants per layer too
#   bandwidth  bench_kernels --bandwidth: the copy ceiling and each memory-bound step, eager and compiled (the
#            compiled launches are the GPU's time; eager ones include building each launch from Python; 124 s)
#   breakdown  bench_kernels --breakdown: the merged form's steps alone, eager and compiled, at 4096x4096 K=4 and 2
#            and 4096x14336 K=4, block-gradient steps included (its three shapes took under 150 s at e19b9e1, where a
#            verification that then followed by mistake was cut by the limit)
#   graph    bench_graph, LoRA and the merged form at K = 2 and 4: nodes and kernels per adapted layer, the
#            tiny-model step (the per-node cost on the GPU), no peak memory (about 60 s on the CPU for six methods; on
#            the GPU six methods with peak memory went past 200 s, likely compiling each method's kernels)
#   split    bench_train --split, one process per configuration (about 100 s per configuration)
#   verify   bench_kernels verification, one process per case (at fcfd872, three types: ragged (0) about 70 s,
#            4-bit (1) about 200 s, 8-bit (2) 177 s, 2-bit K=1 (3) 81-98 s per type; the 3-bit case (4) took 89-120 s
#            per type at 5c61fce: give the quantized cases DTYPES of one or two types a call, as MLX compiles each new
#            quantized kernel on first use, 19-28 s each); cases 6-8 (mxfp4, nvfp4, mxfp8 bases) ran at e19b9e1.
#            FORMS=merged,merged_blocks checks the merged form (merge kernel) alone: no MLX quantized matmul
#   qmm      a bare nn.QuantizedLinear, 4-, 2- and 3-bit, 3-D input, forward then VJP, in one process, timed: the
#            first-use compilation (169 s for all three)
# Everything lands in $OUT (the device tool's output folder) as JSON and logs, with times.txt; output is unbuffered,
# so a phase cut by its limit still leaves its log.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/.kernels-out}
PHASES=${PHASES:-train}
export PYTHONUNBUFFERED=1
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
    train)
      phase train "${TRAIN_LIMIT:-560}" "$PY" scripts/bench_train.py --rounds 4 --window 8 --split --bits 0 \
        --blocks 4,2 --methods "${METHODS:-lora,smoa,smoa-keep}" --out "$OUT/bench_train.json" ;;
    train4)
      phase train4 400 "$PY" scripts/bench_train.py --rounds 3 --window 8 --bits 4 --blocks 2,4 --methods lora,smoa \
        --out "$OUT/bench_train_4bit.json" ;;
    kernels)
      # KERNELS_ARGS: more bench_kernels arguments, e.g. "--shapes 4096x4096,4096x14336" to split the phase over calls
      phase kernels "${KERNELS_LIMIT:-450}" "$PY" scripts/bench_kernels.py --skip-verify --skip-breakdown ${KERNELS_ARGS:-} \
        --out "$OUT/bench_kernels.json" ;;
    merges)
      phase merges 300 "$PY" scripts/bench_kernels.py --merges --no-probe --no-torch --out "$OUT/bench_merges.json" ;;
    gathers)
      phase gathers 400 "$PY" scripts/bench_kernels.py --gathers --no-probe --tt 8,16 --hadamard-ti 4,16 --out "$OUT/bench_gathers.json" ;;
    bandwidth)
      phase bandwidth "${BANDWIDTH_LIMIT:-150}" "$PY" scripts/bench_kernels.py --bandwidth --no-probe --no-torch \
        --out "$OUT/bench_bandwidth.json" ;;
    breakdown)
      phase breakdown "${BREAKDOWN_LIMIT:-200}" "$PY" scripts/bench_kernels.py --breakdown --no-probe --no-torch \
        --out "$OUT/bench_breakdown.json" ;;
    graph)
      phase graph 300 "$PY" scripts/bench_graph.py --dtype bfloat16 --no-peak --methods lora-k2,smoa-merged-k2,lora-k4,smoa-merged-k4 --out "$OUT/bench_graph.json" ;;
    split)
      phase split 560 "$PY" scripts/bench_train.py --split --iters 4 --bits 0 --blocks 2,4 --methods lora,smoa \
        --out "$OUT/split.json" ;;
    verify)
      for c in ${CASES:-0 1 2 3 4 5 6 7 8}; do  # CASES="4 5": the cases of one call (each up to 300 s); DTYPES: their types
        phase "verify_$c" 300 "$PY" -X faulthandler scripts/bench_kernels.py --skip-bench --no-probe --cases "$c" \
          --stall-s 280 --dtypes "${DTYPES:-bfloat16,float16,float32}" --forms "${FORMS:-kernel,reference,kernel_delta,merged,merged_blocks}" \
          --out "$OUT/verify_$c.json"
      done ;;
    qmm)
      phase qmm 200 "$PY" -c "
import time, mlx.core as mx, mlx.nn as nn
t0 = time.time()
for bits in (4, 2, 3):
    base = nn.Linear(512, 256, bias=False); base.set_dtype(mx.bfloat16)
    q = nn.QuantizedLinear.from_linear(base, group_size=64, bits=bits)
    x = mx.random.normal((2, 32, 512)).astype(mx.bfloat16)
    mx.eval(q(x)); print(bits, 'forward returned after', round(time.time() - t0, 1), 's', flush=True)
    mx.eval(mx.vjp(lambda x: q(x), [x], [mx.ones((2, 32, 256), mx.bfloat16)]))
    print(bits, 'VJP returned after', round(time.time() - t0, 1), 's', flush=True)" ;;
    *) echo "unknown phase $p (train, train4, kernels, merges, gathers, bandwidth, breakdown, graph, split, verify, qmm)" >&2; exit 2 ;;
  esac
done
cat "$OUT/times.txt"
