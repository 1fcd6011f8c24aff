"""Per-layer SMoA cost, side by side, in one run on one GPU: the fused kernel, the pure-MLX path, MLX LoRA at equal
trainable parameters, the reference-style PyTorch SMoA (dense Delta W + a second matmul, as the authors' code does)
and PyTorch LoRA; plus a correctness check of the kernels against the pure-MLX path.

    python scripts/bench_kernels.py --out benchmarks/bench_kernels.json          # on the GPU machine
    python scripts/bench_kernels.py --markdown benchmarks/bench_kernels.json     # table for docs/BENCHMARKS.md

Timings: forward + backward (dx and the trainable parameters' gradients) of one frozen linear plus its adapter,
bf16 activations and base, 8192 tokens, median over repeats after warm-up, device-synchronised.
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

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (1024, 4096)]  # (d_out, d_in) as (rows, cols) of W0
BLOCKS = (2, 4)
RANKS = (8, 16, 32)
TOKENS = 8192


def _median_time(step, sync, budget_s=0.6, min_reps=3, max_reps=30) -> float:
    for _ in range(2):
        step()
        sync()
    times = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < budget_s):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# -- MLX ------------------------------------------------------------------------------------------------------
def _mlx_smoa(d_out, d_in, rank, blocks, quant_bits=0):
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from smoa_mlx.layer import SMoALinear

    base = nn.Linear(d_in, d_out, bias=False)
    base.set_dtype(mx.bfloat16)
    if quant_bits:
        base = nn.QuantizedLinear.from_linear(base, group_size=64, bits=quant_bits)
    rng = np.random.default_rng(0)
    layer = SMoALinear.from_base(base, rank=rank, blocks=blocks, row_order=rng.permutation(d_out),
                                 col_order=rng.permutation(d_in))
    layer.smoa_b = [mx.random.normal(b.shape) * 0.02 for b in layer.smoa_b]
    return layer


def _smoa_step(layer, delta, x, cot):
    import mlx.core as mx

    k = len(layer.smoa_a)

    def f(x, *params):
        y = layer.linear(x)
        return y + delta(x, layer.index, layer.weight_parts(), list(params[:k]), list(params[k:])).astype(y.dtype)

    primals = [x, *layer.smoa_a, *layer.smoa_b]
    return lambda: mx.eval(mx.vjp(f, primals, [cot]))


def _lora_step(d_out, d_in, rank, x, cot):
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

    primals = [x, lora.lora_a, lora.lora_b]
    return lambda: mx.eval(mx.vjp(f, primals, [cot])), rank * (d_in + d_out)


def _frozen_step(d_out, d_in, x, cot):
    import mlx.core as mx
    import mlx.nn as nn

    base = nn.Linear(d_in, d_out, bias=False)
    base.set_dtype(mx.bfloat16)
    return lambda: mx.eval(mx.vjp(lambda x: base(x), [x], [cot]))


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

    smoa_t, lora_t, frozen_t = _torch_steps(d_out, d_in, rank, blocks, lora_rank)
    out = {name: _median_time(step, torch.cuda.synchronize)
           for name, step in (("smoa_torch_ref", smoa_t), ("lora_torch", lora_t), ("frozen_torch", frozen_t))}
    del smoa_t, lora_t, frozen_t
    torch.cuda.empty_cache()
    return out


# -- correctness ----------------------------------------------------------------------------------------------
def verify() -> list[dict]:
    import mlx.core as mx

    from smoa_mlx.kernels import dense_form_delta_fn, fused_delta_fn, reference_delta_fn
    from smoa_mlx.kernels.gpu import GpuRunner, gpu_backend

    runner = GpuRunner(gpu_backend())
    rows = []
    cases = [(4096, 4096, 2, 16, 0), (1024, 4096, 4, 8, 0), (14336, 4096, 2, 32, 0), (4096, 4096, 2, 16, 4),
             (1024, 4096, 4, 32, 8), (300, 200, 3, 7, 0)]
    for d_out, d_in, blocks, rank, bits in cases:
        layer = _mlx_smoa(d_out, d_in, rank, blocks, bits)
        for dtype in (t for t in (mx.bfloat16, mx.float16, mx.float32) if runner.accepts(t)):
            x = mx.random.normal((2, 512, d_in)).astype(dtype)
            cot = mx.random.normal((2, 512, d_out)).astype(dtype)
            args = (layer.index, layer.weight_parts(), layer.smoa_a, layer.smoa_b)
            results = {}
            for name, fn in (("kernel", fused_delta_fn(layer.layout, runner)), ("mlx", reference_delta_fn(layer.layout)),
                             ("dense", dense_form_delta_fn(layer.layout))):
                y, vjps = mx.vjp(lambda x, *p: fn(x, args[0], args[1], list(p[:blocks]), list(p[blocks:])),
                                 [x, *layer.smoa_a, *layer.smoa_b], [cot])
                mx.eval(y, vjps)
                results[name] = [y[0], *vjps]
            # Float64-like reference: the pure-MLX path on float32 upcasts of the same inputs.
            ref = reference_delta_fn(layer.layout)
            parts32 = tuple(p if p.dtype == mx.uint32 else p.astype(mx.float32) for p in args[1])
            y32, v32 = mx.vjp(lambda x, *p: ref(x, args[0], parts32, list(p[:blocks]), list(p[blocks:])),
                              [x.astype(mx.float32), *layer.smoa_a, *layer.smoa_b], [cot.astype(mx.float32)])
            want = [y32[0], *v32]

            def rel(got):
                errs = []
                for g, w in zip(got, want):
                    g, w = g.astype(mx.float32), w.astype(mx.float32)
                    errs.append(float(mx.linalg.norm((g - w).reshape(-1)) / (mx.linalg.norm(w.reshape(-1)) + 1e-30)))
                return max(errs)

            kernel_err, mlx_err, dense_err = rel(results["kernel"]), rel(results["mlx"]), rel(results["dense"])
            tol = 2e-2
            row = dict(d_out=d_out, d_in=d_in, blocks=blocks, rank=rank, bits=bits, dtype=str(dtype),
                       kernel_rel_err=kernel_err, mlx_rel_err=mlx_err, dense_rel_err=dense_err, tol=tol)
            row["ok"] = _verified(row)
            print("verify", row, flush=True)
            rows.append(row)
    return rows


def _verified(row: dict) -> bool:
    """Within tolerance of the float32 reference, and (in bf16/f16, where the pure-MLX path has its own rounding
    error) no worse than twice the pure-MLX path's error. In float32 the reference *is* the pure-MLX path."""
    if row["kernel_rel_err"] >= row["tol"]:
        return False
    return row["dtype"].endswith("float32") or row["kernel_rel_err"] <= 2 * row["mlx_rel_err"]


