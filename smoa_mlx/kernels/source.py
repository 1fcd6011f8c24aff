"""The one source of truth for the SMoA kernels: bodies written once, rendered to Metal and to CUDA.

The block-sparse product spends its FLOPs in MLX's own batched matmuls (Metal's steel GEMM, cuBLAS); what is left
are memory-bound steps that MLX has no fast primitive for, and they are these kernels:

``gather``    out[k, t, j] = in[t, src[k, j]]: activations (x by columns, dy by rows) into block-major layout
              (K, T, P), zero where ``src`` is -1 (a block shorter than the longest).
``scatter``   out[t, c] = in[k(c), t, i(c)] (+ base[t, c] for ``scatter_add``): the block-major result back into
              the original basis, where every column has exactly one (k, i); with ``base`` the frozen layer's own
              output (forward) or input gradient (backward) is added in the same pass.
``modulate``  out[k, i, j] = s (B_k A_k)[i, j] W0[row_src[k, i], col_src[k, j]]: the modulated blocks, with the
              anchor read from the base weight itself (dequantized in the kernel for 2/4/8-bit bases).
``hadamard``  out[k, i, j] = s G[k, i, j] W0[row_src[k, i], col_src[k, j]]: the factor-gradient Hadamard product.
``merge``     out[i, j] = W0[i, j] (1 + s (B_full A_full)[i, j]): the merged form's W0 + Delta W in the original basis,
              the rank-r product fused into one pass over the weight.

Each body is plain C++ that both the Metal Shading Language and CUDA accept, plus ``$NAME`` tokens that
:func:`render` replaces with each backend's spelling (thread position, float conversions) and the anchor read,
written once as a snippet; the vector load/store helpers, which differ only in Metal's ``device`` qualifier, are in
the per-backend headers. No threadgroup memory, barriers, SIMD-group functions or atomics: every thread reads and
writes its own elements, so the CPU shim (tests/metal_shim) models the Metal rendering exactly. Products that can
exceed 2^31 (token x width) are formed in 64-bit.

Gather and scatter: each thread owns ``VEC`` consecutive output elements (16 bytes: 8 bf16/f16 or 4 f32) for ``TT``
tokens (``SCATTER_TT`` in a scatter), reusing its VEC indices for every token. It issues all its per-element reads
(scattered, so one element each; and scatter_add's ``base`` as one 16-byte vector load per token) before its first
store, so VEC x TT loads are in flight, then writes each token's run with one 16-byte vector store; threads of a
warp own consecutive runs, so a warp stores 512 contiguous bytes. A vector access needs its address to be a
multiple of 16 bytes: the block-major widths M and N are padded to multiples of 8 elements
(:func:`.plan.padded_dims`), and a scatter into a width d that 8 (4 for f32) does not divide runs with the widest
VEC that divides d, down to one element
(:func:`vector_width`). A mapping that gave each thread VEC elements 32 apart (so a warp's loads read neighbouring
block columns) was measured against this one on an H200 and dropped: 2.263 against 2.142 ms over the three shapes'
twelve steps (benchmarks/bench_gathers.json), as were 16 tokens per thread (2.722 ms). Modulate/hadamard: each
thread keeps its A columns in registers for ``TI`` rows, ``V`` columns 32 apart (coalesced across the warp).

Measured on an H200 (benchmarks/bench_bandwidth.json; docs/BENCHMARKS.md), these gathers and scatters reach 53-86%
of a device copy's bandwidth when compiled, as a training step runs them (67-86% where a row is 14336 wide, 53-71%
on 4096-wide rows; launched one at a time from Python, 33-71%: the host's cost per launch). A
variant whose lanes loaded 32 consecutive sorted columns per warp load and handed them on through a threadgroup
tile and a barrier was measured against them in the same run and dropped: 1.06-1.15x faster at 4096x4096, but
0.84-0.96x on most 14336-wide steps, and 1.997 ms against these kernels' 1.914 ms over the three shapes' twelve
gathers and scatters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # hints only: rendering the sources needs no MLX
    import mlx.core as mx

BACKENDS = ("metal", "cuda")
KERNELS = ("gather", "scatter", "scatter_add", "modulate", "hadamard", "merge")
MOVERS = ("gather", "scatter", "scatter_add")  # the gathers and scatters

BLOCK_ANCHORED = ("modulate", "hadamard")  # the block form's kernels that read W0 (dense or quantized)
ANCHORED = BLOCK_ANCHORED + ("merge",)  # every kernel that reads W0: each has a dense and a quantized rendering

GROUP = 256  # threads per threadgroup (x); the y and z extents of every threadgroup are 1
TT = 8  # tokens per gather thread
SCATTER_TT = 4  # tokens per scatter / scatter_add thread: twice the threads, half the loads in flight each. On an
# H200, two runs of bench_kernels --gathers --tt 4,8 (benchmarks/bench_gathers_tt4_f45b8b6*.json): the scatters at 4
# took 0.81-0.97 of their time at 8 in all 12 rows (the plain scatter at 4096x4096: 59-60% of the copy ceiling against
# 48-51%); the gathers tied (1-3% less in sum, the 14336x4096 ones a little slower), so they keep 8.
TI = 16  # block rows per modulate/hadamard thread
HADAMARD_TI = 4  # block rows per hadamard thread: it has no factor to keep for its rows (modulate keeps A's
# columns in registers for TI rows), so fewer rows put more threads and loads in flight. On an H200, over the three
# shapes of bench_kernels --gathers: 0.479 ms at 4 rows, 0.517 at 16 (benchmarks/bench_gathers.json); read at
# launch, for bench_kernels --hadamard-ti
MERGE_TI = 8  # weight rows per merge thread: its W0 loads in flight at once, TI x VEC float32 sums in registers.
# Read at launch. On an H200 (bench_merges_78f3eb4.json, bench_kernels_78f3eb4.json) a rank loop unrolled to the
# largest block rank (a template constant) took 1.11-1.21x this loop's time alone, at 4 rows per thread 1.31x at
# 4096x4096 and 1.06-1.13x on the 14336-wide shapes, each bit for bit the same; per layer within the
# runs' spread (auto / MLX LoRA at K=4 with 8 layers per call: 0.94x, 0.94x and 0.95x). Both dropped. Its 8 rows take
# 168 registers a thread (one 256-thread group per SM; benchmarks/kernel_resources_ef65f8c.json), 4 rows 91 and 2
# rows 55, with no spills: at 2 rows the merge alone took 0.87-0.88x the time of 8 on the 14336-wide shapes (1.06x
# at 4096x4096), but a layer's step 1.04-1.19x (8 layers per call; at K=4 1.00x MLX LoRA against 0.91x, 4 rows
# 0.92x; bench_kernels_ef65f8c.json), so 8 stays.
V = 4  # columns per modulate/hadamard thread, 32 apart (lane + 32 v): coalesced across the warp
VECTOR_BYTES = 16  # one gather/scatter store (and scatter_add base load): a thread's VEC consecutive elements;
# read at launch time, so a benchmark can set 8, 4 or 2 to compare narrower runs (2 in bf16: one element, VEC = 1)


def vector_width(width: int, *dtypes: mx.Dtype) -> int:
    """VEC, the elements per gather/scatter thread: 16 bytes of the widest of ``dtypes``, halved until it divides
    the row ``width``, so every thread's run starts at a multiple of its own size in a row-major (., width) array.
    In bf16 a width of 4096 gives 8, d_out = 300 gives 4 (8-byte runs), 75 gives 1 (the scalar fallback)."""
    vec = max(1, VECTOR_BYTES // max(dtype.size for dtype in dtypes))
    while width % vec:
        vec //= 2
    return vec


_VOCAB = {
    "metal": {
        "$TX": "int(thread_position_in_grid.x)",
        "$TY": "int(thread_position_in_grid.y)",
        "$TZ": "int(thread_position_in_grid.z)",
        "$TOF": "static_cast<float>",
        "$TOT": "static_cast<T>",
        "$TOO": "static_cast<OT>",
    },
    "cuda": {
        "$TX": "int(blockIdx.x * blockDim.x + threadIdx.x)",
        "$TY": "int(blockIdx.y * blockDim.y + threadIdx.y)",
        "$TZ": "int(blockIdx.z * blockDim.z + threadIdx.z)",
        "$TOF": "smoa_tof",
        "$TOT": "smoa_fromf<T>",
        "$TOO": "smoa_fromf<OT>",
    },
}

# One vector of N consecutive elements: 16 bytes on the fast path (N = VEC = 16 / sizeof), one element in the
# fallback (VEC = 1). Copied as a whole through a pointer of its own type it is one vector load or store: its
# ``alignas`` is what lets the compiler emit that (the idiom of MLX's steel ReadVector and PyTorch's
# aligned_vector), and the caller guarantees the address is a multiple of it. The helpers differ only in Metal's
# address-space qualifier, so they live in the headers and the bodies stay one text.
_VEC_HELPERS = """
template <typename U, int N> struct alignas(sizeof(U) * N) smoa_vec { U v[N]; };
template <typename U, int N> FN void smoa_vstore(DEV U* p, smoa_vec<U, N> x) {
  *reinterpret_cast<DEV smoa_vec<U, N>*>(p) = x;
}
template <int N, typename U> FN smoa_vec<U, N> smoa_vload(const DEV U* p) {
  return *reinterpret_cast<const DEV smoa_vec<U, N>*>(p);
}
"""

# Float conversions: Metal's static_cast covers half and MLX's bfloat16_t; CUDA's bf16/f16 types need intrinsics.
_HEADERS = {
    "metal": _VEC_HELPERS.replace("FN", "inline").replace("DEV", "device"),
    "cuda": """
