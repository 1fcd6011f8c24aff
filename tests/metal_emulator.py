"""Runs a :class:`smoa_mlx.kernels.gpu.Launch` as Metal would, on the CPU: the proof of the Metal rendering in CI.

1. MLX itself writes the Metal source (signature, template instantiation and our body): ``mx.fast.metal_kernel``
   is called under ``mx.export_function`` tracing, which MLX allows without a Metal back-end, with
   ``verbose=True``; its printout is captured at the file-descriptor level.
2. That exact text is compiled by g++ after ``metal_shim/shim.h`` (the MSL subset, modelled in C++), with a
   generated ``main`` that loads the input buffers, runs every thread of every threadgroup under the shim's
   threadgroup emulator and writes the outputs back.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from smoa_mlx.kernels.gpu import Launch
from smoa_mlx.kernels.source import render

SHIM = Path(__file__).parent / "metal_shim" / "shim.h"
_BUILD = Path(tempfile.gettempdir()) / f"smoa_metal_shim_{os.getuid()}"

_NP = {mx.float32: np.float32, mx.float16: np.float16, mx.int32: np.int32, mx.uint32: np.uint32,
       mx.bfloat16: np.uint16}  # numpy has no bfloat16: its bits travel as uint16 (the shim's bfloat16_t)


def _to_numpy(arr: mx.array) -> np.ndarray:
    return np.asarray(arr.view(mx.uint16) if arr.dtype == mx.bfloat16 else arr)


def _from_numpy(data: np.ndarray, dtype) -> mx.array:
    out = mx.array(data)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out
_ATTRS = (
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "thread_index_in_threadgroup",
    "simdgroup_index_in_threadgroup",
    "thread_index_in_simdgroup",
)


def _capture_fd1(fn) -> str:
    """What native code prints on stdout while ``fn`` runs (MLX prints the generated source from C++)."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode()


def mlx_metal_source(launch: Launch) -> str:
    """The Metal source MLX generates for ``launch`` (our rendered body inside MLX's own signature)."""
    src = render(launch.kernel, "metal", launch.quantized)
    kernel = mx.fast.metal_kernel(
        name=src.name, input_names=list(src.input_names), output_names=list(src.output_names),
        source=src.source, header=src.header,
    )

    def traced(*inputs):
        return kernel(
            inputs=list(inputs), template=launch.template, grid=launch.grid, threadgroup=launch.threadgroup,
            output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes, verbose=True,
        )

    with tempfile.TemporaryDirectory() as d:
        text = _capture_fd1(lambda: mx.export_function(os.path.join(d, "k.mlxfn"), traced, *launch.inputs))
    match = re.search(r"```\n(.*)```", text, re.S)
    if not match:
        raise RuntimeError(f"MLX printed no Metal source for {src.name}: {text[:500]!r}")
    return match.group(1)


def _harness(source: str, n_in: int, n_out: int) -> str:
    """A main() that calls the instantiated kernel with the buffers in signature order and the thread attributes."""
    inst = re.search(r"decltype\((\w+<[^()]*>)\)", source)
    callee = inst.group(1) if inst else re.search(r"\[\[kernel\]\] void (\w+)\(", source).group(1)
    sig = re.search(r"\[\[kernel\]\] void \w+\((.*?)\) \{", source, re.S).group(1)
    args, buf = [], 0
    for param in sig.split(",\n"):
        m = re.match(r"\s*(const )?(constant |device )?([\w:<>]+)([*&]) (\w+) \[\[buffer\((\d+)\)\]\]", param)
        if m:
            ctype = m.group(3)
            args.append(f"({'const ' if m.group(1) else ''}{ctype}*)bufs[{buf}].data()")
            buf += 1
            continue
        attr = re.match(r"\s*uint3? (\w+) \[\[(\w+)\]\]", param)
        if not attr or attr.group(1) not in _ATTRS:
            raise RuntimeError(f"the shim does not model kernel parameter {param.strip()!r}")
        args.append(f"c.{attr.group(1)}")
    if buf != n_in + n_out:
        raise RuntimeError(f"expected {n_in + n_out} buffers in the signature, found {buf} (shape/stride args?)")
    return f"""
#include <fstream>
#include <sstream>
#include <string>
static std::vector<char> load(const std::string& p) {{
  std::ifstream f(p, std::ios::binary); std::stringstream s; s << f.rdbuf(); std::string b = s.str();
  return std::vector<char>(b.begin(), b.end());
}}
int main(int argc, char** argv) {{
  std::string dir = argv[1];
  std::vector<std::vector<char>> bufs;
  for (int i = 0; i < {n_in + n_out}; ++i) bufs.push_back(load(dir + "/buf" + std::to_string(i) + ".bin"));
  uint3 groups{{uint(std::atoi(argv[2])), uint(std::atoi(argv[3])), uint(std::atoi(argv[4]))}};
  uint3 tg{{uint(std::atoi(argv[5])), uint(std::atoi(argv[6])), uint(std::atoi(argv[7]))}};
  smoa_shim::run_grid(groups, tg, [&](const smoa_shim::ThreadCtx& c) {{ {callee}({", ".join(args)}); }});
  for (int i = {n_in}; i < {n_in + n_out}; ++i) {{
    std::ofstream f(dir + "/buf" + std::to_string(i) + ".bin", std::ios::binary);
    f.write(bufs[i].data(), bufs[i].size());
  }}
  return 0;
}}
"""


