"""A layer's block layout, and the per-layer index arrays of the block-major form, built once (numpy, at apply time) and kept on the layer.

Block-major layout: block k's rows (columns) padded to the longest block, M = max |R_k| (N = max |C_k|), rounded up
to a multiple of 8 (so the kernels move aligned 16-byte vectors), so every block is one slice of a (K, ., .) array
and one batched matmul covers all of them. Within a block the rows (columns) are visited in ascending original index
rather than in spectral order: the sum over a block does not depend on the order, and ascending indices make the
gathers and the anchor reads walk memory forwards. The factors follow: ``fac_take`` places A_k's columns and B_k's
rows at those sorted positions, ``a_back`` / ``b_back`` take the padded gradients back to the factors' own
(spectral) order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class BlockLayout:
    """Static description of a layer's blocks; hashable so compiled functions can be cached per layout."""

    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    scale: float
    group_size: int = 0  # 0: dense base weight
    bits: int = 0

    @property
    def quantized(self) -> bool:
        return self.bits > 0

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


def build_plan(layout: BlockLayout, row_order, col_order) -> BlockPlan:
    row_order = np.asarray(row_order, dtype=np.int64).reshape(-1)
    col_order = np.asarray(col_order, dtype=np.int64).reshape(-1)
    K, M, N, R = padded_dims(layout)
    row_src, row_slot, rpos = _sorted_blocks(row_order, layout.row_sizes, M)
    col_src, col_slot, cpos = _sorted_blocks(col_order, layout.col_sizes, N)
    ranks = layout.ranks
    total_a = sum(r * n for r, n in zip(ranks, layout.col_sizes))
    total_b = sum(m * r for r, m in zip(ranks, layout.row_sizes))
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
    as32 = lambda a: mx.array(a.reshape(-1).astype(np.int32))  # noqa: E731
    return BlockPlan(as32(row_src), as32(col_src), as32(row_slot), as32(col_slot),
                     as32(np.concatenate([a_take.reshape(-1), b_take.reshape(-1)])), as32(a_back), as32(b_back))


def plan_of(layout: BlockLayout, index) -> BlockPlan:
    """The plan carried in ``index`` (a layer's 5th entry), or one built now from its orders (outside traces)."""
    if len(index) > 4:
        return BlockPlan(*index[4])
    return build_plan(layout, np.asarray(index[0]), np.asarray(index[1]))
