"""The SMoA update in plain MLX through full-size products: the dense HiRA form, and the dense Delta W itself.

:func:`dense_form_delta_fn` computes the update as HiRA does: no gathers, three full matmuls, a transient
d_out x d_in product rebuilt in the backward. It is the fastest form on the CPU (BLAS matmuls beat MLX's CPU takes)
and on a GPU for small layers, where the block form's extra passes cost more than its saved FLOPs
(docs/BENCHMARKS.md). :func:`dense_delta` is the merged Delta W for fusing and checks. The anchors W0[R_k, C_k] are
read from the base weight (dequantized on the fly for quantized bases), never stored.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from .plan import (BlockLayout, LayerFn, LayerIndex, WeightParts, after_factor_grads, after_input, factor_views,
                   plan_of, untake_grads, vjp_primals, whole_weight_factors)


# mxfp4, nvfp4 and mxfp8 bases hold no float array of their own (their scales are 8-bit codes), so they dequantize
# to bfloat16, MLX's own default for them, and exactly: each value is a 2- or 4-bit significand times a power of two
# (e8m0 scales) or an e4m3 scale, at most 6 significant bits where bfloat16 holds 8, and within its exponent range
# (mxfp8's subnormals below 1e-40 aside). What reads them casts to float32 or the activations' type.
FP_MODE_DTYPE = mx.bfloat16


def dequantize(weight_parts: WeightParts, group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """A quantized weight's arrays (w, scales[, biases]) as a dense array: affine in its scales' dtype, the modes
    without biases in bfloat16 (:data:`FP_MODE_DTYPE`)."""
    if mode == "affine":
        w, scales, biases = weight_parts
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
    w, scales = weight_parts
    return mx.dequantize(w, scales, None, group_size=group_size, bits=bits, mode=mode, dtype=FP_MODE_DTYPE)


def gather_rows(weight_parts: tuple[mx.array, ...], rows: mx.array, layout: BlockLayout) -> mx.array:
    """Rows of the base weight, dequantized when the base is quantized (|rows| x d_in)."""
    if not layout.quantized:
        return mx.take(weight_parts[0], rows, axis=0)
    return dequantize(tuple(mx.take(p, rows, axis=0) for p in weight_parts), layout.group_size, layout.bits,
                      layout.mode)


def gather_anchor(weight_parts: tuple[mx.array, ...], rows: mx.array, cols: mx.array, layout: BlockLayout) -> mx.array:
    """W0[rows, cols], read from the base weight (never stored).

    A dense base is gathered in one step, so no |rows| x d_in intermediate is allocated (measured: taking rows
    then columns peaks about 2x higher); a quantized one has to dequantize whole packed rows first (its groups
    run along the columns).
    """
    if not layout.quantized:
        return weight_parts[0][rows[:, None], cols[None, :]]
    return mx.take(gather_rows(weight_parts, rows, layout), cols, axis=1)


def _modulated(a: mx.array, b: mx.array, anchor: mx.array, scale: float, dtype) -> mx.array:
    # The scale goes on the small factor, so the block-sized work is one product and one multiply.
    return ((b * scale) @ a * anchor).astype(dtype)


def dense_delta(layout: BlockLayout, index: LayerIndex, weight_parts: WeightParts, factors: mx.array,
                dtype: mx.Dtype = mx.float32) -> mx.array:
    """The full d_out x d_in update. Only for merging and checks: training never calls it."""
    a_list, b_list = factor_views(layout, factors)
    row_order, col_order, row_inv, col_inv = index[:4]
    d_out, d_in = sum(layout.row_sizes), sum(layout.col_sizes)
    permuted = mx.zeros((d_out, d_in), dtype=dtype)
    for k, ((r0, r1), (c0, c1)) in enumerate(zip(layout.offsets(layout.row_sizes), layout.offsets(layout.col_sizes))):
        if layout.ranks[k] == 0:
            continue
        rows, cols = row_order[r0:r1], col_order[c0:c1]
        anchor = gather_anchor(weight_parts, rows, cols, layout).astype(mx.float32)
        block = _modulated(a_list[k].astype(mx.float32), b_list[k].astype(mx.float32), anchor, layout.scale, dtype)
        permuted[r0:r1, c0:c1] = block
    return mx.take(mx.take(permuted, row_inv, axis=0), col_inv, axis=1)


# -- the dense ("HiRA") form: no gathers at all, for GPUs where full matmuls beat gathers ----------------------
# SMoA is HiRA with block-sparse factors: B_full[R_k, slot_k] = B_k and A_full[slot_k, C_k] = A_k (zeros elsewhere,
# slot_k the block's rank range) give Delta W = s (B_full A_full) * W0 exactly, since different blocks share no
# rank slot. This form spends 1/K more matmul work per block than the gathered one, but touches the activations
# only through plain matmuls; on an H200 the gathers of the block form cost more than that (docs/BENCHMARKS.md).
# The d_out x d_in product is transient: built in the forward and rebuilt in the backward, never kept.


def full_factors(layout: BlockLayout, index: LayerIndex, factors: mx.array,
                 dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
    """(B_full [d_out, r], A_full [r, d_in]) in the original basis, in ``dtype``: one take each (:mod:`.plan`)."""
    return whole_weight_factors(plan_of(layout, index), factors, dtype)


def full_weight(weight_parts: WeightParts, layout: BlockLayout) -> mx.array:
    """W0 as a dense array (dequantized for a quantized base: :func:`dequantize`)."""
    if not layout.quantized:
        return weight_parts[0]
    return dequantize(weight_parts, layout.group_size, layout.bits, layout.mode)


def _dense_update(layout, index, weight_parts, factors, dtype):
    """(Delta W in ``dtype``, B_full and A_full in ``dtype``, W0 in ``dtype``).

    Everything d_out x d_in stays in the activations' type (bf16 in training): the product B_full A_full is
    rounded once before the Hadamard product, which in bf16 costs no more accuracy than the final cast the block
    form makes, and halves the bytes (and the transient memory) of the float32 version.
    """
    b_full, a_full = full_factors(layout, index, factors)
    b_full, a_full = (layout.scale * b_full).astype(dtype), a_full.astype(dtype)
    w0 = full_weight(weight_parts, layout).astype(dtype)
    return (b_full @ a_full) * w0, b_full, a_full, w0


def split_factor_grads(layout: BlockLayout, index: LayerIndex, db_full: mx.array, da_full: mx.array,
                       factors: mx.array) -> mx.array:
    """The flat factors' gradient from the whole-weight factor gradients, one take each (:mod:`.plan`)."""
    plan = plan_of(layout, index)
    return untake_grads(plan.full_a_back, da_full, plan.full_b_back, db_full, factors)