__device__ __forceinline__ float smoa_tof(float v) { return v; }
__device__ __forceinline__ float smoa_tof(__half v) { return __half2float(v); }
__device__ __forceinline__ float smoa_tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename U> __device__ __forceinline__ U smoa_fromf(float v);
template <> __device__ __forceinline__ float smoa_fromf<float>(float v) { return v; }
template <> __device__ __forceinline__ __half smoa_fromf<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 smoa_fromf<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
""" + _VEC_HELPERS.replace("FN", "__device__ __forceinline__").replace("DEV ", ""),
}

GATHER_BODY = """
  const int n_tok = dims[0];
  const int width = dims[1];
  const int P = dims[2];
  const int per_block = dims[3];  // threads across one block's P columns
  // The K blocks run along the grid's x, so the K blocks of one group of tokens are neighbouring threadgroups that
  // read the same input rows while L2 still holds them. With the blocks along z (every block of the first launched
  // before any of the second, each reading the whole of every input row), the gathers ran 1.3-1.6x as long at K = 4
  // as at K = 2 for the same bytes; along x, 0.90-0.97x z's time for a K = 4 layer's step on an H200
  // (benchmarks/bench_gather_along_4628c29.json, bench_kernels_4628c29.json).
  const int k = $TX / per_block;
  const int j0 = ($TX % per_block) * VEC;  // this thread's VEC consecutive block columns (P is a multiple of VEC)
  const int t0 = $TY * TT;
  if (j0 < P) {
    int cols[VEC];
    for (int e = 0; e < VEC; ++e) {
      const int j = j0 + e;
      cols[e] = j < P ? src[k * P + j] : -1;
    }
    // Every load of the thread (VEC columns x TT tokens) is issued before its first store, which the compiler
    // must assume may alias them: that many loads in flight is what keeps the memory system busy.
    smoa_vec<T, VEC> vals[TT];
    for (int u = 0; u < TT; ++u) {
      const int t = t0 + u;
      const long row = long(t) * width;
      for (int e = 0; e < VEC; ++e) {
        vals[u].v[e] = (t < n_tok && cols[e] >= 0) ? inp[row + cols[e]] : $TOT(0.0f);
      }
    }
    for (int u = 0; u < TT; ++u) {
      const int t = t0 + u;
      if (t < n_tok) {
        smoa_vstore(out + (long(k) * n_tok + t) * P + j0, vals[u]);
      }
    }
  }
