"""Per-layer SMoA cost on one GPU, side by side in one run: the merged form (what SMoALinear runs without dropout,
with either way of forming the factor gradients), the block-major form, the dense HiRA form, mlx-lm's LoRALinear at equal trainable parameters, the reference-style PyTorch SMoA (dense
Delta W + a second matmul, as the authors' code) and PyTorch LoRA; the memory-bound kernels' GB/s against a copy
measured in the same run; and a correctness check of the kernels (forward and gradients, every float type, dense and
quantized bases) against a float64 numpy reference.

    python scripts/bench_kernels.py --out benchmarks/bench_kernels.json          # on the GPU machine
    python scripts/bench_kernels.py --markdown benchmarks/bench_kernels.json     # tables for docs/BENCHMARKS.md
    python scripts/bench_kernels.py --cpu --out benchmarks/bench_kernels_cpu.json  # which pure-MLX form on a CPU
    python scripts/bench_kernels.py --gathers --out benchmarks/bench_gathers.json  # gathers/scatters only (~1 min)

Timings: forward + backward (dx and the adapter's gradients) of one frozen linear plus its adapter, compiled with
mx.compile as mlx-lm's trainer compiles its step, bf16 activations and base, 8192 tokens, median over repeats after
warm-up, device-synchronised. The floor of a row is
(2 + 3/K) / 2 x the frozen layer's forward + backward measured in the same run: the matmul work SMoA cannot avoid.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (1024, 4096)]  # (d_out, d_in) as (rows, cols) of W0
BLOCKS = (2, 4)
RANKS = (16,)
TOKENS = 8192
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _median_time(step, sync, budget_s=0.3, min_reps=5, max_reps=30) -> tuple[float, float]:
    """(median ms, relative spread (max-min)/median over the repeats)."""
    for _ in range(3):
        step()
        sync()
    times = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < budget_s):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med * 1e3, (sorted(times)[-2] - min(times)) / med if len(times) > 2 else 0.0


# -- MLX ------------------------------------------------------------------------------------------------------
def _mlx_layer(d_out, d_in, rank, blocks, dtype_name="bfloat16", bits=0, branch=None, seed=0):
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from smoa_mlx.layer import SMoALinear

    mx.random.seed(seed)
    base = nn.Linear(d_in, d_out, bias=False)
    base.set_dtype(getattr(mx, dtype_name))
    if isinstance(bits, str):  # mxfp4 / nvfp4 / mxfp8: the mode's own group size and bits
        base = nn.QuantizedLinear.from_linear(base, mode=bits)
    elif bits:
        base = nn.QuantizedLinear.from_linear(base, group_size=64, bits=bits)
    rng = np.random.default_rng(seed)
    layer = SMoALinear.from_base(base, rank=rank, blocks=blocks, alpha=2.0 * rank, branch_ranks=branch,
                                 row_order=rng.permutation(d_out), col_order=rng.permutation(d_in))
    layer.smoa_b = [mx.random.normal(b.shape) * 0.3 for b in layer.smoa_b]
    return layer


def _vjp_step(fn, primals, cot):
    """One forward + backward, compiled as mlx-lm's trainer compiles its step (mx.compile), so the figures hold
    the GPU's work rather than Python's graph building."""
    import mlx.core as mx

    step = mx.compile(lambda *p: mx.vjp(fn, list(p), [cot]))
    return lambda: mx.eval(step(*primals))


def _smoa_step(layer, full, x, cot):
    """fwd+bwd of base + update; ``full(x, index, parts, factors)`` returns the whole layer's output."""
    return _vjp_step(lambda x, f: full(x, layer.index, layer.weight_parts(), f), [x, layer.smoa_factors], cot)


def _with_base(layer, delta):
    def full(x, index, parts, factors):
        y = layer.linear(x)
        return y + delta(x, index, parts, factors).astype(y.dtype)

    return full