@lru_cache(maxsize=None)
def dense_form_delta_fn(layout: BlockLayout) -> LayerFn:
    """The update ``fn(x, index, weight_parts, factors)`` in the dense HiRA form (no activation gathers)."""

    @mx.custom_function
    def delta(x, index, weight_parts, factors):
        update = _dense_update(layout, index, weight_parts, after_input(factors, x), x.dtype)[0]
        return x @ update.T

    @delta.vjp
    def delta_vjp(primals, cotangent, output):
        (x, index, weight_parts, factors), frozen = vjp_primals(primals, cotangent)
        update, b_full, a_full, w0 = _dense_update(layout, index, weight_parts, factors, x.dtype)
        dx = cotangent.astype(x.dtype) @ update
        g2 = mx.reshape(cotangent, (-1, cotangent.shape[-1])).astype(x.dtype)
        x2 = mx.reshape(x, (-1, x.shape[-1]))
        h = (g2.T @ x2) * w0  # dL/d(B_full A_full) / s; b_full already carries s
        db_full = layout.scale * (h @ a_full.T).astype(mx.float32)
        da_full = b_full.T @ h  # in h's type: untake_grads casts the entries it picks
        dfactors = split_factor_grads(layout, index, db_full, da_full, factors)
        return after_factor_grads(dx, dfactors), *frozen, dfactors

    return delta
