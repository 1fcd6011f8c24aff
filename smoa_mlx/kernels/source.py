"""The one source of truth for the SMoA kernels: bodies written once, rendered to Metal and to CUDA.

The bodies are plain C++ that both the Metal Shading Language and CUDA accept, plus a small vocabulary: ``$NAME``
tokens that :func:`render` replaces with each backend's spelling (thread, SIMD-group/warp and group indices, the
threadgroup barrier, threadgroup/shared arrays, float loads), and ``SMOA_*`` function-like macros for 16x16 (CUDA,
``mma.sync``) or 8x8 (Metal, ``simdgroup_matrix``) matrix fragments, defined in each backend's header. The anchor
read (dense or affine-quantized base weight, dequantized in the kernel) is spliced in as a snippet, also written once.

Kernels (128 threads = 4 SIMD-groups per threadgroup, 64x64 output tiles, float accumulation):

``smoa_modmm``  out[t, omap(o)] = sum_j in[t, jmap(j)] * W_k(o, j) for every block k (grid z): per chunk of j the
    rank-r product (s B_k)(A_k) is formed on the matrix units, multiplied by the anchors W0[R_k, C_k] in
    threadgroup memory and used at once; no block is ever written to device memory. MODE 0 is the forward (o over
    R_k, j over C_k, in = x, out = delta y); MODE 1 the input gradient (o over C_k, j over R_k, in = dy, out = dx).
``smoa_grad``   per (i-tile, c-tile) of block k: G = dy[:, R_k]^T x[:, C_k] over all tokens on the matrix units,
    H = G * W0[R_k, C_k], then the tile's share of dB_k = H A_k^T and dA_k = (s B_k)^T H, written as per-tile
    partial sums that the caller adds up (no atomics, so the CPU emulator models it exactly). G and H live in
    threadgroup memory only.

Deliberately kept to a subset that the CPU shim (tests/metal_shim) models honestly: no SIMD-group functions
(shuffles, reductions), no atomics, fragment operations only in SIMD-group-uniform control flow, no early exit that
is not uniform over the threadgroup, only ``int`` index arithmetic (callers check that every index fits in 31 bits).
Measured speed on an H200: docs/BENCHMARKS.md (correct, but far from cuBLAS: see the notes there).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("metal", "cuda")

THREADS = 128  # four SIMD-groups / warps of 32
# Fragment edge: Metal's simdgroup_matrix is 8x8, CUDA's mma.sync bf16/f16 fragments 16x16 (two m16n8k16). Tile shapes per backend
# (the CUDA tiles are larger; the Metal ones fit 32 KB of threadgroup memory with float operands).
FRAGMENT = {"metal": 8, "cuda": 16}
MODMM_TILE = {"metal": dict(BJ=16), "cuda": dict(BJ=32)}  # BM = BO = 64 tokens x outputs per threadgroup
GRAD_TILE = {"metal": dict(BT=16), "cuda": dict(BT=32)}  # BI = BC = 64 block rows x block columns per threadgroup
MAX_RANK = 32  # per-block rank handled in one fragment pass (RP, the padded rank, <= 32)

_VOCAB = {
    "metal": {
        "$TID": "int(thread_index_in_threadgroup)",
        "$WARP": "int(simdgroup_index_in_threadgroup)",
        "$GX": "int(threadgroup_position_in_grid.x)",
        "$GY": "int(threadgroup_position_in_grid.y)",
        "$GZ": "int(threadgroup_position_in_grid.z)",
        "$BARRIER": "threadgroup_barrier(mem_flags::mem_threadgroup)",
        "$SHARED": "threadgroup",
        "$TOF": "static_cast<float>",
    },
    "cuda": {
        "$TID": "int(threadIdx.x)",
        "$WARP": "int(threadIdx.x / 32)",
        "$GX": "int(blockIdx.x)",
        "$GY": "int(blockIdx.y)",
        "$GZ": "int(blockIdx.z)",
        "$BARRIER": "__syncthreads()",
        "$SHARED": "__shared__ __align__(32)",
        "$TOF": "smoa_tof",
    },
}

# Matrix-fragment operations, as function-like macros in each backend's header. MT is the operand type held in
# threadgroup memory: float on Metal (simdgroup_matrix<float, 8, 8>), the input type T (bf16 or f16) on CUDA.
# These headers are the only per-backend code; every kernel body is shared.
_HEADERS = {
    "metal": """
