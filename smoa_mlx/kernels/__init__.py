"""Dispatch for the SMoA block-modulated product.

Two implementations of one contract, ``fn(x, index, weight_parts, a_list, b_list)``:

- the block-major form (:mod:`.blocks`): batched MLX matmuls at the FLOP floor (2 + 3/K layer-matmuls per training
  step), its gathers, scatters and anchor reads done by the kernels of :mod:`.source` on a GPU (Metal or CUDA) and
  by plain MLX on the CPU;
- the pure-MLX reference (:func:`reference_delta_fn`): one block at a time, what tests compare against.

:func:`delta_fn` returns the update alone; :func:`linear_fn` returns x W0^T plus the update, the frozen layer's
products fused with the update's gather and scatter (what :class:`~smoa_mlx.layer.SMoALinear` calls when there is
no dropout). ``SMOA_MLX_KERNEL`` picks: ``auto`` (default: the block form, with the GPU kernels wherever MLX has a
GPU; on the CPU the form :data:`CPU_FORM` names, measured by scripts/bench_kernels.py), ``kernel`` (the same),
``mlx`` (the block form with plain-MLX steps, on any device), ``reference``. A kernel that fails to compile or run
on a first small probe is reported once with a warning, and the plain-MLX block form is used from then on.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

import mlx.core as mx

from .blocks import FLOAT_TYPES, KernelOps, MlxOps, base_forward, block_fn
from .gpu import GpuRunner, gpu_backend
from .plan import BlockPlan, build_plan
from .reference import BlockLayout, dense_delta, gather_anchor, gather_rows, reference_delta_fn

__all__ = [
    "BlockLayout",
    "BlockPlan",
    "CPU_FORM",
    "KERNEL_ENV",
    "build_plan",
    "delta_fn",
    "dense_delta",
    "form",
    "gather_anchor",
    "gather_rows",
    "linear_fn",
    "reference_delta_fn",
]

KERNEL_ENV = "SMOA_MLX_KERNEL"
FORMS = ("auto", "kernel", "mlx", "reference")

# The form ``auto`` uses where MLX has no GPU: the faster of the two in scripts/bench_kernels.py --cpu on the CPU
# (docs/BENCHMARKS.md).
CPU_FORM = "mlx"

_MLX_OPS = MlxOps()
_kernel_ops: dict[str, KernelOps] = {}
_probed: dict[str, bool] = {}


def form() -> str:
    """The implementation the environment asks for: "kernel", "mlx" or "reference" (``auto`` resolved)."""
    choice = os.environ.get(KERNEL_ENV, "auto").lower()
    if choice not in FORMS:
        raise ValueError(f"{KERNEL_ENV}={choice!r}: expected one of {', '.join(FORMS)}")
    if choice == "auto":
        return "kernel" if gpu_backend() is not None else CPU_FORM
    return choice


def _probe(ops: KernelOps) -> bool:
    """Compile and run every kernel once on tiny inputs, for every float type; False on any failure."""
    backend = ops.name
    if backend in _probed:
        return _probed[backend]
    layouts = [BlockLayout((5, 4), (5, 4), (2, 1), 1.5), BlockLayout((3, 2), (64, 64), (1, 1), 1.0, 32, 4)]
    try:
        outs = []
        for layout in layouts:
            d_out, d_in = sum(layout.row_sizes), sum(layout.col_sizes)
            w = mx.random.normal((d_out, d_in))
            parts = tuple(mx.quantize(w, group_size=layout.group_size, bits=layout.bits)) if layout.quantized else (w,)
            index = (mx.arange(d_out), mx.arange(d_in), mx.arange(d_out), mx.arange(d_in))
            index = index + (tuple(build_plan(layout, range(d_out), range(d_in))),)
            a_list = [mx.ones((r, n)) for r, n in zip(layout.ranks, layout.col_sizes)]
            b_list = [mx.ones((m, r)) for r, m in zip(layout.ranks, layout.row_sizes)]
            for dtype in FLOAT_TYPES:
                p = tuple(q if q.dtype == mx.uint32 else q.astype(dtype) for q in parts)
                fn = block_fn(layout, ops, True)
                outs.extend(mx.vjp(lambda x, *f: fn(x, index, p, list(f[:2]), list(f[2:])),
                                   [mx.ones((3, d_in), dtype=dtype), *a_list, *b_list], [mx.ones((3, d_out), dtype)]))
        mx.eval(outs)
    except Exception as err:  # noqa: BLE001 - any compile or launch error means: use plain MLX
        if "transformation" in str(err) or ("compile" in str(err) and "tracing" in str(err)):
            return True  # called inside mx.compile: cannot probe now, try the kernels and probe next time
        warnings.warn(
            f"smoa_mlx: the {backend} SMoA kernels failed ({type(err).__name__}: {str(err)[:300]}); "
            f"falling back to plain MLX (set {KERNEL_ENV}=mlx to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
        _probed[backend] = False
        return False
    _probed[backend] = True
    return True


def _ops():
    """The memory-bound steps' implementation for this machine: GPU kernels if they work here, else plain MLX."""
    backend = gpu_backend()
    if backend is None:
        return _MLX_OPS
    ops = _kernel_ops.setdefault(backend, KernelOps(GpuRunner(backend)))
    return ops if _probe(ops) else _MLX_OPS


def delta_fn(layout: BlockLayout):
    """The update alone (for layers with dropout on the update path)."""
    chosen = form()
    if chosen == "reference":
        return reference_delta_fn(layout)
    return block_fn(layout, _ops() if chosen == "kernel" else _MLX_OPS, False)


def linear_fn(layout: BlockLayout):
    """x W0^T plus the update (no bias): the whole adapted layer in one call."""
    chosen = form()
    if chosen == "reference":
        return _reference_linear(layout)
    return block_fn(layout, _ops() if chosen == "kernel" else _MLX_OPS, True)


@lru_cache(maxsize=None)
def _reference_linear(layout: BlockLayout):
    ref = reference_delta_fn(layout)

    def fn(x, index, weight_parts, a_list, b_list):
        y = base_forward(layout, mx.reshape(x, (-1, x.shape[-1])), weight_parts)
        y = mx.reshape(y, (*x.shape[:-1], y.shape[-1]))
        return y + ref(x, index, weight_parts, a_list, b_list).astype(y.dtype)

    return fn
