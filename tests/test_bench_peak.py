"""scripts/bench_peak.py: a compiled step over a residual chain keeps about one activation per layer (the layer's
input, which its backward needs), not a second one (a layer's output kept to its backward would be). Memory, not
time: the figures are counts of MLX's allocations, the same on every run of one machine. (A weight kept per layer
is test_layer.py's concern: here it would be 1/8 of an activation.)"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_peak  # noqa: E402


@pytest.mark.parametrize("bits", [0, 4])
def test_chain_keeps_one_activation_per_layer(bits):
    width, tokens = 256, 2048
    activation = width * tokens * 4
    # From 4 layers on: shorter chains show the ends' transients (2 -> 6 layers measured 1.27-1.32 per layer).
    p4, p16 = (bench_peak.extra_peak(n, bits, width, tokens, mx.float32) / activation for n in (4, 16))
    assert 0.8 < (p16 - p4) / 12 < 1.5  # 1.01 measured; a layer's output kept to its backward would make it 2