#include <metal_simdgroup_matrix>
#define SMOA_FR 8
#define MT float
#define SMOA_TOMT(v) (v)
#define SMOA_FROMF(v) static_cast<T>(v)
#define SMOA_FRAG_A metal::simdgroup_matrix<float, 8, 8>
#define SMOA_FRAG_AC metal::simdgroup_matrix<float, 8, 8>
#define SMOA_FRAG_B metal::simdgroup_matrix<float, 8, 8>
#define SMOA_FRAG_C metal::simdgroup_matrix<float, 8, 8>
#define SMOA_ZERO(f) f = metal::make_filled_simdgroup_matrix<float, 8, 8>(0.0f)
#define SMOA_LOAD_A(f, p, ld) metal::simdgroup_load(f, p, ld, ulong2(0, 0), false)
#define SMOA_LOAD_AC(f, p, ld) metal::simdgroup_load(f, p, ld, ulong2(0, 0), true)
#define SMOA_LOAD_B(f, p, ld) metal::simdgroup_load(f, p, ld, ulong2(0, 0), false)
#define SMOA_MMA(c, a, b) metal::simdgroup_multiply_accumulate(c, a, b, c)
#define SMOA_STORE(p, f, ld, tr) metal::simdgroup_store(f, p, ld, ulong2(0, 0), tr)
""",
    "cuda": """
__device__ __forceinline__ float smoa_tof(float v) { return v; }
__device__ __forceinline__ float smoa_tof(__half v) { return __half2float(v); }
__device__ __forceinline__ float smoa_tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename U> __device__ __forceinline__ U smoa_fromf(float v);
template <> __device__ __forceinline__ float smoa_fromf<float>(float v) { return v; }
template <> __device__ __forceinline__ __half smoa_fromf<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 smoa_fromf<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
__device__ __forceinline__ unsigned smoa_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned smoa_bits(__half v) { return __half_as_ushort(v); }
// 16x16 fragments on mma.sync.m16n8k16 (two n8 halves), register layouts as in the PTX ISA; the header NVRTC
// ships for WMMA (crt/mma.h) is missing from the pip CUDA packages MLX runs on, so this is written out.
struct SmoaFragA { unsigned r[4]; };
struct SmoaFragB { unsigned r[4]; };
struct SmoaFragC { float c[8]; };
template <bool COL, typename U>
__device__ __forceinline__ void smoa_load_a(SmoaFragA& f, const U* p, int ld) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#define SMOA_AT(r, c) smoa_bits(COL ? p[(c) * ld + (r)] : p[(r) * ld + (c)])
  f.r[0] = SMOA_AT(g, 2 * t) | (SMOA_AT(g, 2 * t + 1) << 16);
  f.r[1] = SMOA_AT(g + 8, 2 * t) | (SMOA_AT(g + 8, 2 * t + 1) << 16);
  f.r[2] = SMOA_AT(g, 2 * t + 8) | (SMOA_AT(g, 2 * t + 9) << 16);
  f.r[3] = SMOA_AT(g + 8, 2 * t + 8) | (SMOA_AT(g + 8, 2 * t + 9) << 16);
