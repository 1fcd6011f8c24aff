"""The merged form (x (W0 + Delta W)^T, rebuilt per call) against float64 numpy, in plain MLX and with the Metal
rendering of its kernels (the merge kernel, the block gradients' gathers and Hadamard product) under the CPU shim,
with both ways of forming the factor gradients."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import check_against_float64, make_layer
from smoa_mlx.kernels.blocks import KernelOps, MlxOps
from smoa_mlx.kernels.merged import merged_fn
from smoa_mlx.kernels.plan import plan_of

TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 3e-2}
CASES = [
    # d_in, d_out, rank, blocks, dtype, bits, group_size, branch ranks
    pytest.param(128, 150, 8, 3, mx.float32, 0, 64, None, id="dense-f32-K3-ragged"),
    pytest.param(128, 96, 8, 2, mx.float16, 4, 32, None, id="q4-f16-K2"),
    pytest.param(128, 72, 8, 4, mx.bfloat16, 8, 64, [3, 0, 2, 3], id="q8-bf16-K4-zero-rank-block"),
    pytest.param(128, 40, 5, 1, mx.bfloat16, 2, 32, None, id="q2-bf16-K1"),
    pytest.param(96, 64, 40, 2, mx.float16, 0, 64, None, id="dense-f16-rank40"),  # fewer columns per thread
    pytest.param(192, 50, 6, 2, mx.float32, 3, 64, None, id="q3-f32-mlx-anchors"),
    pytest.param(136, 48, 8, 4, mx.bfloat16, 0, 64, None, id="dense-bf16-K4-vec8"),  # 16-byte merge vectors
    pytest.param(75, 33, 6, 3, mx.float16, 0, 64, None, id="dense-f16-odd-width"),  # the merge's scalar fallback
    # Blocks of 17 and 16 rows padded to 24: the shorter block's second group of merge rows is all padding.
    pytest.param(64, 33, 6, 2, mx.float32, 4, 32, None, id="q4-f32-K2-padding-group"),
    # MLX's other quantization modes (no biases; their own group size and bits): plain-MLX anchors, as 3-bit.
    pytest.param(128, 96, 8, 2, mx.float32, "mxfp4", 0, None, id="mxfp4-f32-K2"),
    pytest.param(64, 70, 6, 3, mx.float16, "mxfp4", 0, None, id="mxfp4-f16-K3-ragged"),
    pytest.param(128, 72, 8, 4, mx.float32, "nvfp4", 0, [3, 0, 2, 3], id="nvfp4-f32-K4-zero-rank-block"),
    pytest.param(96, 64, 6, 2, mx.float16, "nvfp4", 0, None, id="nvfp4-f16-K2"),
    pytest.param(96, 40, 5, 1, mx.float32, "mxfp8", 0, None, id="mxfp8-f32-K1"),
    pytest.param(128, 96, 8, 2, mx.float16, "mxfp8", 0, None, id="mxfp8-f16-K2"),
]


@pytest.mark.parametrize("block_grads", [False, True], ids=["full-grads", "block-grads"])
@pytest.mark.parametrize("d_in,d_out,rank,blocks,dtype,bits,gs,branch", CASES)
def test_plain_mlx_matches_float64(d_in, d_out, rank, blocks, dtype, bits, gs, branch, block_grads):
    layer = make_layer(d_in, d_out, rank, blocks, dtype, bits, gs, branch, seed=d_in + d_out)
    check_against_float64(layer, merged_fn(layer.layout, MlxOps(), block_grads), (2, 7), True, TOL[dtype])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the Metal shim")
@pytest.mark.parametrize("block_grads", [False, True], ids=["full-grads", "block-grads"])
@pytest.mark.parametrize("d_in,d_out,rank,blocks,dtype,bits,gs,branch", CASES)
def test_metal_rendering_matches_float64(d_in, d_out, rank, blocks, dtype, bits, gs, branch, block_grads):
    from metal_emulator import run_launch

    launched, quantized = [], []

    def run(launch):
        launched.append(launch.kernel)
        quantized.append(launch.quantized)
        return run_launch(launch)

    layer = make_layer(d_in, d_out, rank, blocks, dtype, bits, gs, branch, seed=d_in + d_out)
    check_against_float64(layer, merged_fn(layer.layout, KernelOps(run), block_grads), (2, 7), True, TOL[dtype])
    # W0 + Delta W comes from the merge kernel wherever the kernels read the base (dense, 2/4/8-bit affine); the
    # block gradients use the gather and Hadamard kernels. 3-bit words straddle, and the mxfp4 / nvfp4 / mxfp8 arrays
    # are not the kernels' affine words: MLX's merge and plain-MLX anchors there by design, the gathers all the same.
    reads = bits in (0, 2, 4, 8)
    assert launched.count("merge") == (2 if reads else 0)  # the forward's and the backward's
    assert ("gather" in launched) == block_grads
    assert ("hadamard" in launched) == (block_grads and reads)
    assert any(quantized) == (bits in (2, 4, 8))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the Metal shim")
@pytest.mark.parametrize("dtype,bits,branch", [(mx.bfloat16, 0, None), (mx.float16, 4, [4, 0, 2]),
                                               (mx.float32, 2, None)], ids=["dense-bf16", "q4-f16-zero-rank", "q2-f32"])
def test_merge_kernel_is_the_fused_weight(dtype, bits, branch):
    """The merge kernel's W0 + Delta W against fused_weight's (the fuse command's: float32 rank-r product, rounded
    once): the same formula. On a dense base at most one unit in the last place apart (the rank sums' order), and
    every entry outside the diagonal blocks W0 itself, bit for bit; a quantized base is dequantized in float32 in
    the kernel and in the activations' type by MLX, so there within a few units of the type at W0's scale."""
    from metal_emulator import run_launch

    from smoa_mlx.kernels import fused_weight
    from smoa_mlx.kernels.dense import full_factors, full_weight

    layer = make_layer(128, 96, 6, 3, dtype, bits, 32, branch, seed=3)
    layout, index, parts = layer.layout, layer.index, layer.weight_parts()
    full = full_factors(layout, index, layer.smoa_factors, mx.float32)  # fused_weight's product is float32
    got = KernelOps(run_launch).merge(layout, plan_of(layout, index), parts, *full, dtype)
    want = fused_weight(layout, index, parts, layer.smoa_factors, dtype)
    w0 = full_weight(parts, layout).astype(dtype)
    outside = np.asarray(layer.delta_weight()) == 0  # Delta W's zeros: off the blocks (and the zero-rank block)
    assert 0.5 < outside.mean() < 0.9
    if not bits:
        ints = {mx.float32: mx.int32, mx.float16: mx.int16, mx.bfloat16: mx.int16}[dtype]
        g, w = (np.asarray(a.view(ints)).astype(np.int64) for a in (got, want))
        assert np.abs(g - w).max() <= 1
        assert (g[outside] == np.asarray(w0.view(ints))[outside]).all()
        return
    g, w, w0 = (np.asarray(a.astype(mx.float32)) for a in (got, want, w0))
    unit = np.abs(w).max() * {mx.float32: 2.0**-23, mx.float16: 2.0**-10}[dtype]
    assert np.abs(g - w).max() <= 4 * unit
    assert np.abs(g - w0)[outside].max() <= 4 * unit


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the Metal shim")
def test_keep_builds_the_weight_with_mlx_ops_the_compiler_can_share():
    """SMOA_MLX_MERGED_KEEP's reuse rests on mx.compile merging the forward's and the backward's W0 + Delta W, which
    it does for MLX's own primitives and never for a custom kernel: with keep, no merge kernel is launched, and the
    result still matches float64 (the block gradients' kernels run as without keep)."""
    from metal_emulator import run_launch

    launched = []

    def run(launch):
        launched.append(launch.kernel)
        return run_launch(launch)

    layer = make_layer(128, 96, 8, 2, mx.float32, 0, 64, None, seed=11)
    fn = merged_fn(layer.layout, KernelOps(run), True, keep=True)
    check_against_float64(layer, fn, (2, 7), True, TOL[mx.float32])
    assert "merge" not in launched and "gather" in launched