def bench(shapes=SHAPES) -> list[dict]:
    import mlx.core as mx
    import torch

    from smoa_mlx.kernels import dense_form_delta_fn, fused_delta_fn, reference_delta_fn
    from smoa_mlx.kernels.gpu import GpuRunner, gpu_backend

    runner = GpuRunner(gpu_backend())
    with_torch = torch.cuda.is_available()  # the PyTorch columns are CUDA-only; NaN elsewhere (a Mac)
    rows = []
    for d_out, d_in in shapes:
        x = mx.random.normal((TOKENS, d_in)).astype(mx.bfloat16)
        cot = mx.random.normal((TOKENS, d_out)).astype(mx.bfloat16)
        frozen_mlx = _median_time(_frozen_step(d_out, d_in, x, cot), mx.synchronize)
        for blocks in BLOCKS:
            for rank in RANKS:
                layer = _mlx_smoa(d_out, d_in, rank, blocks)
                lora_rank = rank // blocks  # equal trainable parameters: SMoA has r (d_in + d_out) / K
                t = {"frozen_mlx": frozen_mlx}
                t["smoa_kernel"] = _median_time(
                    _smoa_step(layer, fused_delta_fn(layer.layout, runner), x, cot), mx.synchronize)
                t["smoa_mlx"] = _median_time(_smoa_step(layer, reference_delta_fn(layer.layout), x, cot), mx.synchronize)
                t["smoa_dense"] = _median_time(_smoa_step(layer, dense_form_delta_fn(layer.layout), x, cot),
                                               mx.synchronize)
                lora_step, lora_params = _lora_step(d_out, d_in, lora_rank, x, cot)
                t["lora_mlx"] = _median_time(lora_step, mx.synchronize)
                t.update(_torch_times(d_out, d_in, rank, blocks, lora_rank) if with_torch else
                         dict(smoa_torch_ref=math.nan, lora_torch=math.nan, frozen_torch=math.nan))
                row = dict(d_out=d_out, d_in=d_in, blocks=blocks, rank=rank, lora_rank=lora_rank,
                           smoa_params=layer.num_trainable(), lora_params=lora_params, ms=t)
                print("bench", json.dumps(row), flush=True)
                rows.append(row)
    return rows


