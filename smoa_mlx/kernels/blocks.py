"""The block-major form of the SMoA update: every FLOP in MLX's batched matmuls, everything else memory-bound.

With the K blocks padded to (M, N) and stored block-major (:mod:`.plan`), one training step of an adapted layer is

    forward   xb = gather(x)            (K, T, N)   x's block columns
              Wb = modulate(A, B, W0)    (K, M, N)   s (B_k A_k) * W0[R_k, C_k], anchors read from W0
              yb = xb @ Wb^T             (K, T, M)   one batched matmul: 1/K of the layer's own
              y  = scatter(yb) [+ x W0^T]
    backward  gb = gather(dy)            (K, T, M)
              dx = scatter(gb @ Wb) [+ dy W0]        1/K
              H  = hadamard(gb^T @ xb)   (K, M, N)   s G * W0[R_k, C_k]; G is 1/K
              dB = H @ A^T, dA = B^T @ H             rank-r products of the blocks

so the matmul work is 2 + 3/K layer-matmuls with the base (1 + 1 for its forward and input gradient), and nothing
of size d_out x d_in is built: the largest temporaries are the K blocks (1/K of W0) and the block-major
activations. The gathers, scatters and the two anchor-reading steps are the kernels of :mod:`.source` on a GPU
(:class:`KernelOps`), or plain MLX (:class:`MlxOps`): the pure-MLX reference the kernels are checked against, the
same algorithm on any device.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .gpu import Launch, Runner
from .dense import full_weight, gather_rows
from .plan import (BlockLayout, BlockPlan, LayerFn, WeightParts, after_factor_grads, after_input, padded_dims,
                   plan_of, untake_grads, vjp_primals, with_zero)
from . import source
from .source import GROUP, SCATTER_TT, TI, TT, V, vector_width

SUPPORTED_BITS = (2, 4, 8)  # in-kernel (affine) dequantization needs whole values per 32-bit word


def reads_base(layout: BlockLayout) -> bool:
    """Whether the anchored kernels read this layer's quantized base themselves: affine words of whole values. Why it
    matters: only then do they need (and the dispatcher probe) their quantized renderings; a 3/5/6-bit or mxfp4 /
    nvfp4 / mxfp8 base's anchors come from MLX's own dequantization, its gathers and scatters still kernels."""
    return layout.affine and layout.bits in SUPPORTED_BITS


FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _mover_threads(width: int, vec: int) -> int:
    """Threads across a gather/scatter row of ``width`` elements, one per run of ``vec``, in whole threadgroups."""
    return _ceil(width // vec, GROUP) * GROUP


class MlxOps:
    """The memory-bound steps in plain MLX (takes and elementwise products): any device, the CPU included."""

    name = "mlx"

    def gather(self, inp: mx.array, src: mx.array, blocks: int, width: int) -> mx.array:
        n_tok = inp.shape[0]
        out = mx.take(inp, mx.maximum(src, 0), axis=1)
        out = mx.where(src >= 0, out, mx.zeros((), inp.dtype))
        return mx.transpose(mx.reshape(out, (n_tok, blocks, width)), (1, 0, 2))

    def scatter(self, inp: mx.array, slot: mx.array, base: Optional[mx.array], out_dtype: mx.Dtype) -> mx.array:
        blocks, n_tok, width = inp.shape
        flat = mx.reshape(mx.transpose(inp, (1, 0, 2)), (n_tok, blocks * width))
        out = mx.take(flat, slot, axis=1)
        return (out if base is None else base + out).astype(out_dtype)

    def _anchors(self, layout: BlockLayout, plan: BlockPlan, weight_parts: WeightParts) -> mx.array:
        K, M, N, _ = padded_dims(layout)
        rows = mx.reshape(mx.maximum(plan.row_src, 0), (K, M))
        cols = mx.reshape(mx.maximum(plan.col_src, 0), (K, 1, N))
        if not layout.quantized:
            return weight_parts[0][rows[:, :, None], cols]
        w = mx.reshape(gather_rows(weight_parts, mx.reshape(rows, (-1,)), layout), (K, M, -1))
        return mx.take_along_axis(w, mx.broadcast_to(cols, (K, M, N)), axis=2)

    def modulate(self, layout: BlockLayout, plan: BlockPlan, weight_parts: WeightParts, a_pad: mx.array,
                 b_pad: mx.array, dtype: mx.Dtype) -> mx.array:
        # Padded rows of B and columns of A are zero, so padding comes out zero whatever the clamped anchor.
        ab = (layout.scale * b_pad.astype(mx.float32)) @ a_pad.astype(mx.float32)
        return (ab * self._anchors(layout, plan, weight_parts)).astype(dtype)

    def hadamard(self, layout: BlockLayout, plan: BlockPlan, weight_parts: WeightParts, g: mx.array) -> mx.array:
        # Padded entries are not zero here; they meet only zero factor entries or are dropped by a_back/b_back.
        return (layout.scale * g.astype(mx.float32) * self._anchors(layout, plan, weight_parts)).astype(g.dtype)

    # The merged form's steps over the whole weight (original basis; B_full, A_full in disjoint rank slots).
    def merge(self, layout: BlockLayout, plan: BlockPlan, weight_parts: WeightParts, b_full: mx.array,
              a_full: mx.array, dtype: mx.Dtype) -> mx.array:
        """W0 + s (B_full A_full) * W0: the rank-r product as one matmul in the activations' type, then one fused
        elementwise pass (float32 inside, rounded once) that applies s too (no pass of its own over a factor)."""
        pdtype = product_type(dtype)
        p = b_full.astype(pdtype) @ a_full.astype(pdtype)
        return _merge_pass(dtype)(full_weight(weight_parts, layout), p, mx.array(layout.scale, mx.float32))

    def hadamard_full(self, layout: BlockLayout, weight_parts: WeightParts, g: mx.array) -> mx.array:
        """s G * W0 over the whole weight, one fused elementwise pass."""
        return _hadamard_pass(g.dtype)(g, full_weight(weight_parts, layout), mx.array(layout.scale, mx.float32))


def product_type(dtype: mx.Dtype) -> mx.Dtype:
    """The type of the merged form's rank-r product B_full A_full: the activations' half type, else float32."""
    return dtype if dtype in (mx.float16, mx.bfloat16) else mx.float32


@lru_cache(maxsize=None)
def _merge_pass(dtype):
    return mx.compile(lambda w, p, s: (w.astype(mx.float32) * (1.0 + s * p.astype(mx.float32))).astype(dtype))


@lru_cache(maxsize=None)
def _hadamard_pass(dtype):
    return mx.compile(lambda g, w, s: (s * g.astype(mx.float32) * w.astype(mx.float32)).astype(dtype))


def _base_args(layout: BlockLayout, weight_parts: WeightParts) -> tuple[list[int], list]:
    """What a kernel that reads W0 needs of a quantized base: its arrays' row lengths (packed words, scales) for
    ``dims`` and the BITS and GS template constants; zeros and nothing for a dense base."""
    if not layout.quantized:
        return [0, 0], []
    return [weight_parts[0].shape[1], weight_parts[1].shape[1]], [("BITS", layout.bits), ("GS", layout.group_size)]


class KernelOps(MlxOps):
    """The same steps as the GPU kernels of :mod:`.source`, launched through ``run`` (Metal, CUDA, or the shim)."""

    def __init__(self, run: Runner):
        self.run = run
        self.name = getattr(run, "backend", "kernel")

    def gather(self, inp: mx.array, src: mx.array, blocks: int, width: int) -> mx.array:
        n_tok = inp.shape[0]
        vec = vector_width(width, inp.dtype)
        per_block = _mover_threads(width, vec)
        dims = mx.array([n_tok, inp.shape[1], width, per_block], dtype=mx.int32)
        grid = (per_block * blocks, _ceil(n_tok, TT), 1)  # the blocks along x: see source.GATHER_BODY
        (out,) = self.run(Launch("gather", False, [inp, src, dims],
                                 [("T", inp.dtype), ("TT", TT), ("VEC", vec)], grid, (GROUP, 1, 1),
                                 [(blocks, n_tok, width)], [inp.dtype]))
        return out

    def scatter(self, inp: mx.array, slot: mx.array, base: Optional[mx.array], out_dtype: mx.Dtype) -> mx.array:
        _, n_tok, width = inp.shape
        d = slot.shape[0]
        vec = vector_width(d, out_dtype, *([] if base is None else [base.dtype]))
        dims = mx.array([n_tok, d, width], dtype=mx.int32)
        kernel, extra = ("scatter", []) if base is None else ("scatter_add", [base])
        (out,) = self.run(Launch(kernel, False, [inp, slot, dims, *extra],
                                 [("OT", out_dtype), ("TT", SCATTER_TT), ("VEC", vec)],
                                 (_mover_threads(d, vec), _ceil(n_tok, SCATTER_TT), 1), (GROUP, 1, 1),
                                 [(n_tok, d)], [out_dtype]))
        return out

    def _anchored(self, kernel, layout, plan, weight_parts, data, dtype):
        # The kernels dequantize affine (w, scales, biases) words of whole values only; any other quantized base
        # (3/5/6-bit words straddle, mxfp4/nvfp4/mxfp8 have other arrays and codes) never reaches them: its
        # anchors come from MLX's own dequantization (MlxOps), while the gathers and scatters stay kernels.
        if layout.quantized and not reads_base(layout):
            return None
        K, M, N, R = padded_dims(layout)
        d_in = sum(layout.col_sizes)
        strides, quant = _base_args(layout, weight_parts)
        dims = mx.array([M, N, d_in, *strides], dtype=mx.int32)
        scale = mx.array([layout.scale], dtype=mx.float32)
        ti = TI if kernel == "modulate" else source.HADAMARD_TI
        template = [("T", dtype), ("TI", ti), ("V", V)] + ([("R", R)] if kernel == "modulate" else []) + quant
        cols = _ceil(_ceil(N, 32 * V) * 32, GROUP) * GROUP
        (out,) = self.run(Launch(kernel, layout.quantized,
                                 [*data, plan.row_src, plan.col_src, dims, scale, *weight_parts], template,
                                 (cols, _ceil(M, ti), K), (GROUP, 1, 1), [(K, M, N)], [dtype]))
        return out

    def merge(self, layout: BlockLayout, plan: BlockPlan, weight_parts: WeightParts, b_full: mx.array,
              a_full: mx.array, dtype: mx.Dtype) -> mx.array:
        """The merge kernel: the rank-r product and the pass in one (no d_out x d_in product, W0 read once and
        dequantized in the kernel for a 2/4/8-bit base), each row summing its own block's rank slots only (the
        plan's row order groups the rows by block). Other quantized bases take MLX's matmul + fused pass."""
        r = a_full.shape[0]
        if (layout.quantized and not reads_base(layout)) or r == 0:
            return super().merge(layout, plan, weight_parts, b_full, a_full, dtype)
        K, M = len(layout.ranks), padded_dims(layout)[1]
        d_out, d_in = b_full.shape[0], a_full.shape[1]
        w_type = [] if layout.quantized else [weight_parts[0].dtype]
        vec = vector_width(d_in, dtype, a_full.dtype, *w_type)
        strides, quant = _base_args(layout, weight_parts)
        slots = [sum(layout.ranks[:k]) for k in range(K + 1)]
        dims = mx.array([d_out, d_in, *strides, M, *slots], dtype=mx.int32)
        template = [("OT", dtype), ("TI", source.MERGE_TI), ("R", r), ("VEC", vec)] + [("T", t) for t in w_type] + quant
        (out,) = self.run(Launch("merge", layout.quantized,
                                 [a_full, b_full, plan.row_src, dims, mx.array([layout.scale], dtype=mx.float32),
                                  *weight_parts],
                                 template, (_mover_threads(d_in, vec), K * _ceil(M, source.MERGE_TI), 1),
                                 (GROUP, 1, 1), [(d_out, d_in)], [dtype]))
        return out

    def modulate(self, layout: BlockLayout, plan: BlockPlan, weight_parts: WeightParts, a_pad: mx.array,
                 b_pad: mx.array, dtype: mx.Dtype) -> mx.array:
        out = self._anchored("modulate", layout, plan, weight_parts, [a_pad, b_pad], dtype)
        return super().modulate(layout, plan, weight_parts, a_pad, b_pad, dtype) if out is None else out

    def hadamard(self, layout: BlockLayout, plan: BlockPlan, weight_parts: WeightParts, g: mx.array) -> mx.array:
        out = self._anchored("hadamard", layout, plan, weight_parts, [g], g.dtype)
        return super().hadamard(layout, plan, weight_parts, g) if out is None else out


# -- the base layer's own products, for the fused form (base + update in one function) -----------------------
def _quantized_matmul(layout: BlockLayout, a: mx.array, weight_parts: WeightParts, transpose: bool) -> mx.array:
    w, scales, *biases = weight_parts  # no biases in the modes other than affine
    return mx.quantized_matmul(a, w, scales, biases[0] if biases else None, transpose=transpose,
                               group_size=layout.group_size, bits=layout.bits, mode=layout.mode)


def base_forward(layout: BlockLayout, x2: mx.array, weight_parts: WeightParts) -> mx.array:
    """x W0^T, as nn.Linear / nn.QuantizedLinear compute it (bias excluded)."""
    if layout.quantized:
        return _quantized_matmul(layout, x2, weight_parts, True)
    return x2 @ weight_parts[0].T


def base_backward(layout: BlockLayout, g2: mx.array, weight_parts: WeightParts) -> mx.array:
    """dy W0: the frozen layer's input gradient."""
    if layout.quantized:
        return _quantized_matmul(layout, g2, weight_parts, False)
    return g2 @ weight_parts[0]