#undef SMOA_AT
}
template <typename U>
__device__ __forceinline__ void smoa_load_b(SmoaFragB& f, const U* p, int ld) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  for (int h = 0; h < 2; ++h) {
    const int n = h * 8 + g;
    f.r[2 * h] = smoa_bits(p[(2 * t) * ld + n]) | (smoa_bits(p[(2 * t + 1) * ld + n]) << 16);
    f.r[2 * h + 1] = smoa_bits(p[(2 * t + 8) * ld + n]) | (smoa_bits(p[(2 * t + 9) * ld + n]) << 16);
  }
}
template <typename U> __device__ __forceinline__ void smoa_mma(SmoaFragC& c, const SmoaFragA& a, const SmoaFragB& b);
#define SMOA_MMA_ASM(TY) \\
  for (int h = 0; h < 2; ++h) { \\
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \\
                 "{%0,%1,%2,%3};" \\
                 : "+f"(c.c[4 * h]), "+f"(c.c[4 * h + 1]), "+f"(c.c[4 * h + 2]), "+f"(c.c[4 * h + 3]) \\
                 : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[2 * h]), "r"(b.r[2 * h + 1])); \\
  }
template <> __device__ __forceinline__ void smoa_mma<__nv_bfloat16>(SmoaFragC& c, const SmoaFragA& a, const SmoaFragB& b) {
  SMOA_MMA_ASM("bf16")
}
template <> __device__ __forceinline__ void smoa_mma<__half>(SmoaFragC& c, const SmoaFragA& a, const SmoaFragB& b) {
  SMOA_MMA_ASM("f16")
}
__device__ __forceinline__ void smoa_store(float* p, const SmoaFragC& f, int ld, bool col) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      const int r = g + (i >= 2 ? 8 : 0);
      const int c = h * 8 + 2 * t + (i & 1);
      p[col ? c * ld + r : r * ld + c] = f.c[4 * h + i];
    }
  }
}
#define SMOA_FR 16
#define MT T
#define SMOA_TOMT(v) smoa_fromf<T>(v)
#define SMOA_FROMF(v) smoa_fromf<T>(v)
#define SMOA_FRAG_A SmoaFragA
#define SMOA_FRAG_AC SmoaFragA
#define SMOA_FRAG_B SmoaFragB
#define SMOA_FRAG_C SmoaFragC
#define SMOA_ZERO(f) for (int z_ = 0; z_ < 8; ++z_) (f).c[z_] = 0.0f
#define SMOA_LOAD_A(f, p, ld) smoa_load_a<false>(f, p, ld)
#define SMOA_LOAD_AC(f, p, ld) smoa_load_a<true>(f, p, ld)
#define SMOA_LOAD_B(f, p, ld) smoa_load_b(f, p, ld)
#define SMOA_MMA(c, a, b) smoa_mma<T>(c, a, b)
#define SMOA_STORE(p, f, ld, tr) smoa_store(p, f, ld, tr)
""",
}

# -- the anchor W0[row, col] as float, dense or affine-quantized (MLX packing: low bits first) ----------
_ANCHOR_DENSE = "$TOF(w[row * d_in + col])"
_ANCHOR_QUANT = (
    "($TOF(scales[row * s_ld + col / GS]) * float((wq[row * wq_ld + col / (32 / BITS)] >> "
    "((col % (32 / BITS)) * BITS)) & ((1u << BITS) - 1u)) + $TOF(biases[row * s_ld + col / GS]))"
)

# Index inputs: within each block the rows (columns) are visited in ascending original index, so loads of x, dy
# and W0 walk memory forwards; row_pos / col_pos give each visited row's (column's) position in R_k (C_k), which
# is where its factor row (column) lives. The reduction order inside a block does not change the result.
_COMMON_PROLOGUE = """
  const int N = dims[0];
  const int d_in = dims[1];
  const int d_out = dims[2];
  const int wq_ld = dims[3];
  const int s_ld = dims[4];
  const int k = $GZ;
  const int ro = meta[k * 8 + 0];
  const int nr = meta[k * 8 + 1];
  const int co = meta[k * 8 + 2];
  const int nc = meta[k * 8 + 3];
  const int rk = meta[k * 8 + 4];
  const int aoff = meta[k * 8 + 5];
  const int boff = meta[k * 8 + 6];
  const int tid = $TID;
  const int warp = $WARP;
  constexpr int FR = SMOA_FR;
  constexpr int NF = 32 / FR;  // fragments along each edge of a warp's 32 x 32 sub-tile
  (void)wq_ld; (void)s_ld; (void)d_out;
