"""The dense (HiRA-form) pure-MLX path against float64 numpy, alone and with the base fused in by linear_fn."""

from __future__ import annotations

import mlx.core as mx
import pytest

from kernel_cases import check_against_float64, make_layer
from smoa_mlx.kernels import dense_form_delta_fn, linear_fn


@pytest.mark.parametrize("bits,blocks,branch,dtype", [
    (0, 3, None, mx.float32), (4, 4, [3, 0, 2, 3], mx.float32), ("mxfp4", 2, None, mx.float32),
    ("nvfp4", 3, None, mx.float16), ("mxfp8", 4, [3, 0, 2, 3], mx.float16)])
def test_dense_form_matches_float64(bits, blocks, branch, dtype, monkeypatch):
    seed = (len(bits) if isinstance(bits, str) else bits) + blocks
    layer = make_layer(128, 150, 8, blocks, dtype, bits, 64, branch, seed=seed)
    tol = 1e-2 if dtype == mx.float16 else 1e-4
    check_against_float64(layer, dense_form_delta_fn(layer.layout), (2, 9), False, tol)
    monkeypatch.setenv("SMOA_MLX_KERNEL", "dense")
    check_against_float64(layer, linear_fn(layer.layout), (2, 9), True, tol)