def _pack(layout: BlockLayout, plan: BlockPlan, factors: mx.array, dtype=mx.float32) -> tuple[mx.array, mx.array]:
    """(A packed (K, R, N), B packed (K, M, R)) in sorted block order, zero in the padding, in ``dtype`` (cast before
    the take: one pass over the factors)."""
    return packed(layout, plan, with_zero(factors, dtype))


def packed(layout: BlockLayout, plan: BlockPlan, flat: mx.array) -> tuple[mx.array, mx.array]:
    """:func:`_pack` from the flat factors already cast and given their trailing zero (:func:`.plan.with_zero`)."""
    K, M, N, R = padded_dims(layout)
    flat = mx.take(flat, plan.fac_take)
    return mx.reshape(flat[: K * R * N], (K, R, N)), mx.reshape(flat[K * R * N :], (K, M, R))


def _forward(ops, layout, with_base, x, index, weight_parts, factors):
    K, M, N, _ = padded_dims(layout)
    plan = plan_of(layout, index)
    x2 = mx.reshape(x, (-1, x.shape[-1]))
    a_pad, b_pad = _pack(layout, plan, factors)
    xb = ops.gather(x2, plan.col_src, K, N)
    wb = ops.modulate(layout, plan, weight_parts, a_pad, b_pad, x.dtype)
    yb = xb @ mx.transpose(wb, (0, 2, 1))
    base = base_forward(layout, x2, weight_parts) if with_base else None
    y = ops.scatter(yb, plan.row_slot, base, x.dtype if base is None else base.dtype)
    return mx.reshape(y, (*x.shape[:-1], y.shape[-1]))


