"""scripts/kernel_resources.py reports ptxas's registers for the kernels as the layers launch them: its template
constants must be the launches' own (names and the per-thread work), else its report describes kernels nobody runs.
Compiling needs nvcc (tests/test_kernels_cuda_compile.py, the device machine); this checks what it would compile."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx

from kernel_cases import make_layer
from smoa_mlx.kernels import source
from smoa_mlx.kernels.blocks import KernelOps, block_fn
from smoa_mlx.kernels.merged import merged_fn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import kernel_resources  # noqa: E402

_TYPES = ("T", "OT", "BITS", "GS")  # types and the quantization's constants: not the thread's work


def _launches() -> list:
    """Every kernel, launched by the block form (fused base and update alone) and the merged form with block
    gradients on a bf16 layer; the runner records each launch and returns zeros of its outputs' shapes."""
    launches = []

    def run(launch):
        launches.append(launch)
        return [mx.zeros(shape, dtype) for shape, dtype in zip(launch.output_shapes, launch.output_dtypes)]

    ops = KernelOps(run)
    layer = make_layer(64, 48, 8, 2, mx.bfloat16, 0, 64, None, seed=1)
    x = mx.random.normal((2, 8, 64)).astype(mx.bfloat16)
    cot = mx.ones((2, 8, 48), mx.bfloat16)
    for fn in (block_fn(layer.layout, ops, True), block_fn(layer.layout, ops, False),
               merged_fn(layer.layout, ops, True)):
        mx.eval(mx.vjp(lambda x, f, fn=fn: fn(x, layer.index, layer.weight_parts(), f), [x, layer.smoa_factors],
                       [cot]))
    return launches


def test_reported_constants_are_the_launches_own():
    launches = _launches()
    assert {la.kernel for la in launches} == set(source.KERNELS)
    for la in launches:
        launched = {k: v for k, v in la.template if k not in _TYPES}
        ctype = "__nv_bfloat16"
        reported = kernel_resources.shipped_constants(la.kernel, ctype)
        assert reported.keys() == launched.keys(), la.kernel
        # the per-thread work (rows, tokens, columns, vector width) as launched; R is the layer's own rank
        assert {k: v for k, v in reported.items() if k != "R"} == {k: v for k, v in launched.items() if k != "R"}, \
            la.kernel
        text = kernel_resources.kernel_text(la.kernel, la.quantized, ctype, reported, "k")
        assert all(f"constexpr int {k} = {v};" in text for k, v in reported.items())
        assert text.startswith("__global__ void k(") and "using OT = __nv_bfloat16;" in text


def test_ptxas_log_is_read_per_kernel_by_its_mangled_name():
    """ptxas's -v lines go to the kernel whose entry they follow; a name that prefixes another (k_merge_d_1 of
    k_merge_d_10) takes only its own."""
    log = """ptxas info    : Compiling entry function '_ZN3mlx4core2cu12k_merge_d_10EPKfS4_' for 'sm_90'
ptxas info    : Function properties for _ZN3mlx4core2cu12k_merge_d_10EPKfS4_
    64 bytes stack frame, 64 bytes spill stores, 64 bytes spill loads
ptxas info    : Used 254 registers, used 0 barriers, 416 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN3mlx4core2cu11k_merge_d_1EPKfS4_' for 'sm_90'
ptxas info    : Function properties for _ZN3mlx4core2cu11k_merge_d_1EPKfS4_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 91 registers, used 0 barriers, 416 bytes cmem[0]
"""
    found = kernel_resources.parse_ptxas(log, ["k_merge_d_1", "k_merge_d_10"])
    assert found == {"k_merge_d_10": dict(stack=64, spill_stores=64, spill_loads=64, registers=254),
                     "k_merge_d_1": dict(stack=0, spill_stores=0, spill_loads=0, registers=91)}