def markdown(data: dict) -> str:
    out = [f"Command: `{data['command']}`  ", f"Device: {data['device']}; MLX {data['mlx']}, torch {data['torch']}.", ""]
    out.append("| W0 (out x in) | K | r | LoRA r | SMoA kernel | SMoA MLX blocks | SMoA MLX dense | MLX LoRA "
               "| PyTorch ref SMoA | PyTorch LoRA | frozen MLX | best SMoA / MLX LoRA | ref SMoA / best SMoA |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["bench"]:
        t = r["ms"]
        best = min(t["smoa_kernel"], t["smoa_mlx"], t.get("smoa_dense", float("inf")))
        out.append(
            f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {r['rank']} | {r['lora_rank']} | {t['smoa_kernel']:.2f} "
            f"| {t['smoa_mlx']:.2f} | {t.get('smoa_dense', float('nan')):.2f} | {t['lora_mlx']:.2f} | {t['smoa_torch_ref']:.2f} | {t['lora_torch']:.2f} "
            f"| {t['frozen_mlx']:.2f} | {best / t['lora_mlx']:.2f}x | {t['smoa_torch_ref'] / best:.2f}x |"
        )
    out += ["", "Kernel correctness (max relative error over y, dx, dA, dB vs a float32 pure-MLX reference):", "",
            "| W0 | K | r | bits | dtype | kernel | pure MLX blocks | pure MLX dense | tol | ok |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for v in data.get("verify", []):
        out.append(f"| {v['d_out']}x{v['d_in']} | {v['blocks']} | {v['rank']} | {v['bits'] or '-'} | {v['dtype']} "
                   f"| {v['kernel_rel_err']:.1e} | {v['mlx_rel_err']:.1e} | {v.get('dense_rel_err', float('nan')):.1e} "
                   f"| {v['tol']:.0e} | {_verified(v)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--markdown", help="print the markdown table of a results JSON and exit")
    ap.add_argument("--skip-bench", action="store_true", help="only the correctness check")
    ap.add_argument("--shapes", help="comma-separated OUTxIN shapes instead of the full set (smoke runs)")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    import mlx.core as mx
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else mx.device_info().get("device_name", "?")
    data = {"command": "python scripts/bench_kernels.py " + " ".join(sys.argv[1:]), "mlx": mx.__version__,
            "torch": torch.__version__, "device": device, "platform": platform.platform(),
            "tokens": TOKENS}
    data["verify"] = verify()
    if not args.skip_bench:
        shapes = [tuple(map(int, x.split("x"))) for x in args.shapes.split(",")] if args.shapes else SHAPES
        data["bench"] = bench(shapes)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=1))
    if "bench" in data:
        print(markdown(data))
    return 0 if all(_verified(v) for v in data["verify"]) else 1


if __name__ == "__main__":
    sys.exit(main())