def _backward(ops, layout, with_base, x, index, weight_parts, factors, cot):
    K, M, N, _ = padded_dims(layout)
    plan = plan_of(layout, index)
    x2 = mx.reshape(x, (-1, x.shape[-1]))
    g2 = mx.reshape(cot, (-1, cot.shape[-1])).astype(x.dtype)
    a_pad, b_pad = _pack(layout, plan, factors)
    xb = ops.gather(x2, plan.col_src, K, N)
    gb = ops.gather(g2, plan.row_src, K, M)
    wb = ops.modulate(layout, plan, weight_parts, a_pad, b_pad, x.dtype)
    base = base_backward(layout, g2, weight_parts).astype(x.dtype) if with_base else None
    dx = ops.scatter(gb @ wb, plan.col_slot, base, x.dtype)
    return mx.reshape(dx, x.shape), block_factor_grads(ops, layout, plan, weight_parts, a_pad, b_pad, xb, gb, factors)


def block_factor_grads(ops: MlxOps, layout: BlockLayout, plan: BlockPlan, weight_parts: WeightParts, a_pad: mx.array,
                       b_pad: mx.array, xb: mx.array, gb: mx.array, factors: mx.array) -> mx.array:
    """The flat factors' gradient from the block-major activations: G_k = dy_k^T x_k in one batched matmul (1/K of a
    layer-matmul), s G_k * M_k in the Hadamard kernel, then the two rank-r products."""
    h = ops.hadamard(layout, plan, weight_parts, mx.transpose(gb, (0, 2, 1)) @ xb)  # (K, M, N): s G * M
    db_pad = h @ mx.transpose(a_pad, (0, 2, 1)).astype(h.dtype)  # in h's type: untake_grads casts what it picks
    da_pad = mx.transpose(b_pad, (0, 2, 1)).astype(h.dtype) @ h
    return untake_grads(plan.a_back, da_pad, plan.b_back, db_pad, factors)


@lru_cache(maxsize=None)
def block_fn(layout: BlockLayout, ops: MlxOps, with_base: bool = False) -> LayerFn:
    """``fn(x, index, weight_parts, factors)``: the update (``with_base``: x W0^T plus the update, the
    frozen layer's products fused with the update's gather and scatter), with its custom VJP."""

    @mx.custom_function
    def fn(x, index, weight_parts, factors):
        return _forward(ops, layout, with_base, x, index, weight_parts, after_input(factors, x))

    @fn.vjp
    def fn_vjp(primals, cotangent, output):
        (x, index, weight_parts, factors), frozen = vjp_primals(primals, cotangent, rebuild_x=True)
        dx, dfactors = _backward(ops, layout, with_base, x, index, weight_parts, factors, cotangent)
        return after_factor_grads(dx, dfactors), *frozen, dfactors

    return fn
