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
import itertools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (1024, 4096)]  # (d_out, d_in) as (rows, cols) of W0
BLOCKS = (2, 4)
RANKS = (16,)
TOKENS = 8192
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kernel_tables import across, join, markdown, verified  # noqa: E402  (this script's folder, as a script's)


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
# Variants of the kernels that bench() times beside the shipped ones, per layer in both merged forms and in auto
# with several layers per call, and --merges alone (kernel_tables.VARIANTS names every variant a results file may
# hold): the launch constants of each (:func:`_with_variant`), e.g. {"merge_ti4": dict(merge_ti=4)}. None now: the
# run at 78f3eb4 timed the merge's rank loop unrolled at 8 and 4 rows per thread, the one at ef65f8c its loop at 4 and
# 2 rows per thread (none faster per layer, none shipped).
TIMED_VARIANTS: dict[str, dict] = {}


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
            row["ok"] = verified(row)
            print("verify", json.dumps(row), flush=True)
            rows.append(row)
    faulthandler.cancel_dump_traceback_later()
    return rows


# -- speed ------------------------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """GB/s of a large device copy (bytes read + written), the ceiling the memory-bound kernels are held to."""
    import mlx.core as mx

    x = mx.random.normal((1 << 30,)).astype(mx.bfloat16)  # 2 GiB
    mx.eval(x)
    ms, _ = _median_time(lambda: mx.eval(x * 1), mx.synchronize, budget_s=0.3)
    return 2 * x.nbytes / ms / 1e6


def _with_variant(fn, tt=None, hadamard_ti=None, merge_ti=None):
    """(``fn()``, the variant it ran) with the kernels' launch constants set: ``tt`` tokens per gather and per
    scatter thread (shipped: 8 and 4), ``hadamard_ti`` rows per Hadamard thread, ``merge_ti`` rows per merge
    thread; None leaves one as shipped. Each is a template constant, so its variant is its own compiled kernel; a
    compiled step traced inside ``fn`` keeps it."""
    from smoa_mlx.kernels import blocks, source

    shipped = blocks.TT, blocks.SCATTER_TT, source.HADAMARD_TI, source.MERGE_TI
    blocks.TT, blocks.SCATTER_TT = shipped[:2] if tt is None else (tt, tt)
    source.HADAMARD_TI = shipped[2] if hadamard_ti is None else hadamard_ti
    source.MERGE_TI = shipped[3] if merge_ti is None else merge_ti
    try:
        return fn(), dict(tt=blocks.TT, scatter_tt=blocks.SCATTER_TT, hadamard_ti=source.HADAMARD_TI,
                          merge_ti=source.MERGE_TI)
    finally:
        blocks.TT, blocks.SCATTER_TT, source.HADAMARD_TI, source.MERGE_TI = shipped


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


def check_merge_variants(kernel_ops, shapes, rank=16) -> list[dict]:
    """Each of :data:`TIMED_VARIANTS`' merge kernels against the shipped one on full-size weights, K = 2 and 4,
    bf16 and float32: equal bits required (the same sums in the same order, only the threads' mapping differs)."""
    import mlx.core as mx

    from smoa_mlx.kernels.dense import full_factors
    from smoa_mlx.kernels.plan import plan_of

    rows = []
    for (d_out, d_in), blocks, dtype in itertools.product(shapes, BLOCKS, (mx.bfloat16, mx.float32)):
        layer = _mlx_layer(d_out, d_in, rank, blocks, str(dtype).split(".")[-1])
        plan, parts = plan_of(layer.layout, layer.index), layer.weight_parts()
        full = full_factors(layer.layout, layer.index, layer.smoa_factors, dtype)

        def merge():
            out = kernel_ops.merge(layer.layout, plan, parts, *full, dtype)
            mx.eval(out)  # launched (and the kernel built) while the variant's constants are set
            return out

        want = merge()
        for v, consts in TIMED_VARIANTS.items():
            out, _ = _with_variant(merge, **consts)
            row = dict(width=f"{d_out}x{d_in}", blocks=blocks, dtype=str(dtype).split(".")[-1], kernel=f"merge {v}",
                       mismatches=int(mx.sum(mx.not_equal(out, want)).item()),
                       nans=int(mx.sum(mx.isnan(out)).item()), shape=list(out.shape))
            row["ok"] = row["mismatches"] == 0 and row["nans"] == 0
            print("movers", json.dumps(row), flush=True)
            rows.append(row)
    return rows


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
    """MLX LoRA, the default (auto) and auto with each of :data:`TIMED_VARIANTS`, each timed ``n`` layers per call
    (:func:`_layers_step`); ms per layer."""
    from smoa_mlx.kernels import block_grads_pay
    from smoa_mlx.kernels.merged import merged_fn

    out = {"lora_mlx": _amortized_ms([_lora_layer(d_out, d_in, lora_rank) for _ in range(n)], x, cot)}
    block_grads = block_grads_pay(d_out, d_in, blocks)
    # each its own orders (its own plan) and factors, as a model's layers; each timing compiles (traces) its own step
    smoa = [_mlx_layer(d_out, d_in, rank, blocks, seed=i) for i in range(n)]
    layers = [(lambda x, f, fn=merged_fn(layer.layout, kernel_ops, block_grads), layer=layer:
               fn(x, layer.index, layer.weight_parts(), f), [layer.smoa_factors]) for layer in smoa]
    out["smoa_auto"] = _amortized_ms(layers, x, cot)
    for v, consts in TIMED_VARIANTS.items():
        out[f"smoa_auto_{v}"] = _with_variant(lambda: _amortized_ms(layers, x, cot), **consts)[0]
    return out


