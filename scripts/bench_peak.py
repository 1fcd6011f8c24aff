"""Peak memory of a compiled training step over a residual chain of SMoA layers, in activations' worth.

Why a residual chain: h <- h + layer(h) is how a transformer uses its projections, and the add's backward needs
neither side, so a layer's output y is not needed after its forward. Anything a form keeps from its forward to its
backward beyond the layer's input then shows as extra peak: per layer (growth from 4 to 16 layers) or once (the
offset at 4 layers). mlx-lm's trainer compiles its step, so this does too. Usable on any device; on the CPU the
merged form takes full gradients unless ``--block-grads`` forces the block gradients (their steps in plain MLX, as a
GPU runs them with its kernels).

    python scripts/bench_peak.py                       # the default form, dense and 4-bit bases
    python scripts/bench_peak.py --block-grads
    SMOA_MLX_KERNEL=dense python scripts/bench_peak.py # any form SMOA_MLX_KERNEL names
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

import smoa_mlx.kernels as kernels
from smoa_mlx.layer import SMoALinear


class _Chain(nn.Module):
    def __init__(self, layers: list[SMoALinear]):
        super().__init__()
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.layers:
            h = h + layer(h)
        return h.astype(mx.float32).sum()


def step_peak(step: Callable[[], object]) -> int:
    """Extra peak memory of one evaluated call of ``step``, in bytes: the second call's, so that compiling and other
    first-call costs are not counted. tests/test_layer.py measures its steps with it too."""
    mx.eval(step())
    mx.synchronize()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    mx.eval(step())
    return mx.get_peak_memory() - start


def extra_peak(n_layers: int, bits: int, width: int, tokens: int, dtype: mx.Dtype) -> float:
    """Extra peak memory of one compiled forward + backward (after a warm-up step), in bytes."""
    mx.random.seed(0)
    bases = [nn.Linear(width, width, bias=False) for _ in range(n_layers)]
    if bits:
        bases = [nn.QuantizedLinear.from_linear(b, group_size=64, bits=bits) for b in bases]
    layers = [SMoALinear.from_base(b, rank=8, blocks=2) for b in bases]
    for layer in layers:  # non-zero B, so that every product is real work
        layer.smoa_factors = mx.random.normal(layer.smoa_factors.shape) * 0.01
    model = _Chain(layers)
    model.set_dtype(dtype)
    x = mx.random.normal((tokens, width)).astype(dtype)
    mx.eval(model.parameters(), x)
    step = mx.compile(nn.value_and_grad(model, model), inputs=[model.state], outputs=[model.state])
    return step_peak(lambda: step(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", default="4,16", help="two chain lengths: the offset at the first, the growth")
    parser.add_argument("--bits", default="0,4", help="base precisions: 0 = unquantized")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--block-grads", action="store_true",
                        help="force the merged form's block gradients (plain-MLX steps), as a GPU takes them")
    args = parser.parse_args()
    if args.block_grads:
        kernels.merged_block_grads = lambda layout: True
        kernels._ops = lambda *a, **k: kernels._MLX_OPS
    dtype = getattr(mx, args.dtype)
    n0, n1 = (int(n) for n in args.layers.split(","))
    activation = args.tokens * args.width * dtype.size
    print("| base | peak at", n0, "layers | at", n1, "| growth per layer | (activations' worth) |")
    print("|---|---|---|---|---|")
    for bits in (int(b) for b in args.bits.split(",")):
        p0, p1 = (extra_peak(n, bits, args.width, args.tokens, dtype) / activation for n in (n0, n1))
        row = {"bits": bits, "layers": [n0, n1], "peak": [round(p0, 2), round(p1, 2)],
               "per_layer": round((p1 - p0) / (n1 - n0), 2), "block_grads": args.block_grads,
               "kernel": os.environ.get(kernels.KERNEL_ENV, "auto")}
        print(f"| {bits or args.dtype} | {p0:.2f} | {p1:.2f} | {row['per_layer']:.2f} | {json.dumps(row)} |")


if __name__ == "__main__":
    main()
