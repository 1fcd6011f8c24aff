"""A layer's block layout, and the per-layer index arrays of the block-major form, built once (numpy, at apply time) and kept on the layer.

Block-major layout: block k's rows (columns) padded to the longest block, M = max |R_k| (N = max |C_k|), rounded up
to a multiple of 8 (so the kernels move aligned 16-byte vectors), so every block is one slice of a (K, ., .) array
and one batched matmul covers all of them. Within a block the rows (columns) are visited in ascending original index
rather than in spectral order: the sum over a block does not depend on the order, and ascending indices make the
gathers and the anchor reads walk memory forwards. The factors follow: ``fac_take`` places A_k's columns and B_k's
rows at those sorted positions, ``a_back`` / ``b_back`` take the padded gradients back to the factors' own
(spectral) order. ``b_*`` / ``a_*`` / ``slots`` / ``full_a_back`` / ``full_b_back`` do the same for the
whole-weight forms (:mod:`.merged`, :mod:`.dense`): B_full (d_out, r) and A_full (r, d_in) in the original basis,
block k's factors in its own rank slots, taken from the same flat factors in one take each way (measured on an H200:
the pads, concatenations and per-block slices this replaces cost about 0.08 ms per call at 4096x4096). The take
indices of B_full and A_full are computed per call from a few integers per row and column
(:func:`whole_weight_factors`) rather than stored: stored, they would be r (d_out + d_in) integers per layer, K times
the factors themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

# The types of every form's contract ``fn(x, index, weight_parts, factors)`` (:mod:`smoa_mlx.kernels`):
# The base weight: (W0,) dense, (w, scales, biases) affine-quantized, (w, scales) in the modes without biases
# (mxfp4, nvfp4, mxfp8: 8-bit scale codes, no float array of their own).
WeightParts = tuple[mx.array, ...]
# A layer's index (``SMoALinear.index``): row order, column order and their inverses (int32 arrays), then its
# BlockPlan as a tuple; without the plan, :func:`plan_of` builds one from the orders (outside traces only).
LayerIndex = Union[tuple[mx.array, mx.array, mx.array, mx.array],
                   tuple[mx.array, mx.array, mx.array, mx.array, tuple[mx.array, ...]]]
LayerFn = Callable[[mx.array, LayerIndex, WeightParts, mx.array], mx.array]
Order = Union[np.ndarray, Sequence[int]]  # a permutation of range(n): a spectral row or column order


@dataclass(frozen=True)
class BlockLayout:
    """Static description of a layer's blocks; hashable so compiled functions can be cached per layout."""

    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    scale: float
    group_size: int = 0  # 0: dense base weight
    bits: int = 0
    mode: str = "affine"  # a quantized base's MLX quantization mode: "affine", "mxfp4", "nvfp4" or "mxfp8"

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def affine(self) -> bool:
        """An affine-quantized base, (w, scales, biases): the only quantized weight the GPU kernels read themselves;
        the other modes' anchors come from MLX's own dequantization (:mod:`.blocks`)."""
        return self.quantized and self.mode == "affine"

    def offsets(self, sizes: tuple[int, ...]) -> list[tuple[int, int]]:
        out, start = [], 0
        for n in sizes:
            out.append((start, start + n))
            start += n
        return out


class BlockPlan(NamedTuple):
    """int32 device arrays; see the module docstring. -1 marks padding in ``row_src`` / ``col_src``."""

    row_src: mx.array  # (K*M,) original row of block-major row (k, i)
    col_src: mx.array  # (K*N,) original column of block-major column (k, j)
    row_slot: mx.array  # (d_out,) k*M + i for each original row
    col_slot: mx.array  # (d_in,) k*N + j for each original column
    fac_take: mx.array  # (K*R*N + K*M*R,) into [A_0.flat, .., A_K-1.flat, B_0.flat, .., B_K-1.flat, 0]
    a_back: mx.array  # (sum r_k |C_k|,) into the flattened (K, R, N) gradient of the packed A
    b_back: mx.array  # (sum |R_k| r_k,) into the flattened (K, M, R) gradient of the packed B
    # The whole-weight takes' parameters, one array each (no indexing of a stacked array inside the step):
    b_start: mx.array  # (d_out, 1): where the row's B_k row starts in the flat factors, minus its first rank slot
    b_lo: mx.array  # (d_out, 1): its block's rank slots are [b_lo, b_hi)
    b_hi: mx.array  # (d_out, 1)
    a_start: mx.array  # (1, d_in): where the column's A_k column starts, minus slot * |C_k|
    a_stride: mx.array  # (1, d_in): |C_k|, the step between A_k's rows in the flat factors
    a_lo: mx.array  # (1, d_in)
    a_hi: mx.array  # (1, d_in)
    slots: mx.array  # (1, r): 0 .. r-1, the rank slots
    full_a_back: mx.array  # (sum r_k |C_k|,) into the flattened A_full (r, d_in), A_k's entries in their order
    full_b_back: mx.array  # (sum |R_k| r_k,) into the flattened B_full (d_out, r)