"""

_SCATTER_TEMPLATE = """
  const int n_tok = dims[0];
  const int width = dims[1];
  const int P = dims[2];
  const int j0 = $TX * VEC;  // this thread's VEC consecutive output columns (width is a multiple of VEC)
  const int t0 = $TY * TT;
  if (j0 < width) {
    long from[VEC];
    for (int e = 0; e < VEC; ++e) {
      const int s = j0 + e < width ? slot[j0 + e] : 0;
      const int k = s / P;
      from[e] = long(k) * n_tok * P + (s - k * P);
    }
    // All loads (and, for scatter_add, the base vectors) before the first store, as in the gather.
    smoa_vec<OT, VEC> vals[TT];
    for (int u = 0; u < TT; ++u) {
      const int t = t0 + u;
      if (t < n_tok) {$LOADBASE
        for (int e = 0; e < VEC; ++e) {
          vals[u].v[e] = $TOO($TOF(inp[from[e] + long(t) * P])$ADD);
        }
      }
    }
    for (int u = 0; u < TT; ++u) {
      const int t = t0 + u;
      if (t < n_tok) {
        smoa_vstore(out + long(t) * width + j0, vals[u]);
      }
    }
  }
"""
_SCATTER_BASE = """
        float add[VEC];
        const auto run = smoa_vload<VEC>(base + long(t) * width + j0);
        for (int e = 0; e < VEC; ++e) {
          add[e] = $TOF(run.v[e]);
        }"""

# The anchor W0[row, col] as float: a dense base, or MLX's affine quantization (uint32 words, low bits first).
_ANCHOR_DENSE = "$TOF(w[long(row) * d_in + col])"
_ANCHOR_QUANT = (
    "($TOF(scales[long(row) * s_ld + col / GS]) * float((wq[long(row) * wq_ld + col / (32 / BITS)] >> "
    "((col % (32 / BITS)) * BITS)) & ((1u << BITS) - 1u)) + $TOF(biases[long(row) * s_ld + col / GS]))"
)

# modulate: the thread's A columns stay in registers (av) for its TI rows; hadamard reads G instead.
_MOD_PRELOAD = {
    "modulate": """
  float av[V * R];
  for (int v = 0; v < V; ++v) {
    const int j = jb + 32 * v;
    for (int q = 0; q < R; ++q) {
      av[v * R + q] = j < N ? $TOF(a[(long(k) * R + q) * N + j]) : 0.0f;
    }
  }""",
    "hadamard": "",
}
_MOD_ROW = {
    "modulate": """
      float bv[R];
      for (int q = 0; q < R; ++q) {
        bv[q] = $TOF(b[(long(k) * M + i) * R + q]);
      }""",
    "hadamard": "",
}
_MOD_FACTOR = {
    "modulate": """float f = 0.0f;
          for (int q = 0; q < R; ++q) {
            f += bv[q] * av[v * R + q];
          }""",
    "hadamard": "const float f = $TOF(g[(long(k) * M + i) * N + j]);",
}

_MODULATE_TEMPLATE = """
  const int M = dims[0];
  const int N = dims[1];
  const int d_in = dims[2];
  const int wq_ld = dims[3];
  const int s_ld = dims[4];
  (void)d_in; (void)wq_ld; (void)s_ld;
  const int tx = $TX;
  const int jb = (tx / 32) * (32 * V) + tx % 32;  // this thread's columns: jb + 32 v
  const int i0 = $TY * TI;
  const int k = $TZ;
  const float s = scale[0];
  int cols[V];
  for (int v = 0; v < V; ++v) {
    const int j = jb + 32 * v;
    cols[v] = j < N ? col_src[k * N + j] : -1;
  }$PRELOAD
  for (int ii = 0; ii < TI; ++ii) {
    const int i = i0 + ii;
    if (i < M) {
      const int row = row_src[k * M + i];$ROW
      for (int v = 0; v < V; ++v) {
        const int j = jb + 32 * v;
        if (j < N) {
          float val = 0.0f;
          const int col = cols[v];
          if (row >= 0 && col >= 0) {
            $FACTOR
            val = s * f * $ANCHOR;
          }
          out[(long(k) * M + i) * N + j] = $TOT(val);
        }
      }
    }
  }
