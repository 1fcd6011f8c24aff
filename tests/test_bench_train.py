"""scripts/bench_train.py's rounds mode: the end-to-end comparison that the device rounds rely on.

The H200 moved 13-14% between processes running the same configuration (docs/BENCHMARKS.md), so the figures that
decide issue #11 come from alternating windows in one process, each SMoA window compared with the LoRA window of its
round. These check that pairing and the peak-memory estimate on a tiny model; nothing is timed against a bound.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_train  # noqa: E402


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setattr(bench_train, "MODEL", dict(bench_train.MODEL, **bench_train.SHAPES["tiny"]))
    # child_rounds sets these per method: restored after the test
    for name, value in (("SMOA_MLX_KERNEL", "auto"), ("SMOA_MLX_MERGED_KEEP", "0"), ("SMOA_MLX_MERGE_KERNEL", "1")):
        monkeypatch.setenv(name, value)


def test_rounds_alternate_the_methods_and_estimate_each_peak_alone(tiny_shape):
    runs = bench_train.child_rounds(["lora", "smoa"], 0, 16, 2, rounds=2, window=4, batch=2, seq=16,
                                    dtype="float32")
    assert [(r["round"], r["method"]) for r in runs] == [(0, "lora"), (0, "smoa"), (1, "smoa"), (1, "lora")]
    for r in runs:
        assert r["tokens_per_second"] > 0
        assert r["iters"] == 4 and r["losses"][-1][0] == 4  # the window's own iterations, reported
        # The other model's parameters and Adam state are subtracted, and only they: the estimate is below the
        # shared peak but still holds this model's weights.
        assert 0 < r["peak_memory_gb"] < r["peak_memory_shared_gb"]
    assert {r["trainable"] for r in runs} == {runs[0]["trainable"]}  # equal trainable parameters at r / K
    # Each model's start-up, timed in parts; only SMoA probes the GPU kernels (on this CPU the probe returns at once).
    steps = {r["method"]: set(r["startup_s"]) for r in runs}
    assert steps == {"lora": {"base_s", "adapters_s", "split_s", "warmup_s"},
                     "smoa": {"base_s", "probe_s", "adapters_s", "split_s", "warmup_s"}}
    table = bench_train.markdown(dict(command="test", runs=runs))
    assert "| base | K | method | base | probe | adapters | split | warmup |" in table
    assert table.count("| float32 | 2 |") == 4  # the two methods' rows, and their start-up rows once each


def test_markdown_pairs_each_round_with_its_own_lora():
    def run(method, rnd, tps, peak=1.0):
        return dict(method=method, bits=0, blocks=2, rank=16, trainable=10, round=rnd, tokens_per_second=tps,
                    peak_memory_gb=peak, dtype="bfloat16")

    data = dict(command="test", runs=[run("lora", 0, 100.0), run("smoa", 0, 90.0, 0.5),
                                      run("lora", 1, 50.0), run("smoa", 1, 55.0, 0.5)])
    row = next(line for line in bench_train.markdown(data).splitlines() if "| smoa" in line)
    # Per-round ratios 0.90 and 1.10 (median 1.00), not the ratio of medians (72.5 / 75 = 0.97).
    assert "| 1.00x (0.90-1.10, n=2) |" in row
    assert "| 72 (55-90, n=2) |" in row  # tokens/s: median and range over the rounds


def test_each_method_traces_with_its_own_environment(monkeypatch):
    """A method's step is traced with its own switches, whatever method ran before it in the same process."""
    names = ("SMOA_MLX_KERNEL", "SMOA_MLX_MERGED_KEEP", "SMOA_MLX_MERGE_KERNEL")
    for name in names:
        monkeypatch.setenv(name, "")  # restored after the test
    bench_train._use("smoa-keep")
    assert [os.environ[n] for n in names] == ["auto", "1", "1"]
    bench_train._use("smoa-mlx-merge")
    assert [os.environ[n] for n in names] == ["auto", "0", "0"]
    bench_train._use("smoa")
    assert [os.environ[n] for n in names] == ["auto", "0", "1"]
