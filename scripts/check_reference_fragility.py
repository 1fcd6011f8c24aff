"""How stable is the reference's recomputed SMoA grouping? float32 (torch, numpy) vs float64 orders on real weights.

The reference format stores no groups; the reference recomputes them from W0 with a float32 SVD wherever it loads
the adapter. This counts, per module of the embedded SmolLM2-135M, the positions where torch's float32 order,
numpy's float32 order and the float64 order disagree, the near-tied adjacent scores, and the coordinates that
change group at K blocks. Writes benchmarks/reference_fragility.json.

    python scripts/check_reference_fragility.py --layers 3 --blocks 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from smoa_mlx.adapters import get_module, target_paths
from smoa_mlx.convert.reference_smoa import NEAR_TIE, reference_orders
from smoa_mlx.models.embedded import load_embedded
from smoa_mlx.spectral import spectral_scores, split_sizes


def _group_changes(a: np.ndarray, b: np.ndarray, blocks: int) -> int:
    edges = np.cumsum([0] + split_sizes(len(a), blocks))
    return sum(len(set(a[s:e]) - set(b[s:e])) for s, e in zip(edges[:-1], edges[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3])
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reference_fragility.json"))
    args = parser.parse_args()
    model, _ = load_embedded(mx.float32)
    rows = []
    for path in target_paths(model, args.targets):
        if int(path.split(".")[2]) not in args.layers:
            continue
        w = np.asarray(get_module(model, path).weight.astype(mx.float32))
        t0 = time.perf_counter()
        torch32 = reference_orders(w, use_torch=True)
        numpy32 = reference_orders(w, use_torch=False)
        scores = spectral_scores(w)
        for side, t, n, s in zip(("rows", "cols"), torch32, numpy32, scores):
            o64 = np.argsort(s, kind="stable")
            ranked = np.sort(s)
            row = {
                "module": path,
                "side": side,
                "size": len(s),
                "torch32_vs_float64_positions": int((t != o64).sum()),
                "numpy32_vs_torch32_positions": int((n != t).sum()),
                "near_ties": int((np.diff(ranked) < NEAR_TIE * np.abs(ranked).max()).sum()),
                f"group_changes_K{args.blocks}_torch32_vs_float64": _group_changes(t, o64, args.blocks),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    args.out.write_text(json.dumps({"command": command, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
                                    "near_tie_relative_gap": NEAR_TIE, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
