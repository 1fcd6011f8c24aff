"""What ptxas makes of the CUDA rendering of each SMoA kernel: registers per thread, spills, local memory.

A kernel's speed at a given memory pattern rests on how many threads an SM can keep in flight, which its registers
bound (65,536 per SM on Hopper: 128 registers a thread leave 16 warps of 64), and on whether its arrays stay in
registers at all (a spill is local memory: a trip to L1 or beyond per access). Run where nvcc is installed (the
device machine has it; this CPU machine does not):

    python scripts/kernel_resources.py                       # every kernel, bf16, the shipped constants
    python scripts/kernel_resources.py --kernels merge,hadamard --variants "TI=8;TI=4;TI=16"

Each variant is a set of template constants (TI, TT, VEC, R, ...) over the shipped ones; the report is what
ptxas prints (``-Xptxas -v``), one line per kernel, and the table lands in ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The kernel sources alone, loaded by path: they need no MLX (a machine with nvcc may have none), where importing
# smoa_mlx.kernels would load MLX with the package.
_spec = importlib.util.spec_from_file_location(
    "smoa_kernel_source", Path(__file__).resolve().parent.parent / "smoa_mlx" / "kernels" / "source.py")
source = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # registered: its dataclass looks it up
_spec.loader.exec_module(source)
ANCHORED, KERNELS, render = source.ANCHORED, source.KERNELS, source.render

_INT = ("src", "slot", "dims", "row_src", "col_src")
_CTYPE = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}


def shipped_constants(kernel: str, ctype: str) -> dict[str, int]:
    """The template constants a launch of ``kernel`` gets (kernels/blocks.py; tests/test_kernel_resources.py holds
    them to it), for a 16-byte vector of ``ctype`` and a rank of 16 per block (R: the merge's whole rank, 2 blocks)."""
    vec = 16 // (4 if ctype == "float" else 2)
    if kernel == "gather":
        return dict(TT=source.TT, VEC=vec)
    if kernel in ("scatter", "scatter_add"):
        return dict(TT=source.SCATTER_TT, VEC=vec)
    if kernel == "merge":
        return dict(TI=source.MERGE_TI, R=32, VEC=vec)
    if kernel == "modulate":
        return dict(TI=source.TI, V=source.V, R=16)
    return dict(TI=source.HADAMARD_TI, V=source.V)


def kernel_text(kernel: str, quantized: bool, ctype: str, consts: dict[str, int], name: str) -> str:
    """The kernel as mx.fast.cuda_kernel assembles it (mlx/backend/cuda/custom_kernel.cpp: const input pointers,
    output pointers, the template arguments as constexpr / using lines at the top of the body)."""
    src = render(kernel, "cuda", quantized)
    types = {**{n: "int32_t" for n in _INT}, "a": "float", "b": "float", "scale": "float", "wq": "uint32_t"}
    if kernel == "merge":  # B_full and A_full in the activations' type
        types.update(a=ctype, b=ctype)
    params = [f"const {types.get(n, ctype)}* {n}" for n in src.input_names]
    params += [f"{ctype}* {n}" for n in src.output_names]
    lines = [f"using T = {ctype};", f"using OT = {ctype};"] + [f"constexpr int {k} = {v};" for k, v in consts.items()]
    if quantized:
        lines += ["constexpr int BITS = 4;", "constexpr int GS = 64;"]
    body = "\n  ".join(lines)
    return f"__global__ void {name}({', '.join(params)}) {{\n  {body}\n{src.source}\n}}\n"


def translation_unit(texts: list[str]) -> str:
    """One .cu file of kernels from :func:`kernel_text`: the CUDA headers, the kernels' shared helpers, and the
    kernels inside MLX's namespace, as MLX's NVRTC sees them."""
    return ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n" + render("gather", "cuda").header
            + "namespace mlx::core::cu {\n" + "\n".join(texts) + "}\n")


def parse_ptxas(log: str, names: list[str]) -> dict[str, dict]:
    """{name: registers, spill stores and loads, stack} from ``-Xptxas -v``'s log: "Compiling entry function
    '<mangled>' for 'sm_90'", then its "N bytes stack frame, ..." and "Used N registers" lines. Matched as mangled,
    where each name carries its length first, so k_merge_d_1 is not read into k_merge_d_10."""
    current, found = None, {}
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = next((n for n in names if f"{len(n)}{n}" in m.group(1)), None)
            if current:
                found[current] = {}
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                         line)):
            found[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            found[current]["registers"] = int(m.group(1))
    return found


def report(kernels, variants, dtype="bfloat16", arch="sm_90") -> list[dict]:
    ctype = _CTYPE[dtype]
    texts, rows = [], []
    for kernel in kernels:
        for quantized in (False, True) if kernel in ANCHORED else (False,):
            for i, extra in enumerate(variants):
                consts = {**shipped_constants(kernel, ctype), **extra}
                name = f"k_{kernel}_{'q' if quantized else 'd'}_{i}"
                texts.append(kernel_text(kernel, quantized, ctype, consts, name))
                rows.append(dict(kernel=kernel, quantized=quantized, dtype=dtype, consts=consts, name=name))
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "smoa.cu"
        cu.write_text(translation_unit(texts))
        done = subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", "-cubin", "-Xptxas", "-v", str(cu), "-o",
                               str(Path(tmp) / "smoa.cubin")], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    found = parse_ptxas(done.stderr, [r["name"] for r in rows])
    for r in rows:
        r.update(found.get(r["name"], {}))
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| kernel | base | constants | registers | spill stores / loads (bytes) | stack |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        consts = ", ".join(f"{k}={v}" for k, v in r["consts"].items())
        out.append(f"| {r['kernel']} | {'4-bit' if r['quantized'] else 'dense'} | {consts} | {r.get('registers', '?')} "
                   f"| {r.get('spill_stores', '?')} / {r.get('spill_loads', '?')} | {r.get('stack', '?')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--variants", default="", help='";"-separated sets of "NAME=value,..." template constants over '
                                                  'the shipped ones (default: the shipped ones alone)')
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_CTYPE))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    variants = [dict((k, int(v)) for k, v in (kv.split("=") for kv in s.split(",") if kv)) for s in
                args.variants.split(";")] if args.variants else [{}]
    rows = report(args.kernels.split(","), variants, args.dtype)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
