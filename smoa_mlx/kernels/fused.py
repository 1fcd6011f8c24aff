"""The SMoA update through the fused kernels of :mod:`.source`, backend-agnostic.

Every kernel call is described as a :class:`Launch` and handed to a runner (``run(launch) -> outputs``): the GPU
runners of :mod:`.metal` and :mod:`.cuda` compile and dispatch it with ``mx.fast``, and the CI test runs the very
same launches through a C++ threadgroup emulator. Only small arrays are built here (block metadata, the
flattened factors, the per-tile partial sums of dA and dB); activations are read in place through the row and
column orders, and no d_out x d_in or per-block matrix is ever formed in device memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import mlx.core as mx

from .reference import BlockLayout
from .source import FRAGMENT, GRAD_TILE, MAX_RANK, MODMM_TILE, THREADS

SUPPORTED_BITS = (2, 4, 8)  # the in-kernel dequantization needs whole values per 32-bit word
FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)


@dataclass
class Launch:
    """One kernel dispatch: inputs in the kernel's ``input_names`` order; grid counts threads, as in ``mx.fast``."""

    kernel: str  # "modmm" or "grad"
    quantized: bool
    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list


Runner = Callable[[Launch], Sequence[mx.array]]  # with a ``backend`` attribute: "metal" or "cuda"


def supports(layout: BlockLayout) -> bool:
    """Whether the kernels handle this layout (other quantizations and ranks use the pure-MLX path)."""
    return (not layout.quantized or layout.bits in SUPPORTED_BITS) and max(layout.ranks) <= MAX_RANK


def _padded_rank(layout: BlockLayout, backend: str) -> int:
    fr = FRAGMENT[backend]
    return max(fr, -(-max(layout.ranks) // fr) * fr)


def _segment_sorted(order: mx.array, sizes: Sequence[int]) -> tuple[mx.array, mx.array]:
    """Each block's indices in ascending order, and where each sits in the block's own (spectral) order."""
    idx, pos, start = [], [], 0
    for n in sizes:
        seg = order[start : start + n]
        p = mx.argsort(seg).astype(mx.int32)
        idx.append(mx.take(seg, p))
        pos.append(p)
        start += n
    return mx.concatenate(idx), mx.concatenate(pos)


def _meta(layout: BlockLayout) -> tuple[mx.array, int, int]:
    rows, cols = layout.offsets(layout.row_sizes), layout.offsets(layout.col_sizes)
    meta, aoff, boff = [], 0, 0
    for (r0, r1), (c0, c1), rk in zip(rows, cols, layout.ranks):
        meta += [r0, r1 - r0, c0, c1 - c0, rk, aoff, boff, 0]
        aoff += rk * (c1 - c0)
        boff += rk * (r1 - r0)
    return mx.array(meta, dtype=mx.int32), aoff, boff


def _factors(layout: BlockLayout, a_list, b_list) -> tuple[mx.array, mx.array]:
    """A_k and s B_k flattened into one float32 vector each (tiny: the trainable parameters)."""
    a = mx.concatenate([mx.reshape(x, (-1,)).astype(mx.float32) for x in a_list])
    sb = mx.concatenate([mx.reshape(x, (-1,)).astype(mx.float32) for x in b_list]) * layout.scale
    return a, sb


def _weight_dims(layout: BlockLayout, d_in: int) -> tuple[int, int]:
    if not layout.quantized:
        return 0, 0
    return d_in * layout.bits // 32, d_in // layout.group_size


def _quant_template(layout: BlockLayout) -> list:
    return [("BITS", layout.bits), ("GS", layout.group_size)] if layout.quantized else []


def _check_sizes(n_tokens: int, d_in: int, d_out: int) -> None:
    if n_tokens * max(d_in, d_out) >= 2**31:
        raise ValueError(f"SMoA kernels index with 32-bit ints: {n_tokens} tokens x {max(d_in, d_out)} is too large")


def _common(layout: BlockLayout, n_tokens: int, index, weight_parts, a_list, b_list):
    d_in, d_out = sum(layout.col_sizes), sum(layout.row_sizes)
    _check_sizes(n_tokens, d_in, d_out)
    meta, tot_a, tot_b = _meta(layout)
    wq_ld, s_ld = _weight_dims(layout, d_in)
    dims = mx.array([n_tokens, d_in, d_out, wq_ld, s_ld, tot_a, tot_b, 0], dtype=mx.int32)
    a, sb = _factors(layout, a_list, b_list)
    row_idx, row_pos = _segment_sorted(index[0], layout.row_sizes)
    col_idx, col_pos = _segment_sorted(index[1], layout.col_sizes)
    tail = [dims, meta, row_idx, row_pos, col_idx, col_pos, a, sb, *weight_parts]
    return tail, tot_a, tot_b


def modmm_launch(backend: str, layout: BlockLayout, mode: int, inp: mx.array, index, weight_parts, a_list, b_list):
    """MODE 0: delta y = x-block products (inp = x, N x d_in); MODE 1: dx (inp = dy, N x d_out); output in inp's type."""
    n_tokens = inp.shape[0]
    tail, _, _ = _common(layout, n_tokens, index, weight_parts, a_list, b_list)
    n_out = max(layout.row_sizes) if mode == 0 else max(layout.col_sizes)
    width = sum(layout.row_sizes) if mode == 0 else sum(layout.col_sizes)
    template = [("T", inp.dtype), ("MODE", mode), ("BJ", MODMM_TILE[backend]["BJ"]),
                ("RP", _padded_rank(layout, backend))]
    return Launch(
        kernel="modmm",
        quantized=layout.quantized,
        inputs=[inp, *tail],
        template=template + _quant_template(layout),
        grid=(math.ceil(n_out / 64) * THREADS, math.ceil(n_tokens / 64), len(layout.ranks)),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(n_tokens, width)],
        output_dtypes=[inp.dtype],
    )


def grad_launch(backend: str, layout: BlockLayout, cot: mx.array, x: mx.array, index, weight_parts, a_list, b_list):
    n_tokens = x.shape[0]
    tail, tot_a, tot_b = _common(layout, n_tokens, index, weight_parts, a_list, b_list)
    c_tiles = math.ceil(max(layout.col_sizes) / 64)
    i_tiles = math.ceil(max(layout.row_sizes) / 64)
    return Launch(
        kernel="grad",
        quantized=layout.quantized,
        inputs=[cot.astype(x.dtype), x, *tail],
        template=[("T", x.dtype), ("BT", GRAD_TILE[backend]["BT"])] + _quant_template(layout),
        grid=(c_tiles * THREADS, i_tiles, len(layout.ranks)),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(c_tiles, tot_b), (i_tiles, tot_a)],
        output_dtypes=[mx.float32, mx.float32],
    )