PAD = 8  # M and N are multiples of this: every block-major row starts 16-byte aligned in any float type


def padded_dims(layout: BlockLayout) -> tuple[int, int, int, int]:
    """(K, M, N, R): blocks, longest row group and longest column group rounded up to a multiple of ``PAD`` (so
    the gather/scatter kernels move whole 16-byte vectors of the block-major arrays), largest rank (at least 1)."""
    up = lambda n: -(-n // PAD) * PAD  # noqa: E731
    return len(layout.ranks), up(max(layout.row_sizes)), up(max(layout.col_sizes)), max(1, max(layout.ranks))


def _sorted_blocks(order: np.ndarray, sizes, width: int):
    """(src (K*width), slot (len(order)), pos: per block, each sorted position's index in spectral order)."""
    src = np.full(len(sizes) * width, -1, dtype=np.int64)
    slot = np.empty(len(order), dtype=np.int64)
    pos, start = [], 0
    for k, n in enumerate(sizes):
        seg = order[start : start + n]
        p = np.argsort(seg, kind="stable")
        src[k * width : k * width + n] = seg[p]
        slot[seg[p]] = k * width + np.arange(n)
        pos.append(p)
        start += n
    return src, slot, pos


def build_plan(layout: BlockLayout, row_order: Order, col_order: Order) -> BlockPlan:
    row_order = np.asarray(row_order, dtype=np.int64).reshape(-1)
    col_order = np.asarray(col_order, dtype=np.int64).reshape(-1)
    K, M, N, R = padded_dims(layout)
    row_src, row_slot, rpos = _sorted_blocks(row_order, layout.row_sizes, M)
    col_src, col_slot, cpos = _sorted_blocks(col_order, layout.col_sizes, N)
    ranks = layout.ranks
    total_a, total_b = _flat_halves(layout)
    zero = total_a + total_b
    a_take = np.full((K, R, N), zero, dtype=np.int64)
    b_take = np.full((K, M, R), zero, dtype=np.int64)
    a_back = np.empty(total_a, dtype=np.int64)
    b_back = np.empty(total_b, dtype=np.int64)
    aoff, boff = 0, 0
    for k, (r, m, n) in enumerate(zip(ranks, layout.row_sizes, layout.col_sizes)):
        q = np.arange(r)[:, None]
        j = np.arange(n)[None, :]
        a_take[k, :r, :n] = aoff + q * n + cpos[k][None, :]  # packed (k, q, j) <- A_k[q, cpos[j]]
        a_back[aoff + q * n + cpos[k][None, :]] = (k * R + q) * N + j
        i = np.arange(m)[:, None]
        qb = np.arange(r)[None, :]
        b_take[k, :m, :r] = total_a + boff + rpos[k][:, None] * r + qb  # packed (k, i, q) <- B_k[rpos[i], q]
        b_back[boff + rpos[k][:, None] * r + qb] = (k * M + i) * R + qb
        aoff += r * n
        boff += m * r
    flat32 = lambda a: mx.array(a.reshape(-1).astype(np.int32))  # noqa: E731
    rows, cols, full_a_back, full_b_back = _whole_weight_takes(layout, row_order, col_order)
    column = lambda v: mx.array(v.astype(np.int32)[:, None])  # noqa: E731
    row = lambda v: mx.array(v.astype(np.int32)[None, :])  # noqa: E731
    return BlockPlan(flat32(row_src), flat32(col_src), flat32(row_slot), flat32(col_slot),
                     flat32(np.concatenate([a_take.reshape(-1), b_take.reshape(-1)])), flat32(a_back), flat32(b_back),
                     *map(column, rows), *map(row, cols), row(np.arange(sum(layout.ranks))),
                     flat32(full_a_back), flat32(full_b_back))


def _whole_weight_takes(layout: BlockLayout, row_order: np.ndarray, col_order: np.ndarray):
    """(rows (3, d_out): start, lo, hi; cols (4, d_in): start, stride, lo, hi; full_a_back, full_b_back), for
    B_full[row_order[r0 + i], slot_k + q] = B_k[i, q] and A_full[slot_k + q, col_order[c0 + j]] = A_k[q, j], zero
    elsewhere (disjoint rank slots)."""
    ranks = layout.ranks
    total_a = _flat_halves(layout)[0]
    d_out, d_in, r_all = len(row_order), len(col_order), sum(ranks)
    rows = np.zeros((3, d_out), dtype=np.int64)  # base, lo, hi
    cols = np.zeros((4, d_in), dtype=np.int64)  # base, stride, lo, hi
    a_back, b_back = [], []
    aoff, boff, slot = 0, total_a, 0
    row_starts, col_starts = layout.offsets(layout.row_sizes), layout.offsets(layout.col_sizes)
    for k, (r, m, n) in enumerate(zip(ranks, layout.row_sizes, layout.col_sizes)):
        orig_rows = row_order[row_starts[k][0] : row_starts[k][1]]  # original row of B_k's row i
        orig_cols = col_order[col_starts[k][0] : col_starts[k][1]]  # original column of A_k's column j
        rows[:, orig_rows] = np.stack([boff + np.arange(m) * r - slot, np.full(m, slot), np.full(m, slot + r)])
        cols[:, orig_cols] = np.stack([aoff + np.arange(n) - slot * n, np.full(n, n), np.full(n, slot),
                                       np.full(n, slot + r)])
        q = slot + np.arange(r)
        a_back.append((q[:, None] * d_in + orig_cols[None, :]).reshape(-1))  # A_k's entries in their own order
        b_back.append((orig_rows[:, None] * r_all + q[None, :]).reshape(-1))
        aoff, boff, slot = aoff + r * n, boff + m * r, slot + r
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return rows, cols, cat(a_back), cat(b_back)


def plan_of(layout: BlockLayout, index: LayerIndex) -> BlockPlan:
    """The plan carried in ``index`` (a layer's 5th entry), or one built now from its orders (outside traces)."""
    if len(index) > 4:
        return BlockPlan(*index[4])
    return build_plan(layout, np.asarray(index[0]), np.asarray(index[1]))


def factor_shapes(layout: BlockLayout) -> list[tuple[int, int]]:
    """The shapes of A_0 .. A_K-1 ([r_k, |C_k|]), then B_0 .. B_K-1 ([|R_k|, r_k]), in a layer's flat factors."""
    return [(r, n) for r, n in zip(layout.ranks, layout.col_sizes)] + [
        (m, r) for r, m in zip(layout.ranks, layout.row_sizes)]


def factor_sizes(layout: BlockLayout) -> list[int]:
    """The sizes of A_0 .. A_K-1, B_0 .. B_K-1 in a layer's flat factor vector (:func:`factor_views`)."""
    return [rows * cols for rows, cols in factor_shapes(layout)]


def _flat_halves(layout: BlockLayout) -> tuple[int, int]:
    """(elements of all A_k, elements of all B_k) in the flat factors: where the B half starts, and its length."""
    sizes = factor_sizes(layout)
    return sum(sizes[: len(layout.ranks)]), sum(sizes[len(layout.ranks) :])


def pack_factors(a_list: Sequence[mx.array], b_list: Sequence[mx.array], dtype: mx.Dtype = mx.float32) -> mx.array:
    """The factors as one flat vector, [A_0, .., A_K-1, B_0, .., B_K-1] row-major: how a layer stores them and what
    every form takes. One trainable array per layer, whatever K: an optimizer update costs a few launches per array
    (on an H200, 2K arrays per layer took SMoA's K=4 step 27 ms over its forward + backward, LoRA's 3 ms;
    docs/BENCHMARKS.md)."""
    return mx.concatenate([mx.reshape(p, (-1,)).astype(dtype) for p in (*a_list, *b_list)])


def factor_views(layout: BlockLayout, factors: mx.array) -> tuple[list[mx.array], list[mx.array]]:
    """(A_k list [r_k, |C_k|], B_k list [|R_k|, r_k]): reshaped slices of the flat factors."""
    bounds = np.cumsum(factor_sizes(layout))[:-1].tolist()
    parts = mx.split(factors, bounds) if bounds else [factors]
    views = [mx.reshape(p, shape) for p, shape in zip(parts, factor_shapes(layout))]
    return views[: len(layout.ranks)], views[len(layout.ranks) :]


def with_zero(factors: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The flat factors in ``dtype`` with a trailing 0: what the plan's takes index (the 0 fills padding and the
    slots of other blocks). Cast before the concatenation: one pass over the factors."""
    return mx.concatenate([factors.astype(dtype), _ZERO.astype(dtype)])


_ZERO = mx.array([0.0], dtype=mx.float32)  # data, made once: an mx.zeros per call is a graph node per layer


def whole_weight_factors(plan: BlockPlan, factors: mx.array, dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
    """(B_full [d_out, r], A_full [r, d_in]) in ``dtype``, in the original basis: one take each from the flat
    factors, its indices computed from the plan's per-row and per-column parameters (one fused elementwise pass each
    under mx.compile). Every operand is a plan array of its own, ready shaped: slicing rows out of a stacked array,
    or an ``mx.arange``, adds graph nodes (and GPU launches) to every layer's step."""
    return whole_weight_takes(plan, with_zero(factors, dtype))


