"""The size of the compiled training step: SMoA's adapted layer must not creep back towards twice LoRA's kernels.

Every graph node is host work per step and every non-view node a kernel launch on a GPU; with dozens of adapted
layers that is what separates a layer that is fast alone from a model that trains fast (docs/BENCHMARKS.md, host-side
cost). Counted by scripts/bench_graph.py on a 2-layer tiny llama: deterministic for a given MLX, nothing timed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_graph  # noqa: E402

SHAPE = dict(bench_graph.TINY, num_hidden_layers=2)


def _kernels_per_adapted_layer(method: str, monkeypatch) -> float:
    kind, blocks, kernel = bench_graph._config(method)
    monkeypatch.setenv("SMOA_MLX_KERNEL", kernel)
    model, args = bench_graph._model(kind, blocks, SHAPE)
    counts = bench_graph._count(bench_graph._step(model, args, 1, 8)())
    return bench_graph._kernels(counts) / (SHAPE["num_hidden_layers"] * len(bench_graph.bench_train.TARGETS))


@pytest.mark.parametrize("blocks", [2, 4])
def test_merged_form_adds_few_kernels_per_adapted_layer(blocks, monkeypatch):
    lora = _kernels_per_adapted_layer(f"lora-k{blocks}", monkeypatch)
    smoa = _kernels_per_adapted_layer(f"smoa-merged-k{blocks}", monkeypatch)
    # Measured with MLX 0.32.4: +9.7 kernels per adapted layer at K = 2 and 4 (two takes each way and back, the
    # factor concatenations, the index passes, the second merge pass); +21.9 before the plan arrays were split
    # and the backward's rebuild pinned to the cotangent. A K-dependent count would mean per-block work crept in.
    assert smoa - lora < 12