def _lora_layer(d_out, d_in, rank):
    """(fn(x, a, b), [a, b]): mlx-lm's LoRALinear on a bf16 base, its factors as the trainable inputs."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear

    base = nn.Linear(d_in, d_out, bias=False)
    base.set_dtype(mx.bfloat16)
    lora = LoRALinear.from_base(base, r=rank, scale=1.0)
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.02

    def f(x, a, b):
        lora.lora_a, lora.lora_b = a, b
        return lora(x)

    return f, [lora.lora_a, lora.lora_b]


def _lora_step(d_out, d_in, rank, x, cot):
    f, trainable = _lora_layer(d_out, d_in, rank)
    return _vjp_step(f, [x, *trainable], cot), rank * (d_in + d_out)


def _frozen_layer(d_out, d_in):
    """(fn(x), []): the bf16 base alone."""
    import mlx.core as mx
    import mlx.nn as nn

    base = nn.Linear(d_in, d_out, bias=False)
    base.set_dtype(mx.bfloat16)
    return lambda x: base(x), []


def _frozen_step(d_out, d_in, x, cot):
    f, _ = _frozen_layer(d_out, d_in)
    return _vjp_step(f, [x], cot)


AMORTIZED = 8  # layers per call in the amortized per-layer columns


def _layers_step(layers, x, cot):
    """One compiled call of the forward + backward of every layer in ``layers`` ((fn, trainables) with
    ``fn(x, *trainables)``), each layer on its own scaled copy of x and of the cotangent. Why: a single-layer step
    pays a fixed cost per call (its evaluation's launch and synchronisation: the frozen 4096x4096 step took 1.42 ms
    where its two matmuls took 0.84, e19b9e1) that a training step spreads over all of a model's layers; here it is
    spread over ``len(layers)`` layers of one shape, each with its own weights and inputs, so mx.compile has nothing
    to share between them. The call's time / len(layers) is one layer's fwd+bwd."""
    import mlx.core as mx

    n = len(layers)
    xs = [x * (1 + i / 64) for i in range(n)]  # distinct in bf16 (steps of 2^-6)
    cots = [cot * (1 + i / 64) for i in range(n)]
    args = [a for (_, trainable), xi in zip(layers, xs) for a in (xi, *trainable)]
    sizes = [1 + len(trainable) for _, trainable in layers]

    def run(*flat):
        outs, at = [], 0
        for (fn, _), size, c in zip(layers, sizes, cots):
            outs.append(mx.vjp(fn, list(flat[at : at + size]), [c]))
            at += size
        return outs

    step = mx.compile(run)
    mx.eval(args, cots)
    return lambda: step(*args)


# -- PyTorch --------------------------------------------------------------------------------------------------
def _torch_steps(d_out, d_in, rank, blocks, lora_rank):
    """(reference-style SMoA step, LoRA step, frozen step) in PyTorch, bf16 base and activations."""
    import torch
    import torch.nn.functional as F

    dev = "cuda"
    w0 = (torch.randn(d_out, d_in, device=dev) / math.sqrt(d_in)).to(torch.bfloat16)
    x = torch.randn(TOKENS, d_in, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cot = torch.randn(TOKENS, d_out, device=dev, dtype=torch.bfloat16)
    rows, cols = torch.randperm(d_out, device=dev), torch.randperm(d_in, device=dev)
    r_groups, c_groups = torch.tensor_split(rows, blocks), torch.tensor_split(cols, blocks)
    ranks = [rank // blocks + (1 if k < rank % blocks else 0) for k in range(blocks)]
    # As the authors' code: float32 anchor copies and factors, a dense Delta W scattered every call.
    anchors = [w0[r][:, c].float() for r, c in zip(r_groups, c_groups)]
    a = [(torch.rand(rk, len(c), device=dev) - 0.5).requires_grad_() for rk, c in zip(ranks, c_groups)]
    b = [(torch.randn(len(r), rk, device=dev) * 0.02).requires_grad_() for rk, r in zip(ranks, r_groups)]

    def smoa():
        delta = torch.zeros(d_out, d_in, device=dev, dtype=torch.float32)
        for k in range(blocks):
            delta[r_groups[k][:, None], c_groups[k][None, :]] = (b[k] @ a[k]) * anchors[k]
        y = F.linear(x, w0) + F.linear(x, delta.to(torch.bfloat16))
        torch.autograd.grad(y, [x, *a, *b], cot)

    la = (torch.randn(lora_rank, d_in, device=dev, dtype=torch.bfloat16) * 0.01).requires_grad_()
    lb = (torch.randn(d_out, lora_rank, device=dev, dtype=torch.bfloat16) * 0.01).requires_grad_()

    def lora():
        y = F.linear(x, w0) + F.linear(F.linear(x, la), lb)
        torch.autograd.grad(y, [x, la, lb], cot)

    def frozen():
        torch.autograd.grad(F.linear(x, w0), [x], cot)

    return smoa, lora, frozen


def _torch_times(d_out, d_in, rank, blocks, lora_rank) -> dict:
    import torch

    steps = _torch_steps(d_out, d_in, rank, blocks, lora_rank)
    out = {name: _median_time(step, torch.cuda.synchronize)[0]
           for name, step in zip(("smoa_torch_ref", "lora_torch", "frozen_torch"), steps)}
    del steps
    torch.cuda.empty_cache()
    return out


# -- correctness ----------------------------------------------------------------------------------------------
VERIFY = [  # d_out, d_in, K, rank, bits, branch ranks, tokens
    (300, 200, 3, 7, 0, None, 96),  # ragged groups, ragged tiles
    (512, 768, 2, 16, 4, None, 256),
    (384, 512, 4, 12, 8, [5, 0, 4, 3], 128),  # a block with r_k = 0
    (256, 512, 1, 8, 2, None, 64),  # K = 1 (HiRA)
    (448, 512, 2, 10, 3, None, 64),  # 3-bit: plain-MLX anchors (words straddle), kernel gathers
    (4096, 4096, 2, 32, 0, None, 1024),
    # MLX's other quantization modes (bits: the mode): plain-MLX anchors, kernel gathers, as 3-bit
    (512, 768, 2, 16, "mxfp4", None, 256),
    (300, 512, 3, 12, "nvfp4", [5, 0, 7], 96),  # ragged groups, a block with r_k = 0
    (384, 512, 4, 12, "mxfp8", None, 128),
]


def _numpy_reference(layer, x, cot):
    """float64: y = x (W0 + Delta W)^T, dx, dA_k, dB_k, from the dequantized base (tests/reference_numpy.py)."""
    import mlx.core as mx
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from reference_numpy import ref_delta, ref_dequantize, ref_dequantize_fp, ref_groups

    f64 = lambda a: np.asarray(a.astype(mx.float32), dtype=np.float64)  # noqa: E731
    parts = layer.weight_parts()
    if layer.layout.quantized and not layer.layout.affine:
        w = ref_dequantize_fp(np.asarray(parts[0]), np.asarray(parts[1]), layer.layout.group_size, layer.layout.bits,
                              layer.layout.mode)
    elif layer.layout.quantized and layer.layout.bits not in (2, 4, 8):  # words straddle: MLX's own, in float32
        w = f64(mx.dequantize(parts[0], parts[1].astype(mx.float32), parts[2].astype(mx.float32),
                              group_size=layer.layout.group_size, bits=layer.layout.bits))
    elif layer.layout.quantized:
        w = ref_dequantize(np.asarray(parts[0]), f64(parts[1]), f64(parts[2]), layer.layout.group_size,
                           layer.layout.bits)
    else:
        w = f64(parts[0])
    a_list, b_list = [f64(a) for a in layer.smoa_a], [f64(b) for b in layer.smoa_b]
    orders = (np.asarray(layer.row_order), np.asarray(layer.col_order))
    delta = ref_delta(w, a_list, b_list, len(a_list), layer.scale, orders)
    x2, g2 = f64(x).reshape(-1, w.shape[1]), f64(cot).reshape(-1, w.shape[0])
    y = x2 @ (w + delta).T
    dx = g2 @ (w + delta)
    gram = g2.T @ x2
    da, db = [], []
    for rows, cols, a, b in zip(ref_groups(orders[0], len(a_list)), ref_groups(orders[1], len(a_list)), a_list, b_list):
        h = layer.scale * gram[np.ix_(rows, cols)] * w[np.ix_(rows, cols)]
        da.append(b.T @ h)
        db.append(h @ a.T)
    return [y, dx, *da, *db]


VERIFY_FORMS = ("kernel", "reference", "kernel_delta", "merged", "merged_blocks")


def verify(kernel_ops=None, cases=VERIFY, stall_s: float = 420,
           dtypes=("bfloat16", "float16", "float32"), forms=VERIFY_FORMS) -> list[dict]:
    """Relative errors of the block form with the GPU kernels, of the merged form with them, and of the pure-MLX
    reference in the same type. ``forms``: a subset of VERIFY_FORMS (the merged ones alone compile none of MLX's
    quantized matmuls, which the block forms' fused base needs: 19-28 s each on CUDA)."""
    import mlx.core as mx
    import numpy as np

    from smoa_mlx.kernels import GPU_TOLERANCE, factor_views
    from smoa_mlx.kernels.blocks import MlxOps, block_fn
    from smoa_mlx.kernels.merged import merged_fn

    import faulthandler

    rows = []
    for d_out, d_in, blocks, rank, bits, branch, n_tok in cases:
        for dtype in dtypes:
            # Seen twice on the H200: the process hung at a fresh case (never the same one); this prints where
            # and ends the run instead of waiting out the machine's time limit.
            faulthandler.dump_traceback_later(stall_s, exit=True)
            seed = d_out + d_in + (bits if isinstance(bits, int) else len(bits))
            layer = _mlx_layer(d_out, d_in, rank, blocks, dtype, bits, branch, seed=seed)
            x = mx.random.normal((2, n_tok // 2, d_in)).astype(getattr(mx, dtype))
            cot = mx.random.normal((2, n_tok // 2, d_out)).astype(getattr(mx, dtype))
            want = _numpy_reference(layer, x, cot)
            errs = {}
            t0 = time.perf_counter()
            for name, fn in (("kernel", block_fn(layer.layout, kernel_ops, True)),
                             ("reference", block_fn(layer.layout, MlxOps(), True)),
                             ("kernel_delta", None),
                             ("merged", merged_fn(layer.layout, kernel_ops, False)),
                             ("merged_blocks", merged_fn(layer.layout, kernel_ops, True))):
                if name not in forms:
                    continue
                if fn is None:  # the update alone (dropout path), plus the base outside, as SMoALinear does
                    fn = _with_base(layer, block_fn(layer.layout, kernel_ops, False))
                print(f"verify: {d_out}x{d_in} K={blocks} bits={bits} {dtype}: {name}", flush=True)
                y, (dx, dfactors) = mx.vjp(lambda x, f: fn(x, layer.index, layer.weight_parts(), f),
                                           [x, layer.smoa_factors], [cot])
                got = [y[0], dx, *sum(factor_views(layer.layout, dfactors), [])]
                mx.eval(got)
                per = []
                for g, w in zip(got, want):
                    if w.size == 0:
                        continue
                    g = np.asarray(g.astype(mx.float32), dtype=np.float64).reshape(w.shape)
                    per.append(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)) if np.isfinite(g).all()
                               else float("inf"))
                errs[name] = max(per)
            tol = GPU_TOLERANCE[getattr(mx, dtype)]
            row = dict(d_out=d_out, d_in=d_in, blocks=blocks, rank=rank, bits=bits, branch=branch, tokens=n_tok,
                       dtype=dtype, **{f"{name}_rel_err": err for name, err in errs.items()}, tol=tol,
                       seconds=time.perf_counter() - t0)
            row["ok"] = _verified(row)
            print("verify", json.dumps(row), flush=True)
            rows.append(row)
    faulthandler.cancel_dump_traceback_later()
    return rows


def _verified(row: dict) -> bool:
    """Within the type's tolerance of float64, and (where the run has it) no worse than twice the pure-MLX
    reference's own error in the same type on the same device (plus float32 rounding)."""
    worst = max(row[k] for k in ("kernel_rel_err", "kernel_delta_rel_err", "merged_rel_err", "merged_blocks_rel_err")
                if k in row)
    return worst < row["tol"] and ("reference_rel_err" not in row or worst <= 2 * row["reference_rel_err"] + 1e-5)


# -- speed ------------------------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """GB/s of a large device copy (bytes read + written), the ceiling the memory-bound kernels are held to."""
    import mlx.core as mx

    x = mx.random.normal((1 << 30,)).astype(mx.bfloat16)  # 2 GiB
    mx.eval(x)
    ms, _ = _median_time(lambda: mx.eval(x * 1), mx.synchronize, budget_s=0.3)
    return 2 * x.nbytes / ms / 1e6


def _with_variant(fn, tt=None, hadamard_ti=None):
    """(``fn()``, the variant it ran) with the kernels' launch constants set: ``tt`` tokens per gather and per
    scatter thread (shipped: 8 and 4), ``hadamard_ti`` rows per Hadamard thread; None leaves one as shipped. Each
    is a template constant, so its variant is its own compiled kernel."""
    from smoa_mlx.kernels import blocks, source

    shipped = blocks.TT, blocks.SCATTER_TT, source.HADAMARD_TI
    blocks.TT, blocks.SCATTER_TT = shipped[:2] if tt is None else (tt, tt)
    source.HADAMARD_TI = shipped[2] if hadamard_ti is None else hadamard_ti
    try:
        return fn(), dict(tt=blocks.TT, scatter_tt=blocks.SCATTER_TT, hadamard_ti=source.HADAMARD_TI)
    finally:
        blocks.TT, blocks.SCATTER_TT, source.HADAMARD_TI = shipped


def _eager_and_compiled(fn, inputs: list) -> tuple[float, float, float, float]:
    """(ms, spread) of ``fn`` launched once per input, eagerly (each launch built from Python), then (ms, spread)
    of the same launches replayed by ``mx.compile`` (the GPU's time, as a compiled training step pays it; distinct
    inputs keep compile from merging the launches)."""
    import mlx.core as mx

    ms, spread = _median_time(lambda: mx.eval([fn(v) for v in inputs]), mx.synchronize, budget_s=0.3)
    compiled = mx.compile(lambda *vs: [fn(v) for v in vs])
    ms_c, spread_c = _median_time(lambda: mx.eval(compiled(*inputs)), mx.synchronize, budget_s=0.3)
    return ms, spread, ms_c, spread_c


def kernel_bandwidth(kernel_ops, shapes, blocks=2, rank=16, reps=10, only=None) -> list[dict]:
    """Each memory-bound step alone, ``reps`` launches per evaluation on ``reps`` distinct inputs: ms and GB/s of
    the bytes that must move, timed twice. Eagerly (``ms``): each launch is built from Python, as in an uncompiled
    step, so a short kernel's time can be the host's. Compiled (``ms_compiled``): the launches replayed by
    ``mx.compile``, as mlx-lm's trainer runs a step, which leaves the GPU's time. Distinct inputs keep compile from
    merging identical launches into one. ``only``: the names of the steps to time (default all)."""
    import mlx.core as mx

    from smoa_mlx.kernels.blocks import MlxOps, _pack
    from smoa_mlx.kernels.dense import full_factors
    from smoa_mlx.kernels.plan import padded_dims, plan_of

    def randoms(shape):
        return [mx.random.normal(shape).astype(mx.bfloat16) for _ in range(reps)]

    rows = []
    for d_out, d_in in shapes:
        layer = _mlx_layer(d_out, d_in, rank, blocks)
        K, M, N, _ = padded_dims(layer.layout)
        plan = plan_of(layer.layout, layer.index)
        base_y = mx.random.normal((TOKENS, d_out)).astype(mx.bfloat16)
        a_pad, b_pad = _pack(layer.layout, plan, layer.smoa_factors)
        b_full, a_full = full_factors(layer.layout, layer.index, layer.smoa_factors, mx.bfloat16)
        parts = layer.weight_parts()
        es = 2
        steps = {  # name: (the launch of one varying input, the inputs, bytes one launch must move)
            "gather x": (lambda v: kernel_ops.gather(v, plan.col_src, K, N), lambda: randoms((TOKENS, d_in)),
                         (TOKENS * d_in + K * TOKENS * N) * es),
            "gather dy": (lambda v: kernel_ops.gather(v, plan.row_src, K, M), lambda: randoms((TOKENS, d_out)),
                          (TOKENS * d_out + K * TOKENS * M) * es),
            "scatter": (lambda v: kernel_ops.scatter(v, plan.row_slot, None, mx.bfloat16),
                        lambda: randoms((K, TOKENS, M)), (K * TOKENS * M + TOKENS * d_out) * es),
            "scatter+add": (lambda v: kernel_ops.scatter(v, plan.row_slot, base_y, mx.bfloat16),
                            lambda: randoms((K, TOKENS, M)), (K * TOKENS * M + 2 * TOKENS * d_out) * es),
            "modulate": (lambda v: kernel_ops.modulate(layer.layout, plan, parts, v, b_pad, mx.bfloat16),
                         lambda: [a_pad * (1 + i) for i in range(reps)], 2 * K * M * N * es),
            "hadamard": (lambda v: kernel_ops.hadamard(layer.layout, plan, parts, v), lambda: randoms((K, M, N)),
                         3 * K * M * N * es),
            "merge": (lambda b: kernel_ops.merge(layer.layout, plan, parts, b, a_full, mx.bfloat16),
                      lambda: [b_full * (1 + i) for i in range(reps)], 2 * d_out * d_in * es),
            # The same product by MLX's rank-r matmul + fused pass (what the merge kernel replaces), same bytes.
            "merge-mlx": (lambda b: MlxOps().merge(layer.layout, plan, parts, b, a_full, mx.bfloat16),
                          lambda: [b_full * (1 + i) for i in range(reps)], 2 * d_out * d_in * es),
        }
        for name, (fn, make, nbytes) in steps.items():
            if only is not None and name not in only:
                continue
            inputs = make()
            mx.eval(inputs, base_y, a_pad, b_pad, a_full)
            ms, spread, ms_c, spread_c = _eager_and_compiled(fn, inputs)
            row = dict(d_out=d_out, d_in=d_in, blocks=blocks, step=name, ms=ms / reps, gb=nbytes / 1e9,
                       gbps=nbytes / (ms / reps) / 1e6, spread=spread, ms_compiled=ms_c / reps,
                       gbps_compiled=nbytes / (ms_c / reps) / 1e6, spread_compiled=spread_c)
            print("bandwidth", json.dumps(row), flush=True)
            rows.append(row)
    return rows


MOVER_CHECKS = [(4096, 2), (4096, 4), (14336, 2), (14336, 4), (4100, 3), (4095, 3)]  # (width, K): the last two
# ragged (blocks padded with -1), 4100 the 8-byte path in bf16 (VEC = 4), 4095 the scalar one (VEC = 1)


def check_movers(kernel_ops, cases=MOVER_CHECKS, tokens=TOKENS) -> list[dict]:
    """The gathers and scatters against plain MLX (MlxOps) on full-size inputs: equal bits
    required (they only move elements; scatter_add sums in float32 and rounds once, the reference likewise)."""
    import mlx.core as mx
    import numpy as np

    from smoa_mlx.kernels.blocks import MlxOps
    from smoa_mlx.kernels.plan import BlockLayout, build_plan, padded_dims

    ref, rows = MlxOps(), []
    for width, blocks in cases:
        sizes = tuple(len(part) for part in np.array_split(np.arange(width), blocks))
        layout = BlockLayout(sizes, sizes, (1,) * blocks, 1.0)
        K, M, N, _ = padded_dims(layout)
        rng = np.random.default_rng(width + blocks)
        plan = build_plan(layout, rng.permutation(width), rng.permutation(width))
        for dtype in (mx.bfloat16, mx.float32):
            x = mx.random.normal((tokens, width)).astype(dtype)
            yb = mx.random.normal((K, tokens, M)).astype(dtype)
            base = mx.random.normal((tokens, width)).astype(dtype)
            want = {"gather": ref.gather(x, plan.col_src, K, N),
                    "scatter": ref.scatter(yb, plan.row_slot, None, dtype),
                    "scatter_add": (ref.scatter(yb, plan.row_slot, None, mx.float32)
                                    + base.astype(mx.float32)).astype(dtype)}
            mx.eval(x, yb, base, *want.values())
            got = {"gather": kernel_ops.gather(x, plan.col_src, K, N),
                   "scatter": kernel_ops.scatter(yb, plan.row_slot, None, dtype),
                   "scatter_add": kernel_ops.scatter(yb, plan.row_slot, base, dtype)}
            mx.eval(*got.values())
            for kernel, out in got.items():
                diff = mx.not_equal(out, want[kernel])
                row = dict(width=width, blocks=blocks, dtype=str(dtype).split(".")[-1], kernel=kernel,
                           mismatches=int(mx.sum(diff).item()), nans=int(mx.sum(mx.isnan(out)).item()),
                           shape=list(out.shape))
                row["ok"] = row["mismatches"] == 0 and row["nans"] == 0
                print("movers", json.dumps(row), flush=True)
                rows.append(row)
            del x, yb, base, want, got
    return rows


def _breakdowns(kernel_ops) -> list[dict]:
    """The breakdowns a device round runs: 4096x4096 at K = 4 (where the default is furthest above its floor) and 2,
    and 4096x14336 at K = 4."""
    return [r for shape, k in (((4096, 4096), 4), ((4096, 4096), 2), ((4096, 14336), 4))
            for r in breakdown(kernel_ops, shape, k)]


def breakdown(kernel_ops, shape=(4096, 4096), blocks=2, rank=16, reps=10, tokens=TOKENS) -> list[dict]:
    """The merged form's steps alone at one shape: where its time goes (ms per step), with the block gradients'
    steps where ``block_grads_pay``. Each step runs ``reps`` times on distinct inputs, eagerly (``ms``: each launch
    built from Python) and replayed by ``mx.compile`` (``ms_compiled``: the GPU's time, as the trainer's compiled
    step pays it; distinct inputs keep compile from merging the copies)."""
    import mlx.core as mx

    from smoa_mlx.kernels import block_grads_pay
    from smoa_mlx.kernels.blocks import KernelOps, MlxOps, _pack, block_factor_grads
    from smoa_mlx.kernels.dense import full_factors
    from smoa_mlx.kernels.plan import padded_dims, plan_of

    d_out, d_in = shape
    layer = _mlx_layer(d_out, d_in, rank, blocks)
    parts, layout, index, factors = layer.weight_parts(), layer.layout, layer.index, layer.smoa_factors
    w = parts[0]
    plan = plan_of(layout, index)
    mlx_ops = MlxOps()
    bf, af = full_factors(layout, index, factors, mx.bfloat16)
    x = mx.random.normal((tokens, d_in)).astype(mx.bfloat16)
    g = mx.random.normal((tokens, d_out)).astype(mx.bfloat16)
    mx.eval(bf, af, x, g)

    def varied(a):  # reps distinct arrays like ``a``, made on demand (a step's inputs only live while it is timed)
        return lambda: [a + i for i in range(reps)]

    gram = lambda: [mx.random.normal((d_out, d_in)).astype(mx.bfloat16) for _ in range(reps)]  # noqa: E731
    steps = {  # name: (one launch on a varying input, its reps inputs)
        "full factors (one take each)": (lambda f: full_factors(layout, index, f, mx.bfloat16), varied(factors)),
        "merge (rank-r matmul + fused pass)": (lambda b: mlx_ops.merge(layout, plan, parts, b, af, mx.bfloat16),
                                               varied(bf)),
        "x W^T": (lambda v: v @ w.T, varied(x)),
        "dy W": (lambda v: v @ w, varied(g)),
        "G = dy^T x": (lambda v: v.T @ x, varied(g)),
        "s G * W0 (fused pass)": (lambda h: kernel_ops.hadamard_full(layout, parts, h), gram),
        "H A^T": (lambda h: h @ af.T, gram),
        "B^T H": (lambda h: bf.T @ h, gram),
    }
    if isinstance(kernel_ops, KernelOps):
        steps["merge kernel"] = (lambda b: kernel_ops.merge(layout, plan, parts, b, af, mx.bfloat16), varied(bf))
    if block_grads_pay(d_out, d_in, blocks):
        K, M, N, _ = padded_dims(layout)
        a_pad, b_pad = _pack(layout, plan, factors, mx.bfloat16)
        xb = kernel_ops.gather(x, plan.col_src, K, N)
        gb = kernel_ops.gather(g, plan.row_src, K, M)
        mx.eval(a_pad, b_pad, xb, gb)
        steps.update({
            "gather x (block-major)": (lambda v: kernel_ops.gather(v, plan.col_src, K, N), varied(x)),
            "gather dy (block-major)": (lambda v: kernel_ops.gather(v, plan.row_src, K, M), varied(g)),
            "G_k = dy_k^T x_k (batched)": (lambda v: mx.transpose(v, (0, 2, 1)) @ xb, varied(gb)),
            "block factor grads (G_k, Hadamard kernel, products, takes)": (
                lambda v: block_factor_grads(kernel_ops, layout, plan, parts, a_pad, b_pad, xb, v, factors),
                varied(gb)),
        })
    rows = []
    for name, (fn, make) in steps.items():
        inputs = make()
        mx.eval(inputs)
        ms, spread, ms_c, spread_c = _eager_and_compiled(fn, inputs)
        rows.append(dict(d_out=d_out, d_in=d_in, blocks=blocks, step=name, ms=ms / reps, spread=spread,
                         ms_compiled=ms_c / reps, spread_compiled=spread_c))
        print("breakdown", json.dumps(rows[-1]), flush=True)
    return rows


def _amortized_ms(layers, x, cot) -> float:
    """One layer's fwd+bwd in ms, ``len(layers)`` layers per call (:func:`_layers_step`)."""
    import mlx.core as mx

    step = _layers_step(layers, x, cot)
    return _median_time(lambda: mx.eval(step()), mx.synchronize)[0] / len(layers)


def _amortized(kernel_ops, d_out, d_in, rank, blocks, lora_rank, x, cot, n) -> dict:
    """MLX LoRA, the default (auto) and, where it takes block gradients, its :data:`TIMED_VARIANTS`, each timed
    ``n`` layers per call (:func:`_layers_step`); ms per layer."""
    from smoa_mlx.kernels import block_grads_pay
    from smoa_mlx.kernels.merged import merged_fn

    out = {"lora_mlx": _amortized_ms([_lora_layer(d_out, d_in, lora_rank) for _ in range(n)], x, cot)}
    block_grads = block_grads_pay(d_out, d_in, blocks)
    # each its own orders (its own plan) and factors, as a model's layers
    smoa = [_mlx_layer(d_out, d_in, rank, blocks, seed=i) for i in range(n)]

    def calls(block_grads, **kwargs):
        return [(lambda x, f, fn=merged_fn(layer.layout, kernel_ops, block_grads, **kwargs), layer=layer:
                 fn(x, layer.index, layer.weight_parts(), f), [layer.smoa_factors]) for layer in smoa]

    out["smoa_auto"] = _amortized_ms(calls(block_grads), x, cot)
    for v, kwargs in TIMED_VARIANTS.items() if block_grads else ():
        out[f"smoa_auto_{v}"] = _amortized_ms(calls(True, **kwargs), x, cot)
    return out


def bench(kernel_ops, shapes=SHAPES, ranks=RANKS, with_torch=True, amortized=AMORTIZED) -> list[dict]:
    """Per layer, fwd+bwd, one layer per compiled call (``ms``), and, with ``amortized`` > 0, that many layers of
    the shape per call for the frozen layer, MLX LoRA and the default (``ms_amortized``; :func:`_layers_step`)."""
    import mlx.core as mx

    from smoa_mlx.kernels.blocks import block_fn
    from smoa_mlx.kernels.dense import dense_form_delta_fn
    from smoa_mlx.kernels.merged import merged_fn

    rows = []
    for d_out, d_in in shapes:
        x = mx.random.normal((TOKENS, d_in)).astype(mx.bfloat16)
        cot = mx.random.normal((TOKENS, d_out)).astype(mx.bfloat16)
        frozen_mlx, frozen_spread = _median_time(_frozen_step(d_out, d_in, x, cot), mx.synchronize)
        frozen_amortized = (_amortized_ms([_frozen_layer(d_out, d_in) for _ in range(amortized)], x, cot)
                            if amortized else None)
        for blocks in BLOCKS:
            for rank in ranks:
                layer = _mlx_layer(d_out, d_in, rank, blocks)
                lora_rank = rank // blocks  # equal trainable parameters: SMoA has r (d_in + d_out) / K
                t = {"frozen_mlx": frozen_mlx}
                t["smoa"], spread = _median_time(_smoa_step(layer, block_fn(layer.layout, kernel_ops, True), x, cot),
                                                 mx.synchronize)
                t["smoa_dense"] = _median_time(
                    _smoa_step(layer, _with_base(layer, dense_form_delta_fn(layer.layout)), x, cot), mx.synchronize)[0]
                # The merged form with full and with block gradients, as auto picks between them. The rounds before
                # e19b9e1 also timed MLX's merge here (smoa_merged[_blocks]_mlx_merge), the one at 4628c29 the
                # gathers' blocks along the grid's z and x (smoa_merged_blocks[_gather_x]), before x shipped.
                variants = [(f"smoa_merged_blocks_{v}", True, kwargs) for v, kwargs in TIMED_VARIANTS.items()]
                for name, block_grads, kwargs in [("smoa_merged", False, {}), ("smoa_merged_blocks", True, {}),
                                                  *variants]:
                    fn = merged_fn(layer.layout, kernel_ops, block_grads, **kwargs)
                    t[name] = _median_time(_smoa_step(layer, fn, x, cot), mx.synchronize)[0]
                lora_step, lora_params = _lora_step(d_out, d_in, lora_rank, x, cot)
                t["lora_mlx"] = _median_time(lora_step, mx.synchronize)[0]
                t.update(_torch_times(d_out, d_in, rank, blocks, lora_rank) if with_torch else
                         dict(smoa_torch_ref=math.nan, lora_torch=math.nan, frozen_torch=math.nan))
                floor = (2 + 3 / blocks) / 2 * frozen_mlx
                if amortized:
                    t_amortized = dict(frozen_mlx=frozen_amortized, amortized=amortized, **_amortized(
                        kernel_ops, d_out, d_in, rank, blocks, lora_rank, x, cot, amortized))
                row = dict(d_out=d_out, d_in=d_in, blocks=blocks, rank=rank, lora_rank=lora_rank,
                           smoa_params=layer.num_trainable(), lora_params=lora_params, ms=t, floor_ms=floor,
                           **({"ms_amortized": t_amortized} if amortized else {}),
                           x_floor={k: v / floor for k, v in t.items() if k.startswith("smoa_") or k == "smoa"},
                           smoa_spread=spread, frozen_spread=frozen_spread)
                print("bench", json.dumps(row), flush=True)
                rows.append(row)
                del layer
    return rows


def bench_cpu(shape=(1024, 1024), tokens=512, blocks=2, rank=16) -> list[dict]:
    """The pure-MLX forms on this machine's CPU (float32): which one ``auto`` should use there."""
    import mlx.core as mx

    from smoa_mlx.kernels.blocks import MlxOps, block_fn
    from smoa_mlx.kernels.dense import dense_form_delta_fn
    from smoa_mlx.kernels.merged import merged_fn

    rows = []
    d_out, d_in = shape
    layer = _mlx_layer(d_out, d_in, rank, blocks, "float32")
    x, cot = mx.random.normal((tokens, d_in)), mx.random.normal((tokens, d_out))
    forms = {"mlx (block-major)": block_fn(layer.layout, MlxOps(), True),
             "dense (HiRA form)": _with_base(layer, dense_form_delta_fn(layer.layout)),
             "merged": merged_fn(layer.layout, MlxOps(), False),
             "merged (block grads)": merged_fn(layer.layout, MlxOps(), True)}
    for rep in range(3):
        for name, fn in forms.items():
            ms, spread = _median_time(_smoa_step(layer, fn, x, cot), mx.synchronize, budget_s=2.0)
            rows.append(dict(form=name, rep=rep, d_out=d_out, d_in=d_in, tokens=tokens, blocks=blocks, rank=rank,
                             ms=ms, spread=spread))
            print("cpu", json.dumps(rows[-1]), flush=True)
    return rows


def _auto(row: dict) -> tuple[float, str]:
    """(ms, form) of what SMoALinear runs on this layer by default on a GPU (no dropout): the merged form, its
    gradients block by block where block_grads_pay says."""
    from smoa_mlx.kernels import block_grads_pay

    t = row["ms"]
    if block_grads_pay(row["d_out"], row["d_in"], row["blocks"]):
        return t["smoa_merged_blocks"], "merged, block grads"
    return t["smoa_merged"], "merged"


def _launch_label(row: dict) -> str:
    """The launch variant of a bandwidth row (``--gathers`` sweeps); "-" for runs that swept nothing."""
    if "tt" not in row or row["step"] == "modulate":
        return "-"
    if row["step"] == "hadamard":
        return f"{row['hadamard_ti']} rows / thread"
    # "strided": a mapping measured in December 2026 (benchmarks/bench_gathers.json) and dropped
    tt = row.get("scatter_tt", row["tt"]) if row["step"].startswith("scatter") else row["tt"]  # one TT before f45b8b6
    label = f"{tt} tokens / thread" + {0: ", consecutive", 1: ", 32 apart"}.get(row.get("strided"), "")
    if row["step"].startswith("gather") and "gather_along" in row:
        label += f", K={row['blocks']} blocks along {row['gather_along']}"
    return label


def across(runs: dict) -> str:
    """The two ratios ``auto``'s size rules rest on, for every shape and K of several per-layer runs ({name: results}):
    the block form's time over the dense form's (dropout layers: GPU_BLOCK_MIN_WEIGHTS), and the merged form's with
    block gradients over its time with full ones, by the work the blocks save per gathered element
    (MERGED_BLOCK_GRADS_MIN_SAVING). One run's spread is as large as the margins, so the rules read several."""
    ratios = {}  # (weights, shape, K) -> {run: (block / dense, block grads / full grads, saving)}
    for name, data in runs.items():
        for r in data.get("bench", []):
            t, k = r["ms"], r["blocks"]
            key = (r["d_out"] * r["d_in"], f"{r['d_out']}x{r['d_in']}", k)
            saving = r["d_out"] * r["d_in"] * (1 - 1 / k) / (r["d_out"] + r["d_in"])
            dense = t["smoa"] / t["smoa_dense"] if "smoa" in t and "smoa_dense" in t else None
            grads = t["smoa_merged_blocks"] / t["smoa_merged"] if "smoa_merged_blocks" in t and "smoa_merged" in t \
                else None
            ratios.setdefault(key, {})[name] = (dense, grads, saving)
    names = list(runs)

    def cells(key, i):
        return " | ".join(f"{ratios[key][n][i]:.2f}" if n in ratios[key] and ratios[key][n][i] is not None else ""
                          for n in names)

    head = " | ".join(names)
    out = ["Block form / dense form (the update of a dropout layer):", "",
           f"| W0 | weights | K | {head} |", "|---|---|---|" + "---|" * len(names)]
    out += [f"| {key[1]} | {key[0] / 2**20:.0f}M | {key[2]} | {cells(key, 0)} |" for key in sorted(ratios, reverse=True)
            if any(v[0] is not None for v in ratios[key].values())]
    out += ["", "Merged form, block gradients / full gradients, by the work saved per gathered element:", "",
            f"| W0 | K | saved / gathered | {head} |", "|---|---|---|" + "---|" * len(names)]
    by_saving = sorted(ratios, key=lambda key: next(iter(ratios[key].values()))[2])
    out += [f"| {key[1]} | {key[2]} | {next(iter(ratios[key].values()))[2]:.0f} | {cells(key, 1)} |"
            for key in by_saving if any(v[1] is not None for v in ratios[key].values())]
    return "\n".join(out)


def markdown(data: dict) -> str:
    out = [f"Command: `{data['command']}`  ", f"Device: {data['device']}; MLX {data['mlx']}, torch {data['torch']}.", ""]
    if "bench" in data:
        out += ["| W0 (out x in) | K | r | LoRA r | frozen | floor | merged | x floor | merged, block grads | x floor "
                "| block form | x floor | dense form | x floor | auto runs | MLX LoRA | PyTorch ref SMoA | PyTorch LoRA "
                "| auto / MLX LoRA | ref / auto |",
                "|" + "---|" * 20]
        nan = float("nan")
        for r in data["bench"]:
            t, fl = r["ms"], r["floor_ms"]
            auto, name = _auto(r)
            out.append(
                f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {r['rank']} | {r['lora_rank']} | {t['frozen_mlx']:.2f} "
                f"| {fl:.2f} | {t.get('smoa_merged', nan):.2f} | {t.get('smoa_merged', nan) / fl:.2f}x "
                f"| {t.get('smoa_merged_blocks', nan):.2f} | {t.get('smoa_merged_blocks', nan) / fl:.2f}x "
                f"| {t['smoa']:.2f} | {t['smoa'] / fl:.2f}x | {t['smoa_dense']:.2f} | {t['smoa_dense'] / fl:.2f}x "
                f"| {name} | {t['lora_mlx']:.2f} | {t['smoa_torch_ref']:.2f} | {t['lora_torch']:.2f} "
                f"| {auto / t['lora_mlx']:.2f}x | {t['smoa_torch_ref'] / auto:.2f}x |")
        out += ["", _goal_summary(data["bench"]), ""]
        if "copy_gbps" in data:
            out += _design_floor_table(data["bench"], data["copy_gbps"])
        out += _merge_kernel_table(data["bench"])
        out += _variant_tables(data["bench"])
        out += _amortized_table(data["bench"])
    if "breakdown" in data:
        out += ["The merged form's steps alone (bf16, ms per launch; compiled: replayed by mx.compile, as a training "
                "step runs them):", "", "| W0 | K | step | eager ms | compiled ms |", "|---|---|---|---|---|"]
        out += [f"| {r['d_out']}x{r['d_in']} | {r.get('blocks', '-')} | {r['step']} | {r['ms']:.3f} "
                f"| {r['ms_compiled']:.3f} |" if "ms_compiled" in r else
                f"| {r['d_out']}x{r['d_in']} | {r.get('blocks', '-')} | {r['step']} | {r['ms']:.3f} | - |"
                for r in data["breakdown"]]
        out.append("")
    if "bandwidth" in data:
        out += [f"Memory-bound steps (bf16, {TOKENS} tokens; copy ceiling measured in the same run: "
                f"{data.get('copy_gbps', float('nan')):.0f} GB/s):", "",
                "| W0 | step | launch | GB moved | eager ms | GB/s | % of copy | compiled ms | GB/s | % of copy |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        copy = data.get("copy_gbps", float("nan"))
        for r in data["bandwidth"]:  # runs before the compiled timing have no compiled columns
            compiled = (f"{r['ms_compiled']:.3f} | {r['gbps_compiled']:.0f} | {100 * r['gbps_compiled'] / copy:.0f}%"
                        if "ms_compiled" in r else "- | - | -")
            out.append(f"| {r['d_out']}x{r['d_in']} | {r['step']} | {_launch_label(r)} | {r['gb']:.3f} "
                       f"| {r['ms']:.3f} | {r['gbps']:.0f} | {100 * r['gbps'] / copy:.0f}% | {compiled} |")
        out.append("")
    if "movers_check" in data:
        bad = [r for r in data["movers_check"] if not r["ok"]]
        out += [f"Gathers and scatters against plain MLX, {TOKENS} tokens, bf16 and f32: "
                f"{len(data['movers_check']) - len(bad)} of {len(data['movers_check'])} bit-exact.", ""]
        out += [f"- MISMATCH {r['kernel']} width {r['width']} K={r['blocks']} {r['dtype']} "
                f"TT={r.get('tt', '-')}: "
                f"{r['mismatches']} elements differ, {r['nans']} NaN" for r in bad]
        out.append("")
    if "verify" in data:
        out += ["Correctness (max relative error over y, dx, dA_k, dB_k against float64 numpy):", "",
                "| W0 | K | r (per block) | bits | dtype | tokens | block form (fused base) | block form (update alone) "
                "| merged | merged, block grads | pure-MLX reference | tol | ok |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for v in data["verify"]:
            ranks = v["branch"] if v["branch"] else v["rank"]
            out.append(f"| {v['d_out']}x{v['d_in']} | {v['blocks']} | {ranks} | {v['bits'] or '-'} | {v['dtype']} "
                       f"| {v['tokens']} | "
                       + " | ".join(f"{v[name + '_rel_err']:.1e}" if name + "_rel_err" in v else "-"
                                    for name in ("kernel", "kernel_delta", "merged", "merged_blocks", "reference"))
                       + f" | {v['tol']:.0e} | {_verified(v)} |")
    if "cpu" in data:
        out += ["", "| form (CPU, float32) | rep | ms |", "|---|---|---|"]
        out += [f"| {r['form']} | {r['rep']} | {r['ms']:.1f} |" for r in data["cpu"]]
    return "\n".join(out)


def design_floor(row: dict, copy_gbps: float, tokens: int = TOKENS) -> dict:
    """What the default (merged) form cannot go below on this device, from the same run's measurements: its
    layer-matmuls at the frozen step's pace (2 + 1/K with block gradients, else 3, against the frozen step's 2) plus
    the bytes its memory-bound passes must move at the copy ceiling (bf16: each build of W0 + Delta W by the merge
    kernel reads W0 and writes W, twice per step; block gradients gather x and dy and read G_k and
    the anchors to write H; full gradients read G and W0 to write s G * W0). An estimate, not a strict bound: it
    leaves out the rank-r products, the factors' small passes and every launch's own cost, but scales the frozen
    step's fixed cost with its matmuls, which overstates the floor (by an eighth of that cost at 2.25 layer-matmuls,
    by half at 3: enough on a small layer that a form ran below it, 1024x4096 at K = 2, December 2026). Why: a goal
    well below it on large layers is out of reach of any kernel of this design."""
    from smoa_mlx.kernels import block_grads_pay

    d_out, d_in, k = row["d_out"], row["d_in"], row["blocks"]
    weights, two = d_out * d_in, 2  # bf16 bytes
    blocks = block_grads_pay(d_out, d_in, k)
    matmuls = 2 + 1 / k if blocks else 3
    moved = 2 * 2 * two * weights  # two builds of W0 + Delta W (the merge kernel: W0 in, W out)
    if blocks:
        moved += 2 * two * tokens * (d_in + d_out) + 3 * two * weights / k
    else:
        moved += 3 * two * weights
    ms = row["ms"]["frozen_mlx"] * matmuls / 2 + moved / copy_gbps / 1e6
    return {"ms": ms, "matmuls": matmuls, "gb_moved": moved / 1e9, "vs_lora": ms / row["ms"]["lora_mlx"]}


def _design_floor_table(rows: list[dict], copy_gbps: float) -> list[str]:
    # A joined run (--join) keeps each part's copy ceiling on its rows: the parts may have run on two machines.
    ceilings = sorted({round(r.get("copy_gbps", copy_gbps)) for r in rows})
    out = ["The merged form's own floor (`design_floor`: its layer-matmuls at the frozen step's pace plus its passes' "
           f"bytes at the copy ceiling, {' and '.join(map(str, ceilings))} GB/s; an estimate, see below):", "",
           "| W0 | K | layer-matmuls | GB moved | floor ms | auto ms | auto / floor | MLX LoRA | floor / MLX LoRA |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, auto = design_floor(r, r.get("copy_gbps", copy_gbps)), _auto(r)[0]
        out.append(f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {f['matmuls']:.2f} | {f['gb_moved']:.2f} "
                   f"| {f['ms']:.2f} | {auto:.2f} | {auto / f['ms']:.2f}x | {r['ms']['lora_mlx']:.2f} "
                   f"| {f['vs_lora']:.2f}x |")
    out.append("")
    for k in sorted({r["blocks"] for r in rows}):
        med = statistics.median(design_floor(r, r.get("copy_gbps", copy_gbps))["vs_lora"]
                                for r in rows if r["blocks"] == k)
        out.append(f"K={k}: the floor is {med:.2f}x MLX LoRA's time (median over the shapes).  ")
    return out + [""]


# Variants of the merged form with block gradients, timed per layer beside the default (``smoa_merged_blocks_<v>``)
# and with several layers per call (``smoa_auto_<v>``), and what each was: the gathers' blocks along the grid's x
# (the run at 4628c29, where z still shipped; x since), and the block gradients on a second stream of the device
# (SMOA_MLX_SIDE_STREAM=1, merged_fn's ``side_stream``: opt-in until timed on a GPU).
VARIANTS = {"gather_x": "the gathers along x", "side": "the block grads on a side stream"}
TIMED_VARIANTS = {"side": dict(side_stream=True)}  # what bench() times now: merged_fn's arguments for each


def _amortized_table(rows: list[dict]) -> list[str]:
    """The per-layer times with ``amortized`` layers of a shape per call (runs since the column existed), with the
    variants a run timed (:data:`VARIANTS`; auto's own time where a shape takes no block gradients)."""
    rows = [r for r in rows if "ms_amortized" in r]
    if not rows:
        return []
    n = rows[0]["ms_amortized"]["amortized"]
    variants = [v for v in VARIANTS if any(f"smoa_auto_{v}" in r["ms_amortized"] for r in rows)]
    out = [f"{n} layers of a shape per compiled call (each its own weights and inputs), ms per layer; the ratios "
           "with one layer per call beside them:", "",
           "| W0 | K | frozen | MLX LoRA | auto | auto / MLX LoRA | one per call |"
           + "".join(f" auto, {VARIANTS[v]} | / MLX LoRA |" for v in variants),
           "|---|---|---|---|---|---|---|" + "---|---|" * len(variants)]
    ratios = {}
    for r in rows:
        a = r["ms_amortized"]
        one = _auto(r)[0] / r["ms"]["lora_mlx"]
        ratio = a["smoa_auto"] / a["lora_mlx"]
        line = (f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {a['frozen_mlx']:.2f} | {a['lora_mlx']:.2f} "
                f"| {a['smoa_auto']:.2f} | {ratio:.2f}x | {one:.2f}x |")
        timed = [a.get(f"smoa_auto_{v}", a["smoa_auto"]) for v in variants]
        ratios.setdefault(r["blocks"], []).append((ratio, one, *(t / a["lora_mlx"] for t in timed)))
        out.append(line + "".join(f" {t:.2f} | {t / a['lora_mlx']:.2f}x |" for t in timed))
    out.append("")
    for k, v in sorted(ratios.items()):
        med = [statistics.median(c) for c in zip(*v)]
        out.append(f"K={k}, medians over the shapes: auto / MLX LoRA {med[0]:.2f}x ({n} per call), "
                   f"{med[1]:.2f}x (one per call)"
                   + "".join(f"; with {VARIANTS[name]} {m:.2f}x" for name, m in zip(variants, med[2:])) + ".  ")
    return out + [""]


def _variant_tables(rows: list[dict]) -> list[str]:
    """Per variant a run timed (:data:`VARIANTS`): the merged form with block gradients as shipped and as the
    variant, and what auto / MLX LoRA would be with it (only where auto takes block gradients)."""
    out = []
    for v, label in VARIANTS.items():
        timed = [r for r in rows if f"smoa_merged_blocks_{v}" in r["ms"]]
        if not timed:
            continue
        out += [f"The merged form with block gradients, as shipped and with {label} (ms):", "",
                "| W0 | K | auto runs | shipped | variant | variant / shipped | auto / MLX LoRA | with the variant |",
                "|---|---|---|---|---|---|---|---|"]
        with_v = {}
        for r in timed:
            auto, name = _auto(r)
            base, var = r["ms"]["smoa_merged_blocks"], r["ms"][f"smoa_merged_blocks_{v}"]
            auto_v = var if "block" in name else auto
            lora = r["ms"]["lora_mlx"]
            with_v.setdefault(r["blocks"], []).append(auto_v / lora)
            out.append(f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {name} | {base:.2f} | {var:.2f} "
                       f"| {var / base:.2f} | {auto / lora:.2f}x | {auto_v / lora:.2f}x |")
        out.append("")
        out += [f"K={k}: auto / MLX LoRA with {label} {statistics.median(m):.2f}x (median over the shapes).  "
                for k, m in sorted(with_v.items())]
        out.append("")
    return out


def _merge_kernel_table(rows: list[dict]) -> list[str]:
    """The default against the same form with MLX's rank-r matmul + fused pass building W0 + Delta W (runs since the
    merge kernel; earlier ones have no such column)."""
    rows = [r for r in rows if "smoa_merged_mlx_merge" in r["ms"]]
    if not rows:
        return []
    out = ["W0 + Delta W by the merge kernel (the default) or by MLX's rank-r matmul + fused pass, the rest of the "
           "step the same (ms):", "", "| W0 | K | auto runs | merge kernel | MLX's merge | kernel / MLX |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        auto, name = _auto(r)
        other = r["ms"]["smoa_merged_blocks_mlx_merge" if "block" in name else "smoa_merged_mlx_merge"]
        out.append(f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {name} | {auto:.2f} | {other:.2f} "
                   f"| {auto / other:.2f} |")
    return out + [""]


def _goal_summary(rows: list[dict]) -> str:
    lines = []
    for blocks in sorted({r["blocks"] for r in rows}):
        sel = [r for r in rows if r["blocks"] == blocks]
        med = lambda f: statistics.median(f(r) for r in sel)  # noqa: E731
        ratio = lambda f: f"{min(f(r) for r in sel):.2f} to {max(f(r) for r in sel):.2f}"  # noqa: E731
        lines.append(
            f"K={blocks}, medians over the shapes: auto {med(lambda r: _auto(r)[0] / r['floor_ms']):.2f}x floor "
            f"(block form {med(lambda r: r['ms']['smoa'] / r['floor_ms']):.2f}x, dense form "
            f"{med(lambda r: r['ms']['smoa_dense'] / r['floor_ms']):.2f}x); "
            f"auto / MLX LoRA {med(lambda r: _auto(r)[0] / r['ms']['lora_mlx']):.2f}; "
            f"PyTorch ref / auto {med(lambda r: r['ms']['smoa_torch_ref'] / _auto(r)[0]):.2f}; "
            f"auto / dense form {ratio(lambda r: _auto(r)[0] / r['ms']['smoa_dense'])}.")
    return "  \n".join(lines)


def join(parts: list[dict], names: Optional[list[str]] = None) -> dict:
    """One results file from a run split over device calls (``--shapes``, a call's time limit): the first part's
    fields, every part's commands, per-layer rows and bandwidth rows, each per-layer row with its own part's copy
    ceiling (the calls may have had different machines). Parts that timed other token counts, devices or MLX
    versions do not make one run: a ValueError names the first that differs (``names``: the parts' files)."""
    names = names or [f"part {i + 1}" for i in range(len(parts))]
    for key in ("tokens", "device", "mlx"):
        for name, p in zip(names[1:], parts[1:]):
            if p.get(key) != parts[0].get(key):
                raise ValueError(f"{name}: {key} {p.get(key)!r}, but {names[0]} has {parts[0].get(key)!r}")
    out = dict(parts[0], command=" ; ".join(p["command"] for p in parts))
    for key in ("bench", "bandwidth"):
        if any(key in p for p in parts):
            out[key] = [dict(r, **({"copy_gbps": p["copy_gbps"]} if key == "bench" and "copy_gbps" in p else {}))
                        for p in parts for r in p.get(key, [])]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--markdown", help="print the markdown tables of a results JSON and exit")
    ap.add_argument("--across", nargs="+", metavar="JSON",
                    help="print, across these results files, the ratios auto's size rules rest on, and exit")
    ap.add_argument("--join", nargs="+", metavar="JSON",
                    help="write to --out one results file from these parts of a split run, and exit")
    ap.add_argument("--cpu", action="store_true", help="time the pure-MLX forms on the CPU only")
    ap.add_argument("--skip-bench", action="store_true", help="only the correctness check")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--gathers", action="store_true",
                    help="only the gathers and scatters: checked bit for bit against plain MLX on full-size inputs, "
                         "then their bandwidth")
    ap.add_argument("--tt", help="with --gathers: comma-separated tokens per gather/scatter thread to compare "
                                 "(default: the kernels' own, source.TT and SCATTER_TT); each checked bit for bit, "
                                 "then timed")
    ap.add_argument("--hadamard-ti", help="with --gathers: also time the Hadamard kernel at these rows per thread "
                                          "(e.g. 4,16; shipped: source.HADAMARD_TI, 4; the CPU shim proves them equal)")
    ap.add_argument("--shapes", help="comma-separated OUTxIN shapes instead of the full set (smoke runs)")
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)))
    ap.add_argument("--cases", help="comma-separated indices into VERIFY (default: every case)")
    ap.add_argument("--forms", default=",".join(VERIFY_FORMS),
                    help="the verification's forms (merged,merged_blocks: no quantized matmul to compile)")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32",
                    help="the verification's types (a case's first use of each compiles new kernels on CUDA)")
    ap.add_argument("--bandwidth", action="store_true",
                    help="only the copy ceiling and the memory-bound steps' bandwidth, eager and compiled")
    ap.add_argument("--steps", help="with --bandwidth: comma-separated steps to time (e.g. merge,merge-mlx)")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the merged form's steps alone, eager and compiled (4096x4096 at K=4 and 2, "
                         "4096x14336 at K=4), with the copy ceiling")
    ap.add_argument("--stall-s", type=float, default=420, help="end a verification case stuck this long")
    ap.add_argument("--no-probe", action="store_true",
                    help="use the GPU kernels without the dispatcher's probe (saves its compilations)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    ap.add_argument("--amortized", type=int, default=AMORTIZED,
                    help="also time the frozen layer, MLX LoRA and the default with this many layers of a shape per "
                         "compiled call (the per-call cost spread as a model's step spreads it); 0 skips")
    ap.add_argument("--no-extras", action="store_true", help="skip the copy, step breakdown and bandwidth tables")
    ap.add_argument("--skip-breakdown", action="store_true", help="skip the merged form's step breakdown")
    args = ap.parse_args(argv)
    if args.across:
        print(across({Path(f).stem: json.loads(Path(f).read_text()) for f in args.across}))
        return 0
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.join:
        if not args.out:
            ap.error("--join needs --out")
        parts = []
        for f in args.join:
            try:
                parts.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as e:
                ap.error(f"--join: {f}: {e}")
        try:
            joined = join(parts, args.join)
        except ValueError as e:
            ap.error(f"--join: {e}")
        Path(args.out).write_text(json.dumps(joined, indent=1))
        return 0
    import mlx.core as mx

    data = {"command": "python scripts/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "mlx": mx.__version__, "platform": platform.platform(), "tokens": TOKENS}
    ok = True
    if args.cpu:
        mx.set_default_device(mx.cpu)
        data.update(device="CPU (" + platform.processor() + ")", torch="-", cpu=bench_cpu())
    else:
        try:
            import torch
        except ImportError:  # only the PyTorch columns need it
            if not (args.gathers or args.no_torch):
                raise
            torch = None

        from smoa_mlx.kernels import _ops
        from smoa_mlx.kernels.blocks import KernelOps

        if args.no_probe:
            from smoa_mlx.kernels.gpu import GpuRunner, gpu_backend

            kernel_ops = KernelOps(GpuRunner(gpu_backend())) if gpu_backend() else None
        else:
            kernel_ops = _ops()
        if not isinstance(kernel_ops, KernelOps):
            raise SystemExit("bench_kernels: no working GPU kernels on this machine (see the warning above)")
        with_torch = torch is not None and torch.cuda.is_available() and not args.no_torch
        data.update(device=torch.cuda.get_device_name(0) if with_torch else mx.device_info().get("device_name", "?"),
                    torch=torch.__version__ if torch is not None else "-", backend=kernel_ops.name)
        if args.bandwidth:
            data["copy_gbps"] = copy_bandwidth()
            data["bandwidth"] = kernel_bandwidth(kernel_ops, SHAPES[:3],
                                                 only=args.steps.split(",") if args.steps else None)
        elif args.breakdown:
            data["copy_gbps"] = copy_bandwidth()
            data["breakdown"] = _breakdowns(kernel_ops)
        elif args.gathers:
            data["copy_gbps"] = copy_bandwidth()
            data["movers_check"], data["bandwidth"] = [], []
            movers = ("gather x", "gather dy", "scatter", "scatter+add")
            for tt in map(int, args.tt.split(",")) if args.tt else [None]:
                (checks, rows), variant = _with_variant(lambda: (
                    check_movers(kernel_ops), kernel_bandwidth(kernel_ops, SHAPES[:3], only=movers)), tt)
                for r in checks + rows:
                    r.update(variant)
                data["movers_check"] += checks
                data["bandwidth"] += rows
            for ti in map(int, args.hadamard_ti.split(",")) if args.hadamard_ti else []:
                rows, variant = _with_variant(lambda: kernel_bandwidth(kernel_ops, SHAPES[:3], only=("hadamard",)),
                                              hadamard_ti=ti)
                data["bandwidth"] += [dict(r, **variant) for r in rows]
            ok = all(r["ok"] for r in data["movers_check"])
        elif not args.skip_bench:
            shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
            if not args.no_extras:
                data["copy_gbps"] = copy_bandwidth()
                if not args.skip_breakdown:
                    data["breakdown"] = _breakdowns(kernel_ops)
                data["bandwidth"] = kernel_bandwidth(kernel_ops, shapes[:3])
            data["bench"] = bench(kernel_ops, shapes, tuple(map(int, args.ranks.split(","))), with_torch,
                                  args.amortized)
            if args.out:  # the timings are safe on disk before the verification starts
                Path(args.out).write_text(json.dumps(data, indent=1))
        if not args.skip_verify and not (args.gathers or args.bandwidth or args.breakdown):
            cases = [VERIFY[int(i)] for i in args.cases.split(",")] if args.cases else VERIFY
            data["verify"] = verify(kernel_ops, cases, args.stall_s, args.dtypes.split(","), args.forms.split(","))
            ok = all(_verified(v) for v in data["verify"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=1))
    print(markdown(data))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
