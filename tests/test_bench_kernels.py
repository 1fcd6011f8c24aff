"""scripts/bench_kernels.py --across: the cross-run ratios that auto's size rules (GPU_BLOCK_MIN_WEIGHTS,
MERGED_BLOCK_GRADS_MIN_SAVING) are read from. Synthetic timings; nothing is timed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_kernels  # noqa: E402


def _row(d_out, d_in, k, block, dense, merged=None, merged_blocks=None):
    ms = {"smoa": block, "smoa_dense": dense}
    if merged is not None:
        ms.update(smoa_merged=merged, smoa_merged_blocks=merged_blocks)
    return {"d_out": d_out, "d_in": d_in, "blocks": k, "ms": ms}


def test_across_puts_each_runs_ratio_under_its_name():
    runs = {"old": {"bench": [_row(4096, 4096, 2, 2.0, 4.0, 3.0, 2.7), _row(1024, 4096, 2, 1.5, 1.0)]},
            "new": {"bench": [_row(4096, 4096, 2, 3.0, 4.0)]}}
    table = bench_kernels.across(runs)
    dropout, grads = table.split("Merged form")
    assert "| 4096x4096 | 16M | 2 | 0.50 | 0.75 |" in dropout  # block / dense, run by run
    assert "| 1024x4096 | 4M | 2 | 1.50 |  |" in dropout  # a shape one run lacks: an empty cell
    assert dropout.index("4096x4096") < dropout.index("1024x4096")  # largest layers first
    # Block grads / full grads by the saving 4096 * 4096 / 2 / 8192 = 1024; the run without merged timings is empty.
    assert "| 4096x4096 | 2 | 1024 | 0.90 |  |" in grads
    assert "1024x4096" not in grads