# UBSan's alignment check: every access through a type is checked against the type's alignment, so a vector copy
# through the kernels' 16-byte ``smoa_vec`` at a misaligned address stops the run whatever instructions g++ chose
# for it (element-wise moves, say, where a real GPU needs one aligned 16-byte access).
_FLAGS = ["-std=c++20", "-O1", "-pthread", "-Wno-attributes", "-fsanitize=alignment",
          "-fno-sanitize-recover=alignment"]


def _compile(source: str, n_in: int, n_out: int) -> Path:
    program = f'#include "{SHIM}"\n{source}\n{_harness(source, n_in, n_out)}'
    shim_text = SHIM.read_text() + (SHIM.parent / "include" / "metal_simdgroup_matrix").read_text()
    digest = hashlib.sha256((program + shim_text + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    _BUILD.mkdir(parents=True, exist_ok=True)
    exe = _BUILD / f"k_{digest}"
    if not exe.exists():
        cpp = _BUILD / f"k_{digest}.cpp"
        cpp.write_text(program)
        cmd = ["g++", *_FLAGS, "-I", str(SHIM.parent / "include"), str(cpp), "-o", str(exe) + ".tmp"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"g++ rejected the rendered Metal source:\n{done.stderr[:4000]}")
        os.replace(str(exe) + ".tmp", exe)
    return exe


def run_launch(launch: Launch) -> list[mx.array]:
    """Execute ``launch`` on the CPU through MLX's Metal source and the shim; returns its outputs."""
    source = mlx_metal_source(launch)
    n_in, n_out = len(launch.inputs), len(launch.output_shapes)
    exe = _compile(source, n_in, n_out)
    groups = [g // t for g, t in zip(launch.grid, launch.threadgroup)]
    if any(g * t != n for g, t, n in zip(groups, launch.threadgroup, launch.grid)):
        raise ValueError(f"grid {launch.grid} is not a whole number of threadgroups {launch.threadgroup}")
    with tempfile.TemporaryDirectory() as d:
        for i, arr in enumerate(launch.inputs):
            np.ascontiguousarray(_to_numpy(arr)).tofile(f"{d}/buf{i}.bin")
        outs = []
        for j, (shape, dtype) in enumerate(zip(launch.output_shapes, launch.output_dtypes)):
            # Poison: a NaN left anywhere means the kernel never wrote that element.
            if dtype == mx.bfloat16:
                poison = np.full(shape, 0x7FC0, dtype=np.uint16)  # a bfloat16 NaN
            else:
                poison = np.full(shape, np.nan, dtype=_NP[dtype])
            poison.tofile(f"{d}/buf{n_in + j}.bin")
            outs.append((shape, dtype))
        cmd = [str(exe), d, *map(str, groups), *map(str, launch.threadgroup)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"emulated kernel failed ({done.returncode}): {done.stderr[:2000]}")
        return [
            _from_numpy(np.fromfile(f"{d}/buf{n_in + j}.bin", dtype=_NP[dt]).reshape(shape), dt)
            for j, (shape, dt) in enumerate(outs)
        ]


run_launch.backend = "metal"  # the runner protocol of smoa_mlx.kernels.gpu