def _split(flat: mx.array, shapes: list[tuple[int, int]], like: list[mx.array]) -> list[mx.array]:
    out, start = [], 0
    for shape, ref in zip(shapes, like):
        n = shape[0] * shape[1]
        out.append(mx.reshape(flat[start : start + n], shape).astype(ref.dtype))
        start += n
    return out


def forward(run: Runner, layout: BlockLayout, x, index, weight_parts, a_list, b_list) -> mx.array:
    lead = x.shape[:-1]
    x2 = mx.reshape(x, (-1, x.shape[-1]))
    (y,) = run(modmm_launch(run.backend, layout, 0, x2, index, weight_parts, a_list, b_list))
    return mx.reshape(y, (*lead, y.shape[-1]))


def backward(run: Runner, layout: BlockLayout, x, index, weight_parts, a_list, b_list, cot):
    """(dx, [dA_k], [dB_k]) for the cotangent ``cot`` of the update."""
    x2 = mx.reshape(x, (-1, x.shape[-1]))
    g2 = mx.reshape(cot, (-1, cot.shape[-1])).astype(x.dtype)
    (dx,) = run(modmm_launch(run.backend, layout, 1, g2, index, weight_parts, a_list, b_list))
    db_part, da_part = run(grad_launch(run.backend, layout, g2, x2, index, weight_parts, a_list, b_list))
    db = mx.sum(db_part, axis=0) * layout.scale
    da = mx.sum(da_part, axis=0)
    da_list = _split(da, [a.shape for a in a_list], a_list)
    db_list = _split(db, [b.shape for b in b_list], b_list)
    return mx.reshape(dx, x.shape), da_list, db_list


@lru_cache(maxsize=None)
def fused_delta_fn(layout: BlockLayout, run: Runner):
    """Same contract as :func:`reference_delta_fn`, computed by ``run``'s kernels."""

    @mx.custom_function
    def delta(x, index, weight_parts, a_list, b_list):
        return forward(run, layout, x, index, weight_parts, a_list, b_list)

    @delta.vjp
    def delta_vjp(primals, cotangent, output):
        x, index, weight_parts, a_list, b_list = primals
        dx, da, db = backward(run, layout, x, index, weight_parts, a_list, b_list, cotangent)
        return dx, tuple(mx.zeros_like(i) for i in index), tuple(mx.zeros_like(p) for p in weight_parts), da, db

    return delta
