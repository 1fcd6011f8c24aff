"""Shared by the block-form tests: an SMoA layer with random orders and non-zero factors, and a float64 check of
its forward and gradients through any implementation of the ``fn(x, index, weight_parts, factors)`` contract."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from reference_numpy import ref_dequantize, ref_dequantize_fp, ref_layer
from smoa_mlx.kernels import factor_views
from smoa_mlx.layer import SMoALinear


def make_layer(d_in, d_out, rank, blocks, dtype=mx.float32, bits=0, group_size=64, branch_ranks=None, seed=0):
    """``bits``: 0 for a dense base, the bits of an affine-quantized one, or another MLX quantization mode by name
    ("mxfp4", "nvfp4", "mxfp8": their own group size and bits; ``group_size`` is then ignored)."""
    mx.random.seed(seed)
    base = nn.Linear(d_in, d_out, bias=False)
    base.set_dtype(dtype)
    if isinstance(bits, str):
        base = nn.QuantizedLinear.from_linear(base, mode=bits)
    elif bits:
        base = nn.QuantizedLinear.from_linear(base, group_size=group_size, bits=bits)
    rng = np.random.default_rng(seed)
    layer = SMoALinear.from_base(base, rank=rank, blocks=blocks, alpha=2.0 * rank, branch_ranks=branch_ranks,
                                 row_order=rng.permutation(d_out), col_order=rng.permutation(d_in))
    layer.case_dtype = dtype  # the activations' type: an mxfp4 / nvfp4 / mxfp8 base keeps no float array to tell it
    # Non-zero B (its init is zero), large enough that Delta W is comparable to W0: an error in the update cannot
    # hide under the base's share of y and dx.
    layer.smoa_b = [mx.random.normal(b.shape) * 3.0 for b in layer.smoa_b]
    return layer


def _f64(a: mx.array) -> np.ndarray:
    return np.asarray(a.astype(mx.float32), dtype=np.float64)


def base_weight(layer) -> np.ndarray:
    parts, layout = layer.weight_parts(), layer.layout
    if not layout.quantized:
        return _f64(parts[0])
    if not layout.affine:
        return ref_dequantize_fp(np.asarray(parts[0]), np.asarray(parts[1]), layout.group_size, layout.bits,
                                 layout.mode)
    if layout.bits in (2, 4, 8):
        return ref_dequantize(np.asarray(parts[0]), _f64(parts[1]), _f64(parts[2]), layout.group_size, layout.bits)
    # 3/5/6-bit values straddle the packed words; MLX's own dequantization in float32 stands in.
    return _f64(mx.dequantize(parts[0], parts[1].astype(mx.float32), parts[2].astype(mx.float32),
                              group_size=layout.group_size, bits=layout.bits))


def check_against_float64(layer, fn, lead, with_base: bool, tol: float, seed: int = 0) -> None:
    """fn's output and gradients (x, every A_k and B_k) within ``tol`` relative error of float64, all finite."""
    dtype = getattr(layer, "case_dtype", None) or layer.weight_parts()[-1].dtype
    d_out, d_in = layer.shape
    mx.random.seed(seed + 1)
    x = mx.random.normal((*lead, d_in)).astype(dtype)
    cot = mx.random.normal((*lead, d_out)).astype(dtype)
    k = layer.blocks
    y, (dx, dfactors) = mx.vjp(lambda x, f: fn(x, layer.index, layer.weight_parts(), f), [x, layer.smoa_factors],
                               [cot])
    da, db = factor_views(layer.layout, dfactors)
    got = [y[0], dx, *da, *db]
    want = ref_layer(base_weight(layer), _f64(x), _f64(cot), [_f64(a) for a in layer.smoa_a],
                     [_f64(b) for b in layer.smoa_b], k, layer.scale,
                     (np.asarray(layer.row_order), np.asarray(layer.col_order)), with_base)
    names = ["y", "dx"] + [f"dA{i}" for i in range(k)] + [f"dB{i}" for i in range(k)]
    for name, g, w in zip(names, got, want):
        assert g.size == w.size, f"{name}: {g.shape} vs {w.shape}"
        if w.size == 0:
            continue
        g = _f64(g).reshape(w.shape)
        assert np.isfinite(g).all(), f"{name}: non-finite values (an element never written?)"
        err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