"""

MODMM_BODY = (
    _COMMON_PROLOGUE
    + """
  constexpr int BM = 64;
  constexpr int BO = 64;
  constexpr int NT = 128;
  const int no = MODE == 0 ? nr : nc;
  const int nj = MODE == 0 ? nc : nr;
  const int o0 = $GX * BO;
  if (o0 >= no) {
    return;  // uniform over the whole group, before any barrier
  }
  const int t0 = $GY * BM;
  const int ld_in = MODE == 0 ? d_in : d_out;
  const int ld_out = MODE == 0 ? d_out : d_in;
  // Formation F = L R, with L the (s B) rows and R the A columns of this tile: F[u][v], u over FU, v over FV.
  constexpr int FU = MODE == 0 ? BO : BJ;
  constexpr int FV = MODE == 0 ? BJ : BO;
  $SHARED MT xs[BM * BJ];    // gathered input tile [t][j]
  $SHARED MT ws[BJ * BO];    // modulated block tile [j][o]
  $SHARED float fs[BJ * BO]; // (B A) tile [j][o]; later the output staging area (BJ * BO >= 32 * 32)
  $SHARED MT ls[BO * RP];    // L [u][q]
  $SHARED MT rs[RP * BO];    // R [q][v]
  const int wt = (warp / 2) * 32;
  const int wo = (warp % 2) * 32;
  SMOA_FRAG_C acc[NF * NF];
  for (int e = 0; e < NF * NF; ++e) {
    SMOA_ZERO(acc[e]);
  }
  for (int j0 = 0; j0 < nj; j0 += BJ) {
    for (int e = tid; e < BM * BJ; e += NT) {
      const int t = t0 + e / BJ;
      const int j = j0 + e % BJ;
      float v = 0.0f;
      if (t < N && j < nj) {
        const int src = MODE == 0 ? col_idx[co + j] : row_idx[ro + j];
        v = $TOF(inp[t * ld_in + src]);
      }
      xs[e] = SMOA_TOMT(v);
    }
    for (int e = tid; e < FU * RP; e += NT) {
      const int u = e / RP;
      const int q = e % RP;
      const int i = (MODE == 0 ? o0 : j0) + u;
      ls[e] = SMOA_TOMT((q < rk && i < nr) ? sb[boff + row_pos[ro + i] * rk + q] : 0.0f);
    }
    for (int e = tid; e < RP * FV; e += NT) {
      const int q = e / FV;
      const int c = (MODE == 0 ? j0 : o0) + e % FV;
      rs[e] = SMOA_TOMT((q < rk && c < nc) ? a[aoff + q * nc + col_pos[co + c]] : 0.0f);
    }
    $BARRIER;
    for (int f = warp; f < (FU / FR) * (FV / FR); f += NT / 32) {
      const int fu = f / (FV / FR);
      const int fv = f % (FV / FR);
      SMOA_FRAG_C fc;
      SMOA_ZERO(fc);
      for (int kq = 0; kq < RP; kq += FR) {
        SMOA_FRAG_A fl;
        SMOA_FRAG_B fr;
        SMOA_LOAD_A(fl, ls + fu * FR * RP + kq, RP);
        SMOA_LOAD_B(fr, rs + kq * FV + fv * FR, FV);
        SMOA_MMA(fc, fl, fr);
      }
      // fs is [j][o]: MODE 0 has u = o, v = j, so its fragment goes in transposed.
      if (MODE == 0) {
        SMOA_STORE(fs + fv * FR * BO + fu * FR, fc, BO, true);
      } else {
        SMOA_STORE(fs + fu * FR * BO + fv * FR, fc, BO, false);
      }
    }
    $BARRIER;
    for (int e = tid; e < BJ * BO; e += NT) {
      // Consecutive threads walk W0 along its rows: over j in MODE 0 (columns), over o in MODE 1.
      const int jj = MODE == 0 ? e % BJ : e / BO;
      const int oo = MODE == 0 ? e / BJ : e % BO;
      const int o = o0 + oo;
      const int j = j0 + jj;
      float v = 0.0f;
      if (o < no && j < nj) {
        const int row = row_idx[ro + (MODE == 0 ? o : j)];
        const int col = col_idx[co + (MODE == 0 ? j : o)];
        v = fs[jj * BO + oo] * $ANCHOR;
      }
      ws[jj * BO + oo] = SMOA_TOMT(v);
    }
    $BARRIER;
    for (int kk = 0; kk < BJ; kk += FR) {
      SMOA_FRAG_A fa[NF];
      SMOA_FRAG_B fb[NF];
      for (int p = 0; p < NF; ++p) {
        SMOA_LOAD_A(fa[p], xs + (wt + p * FR) * BJ + kk, BJ);
        SMOA_LOAD_B(fb[p], ws + kk * BO + wo + p * FR, BO);
      }
      for (int p = 0; p < NF; ++p) {
        for (int u = 0; u < NF; ++u) {
          SMOA_MMA(acc[p * NF + u], fa[p], fb[u]);
        }
      }
    }
    $BARRIER;
  }
  // Write out one warp's 32 x 32 sub-tile at a time through fs, so stores walk output rows.
  for (int w = 0; w < NT / 32; ++w) {
    if (warp == w) {
      for (int p = 0; p < NF; ++p) {
        for (int u = 0; u < NF; ++u) {
          SMOA_STORE(fs + p * FR * 32 + u * FR, acc[p * NF + u], 32, false);
        }
      }
    }
    $BARRIER;
    for (int e = tid; e < 32 * 32; e += NT) {
      const int t = t0 + (w / 2) * 32 + e / 32;
      const int o = o0 + (w % 2) * 32 + e % 32;
      if (t < N && o < no) {
        const int dst = MODE == 0 ? row_idx[ro + o] : col_idx[co + o];
        out[t * ld_out + dst] = SMOA_FROMF(fs[e]);
      }
    }
    $BARRIER;
  }
