#!/usr/bin/env bash
# The quality grid of scripts/compare_device.sh split over the GPUs of one host, one shard (task : methods) per
# GPU. A 135M model cannot use an H200 (a run is ~20 s of launch-bound steps), so the grid scales with GPUs, not
# with batch size. Shards share the protocol, so their results files merge into one report here:
#     python scripts/quality_report.py <social_iqa quality.json> <shard*/quality.json> \
#         --merged benchmarks/quality.json --doc docs/QUALITY.md --plot docs/quality.png
# On the device (after the MLX-CUDA install and the .gguf-a copy, see compare_device.sh), in a call that carries
# .gguf-b and .bigbench:
#     . /tmp/mlxcuda/env.sh && bash scripts/compare_device_parallel.sh
# BUDGET (seconds) applies to each shard. $OUT gets one quality.json per shard ($OUT/shard<i>/quality.json) and
# logs.tar.gz (every shard's log, report and plot): the device tool brings back only a few files per call, and
# five per shard lost the later shards' results once.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/.compare-out}
SHARDS=${SHARDS:-"winowhy:lora,dora,hira winowhy:smoa-k2-half,smoa-k2,smoa-k4 default:lora,dora,hira default:smoa-k2-half,smoa-k2,smoa-k4"}
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
read -r -a shards <<< "$SHARDS"
if [ "${#shards[@]}" -gt "$GPUS" ]; then
  echo "compare_device_parallel.sh: ${#shards[@]} shards but $GPUS GPUs (one shard per GPU)" >&2
  exit 3
fi
gguf=$(PREPARE_ONLY=1 bash scripts/compare_device.sh | sed -n 's/^SMOA_MLX_GGUF=//p')
[ -n "$gguf" ] || exit 3
export SMOA_MLX_GGUF=$gguf SMOA_MLX_BIGBENCH=${SMOA_MLX_BIGBENCH:-$ROOT/.bigbench}
# 16 cores per GPU on the lent hosts: keep each shard's NumPy (spectral step) off the others' cores.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-4} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
LOGS=${LOGS:-/tmp/smoa-compare-logs}
pids=()
for i in "${!shards[@]}"; do
  task=${shards[$i]%%:*}
  methods=${shards[$i]#*:}
  mkdir -p "$LOGS/shard$i"
  CUDA_VISIBLE_DEVICES=$i TASKS=$task METHODS=$methods RESULTS=/tmp/smoa-compare-shard$i OUT="$LOGS/shard$i" \
    bash scripts/compare_device.sh > "$LOGS/shard$i/summary.txt" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || rc=1
  echo "== shard $i (${shards[$i]})"
  tail -n 25 "$LOGS/shard$i/summary.txt"
  if [ -f "/tmp/smoa-compare-shard$i/quality.json" ]; then
    mkdir -p "$OUT/shard$i"
    cp "/tmp/smoa-compare-shard$i/quality.json" "$OUT/shard$i/quality.json"
  fi
done
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
exit $rc
