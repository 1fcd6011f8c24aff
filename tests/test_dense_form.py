"""The dense (HiRA-form) pure-MLX path computes the same update and gradients as the block-form reference."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from smoa_mlx.kernels.reference import dense_form_delta_fn, reference_delta_fn
from smoa_mlx.layer import SMoALinear


@pytest.mark.parametrize("bits,blocks,branch", [(0, 3, None), (4, 4, [3, 0, 2, 3])])
def test_dense_form_matches_block_form(bits, blocks, branch):
    base = nn.Linear(128, 150)
    if bits:
        base = nn.QuantizedLinear.from_linear(base, group_size=64, bits=bits)
    rng = np.random.default_rng(bits + blocks)
    layer = SMoALinear.from_base(base, rank=8, blocks=blocks, alpha=16, branch_ranks=branch,
                                 row_order=rng.permutation(150), col_order=rng.permutation(128))
    layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    x, cot = mx.random.normal((2, 9, 128)), mx.random.normal((2, 9, 150))
    results = []
    for fn in (reference_delta_fn(layer.layout), dense_form_delta_fn(layer.layout)):
        y, grads = mx.vjp(
            lambda x, *p: fn(x, layer.index, layer.weight_parts(), list(p[:blocks]), list(p[blocks:])),
            [x, *layer.smoa_a, *layer.smoa_b], [cot],
        )
        results.append([y[0], *grads])
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape
        if want.size:
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
