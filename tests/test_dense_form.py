"""The dense (HiRA-form) pure-MLX path against float64 numpy, alone and with the base fused in by linear_fn."""

from __future__ import annotations

import mlx.core as mx
import pytest

from kernel_cases import check_against_float64, make_layer
from smoa_mlx.kernels import dense_form_delta_fn, linear_fn


@pytest.mark.parametrize("bits,blocks,branch", [(0, 3, None), (4, 4, [3, 0, 2, 3])])
def test_dense_form_matches_float64(bits, blocks, branch, monkeypatch):
    layer = make_layer(128, 150, 8, blocks, mx.float32, bits, 64, branch, seed=bits + blocks)
    check_against_float64(layer, dense_form_delta_fn(layer.layout), (2, 9), False, 1e-4)
    monkeypatch.setenv("SMOA_MLX_KERNEL", "dense")
    check_against_float64(layer, linear_fn(layer.layout), (2, 9), True, 1e-4)
