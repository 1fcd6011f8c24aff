"""Dispatch for the SMoA block-modulated product.

Every backend exposes the same callable ``fn(x, index, weight_parts, a_list, b_list) -> delta_y`` for a
:class:`BlockLayout`: the fused kernels rendered from :mod:`.source` (Metal on Apple GPUs, CUDA on NVIDIA GPUs) or
pure MLX (:func:`mlx_delta_fn`: the dense HiRA form on CUDA, the block form elsewhere, CPU included).
``SMOA_MLX_KERNEL`` picks: ``auto`` (default: the kernel where :data:`KERNEL_DEFAULT` says the benchmark found it
faster), ``kernel`` (the kernel wherever a GPU backend exists), ``mlx`` (always pure MLX), ``reference`` (always
the pure-MLX block form). A kernel that fails to compile or run on a first small probe is reported once with a
warning, and pure MLX is used from then on.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .fused import FLOAT_TYPES, fused_delta_fn, supports
from .gpu import GpuRunner, gpu_backend
from .reference import BlockLayout, dense_delta, dense_form_delta_fn, gather_anchor, gather_rows, reference_delta_fn

__all__ = [
    "BlockLayout",
    "KERNEL_DEFAULT",
    "KERNEL_ENV",
    "delta_fn",
    "dense_form_delta_fn",
    "mlx_delta_fn",
    "dense_delta",
    "gather_anchor",
    "gather_rows",
    "kernel_backend",
    "reference_delta_fn",
]

KERNEL_ENV = "SMOA_MLX_KERNEL"
_FORCE_MLX = ("mlx", "reference", "off", "0")
_FORCE_KERNEL = ("kernel", "on", "1", "metal", "cuda")

# Backends on which ``auto`` picks the kernel, by scripts/bench_kernels.py (docs/BENCHMARKS.md). CUDA: off, the
# kernel measured 3.6x-17x slower than the pure-MLX dense form on an H200. Metal: off until a Mac benchmark says
# otherwise: unmeasured, and the same kernel design lost clearly on CUDA (``SMOA_MLX_KERNEL=kernel`` opts in).
KERNEL_DEFAULT = {"metal": False, "cuda": False}

# The pure-MLX formulation per backend: the dense HiRA form (full matmuls, no activation gathers) where the benchmark
# found it faster than the gathered block form (CUDA, H200); the block form (1/K of the matmul work) elsewhere.
MLX_FORM = {"cuda": "dense"}

_runners: dict[str, GpuRunner] = {}
_probed: dict[tuple, bool] = {}


def _probe(runner: GpuRunner, layout: BlockLayout) -> bool:
    """Compile and run the layout's kernels once on tiny inputs, for every float type; False on any failure."""
    key = (runner.backend, layout.bits, layout.group_size)
    if key in _probed:
        return _probed[key]
    from .fused import backward, forward

    d = max(2 * layout.group_size, 8) if layout.quantized else 8
    w = mx.random.normal((d, d))
    parts = (w,)
    if layout.quantized:
        parts = tuple(mx.quantize(w, group_size=layout.group_size, bits=layout.bits))
    tiny = BlockLayout((d // 2, d // 2), (d // 2, d // 2), (1, 1), 1.0, layout.group_size, layout.bits)
    order = mx.arange(d, dtype=mx.int32)
    index = (order, order, order, order)
    a_list = [mx.ones((1, d // 2))] * 2
    try:
        outs = []
        for dtype in (t for t in FLOAT_TYPES if runner.accepts(t)):
            p = tuple(q.astype(dtype) if q.dtype != mx.uint32 else q for q in parts)
            x = mx.ones((3, d), dtype=dtype)
            outs.append(forward(runner, tiny, x, index, p, a_list, a_list))
            outs.extend(backward(runner, tiny, x, index, p, a_list, [mx.ones((d // 2, 1))] * 2, x)[0:1])
        mx.eval(outs)
    except Exception as err:  # noqa: BLE001 - any compile or launch error means: use the reference
        if "transformation" in str(err) or "compile" in str(err) and "tracing" in str(err):
            return True  # called inside mx.compile: cannot probe now, try the kernel and probe next time
        warnings.warn(
            f"smoa_mlx: the {runner.backend} SMoA kernel failed ({type(err).__name__}: {str(err)[:300]}); "
            f"falling back to the pure-MLX path (set {KERNEL_ENV}=mlx to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
        _probed[key] = False
        return False
    _probed[key] = True
    return True


def kernel_backend(layout: Optional[BlockLayout] = None) -> Optional[str]:
    """The GPU kernel backend :func:`delta_fn` uses (for ``layout`` if given), or None for the reference."""
    choice = os.environ.get(KERNEL_ENV, "auto").lower()
    if choice in _FORCE_MLX:
        return None
    backend = gpu_backend()
    if backend is None or (layout is not None and not supports(layout)):
        return None
    if choice not in _FORCE_KERNEL and not KERNEL_DEFAULT.get(backend, False):
        return None
    return backend


def mlx_delta_fn(layout: BlockLayout):
    """The pure-MLX implementation for this machine (``SMOA_MLX_KERNEL=reference``: always the block form)."""
    if os.environ.get(KERNEL_ENV, "auto").lower() != "reference" and MLX_FORM.get(gpu_backend()) == "dense":
        return dense_form_delta_fn(layout)
    return reference_delta_fn(layout)


def delta_fn(layout: BlockLayout):
    """The fastest available implementation of the update for ``layout``."""
    backend = kernel_backend(layout)
    if backend is None:
        return mlx_delta_fn(layout)
    runner = _runners.setdefault(backend, GpuRunner(backend))
    if not _probe(runner, layout):
        return mlx_delta_fn(layout)
    return _routed(layout, runner)


@lru_cache(maxsize=None)
def _routed(layout: BlockLayout, runner: GpuRunner):
    """The kernel for the activation types its backend takes (CUDA: bf16/f16), pure MLX for the others (f32)."""
    kernel, fallback = fused_delta_fn(layout, runner), mlx_delta_fn(layout)

    def delta(x, index, weight_parts, a_list, b_list):
        fn = kernel if runner.accepts(x.dtype) else fallback
        return fn(x, index, weight_parts, a_list, b_list)

    return delta