"""

# merge: the rank-r product fused into the pass over the weight. Each thread owns VEC consecutive columns (16 bytes
# of the output) of TI rows of one block (the plan's row_src: block k's rows in ascending order, padding last), as the
# scatters own theirs, so a warp loads and stores 512 contiguous bytes per row. It issues its TI loads of W0 first
# (TI x 16 bytes in flight per thread: the pass is bound by memory latency), then accumulates the sums for its
# TI x VEC entries one rank slot at a time over its block's slots only (B_full's rows are zero in every other
# block's): A_full's VEC entries of that slot (one vector load, coalesced across the warp; zero in columns of other
# blocks) against its rows' B_full entries (the same for the whole warp: broadcast loads). A 2/4/8-bit base is
# dequantized in the kernel; the sum is taken in float32 and the result rounded once. Measured on an H200
# (benchmarks/): a first version that read each column's factors straight from the flat vector ran at 17-22% of a
# copy's bandwidth (bench_kernels_merge_v1_46fccb8.json), a second that kept A's entries in registers and loaded W0
# row by row at 30-46% (bench_kernels_merge_v2_710575d.json): both no faster than MLX's matmul + fused pass. A third
# (465f50e) that gave every entry the whole rank-r sum, over rows in their original order, at 25-41% (0.81-0.96x
# MLX's merge, bench_merge_v3_465f50e.json): K times the FMAs and factor loads this one does.
_MERGE_TEMPLATE = """
  const int d_in = dims[1];
  const int wq_ld = dims[2];
  const int s_ld = dims[3];
  const int M = dims[4];
  (void)wq_ld; (void)s_ld;
  const int groups = (M + TI - 1) / TI;  // TI-row groups per block
  const int k = $TY / groups;
  const int i0 = ($TY - k * groups) * TI;
  const int j0 = $TX * VEC;  // this thread's VEC consecutive columns (d_in is a multiple of VEC)
  const int q_lo = dims[5 + k];  // block k's rank slots: the only ones its rows' B_full entries fill
  const int q_hi = dims[6 + k];
  const float s = scale[0];
  int rows[TI];
  for (int u = 0; u < TI; ++u) {
    rows[u] = i0 + u < M ? row_src[k * M + i0 + u] : -1;
  }
  if (j0 < d_in && rows[0] >= 0) {  // a block's padding rows come last: a group whose first is padding is all padding
    float acc[TI * VEC];$WLOAD
    for (int u = 0; u < TI; ++u) {
      for (int e = 0; e < VEC; ++e) {
        acc[u * VEC + e] = 0.0f;
      }
    }
    for (int q = q_lo; q < q_hi; ++q) {
      const auto arun = smoa_vload<VEC>(a + long(q) * d_in + j0);
      for (int u = 0; u < TI; ++u) {
        const float bq = $TOF(b[long(rows[u] >= 0 ? rows[u] : rows[0]) * R + q]);
        for (int e = 0; e < VEC; ++e) {
          acc[u * VEC + e] += bq * $TOF(arun.v[e]);
        }
      }
    }
    for (int u = 0; u < TI; ++u) {
      const int row = rows[u];
      if (row >= 0) {
        smoa_vec<OT, VEC> res;
        for (int e = 0; e < VEC; ++e) {
          const int col = j0 + e;
          (void)col;
          res.v[e] = $TOO($ANCHOR * (1.0f + s * acc[u * VEC + e]));
        }
        smoa_vstore(out + long(row) * d_in + j0, res);
      }
    }
  }
