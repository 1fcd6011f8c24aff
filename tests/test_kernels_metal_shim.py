"""The Metal rendering of the SMoA kernels, proven on the CPU: MLX's generated Metal source, compiled by g++
against tests/metal_shim/shim.h and run under its threadgroup emulator, must equal the pure-MLX path."""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from smoa_mlx.kernels import fused, reference, source
from smoa_mlx.layer import SMoALinear

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the Metal shim")


def _layer(d_in, d_out, rank, blocks, dtype, bits=0, group_size=64, branch_ranks=None):
    base = nn.Linear(d_in, d_out, bias=False)
    if bits:
        base = nn.QuantizedLinear.from_linear(base, group_size=group_size, bits=bits)
    base.set_dtype(dtype)
    rng = np.random.default_rng(d_in * 7 + d_out)
    rows, cols = rng.permutation(d_out), rng.permutation(d_in)
    layer = SMoALinear.from_base(base, rank=rank, blocks=blocks, alpha=2.0 * rank, branch_ranks=branch_ranks,
                                 row_order=rows, col_order=cols)
    # Non-zero B (its init is zero) so the update and every gradient are non-trivial.
    layer.smoa_b = [mx.random.normal(b.shape) * 0.3 for b in layer.smoa_b]
    return layer


def _close(got, want, tol):
    got, want = np.asarray(got.astype(mx.float32)), np.asarray(want.astype(mx.float32))
    assert not np.isnan(got).any(), "kernel left elements unwritten (NaN poison survived)"
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
    assert err < tol, f"relative error {err:.2e} >= {tol}"


CASES = [
    # d_in, d_out, rank, blocks, dtype, bits, group_size, branch_ranks, tokens (lead shape)
    pytest.param(70, 150, 6, 3, mx.float32, 0, 64, None, (2, 37), id="dense-f32-K3-edge-tiles"),
    pytest.param(128, 96, 8, 2, mx.float16, 4, 32, None, (20,), id="q4-f16-K2"),
    pytest.param(128, 72, 8, 4, mx.float32, 8, 64, [3, 0, 2, 3], (9,), id="q8-f32-K4-zero-rank-block"),
]


@pytest.mark.parametrize("d_in,d_out,rank,blocks,dtype,bits,gs,branch,lead", CASES)
def test_metal_rendering_matches_reference(d_in, d_out, rank, blocks, dtype, bits, gs, branch, lead):
    from metal_emulator import run_launch

    mx.random.seed(d_in + d_out)
    layer = _layer(d_in, d_out, rank, blocks, dtype, bits, gs, branch)
    x = mx.random.normal((*lead, d_in)).astype(dtype)
    args = (x, layer.index, layer.weight_parts(), layer.smoa_a, layer.smoa_b)
    tol = 2e-3 if dtype == mx.float16 else 1e-5

    y = fused.forward(run_launch, layer.layout, *args)
    _close(y, reference._forward(layer.layout, *args), tol)

    cot = mx.random.normal(y.shape).astype(dtype)
    dx, da, db = fused.backward(run_launch, layer.layout, *args, cot)
    dx_ref, da_ref, db_ref = reference._backward(layer.layout, *args, cot)
    _close(dx, dx_ref, tol)
    for k, r_k in enumerate(layer.ranks):
        assert da[k].shape == da_ref[k].shape and db[k].shape == db_ref[k].shape
        if r_k:
            _close(da[k], da_ref[k], tol)
            _close(db[k], db_ref[k], tol)


def test_one_body_renders_both_backends():
    """The Metal and CUDA kernels differ only in the vocabulary spellings, never in the computation."""
    for kernel in ("modmm", "grad"):
        for quantized in (False, True):
            metal = source.render(kernel, "metal", quantized)
            cuda = source.render(kernel, "cuda", quantized)
            assert metal.input_names == cuda.input_names and metal.output_names == cuda.output_names
            assert "threadgroup_barrier" in metal.source and "__syncthreads()" in cuda.source
            assert "__syncthreads" not in metal.source and "threadgroup_barrier" not in cuda.source
            spell = {**{v: k for k, v in source._VOCAB["metal"].items()}}
            cuda_spell = {v: k for k, v in source._VOCAB["cuda"].items()}
            back_m, back_c = metal.source, cuda.source
            for spelled, token in sorted(spell.items(), key=lambda kv: -len(kv[0])):
                back_m = back_m.replace(spelled, token)
            for spelled, token in sorted(cuda_spell.items(), key=lambda kv: -len(kv[0])):
                back_c = back_c.replace(spelled, token)
            assert back_m == back_c
            assert "SMOA_MMA(" in metal.source and "#define SMOA_MMA" in metal.header and "#define SMOA_MMA" in cuda.header