def whole_weight_takes(plan: BlockPlan, flat: mx.array) -> tuple[mx.array, mx.array]:
    """:func:`whole_weight_factors` from the flat factors already cast and given their trailing zero
    (:func:`with_zero`): a caller that also packs the blocks from them (:func:`.blocks.packed`) makes them once."""
    zero = flat.shape[0] - 1
    q = plan.slots  # (1, r)
    b_take = mx.where((q >= plan.b_lo) & (q < plan.b_hi), plan.b_start + q, zero)
    q = mx.reshape(q, (-1, 1))
    a_take = mx.where((q >= plan.a_lo) & (q < plan.a_hi), plan.a_start + q * plan.a_stride, zero)
    return mx.take(flat, b_take), mx.take(flat, a_take)


def vjp_primals(primals: tuple[mx.array, LayerIndex, WeightParts, mx.array], cotangent: mx.array,
                rebuild_x: bool = False, rebuild: bool = True) -> tuple[tuple, tuple]:
    """For the VJP of a form's ``fn(x, index, weight_parts, factors)``: (the primals with the base's arrays,
    the factors and, with ``rebuild_x``, x made to depend on the cotangent; the zero cotangents of the frozen index
    and base).

    The dependency makes the VJP rebuild what it needs from them (the whole-weight factors, W0 + Delta W, a
    quantized base's dequantized W0, the packed blocks, the block-major activations) instead of sharing it with the
    forward. Built from the very same inputs, mx.compile's common-subexpression pass merges the VJP's copies with
    the forward's and keeps them alive from the forward to the backward of their layer. Measured on the CPU (2-layer
    model with 1024-wide layers, 2048 tokens, K=2, the merged form; docs/BENCHMARKS.md): peak memory 559 MB
    rebuilding from the factors, 590 MB sharing B_full and A_full, 640 MB sharing everything, 600 MB for mlx-lm's
    LoRA. (That 590 MB came from sharing through the common-subexpression pass, which took the full-size rank-r
    product along: the merged form now builds B_full and A_full outside its custom function and hands them to it
    as inputs, which its VJP makes depend on the cotangent.) What depends on none of them (the take indices) is
    still shared. Only the block form gathers from x (``rebuild_x``); for the others the dependency on x measured a
    higher peak (479 against 460 MB, the merged form at K=4).
    The zeros are lazy and never evaluated: nothing asks for the frozen inputs' gradient. ``rebuild=False`` leaves
    the primals as they are, so that under mx.compile the VJP shares what it builds from them with the forward
    (the merged form's ``keep``: speed for memory).
    """
    x, index, weight_parts, factors = primals
    frozen = tree_map(mx.zeros_like, index), tree_map(mx.zeros_like, weight_parts)
    if not rebuild:
        return (x, index, weight_parts, factors), frozen
    rest = mx.depends([factors, *weight_parts, *([x] if rebuild_x else [])], [cotangent])
    x = rest.pop() if rebuild_x else x
    return (x, index, tuple(rest[1:]), rest[0]), frozen


