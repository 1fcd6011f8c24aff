"""The CUDA rendering of the SMoA kernels compiles for Hopper (sm_90) where nvcc is installed.

The body and signature are assembled as mx.fast.cuda_kernel does (mlx/backend/cuda/custom_kernel.cpp: inputs as
const pointers, outputs as pointers, template arguments as constexpr/using lines at the top of the body, inside
namespace mlx::core::cu); nvcc stands in for MLX's NVRTC. Numerical correctness on the GPU is checked by
scripts/bench_kernels.py (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from smoa_mlx.kernels.source import KERNELS, TI, TT, render

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

_INT = ("src", "slot", "dims", "row_src", "col_src")


def _kernel(kernel: str, quantized: bool, ctype: str) -> str:
    src = render(kernel, "cuda", quantized)
    types = {**{n: "int32_t" for n in _INT}, "a": "float", "b": "float", "scale": "float", "wq": "uint32_t"}
    params = [f"const {types.get(n, ctype)}* {n}" for n in src.input_names]
    params += [f"{ctype}* {n}" for n in src.output_names]
    consts = [f"using T = {ctype};", f"using OT = {ctype};", f"constexpr int TT = {TT};", f"constexpr int TI = {TI};",
              "constexpr int V = 4;", "constexpr int R = 16;"]
    if quantized:
        consts += ["constexpr int BITS = 4;", "constexpr int GS = 64;"]
    body = "\n  ".join(consts)
    name = f"{src.name}_{ctype.strip('_')}"
    return f"__global__ void {name}({', '.join(params)}) {{\n  {body}\n{src.source}\n}}\n"


def test_cuda_rendering_compiles_for_sm90(tmp_path):
    header = render("gather", "cuda").header
    kernels = [_kernel(k, q, t) for k in KERNELS for q in ((False, True) if k in ("modulate", "hadamard") else (False,))
               for t in ("__nv_bfloat16", "__half", "float")]
    cu = tmp_path / "smoa.cu"
    cu.write_text("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n" + header
                  + "namespace mlx::core::cu {\n" + "\n".join(kernels) + "}\n")
    done = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / "smoa.o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
