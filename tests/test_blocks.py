"""The block-major form (kernels/blocks.py) with its steps in plain MLX, against float64 numpy: the algorithm the
GPU kernels run (their Metal rendering: test_kernels_metal_shim.py), checked on the CPU."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from kernel_cases import check_against_float64, make_layer
from smoa_mlx.kernels.blocks import MlxOps, _pack, block_fn
from smoa_mlx.kernels.dense import dense_delta, full_factors, split_factor_grads
from smoa_mlx.kernels.plan import build_plan, padded_dims, plan_of, untake_grads

CASES = [
    # d_in, d_out, rank, blocks, dtype, bits, group_size, branch_ranks, lead shape
    pytest.param(70, 150, 6, 3, mx.float32, 0, 64, None, (2, 37), id="dense-f32-K3-ragged"),
    pytest.param(128, 96, 8, 2, mx.float16, 4, 32, None, (20,), id="q4-f16-K2"),
    pytest.param(128, 72, 8, 4, mx.float32, 8, 64, [3, 0, 2, 3], (9,), id="q8-f32-K4-zero-rank-block"),
    pytest.param(128, 40, 5, 1, mx.float32, 2, 32, None, (11,), id="q2-f32-K1"),
    pytest.param(192, 50, 6, 2, mx.float32, 3, 64, None, (7,), id="q3-f32-K2"),
    pytest.param(128, 96, 8, 2, mx.float16, "mxfp4", 0, None, (20,), id="mxfp4-f16-K2"),
    pytest.param(64, 70, 6, 3, mx.float32, "nvfp4", 0, [3, 0, 3], (2, 9), id="nvfp4-f32-K3-zero-rank-block"),
    pytest.param(128, 40, 5, 1, mx.float32, "mxfp8", 0, None, (11,), id="mxfp8-f32-K1"),
]


@pytest.mark.parametrize("with_base", [True, False], ids=["fused-base", "update-alone"])
@pytest.mark.parametrize("d_in,d_out,rank,blocks,dtype,bits,gs,branch,lead", CASES)
def test_block_form_matches_float64(d_in, d_out, rank, blocks, dtype, bits, gs, branch, lead, with_base):
    layer = make_layer(d_in, d_out, rank, blocks, dtype, bits, gs, branch, seed=d_in + d_out)
    tol = 1e-2 if dtype == mx.float16 else 1e-4
    check_against_float64(layer, block_fn(layer.layout, MlxOps(), with_base), lead, with_base, tol)


def test_plan_is_a_sorted_partition_and_the_factor_packing_round_trips():
    layer = make_layer(37, 29, 7, 3, branch_ranks=[4, 0, 3], seed=3)
    layout, plan = layer.layout, plan_of(layer.layout, layer.index)
    K, M, N, R = padded_dims(layout)
    assert (K, M, N, R) == (3, 16, 16, 4)  # 10 and 13 rounded up to multiples of 8
    for src, slot, groups, width in ((plan.row_src, plan.row_slot, layer.row_groups, M),
                                     (plan.col_src, plan.col_slot, layer.col_groups, N)):
        src, slot = np.asarray(src).reshape(K, width), np.asarray(slot)
        for k, group in enumerate(groups):
            n = group.size
            np.testing.assert_array_equal(src[k, :n], np.sort(np.asarray(group)))  # ascending within the block
            assert (src[k, n:] == -1).all()
            np.testing.assert_array_equal(slot[src[k, :n]], k * width + np.arange(n))
    a_pad, b_pad = _pack(layout, plan, layer.smoa_factors)
    assert a_pad.shape == (K, R, N) and b_pad.shape == (K, M, R)
    unpacked = untake_grads(plan.a_back, a_pad, plan.b_back, b_pad, layer.smoa_factors)
    assert mx.array_equal(unpacked, layer.smoa_factors).item()
    # The padding is zero, and the plan a layer carries equals one built from its orders.
    assert float(mx.abs(a_pad[1]).sum()) == 0.0 and float(mx.abs(b_pad[0, layout.row_sizes[0]:]).sum()) == 0.0
    rebuilt = build_plan(layout, np.asarray(layer.row_order), np.asarray(layer.col_order))
    for got, want in zip(plan, rebuilt):
        assert mx.array_equal(got, want).item()


def test_layer_paths_agree(monkeypatch):
    """SMoALinear: the fused call (no dropout) and the update-alone call (dropout while training) against the
    dense Delta W."""
    monkeypatch.setenv("SMOA_MLX_KERNEL", "mlx")
    base = nn.Linear(48, 40, bias=True)
    rng = np.random.default_rng(0)
    from smoa_mlx.layer import SMoALinear

    layer = SMoALinear.from_base(base, rank=6, blocks=2, dropout=0.5, row_order=rng.permutation(40),
                                 col_order=rng.permutation(48))
    layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    x = mx.random.normal((3, 48))
    delta_w = dense_delta(layer.layout, layer.index, layer.weight_parts(), layer.smoa_factors)
    want = base(x) + x @ delta_w.T
    layer.eval()  # dropout off: the fused path, bias added outside
    assert mx.allclose(layer(x), want, atol=1e-5).item()
    layer.train()
    mx.random.seed(5)
    y = layer(x)  # dropout on the update path only: base(x) is untouched
    mx.random.seed(5)
    dropped = layer.dropout(x)
    want = base(x) + dropped @ delta_w.T
    assert mx.allclose(y, want, atol=1e-5).item()


def test_whole_weight_factors_round_trip_and_give_the_dense_update():
    """B_full and A_full come from one take each way: their product modulates W0 into dense_delta, and the take back
    returns every factor unchanged (a zero-rank block and ragged groups included)."""
    layer = make_layer(37, 29, 7, 3, branch_ranks=[4, 0, 3], seed=5)
    layout = layer.layout
    b_full, a_full = full_factors(layout, layer.index, layer.smoa_factors)
    assert b_full.shape == (29, 7) and a_full.shape == (7, 37)
    w0 = np.asarray(layer.linear.weight, dtype=np.float64)
    want = np.asarray(dense_delta(layout, layer.index, layer.weight_parts(), layer.smoa_factors))
    got = layout.scale * (np.asarray(b_full, np.float64) @ np.asarray(a_full, np.float64)) * w0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    back = split_factor_grads(layout, layer.index, b_full, a_full, layer.smoa_factors)
    assert mx.array_equal(back, layer.smoa_factors).item()
