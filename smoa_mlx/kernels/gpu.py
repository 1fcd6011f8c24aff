"""Runs :class:`~.fused.Launch` descriptions on the GPU through ``mx.fast.metal_kernel`` or ``mx.fast.cuda_kernel``."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .fused import Launch
from .source import render


def gpu_backend() -> Optional[str]:
    """"metal" on Apple GPUs, "cuda" on NVIDIA ones, None where MLX has no GPU (the CPU wheels)."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


class GpuRunner:
    """Compiles each rendered kernel once per process (MLX caches the per-template instantiations)."""

    def __init__(self, backend: str):
        self.backend = backend
        self._kernels: dict[tuple[str, bool], object] = {}

    def __repr__(self) -> str:  # part of fused_delta_fn's cache key
        return f"GpuRunner({self.backend!r})"

    def accepts(self, dtype) -> bool:
        """CUDA's WMMA fragments take bf16/f16 operands; Metal's kernels use float fragments for every type."""
        return dtype in (mx.bfloat16, mx.float16) or (self.backend == "metal" and dtype == mx.float32)

    def _kernel(self, kernel: str, quantized: bool):
        key = (kernel, quantized)
        if key not in self._kernels:
            src = render(kernel, self.backend, quantized)
            make = mx.fast.metal_kernel if self.backend == "metal" else mx.fast.cuda_kernel
            self._kernels[key] = make(
                name=src.name,
                input_names=list(src.input_names),
                output_names=list(src.output_names),
                source=src.source,
                header=src.header,
            )
        return self._kernels[key]

    def __call__(self, launch: Launch) -> list[mx.array]:
        return self._kernel(launch.kernel, launch.quantized)(
            inputs=launch.inputs,
            template=launch.template,
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            output_shapes=launch.output_shapes,
            output_dtypes=launch.output_dtypes,
        )