def bench(kernel_ops, shapes=SHAPES, ranks=RANKS, with_torch=True, amortized=AMORTIZED) -> list[dict]:
    """Per layer, fwd+bwd, one layer per compiled call (``ms``), and, with ``amortized`` > 0, that many layers of
    the shape per call for the frozen layer, MLX LoRA and the default (``ms_amortized``; :func:`_layers_step`)."""
    import mlx.core as mx

    from smoa_mlx.kernels.blocks import block_fn
    from smoa_mlx.kernels.dense import dense_form_delta_fn
    from smoa_mlx.kernels.merged import merged_fn

    # The merged form with full and with block gradients, as auto picks between them, and the variants beside them.
    # The rounds before e19b9e1 also timed MLX's merge (smoa_merged[_blocks]_mlx_merge), the one at 4628c29 the
    # gathers' blocks along the grid's z and x (smoa_merged_blocks[_gather_x]), before x shipped, and the one at
    # f1410eb the block gradients on a second stream (smoa_merged_blocks_side), since removed.
    merged_forms = [("smoa_merged", False, {}), ("smoa_merged_blocks", True, {}),
                    *((f"smoa_merged{g}_{v}", grads, consts) for v, consts in TIMED_VARIANTS.items()
                      for g, grads in (("", False), ("_blocks", True)))]
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
                for name, block_grads, consts in merged_forms:
                    # traced when first run: inside _with_variant, with the variant's launch constants
                    step = _smoa_step(layer, merged_fn(layer.layout, kernel_ops, block_grads), x, cot)
                    t[name] = _with_variant(lambda: _median_time(step, mx.synchronize)[0], **consts)[0]
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
    ap.add_argument("--merges", action="store_true",
                    help="the merge kernel as shipped and as each of TIMED_VARIANTS, each variant checked bit for bit "
                         "against the shipped merge on full-size weights, then all timed (with --gathers: after them)")
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
        elif args.gathers or args.merges:
            data["copy_gbps"] = copy_bandwidth()
            data["movers_check"], data["bandwidth"] = [], []
            sweeps = []  # (steps, launch constants): each timed with its constants set, its rows labelled with them
            if args.gathers:
                tts = [int(tt) for tt in args.tt.split(",")] if args.tt else [None]
                for tt in tts:
                    checks, variant = _with_variant(lambda: check_movers(kernel_ops), tt=tt)
                    data["movers_check"] += [dict(r, **variant) for r in checks]
                sweeps += [(("gather x", "gather dy", "scatter", "scatter+add"), dict(tt=tt)) for tt in tts]
                sweeps += [(("hadamard",), dict(hadamard_ti=int(ti)))
                           for ti in (args.hadamard_ti.split(",") if args.hadamard_ti else [])]
            if args.merges:
                data["movers_check"] += check_merge_variants(kernel_ops, SHAPES[:3])
                sweeps += [(("merge",), consts) for consts in [{}, *TIMED_VARIANTS.values()]]
            for steps, consts in sweeps:
                rows, variant = _with_variant(lambda: kernel_bandwidth(kernel_ops, SHAPES[:3], only=steps), **consts)
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
        if not args.skip_verify and not (args.gathers or args.merges or args.bandwidth or args.breakdown):
            cases = [VERIFY[int(i)] for i in args.cases.split(",")] if args.cases else VERIFY
            data["verify"] = verify(kernel_ops, cases, args.stall_s, args.dtypes.split(","), args.forms.split(","))
            ok = all(verified(v) for v in data["verify"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=1))
    print(markdown(data))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