"""
_MERGE_WLOAD = """
    smoa_vec<T, VEC> wv[TI];
    for (int u = 0; u < TI; ++u) {  // a padding row repeats the group's first (never stored)
      wv[u] = smoa_vload<VEC>(w + long(rows[u] >= 0 ? rows[u] : rows[0]) * d_in + j0);
    }"""
_MERGE_ANCHOR_DENSE = "$TOF(wv[u].v[e])"


@dataclass(frozen=True)
class KernelSource:
    """What ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel`` take, for one kernel on one backend."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    header: str
    source: str


def weight_inputs(quantized: bool) -> tuple[str, ...]:
    return ("wq", "scales", "biases") if quantized else ("w",)


def _body(kernel: str, quantized: bool) -> tuple[str, tuple[str, ...]]:
    if kernel == "gather":
        return GATHER_BODY, ("inp", "src", "dims")
    if kernel in ("scatter", "scatter_add"):
        add = kernel == "scatter_add"
        body = _SCATTER_TEMPLATE.replace("$LOADBASE", _SCATTER_BASE if add else "")
        body = body.replace("$ADD", " + add[e]" if add else "")
        return body, ("inp", "slot", "dims") + (("base",) if add else ())
    if kernel == "merge":
        body = (_MERGE_TEMPLATE.replace("$WLOAD", "" if quantized else _MERGE_WLOAD)
                .replace("$ANCHOR", _ANCHOR_QUANT if quantized else _MERGE_ANCHOR_DENSE))
        return body, ("a", "b", "row_src", "dims", "scale") + weight_inputs(quantized)
    if kernel in BLOCK_ANCHORED:
        body = (
            _MODULATE_TEMPLATE.replace("$PRELOAD", _MOD_PRELOAD[kernel])
            .replace("$ROW", _MOD_ROW[kernel])
            .replace("$FACTOR", _MOD_FACTOR[kernel])
            .replace("$ANCHOR", _ANCHOR_QUANT if quantized else _ANCHOR_DENSE)
        )
        data = ("a", "b") if kernel == "modulate" else ("g",)
        return body, data + ("row_src", "col_src", "dims", "scale") + weight_inputs(quantized)
    raise ValueError(f"unknown SMoA kernel {kernel!r}; expected one of {KERNELS}")


def render(kernel: str, backend: str, quantized: bool = False) -> KernelSource:
    """The kernel ``kernel`` spelled for ``backend`` ("metal" or "cuda"); ``quantized`` only matters for the
    anchor-reading kernels (:data:`ANCHORED`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    body, inputs = _body(kernel, quantized)
    for token, spelling in _VOCAB[backend].items():
        body = body.replace(token, spelling)
    if "$" in body:
        raise AssertionError(f"unrendered token in {kernel} for {backend}: {body[body.index('$'):][:40]!r}")
    name = f"smoa_{kernel}" + (("_q" if quantized else "_d") if kernel in ANCHORED else "")
    return KernelSource(name, inputs, ("out",), _HEADERS[backend], body)
