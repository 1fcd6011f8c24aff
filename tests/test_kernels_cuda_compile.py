"""The CUDA rendering of the SMoA kernels compiles for Hopper (sm_90) where nvcc is installed.

The body and signature are assembled as mx.fast.cuda_kernel does (mlx/backend/cuda/custom_kernel.cpp: inputs as
const pointers, outputs as pointers, template arguments as constexpr/using lines at the top of the body, inside
namespace mlx::core::cu); nvcc stands in for MLX's NVRTC. The gathers and scatters compile both ways, 16-byte
vectors and the scalar fallback, and the vector variants must really store (and scatter_add load its base) with
one 16-byte instruction per vector; every global load must come before the first global store, with no shared
memory and no barrier. Numerical correctness on the GPU is checked by scripts/bench_kernels.py (docs/BENCHMARKS.md;
``--gathers`` for these kernels alone).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smoa_mlx.kernels.source import ANCHORED, BLOCK_ANCHORED, KERNELS, TI, TT, render

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import kernel_resources  # noqa: E402  (the kernels assembled as mx.fast.cuda_kernel does)

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

_SIZE = {"__nv_bfloat16": 2, "__half": 2, "float": 4}


def _kernel(kernel: str, quantized: bool, ctype: str, vec: int) -> tuple[str, str]:
    name = f"{render(kernel, 'cuda', quantized).name}_{ctype.strip('_')}_vec{vec}"
    consts = dict(TT=TT, TI=TI, V=4, R=16, VEC=vec)
    return name, kernel_resources.kernel_text(kernel, quantized, ctype, consts, name)


def test_cuda_rendering_compiles_for_sm90(tmp_path):
    kernels = []
    for kernel in KERNELS:
        for quantized in (False, True) if kernel in ANCHORED else (False,):
            for ctype, size in _SIZE.items():
                vecs = (1,) if kernel in BLOCK_ANCHORED else (16 // size, 1)
                kernels += [_kernel(kernel, quantized, ctype, vec) for vec in vecs]
    cu = tmp_path / "smoa.cu"
    cu.write_text(kernel_resources.translation_unit([text for _, text in kernels]))
    ptx = tmp_path / "smoa.ptx"
    done = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-ptx", str(cu), "-o", str(ptx)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    # One PTX function per kernel (names are mangled: find each by its plain name inside the .entry line).
    bodies = re.split(r"\n\.visible \.entry ", ptx.read_text())[1:]
    for name, _ in kernels:
        (body,) = [b for b in bodies if name in b.split("(", 1)[0]]
        vector_store = re.search(r"st\.global(\.\w+)*\.v4\.(b|u|f)32", body) is not None
        vector_load = re.search(r"ld\.global(\.\w+)*\.v4\.(b|u|f)32", body) is not None
        wants = "_vec" in name and name.split("_vec")[1] != "1"
        assert vector_store == wants, f"{name}: 16-byte vector store {'missing' if wants else 'unexpected'}"
        if name.startswith(("smoa_scatter_add", "smoa_merge_d")):  # its base, W0
            assert vector_load == wants, f"{name}: 16-byte vector load of the base {'missing' if wants else 'unexpected'}"
        if name.startswith(("smoa_gather", "smoa_scatter")):
            _check_mover(name, body)


def _check_mover(name: str, body: str) -> None:
    """All of a thread's loads in flight before its first store, and every thread on its own elements."""
    lines = body.splitlines()
    stores = [i for i, line in enumerate(lines) if "st.global" in line]
    late = [line for line in lines[stores[0]:] if "ld.global" in line]
    assert not late, f"{name}: global loads after the first store: {late[:3]}"
    assert re.search(r"\b(bar|barrier)\.sync|\.shared", body) is None, f"{name}: unexpected shared memory or barrier"
