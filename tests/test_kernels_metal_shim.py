"""The Metal rendering of the SMoA kernels, proven on the CPU: MLX's generated Metal source, compiled by g++
against tests/metal_shim/shim.h and run under its threadgroup emulator (outputs poisoned with NaN first), inside the
block form's forward and custom VJP, must match float64 numpy: ragged groups, a zero-rank block, K = 1, dense and
2/4/8-bit bases (3-bit: the kernels' gathers with plain-MLX anchors), float16/bfloat16/float32, gradients included."""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest

from kernel_cases import check_against_float64, make_layer
from smoa_mlx.kernels import source
from smoa_mlx.kernels.blocks import KernelOps, block_fn

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the Metal shim")

CASES = [
    # d_in, d_out, rank, blocks, dtype, bits, group_size, branch_ranks, lead shape, with_base
    pytest.param(70, 150, 6, 3, mx.float32, 0, 64, None, (2, 37), True, id="dense-f32-K3-ragged"),
    pytest.param(128, 96, 8, 2, mx.float16, 4, 32, None, (20,), True, id="q4-f16-K2"),
    pytest.param(128, 72, 8, 4, mx.bfloat16, 8, 64, [3, 0, 2, 3], (9,), True, id="q8-bf16-K4-zero-rank-block"),
    pytest.param(128, 40, 5, 1, mx.bfloat16, 2, 32, None, (11,), False, id="q2-bf16-K1-update-alone"),
    pytest.param(96, 64, 40, 2, mx.float16, 0, 64, None, (5,), False, id="dense-f16-rank20-per-block"),
    pytest.param(192, 50, 6, 2, mx.float32, 3, 64, None, (7,), True, id="q3-f32-mlx-anchors"),
]
TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 3e-2}


@pytest.mark.parametrize("d_in,d_out,rank,blocks,dtype,bits,gs,branch,lead,with_base", CASES)
def test_metal_rendering_matches_float64(d_in, d_out, rank, blocks, dtype, bits, gs, branch, lead, with_base):
    from metal_emulator import run_launch

    layer = make_layer(d_in, d_out, rank, blocks, dtype, bits, gs, branch, seed=d_in + d_out)
    fn = block_fn(layer.layout, KernelOps(run_launch), with_base)
    check_against_float64(layer, fn, lead, with_base, TOL[dtype])


def test_one_body_renders_both_backends():
    """The Metal and CUDA kernels differ only in the vocabulary spellings, never in the computation."""
    for kernel in source.KERNELS:
        for quantized in (False, True):
            metal = source.render(kernel, "metal", quantized)
            cuda = source.render(kernel, "cuda", quantized)
            assert metal.input_names == cuda.input_names and metal.output_names == cuda.output_names
            assert "thread_position_in_grid" in metal.source and "blockIdx" in cuda.source
            assert "blockIdx" not in metal.source and "thread_position_in_grid" not in cuda.source
            back = []
            for text, backend in ((metal.source, "metal"), (cuda.source, "cuda")):
                for token, spelled in sorted(source._VOCAB[backend].items(), key=lambda kv: -len(kv[1])):
                    text = text.replace(spelled, token)
                back.append(text)
            assert back[0] == back[1]
    with pytest.raises(ValueError, match="unknown SMoA kernel"):
        source.render("fused", "metal")
