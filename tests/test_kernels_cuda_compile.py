"""The CUDA rendering of the SMoA kernels compiles for Hopper (sm_90) where nvcc is installed.

The body and signature are assembled as mx.fast.cuda_kernel does (mlx/backend/cuda/custom_kernel.cpp:
inputs as const pointers, outputs as pointers, template arguments as constexpr/using lines at the top of the
body, inside namespace mlx::core::cu); nvcc stands in for MLX's NVRTC. Numerical correctness on the GPU is
checked by scripts/bench_kernels.py (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from smoa_mlx.kernels.source import GRAD_TILE, MODMM_TILE, render

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

_TYPES = {"a": "float", "sb": "float", "wq": "uint32_t", "dims": "int32_t", "meta": "int32_t"}


def _kernel(kernel: str, quantized: bool, mode: int, ctype: str) -> str:
    src = render(kernel, "cuda", quantized)
    params = [f"const {_TYPES.get(n, 'int32_t' if n.endswith(('_idx', '_pos')) else ctype)}* {n}"
              for n in src.input_names]
    params += [f"{ctype if kernel == 'modmm' else 'float'}* {n}" for n in src.output_names]
    consts = [f"using T = {ctype};"]
    if kernel == "modmm":
        consts += [f"constexpr int MODE = {mode};", f"constexpr int BJ = {MODMM_TILE['cuda']['BJ']};",
                   "constexpr int RP = 32;"]
    else:
        consts += [f"constexpr int BT = {GRAD_TILE['cuda']['BT']};"]
    if quantized:
        consts += ["constexpr int BITS = 4;", "constexpr int GS = 64;"]
    name = f"{src.name}_{mode}_{ctype.strip('_')}"
    body = "\n  ".join(consts)
    return f"__global__ void {name}({', '.join(params)}) {{\n  {body}\n{src.source}\n}}\n"


def test_cuda_rendering_compiles_for_sm90(tmp_path):
    header = render("modmm", "cuda", False).header
    kernels = [
        _kernel(k, q, m, t)
        for k, modes in (("modmm", (0, 1)), ("grad", (0,)))
        for q in (False, True)
        for m in modes
        for t in ("__nv_bfloat16", "__half")
    ]
    cu = tmp_path / "smoa.cu"
    cu.write_text("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n" + header
                  + "namespace mlx::core::cu {\n" + "\n".join(kernels) + "}\n")
    done = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / "smoa.o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
