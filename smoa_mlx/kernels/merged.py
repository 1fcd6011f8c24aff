"""The merged form: the adapted layer as one linear layer of W0 + Delta W, rebuilt in every forward and backward.

Without dropout the update sees the same input as the base, so y = x W0^T + x Delta W^T = x (W0 + Delta W)^T: one
matmul for the forward and one for dx, where the forms that keep the base apart (:mod:`.blocks`, :mod:`.dense`)
need 1 + 1/K each. Building W0 + Delta W costs a rank-r product (the block-sparse factors in disjoint rank slots) and
one elementwise pass over the weight (float32 inside, one rounding): on a GPU the two are one kernel (``merge`` in
:mod:`.source`: W0 read once, a 2/4/8-bit base dequantized in it), elsewhere an MLX matmul and a fused pass (a
quantized base dequantized first). A training step costs 2 layer-matmuls plus the factor gradients:

- ``block_grads=False``: G = dy^T x as one full matmul, then s G * W0 and two rank-r products (3 layer-matmuls in
  all, no gathers; below the block form's 2 + 3/K floor for K <= 2);
- ``block_grads=True``: only the K diagonal blocks of G, through the block form's gathers and one batched matmul
  (2 + 1/K layer-matmuls, plus two gathers of the activations).

Nothing d_out x d_in is kept for the backward: W0 + Delta W (and G) are transient, as in the dense form.
Numerics: W0 + Delta W is rounded once to the activations' type, so in bf16 training an entry of Delta W below half
a unit in the last place of its W0 entry does not change the forward output; the separate forms round y = x W0^T +
x Delta W^T instead, which loses the same share at the output. The factor gradients never see this rounding (they
are computed from dy and x alone). A comparison of training curves on a real model is still to be made
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .blocks import MlxOps, _merge_pass, block_factor_grads, packed, product_type
from .dense import full_factors, full_weight, split_factor_grads
from .plan import (BlockLayout, LayerFn, LayerIndex, WeightParts, after_factor_grads, after_input, padded_dims, plan_of,
                   vjp_primals, whole_weight_takes, with_zero)


def _dense_grads(ops, layout, index, weight_parts, factors, x2, g2, b_full, a_full):
    h = ops.hadamard_full(layout, weight_parts, g2.T @ x2)  # s G * W0, d_out x d_in, transient
    # In h's type (a_full and b_full already are: product_type); untake_grads casts the entries it picks.
    db_full = h @ a_full.T
    da_full = b_full.T @ h
    return split_factor_grads(layout, index, db_full, da_full, factors)


def _block_grads(ops, layout, index, weight_parts, factors, flat, x2, g2):
    K, M, N, _ = padded_dims(layout)
    plan = plan_of(layout, index)
    a_pad, b_pad = packed(layout, plan, flat)  # in the products' type, as B_full and A_full
    xb = ops.gather(x2, plan.col_src, K, N)
    gb = ops.gather(g2, plan.row_src, K, M)
    return block_factor_grads(ops, layout, plan, weight_parts, a_pad, b_pad, xb, gb, factors)


def merged_fn(layout: BlockLayout, ops: MlxOps, block_grads: bool = False, keep: bool = False,
              mlx_merge: bool = False) -> LayerFn:
    """``fn(x, index, weight_parts, factors)`` = x (W0 + Delta W)^T (no bias), with its custom VJP.

    ``ops`` does the memory-bound steps (:class:`~.blocks.KernelOps` on a GPU, :class:`~.blocks.MlxOps`
    anywhere); ``block_grads`` picks how the factor gradients are formed (module docstring). ``keep``: the backward
    uses the forward's W0 + Delta W (and B_full, A_full) instead of rebuilding them, under mx.compile (the trainer's
    step), where it is one array shared by both: a pass and a rank-r product fewer per layer and step, one weight
    copy per adapted layer alive from its forward to its backward (opt-in, ``SMOA_MLX_MERGED_KEEP=1``). With keep,
    W0 + Delta W is always MLX's matmul + fused pass, never the merge kernel: mx.compile merges two equal expressions
    of MLX's own primitives, but never two launches of a custom kernel (MLX's CustomKernel defines no equivalence),
    so with the kernel the backward would build the weight again and keep would buy nothing. ``mlx_merge``: MLX's
    way without keep too (``SMOA_MLX_MERGE_KERNEL=0``: a side-by-side measurement, or a GPU where the kernel loses).
    One function per distinct choice, however the arguments are spelled. (The block gradients on a second stream
    of the device, for a GPU to overlap them with the dx matmul, measured no faster on an H200 and were removed:
    docs/BENCHMARKS.md, "The fifth round".)
    """
    return _merged_fn(layout, ops, bool(block_grads), bool(keep), bool(mlx_merge or keep))


@lru_cache(maxsize=None)
def _merged_fn(layout: BlockLayout, ops, block_grads: bool, keep: bool, mlx_merge: bool):
    # B_full and A_full are built outside the custom function, from the factors with no gradient path (the VJP
    # returns the factors' gradient itself), and handed to it as inputs: the backward rebuilds W0 + Delta W from them
    # instead of taking them from the factors again (two takes, a concatenation and a cast fewer per layer and step).
    # They are (d_out + d_in) r elements, alive from the layer's forward to its backward, with the flat factors they
    # were taken from (cast, with their trailing zero), which the block gradients pack the blocks from (a cast and a
    # concatenation fewer per layer and step). As extra outputs of the custom function instead (dffc2ed), they held
    # one activation's worth more at peak on the CPU than as inputs; on an H200 with a 4-bit base the two measured
    # the same (docs/BENCHMARKS.md, "Host-side cost", "End to end").
    merging = MlxOps() if mlx_merge else ops  # the ops that build W0 + Delta W

    @mx.custom_function
    def forward(x, index, weight_parts, factors, full):
        return x @ merging.merge(layout, plan_of(layout, index), weight_parts, *full[:2], x.dtype).T

    @forward.vjp
    def forward_vjp(primals, cotangent, output):
        (x, index, weight_parts, factors), frozen = vjp_primals(primals[:4], cotangent, rebuild=not keep)
        full = primals[4]
        # Rebuilt after the cotangent, so that mx.compile cannot share it with the forward's; with keep, the very
        # expression of the forward, which mx.compile merges with it.
        b_full, a_full, flat = full if keep else mx.depends(list(full), [cotangent])
        w = merging.merge(layout, plan_of(layout, index), weight_parts, b_full, a_full, x.dtype)
        cot = cotangent.astype(x.dtype)
        dx = cot @ w
        x2 = mx.reshape(x, (-1, x.shape[-1]))
        g2 = mx.reshape(cot, (-1, cot.shape[-1]))
        if block_grads:
            dfactors = _block_grads(ops, layout, index, weight_parts, factors, flat, x2, g2)
        else:
            dfactors = _dense_grads(ops, layout, index, weight_parts, factors, x2, g2, b_full, a_full)
        return after_factor_grads(dx, dfactors), *frozen, dfactors, tuple(mx.zeros_like(f) for f in full)

    def fn(x, index, weight_parts, factors):
        # With keep, the forward's W0 + Delta W is the backward's (mx.compile merges the two expressions, which a
        # dependency on x would keep apart): it lives from the forward to the backward anyway.
        # The flat factors, so B_full, A_full and the packed blocks, in the type of the rank-r product (the
        # activations' half type, else float32), which is also the type the factor gradients' products take them in:
        # cast once, before the takes.
        flat = with_zero(factors if keep else after_input(factors, x), product_type(x.dtype))
        full = (*whole_weight_takes(plan_of(layout, index), flat), flat)
        return forward(x, index, weight_parts, factors, tuple(mx.stop_gradient(f) for f in full))

    return fn


def fused_weight(layout: BlockLayout, index: LayerIndex, weight_parts: WeightParts, factors: mx.array,
                 dtype: Optional[mx.Dtype] = None) -> mx.array:
    """W0 + Delta W = W0 (1 + s B_full A_full) as one dense matrix in ``dtype``, by default W0's compute dtype (an
    affine base's scales'; bfloat16 for the modes without, :data:`.dense.FP_MODE_DTYPE`), for fusing and the inference
    cache: the merged form's formula with its rank-r product in float32,
    rounded once. One take per factor, one rank-r matmul and one elementwise pass; W0 + :func:`.dense.dense_delta`
    (K block products placed, then two takes of the whole weight to undo the permutations) took 9.6x as long on
    the CPU (150 layers of SmolLM2-135M: 1.28 s against 0.13 s, scripts/bench_inference.py) and stays the
    reference for checks."""
    w0 = full_weight(weight_parts, layout)
    b_full, a_full = full_factors(layout, index, factors, mx.float32)
    return _merge_pass(w0.dtype if dtype is None else dtype)(w0, b_full @ a_full, mx.array(layout.scale, mx.float32))
