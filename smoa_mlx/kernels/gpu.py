"""Runs :class:`Launch` descriptions on the GPU through ``mx.fast.metal_kernel`` or ``mx.fast.cuda_kernel``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx

from .source import render


@dataclass
class Launch:
    """One kernel dispatch: inputs in the kernel's ``input_names`` order; grid counts threads, as in ``mx.fast``."""

    kernel: str  # one of source.KERNELS
    quantized: bool
    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list


Runner = Callable[[Launch], Sequence[mx.array]]  # with a ``backend`` attribute: "metal" or "cuda"


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

    def __repr__(self) -> str:  # part of cache keys
        return f"GpuRunner({self.backend!r})"

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