"""
)

GRAD_BODY = (
    _COMMON_PROLOGUE
    + """
  constexpr int BI = 64;
  constexpr int BC = 64;
  constexpr int NT = 128;
  const int totA = dims[5];
  const int totB = dims[6];
  const int c0 = $GX * BC;
  const int i0 = $GY * BI;
  $SHARED MT gs[BT * BI];    // dy tile [t][i]
  $SHARED MT xs[BT * BC];    // x tile [t][c]
  $SHARED float hs[BI * BC]; // G = dy^T x, then H = G * W0, [i][c]
  const int wi = (warp / 2) * 32;
  const int wc = (warp % 2) * 32;
  SMOA_FRAG_C acc[NF * NF];
  for (int e = 0; e < NF * NF; ++e) {
    SMOA_ZERO(acc[e]);
  }
  for (int t0 = 0; t0 < N; t0 += BT) {
    for (int e = tid; e < BT * BI; e += NT) {
      const int t = t0 + e / BI;
      const int i = i0 + e % BI;
      gs[e] = SMOA_TOMT((t < N && i < nr) ? $TOF(cot[t * d_out + row_idx[ro + i]]) : 0.0f);
    }
    for (int e = tid; e < BT * BC; e += NT) {
      const int t = t0 + e / BC;
      const int c = c0 + e % BC;
      xs[e] = SMOA_TOMT((t < N && c < nc) ? $TOF(x[t * d_in + col_idx[co + c]]) : 0.0f);
    }
    $BARRIER;
    for (int kk = 0; kk < BT; kk += FR) {
      SMOA_FRAG_AC fa[NF];
      SMOA_FRAG_B fb[NF];
      for (int p = 0; p < NF; ++p) {
        SMOA_LOAD_AC(fa[p], gs + kk * BI + wi + p * FR, BI);  // A[i][t] = gs[t][i]: column-major
        SMOA_LOAD_B(fb[p], xs + kk * BC + wc + p * FR, BC);
      }
      for (int p = 0; p < NF; ++p) {
        for (int u = 0; u < NF; ++u) {
          SMOA_MMA(acc[p * NF + u], fa[p], fb[u]);
        }
      }
    }
    $BARRIER;
  }
  for (int p = 0; p < NF; ++p) {
    for (int u = 0; u < NF; ++u) {
      SMOA_STORE(hs + (wi + p * FR) * BC + wc + u * FR, acc[p * NF + u], BC, false);
    }
  }
  $BARRIER;
  for (int e = tid; e < BI * BC; e += NT) {
    const int i = i0 + e / BC;
    const int c = c0 + e % BC;
    float h = 0.0f;
    if (i < nr && c < nc) {
      const int row = row_idx[ro + i];
      const int col = col_idx[co + c];
      h = hs[e] * $ANCHOR;
    }
    hs[e] = h;
  }
  $BARRIER;
  // This c-tile's share of dB_k[i, q] = sum_c H[i, c] A_k[q, c] (the caller scales by s).
  for (int e = tid; e < BI * rk; e += NT) {
    const int ii = e / rk;
    const int q = e % rk;
    if (i0 + ii < nr) {
      float v = 0.0f;
      for (int cc = 0; cc < BC && c0 + cc < nc; ++cc) {
        v += hs[ii * BC + cc] * a[aoff + q * nc + col_pos[co + c0 + cc]];
      }
      db_part[$GX * totB + boff + row_pos[ro + i0 + ii] * rk + q] = v;
    }
  }
  // This i-tile's share of dA_k[q, c] = sum_i (s B_k)[i, q] H[i, c].
  for (int e = tid; e < rk * BC; e += NT) {
    const int q = e / BC;
    const int cc = e % BC;
    if (c0 + cc < nc) {
      float v = 0.0f;
      for (int ii = 0; ii < BI && i0 + ii < nr; ++ii) {
        v += sb[boff + row_pos[ro + i0 + ii] * rk + q] * hs[ii * BC + cc];
      }
      da_part[$GY * totA + aoff + q * nc + col_pos[co + c0 + cc]] = v;
    }
  }
"""
)


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


def render(kernel: str, backend: str, quantized: bool) -> KernelSource:
    """The kernel ``kernel`` ("modmm" or "grad") spelled for ``backend`` ("metal" or "cuda")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if kernel == "modmm":
        body, data, outs = MODMM_BODY, ("inp",), ("out",)
    elif kernel == "grad":
        body, data, outs = GRAD_BODY, ("cot", "x"), ("db_part", "da_part")
    else:
        raise ValueError(f"unknown SMoA kernel {kernel!r}")
    body = body.replace("$ANCHOR", _ANCHOR_QUANT if quantized else _ANCHOR_DENSE)
    for token, spelling in _VOCAB[backend].items():
        body = body.replace(token, spelling)
    if "$" in body:
        raise AssertionError(f"unrendered token in {kernel} for {backend}: {body[body.index('$'):][:40]!r}")
    inputs = data + ("dims", "meta", "row_idx", "row_pos", "col_idx", "col_pos", "a", "sb") + weight_inputs(quantized)
    name = f"smoa_{kernel}_{'q' if quantized else 'd'}"
    return KernelSource(name, inputs, outs, _HEADERS[backend], body)
