#!/usr/bin/env bash
# Puts BIG-bench's Social IQa and WinoWhy task files (Apache-2.0) into .bigbench/ (git-ignored), where
# smoa_mlx.eval.bigbench.data_root() finds them: taken unchanged from the bigbench==1.0.0 sdist on PyPI, checked by hash.
# Used by .ci/run and by anyone running scripts/compare.py without the shared data folder.
#   bash scripts/fetch_bigbench.sh [DEST]      (default: .bigbench in the repository root)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.bigbench}
PY=${PYTHON:-python3}
declare -A SHA=(
  [social_iqa]=edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348
  [winowhy]=c36fa38ab146fd7cc60e9f4b7a34c979c5ffbcb4a6870302bf8d785fbe64d1f6
)
ok=1
for t in "${!SHA[@]}"; do
  [ -f "$DEST/$t.json" ] && echo "${SHA[$t]}  $DEST/$t.json" | sha256sum -c --quiet - 2>/dev/null || ok=0
done
if [ "$ok" = 1 ]; then echo "fetch_bigbench: $DEST already holds both tasks"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Straight from PyPI's simple index (the sdist's own sha256 is in the link): `pip download` of this sdist fails on
# newer pips, which prepare its metadata, and that declares a direct-URL dependency.
"$PY" - "$tmp" <<'PY'
import hashlib, re, sys, urllib.request
page = urllib.request.urlopen("https://pypi.org/simple/bigbench/", timeout=60).read().decode()
url, sha = re.search(r'href="([^"#]*/bigbench-1\.0\.0\.tar\.gz)#sha256=([0-9a-f]+)"', page).groups()
dest = f"{sys.argv[1]}/bigbench-1.0.0.tar.gz"
urllib.request.urlretrieve(url, dest)
with open(dest, "rb") as f:
    got = hashlib.sha256(f.read()).hexdigest()
if got != sha:
    sys.exit(f"fetch_bigbench: {url} has sha256 {got}, the index says {sha}")
PY
tar -xzf "$tmp"/bigbench-1.0.0.tar.gz -C "$tmp" --wildcards \
  '*/benchmark_tasks/social_iqa/task.json' '*/benchmark_tasks/winowhy/task.json'
mkdir -p "$DEST"
for t in "${!SHA[@]}"; do
  src=$(find "$tmp" -path "*/benchmark_tasks/$t/task.json")
  echo "${SHA[$t]}  $src" | sha256sum -c --quiet -
  cp "$src" "$DEST/$t.json.part" && mv "$DEST/$t.json.part" "$DEST/$t.json"
done
echo "fetch_bigbench: wrote $DEST/social_iqa.json and $DEST/winowhy.json"