def after_input(factors: mx.array, x: mx.array) -> mx.array:
    """The factors made to wait for the layer's input, so that what a form builds from them (W0 + Delta W, Delta W,
    the modulated blocks: up to a weight each) is built when the layer runs, not ahead of it. Nothing else orders
    it: MLX's breadth-first evaluation otherwise builds several layers' products before their matmuls and keeps them
    all (measured on the CPU, 32 layers of 256x256, the merged form's forward: 33 weights' worth at peak with
    MLX_BFS_MAX_WIDTH=1, 7.8 with this; docs/BENCHMARKS.md, "Host-side cost")."""
    return mx.depends([factors], [x])[0]


def after_factor_grads(dx: mx.array, dfactors: mx.array) -> mx.array:
    """dx made to wait for the layer's factor gradient, so that the backward finishes one layer (and frees its
    d_out x d_in transients: G, s G * W0) before the next layer's starts. Otherwise the factor gradients, off the
    path from the loss to the input, are left to the end and run side by side, each holding its transients
    (measured as above, a compiled value_and_grad: 22.5 weights' worth at the default MLX_BFS_MAX_WIDTH of 20 and 37
    at 100, against 9.8 with this). Where only dx is wanted, this computes the factor gradient too."""
    return mx.depends([dx], [dfactors])[0]


def untake_grads(a_back: mx.array, da: mx.array, b_back: mx.array, db: mx.array, like: mx.array) -> mx.array:
    """The flat factors' gradient (shape and type of ``like``) from a packed or whole-weight gradient of A and of B:
    one take each, in the flat order (:func:`pack_factors`), then one cast of what they picked (the same values as
    casting before the takes, with one kernel instead of two and fewer elements: the padded gradients are larger)."""
    parts = [mx.take(mx.reshape(da, (-1,)), a_back), mx.take(mx.reshape(db, (-1,)), b_back)]
    return mx.concatenate(parts).astype(like.dtype)
