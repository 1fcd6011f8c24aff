"""The one source of truth for the SMoA kernels: bodies written once, rendered to Metal and to CUDA.

The bodies are plain C++ that both the Metal Shading Language and CUDA accept, plus a small vocabulary of
``$NAME`` tokens that :func:`render` replaces with each backend's spelling (thread and group indices, the
threadgroup barrier, threadgroup/shared arrays, float conversions). The anchor read (dense or affine-quantized
base weight, dequantized in the kernel) is spliced in as a snippet, also written once.

Kernels (all tiles in float32, one threadgroup per output tile, 256 threads):

``smoa_modmm``  out[t, omap(o)] = sum_j in[t, jmap(j)] * W_k(o, j) for every block k (grid z), where the
    modulated block W_k = (s B_k A_k) * W0[R_k, C_k] is formed tile by tile in threadgroup memory, never in
    device memory. MODE 0 is the forward (o over R_k, j over C_k, in = x, out = delta y); MODE 1 is the input
    gradient (o over C_k, j over R_k, in = dy, out = dx) with the same block read transposed.
``smoa_grad``   per (i-tile, c-tile) of block k: G = dy[:, R_k]^T x[:, C_k] over all tokens, H = G * W0[R_k, C_k],
    then the tile's share of dB_k = H A_k^T and dA_k = (s B_k)^T H, written as per-tile partial sums that the
    caller adds up (no atomics, so the CPU emulator models it exactly). G and H live in threadgroup memory only.

Deliberately kept to a subset that the CPU shim (tests/metal_shim) models honestly: no SIMD-group functions,
no atomics, no simdgroup matrices, no early exit that is not uniform over the threadgroup before a barrier,
only ``int`` index arithmetic (callers check that every index fits in 31 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("metal", "cuda")

# Tile shapes: THREADS = (BM / TM) * (BO / TO) = 256 for both kernels.
MODMM_TILE = dict(BM=64, BO=64, BJ=16, TM=4, TO=4)
GRAD_TILE = dict(BI=64, BC=64, BT=16, TI=4, TC=4)
THREADS = 256

_VOCAB = {
    "metal": {
        "$TID": "int(thread_index_in_threadgroup)",
        "$GX": "int(threadgroup_position_in_grid.x)",
        "$GY": "int(threadgroup_position_in_grid.y)",
        "$GZ": "int(threadgroup_position_in_grid.z)",
        "$BARRIER": "threadgroup_barrier(mem_flags::mem_threadgroup)",
        "$SHARED": "threadgroup",
        "$TOF": "static_cast<float>",
    },
    "cuda": {
        "$TID": "int(threadIdx.x)",
        "$GX": "int(blockIdx.x)",
        "$GY": "int(blockIdx.y)",
        "$GZ": "int(blockIdx.z)",
        "$BARRIER": "__syncthreads()",
        "$SHARED": "__shared__",
        "$TOF": "smoa_tof",
    },
}

# Float conversions: Metal's (and MLX's Metal) half/bfloat types convert with static_cast; CUDA's __half and
# __nv_bfloat16 may have their implicit conversions compiled out, so CUDA goes through the intrinsics.
_HEADERS = {
    "metal": "",
    "cuda": """
__device__ __forceinline__ float smoa_tof(float v) { return v; }
__device__ __forceinline__ float smoa_tof(__half v) { return __half2float(v); }
__device__ __forceinline__ float smoa_tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename U> __device__ __forceinline__ U smoa_fromf(float v);
template <> __device__ __forceinline__ float smoa_fromf<float>(float v) { return v; }
template <> __device__ __forceinline__ __half smoa_fromf<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 smoa_fromf<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
""",
}
_FROMF = {"metal": "static_cast<T>({})", "cuda": "smoa_fromf<T>({})"}

# -- the anchor W0[row, col] as float, dense or affine-quantized (MLX packing: low bits first) ----------
_ANCHOR_DENSE = "$TOF(w[row * d_in + col])"
_ANCHOR_QUANT = (
    "($TOF(scales[row * s_ld + col / GS]) * float((wq[row * wq_ld + col / (32 / BITS)] >> "
    "((col % (32 / BITS)) * BITS)) & ((1u << BITS) - 1u)) + $TOF(biases[row * s_ld + col / GS]))"
)

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
  (void)wq_ld; (void)s_ld; (void)d_out;
"""

MODMM_BODY = (
    _COMMON_PROLOGUE
    + """
  constexpr int NT = (BM / TM) * (BO / TO);
  const int no = MODE == 0 ? nr : nc;
  const int nj = MODE == 0 ? nc : nr;
  const int o0 = $GX * BO;
  if (o0 >= no) {
    return;  // uniform over the whole group, before any barrier
  }
  const int t0 = $GY * BM;
  const int ld_in = MODE == 0 ? d_in : d_out;
  const int ld_out = MODE == 0 ? d_out : d_in;
  $SHARED float xs[BJ * BM];
  $SHARED float ws[BJ * BO];
  const int tx = tid % (BO / TO);
  const int ty = tid / (BO / TO);
  float acc[TM * TO];
  for (int e = 0; e < TM * TO; ++e) {
    acc[e] = 0.0f;
  }
  for (int j0 = 0; j0 < nj; j0 += BJ) {
    for (int e = tid; e < BJ * BM; e += NT) {
      const int jj = e % BJ;
      const int t = t0 + e / BJ;
      const int j = j0 + jj;
      float v = 0.0f;
      if (t < N && j < nj) {
        const int src = MODE == 0 ? col_order[co + j] : row_order[ro + j];
        v = $TOF(inp[t * ld_in + src]);
      }
      xs[jj * BM + e / BJ] = v;
    }
    for (int e = tid; e < BJ * BO; e += NT) {
      const int jj = e % BJ;
      const int oo = e / BJ;
      const int o = o0 + oo;
      const int j = j0 + jj;
      float v = 0.0f;
      if (o < no && j < nj) {
        const int i = MODE == 0 ? o : j;
        const int c = MODE == 0 ? j : o;
        float ba = 0.0f;
        for (int q = 0; q < rk; ++q) {
          ba += sb[boff + i * rk + q] * a[aoff + q * nc + c];
        }
        const int row = row_order[ro + i];
        const int col = col_order[co + c];
        v = ba * $ANCHOR;
      }
      ws[jj * BO + oo] = v;
    }
    $BARRIER;
    for (int jj = 0; jj < BJ; ++jj) {
      float xv[TM];
      float wv[TO];
      for (int p = 0; p < TM; ++p) {
        xv[p] = xs[jj * BM + ty * TM + p];
      }
      for (int p = 0; p < TO; ++p) {
        wv[p] = ws[jj * BO + tx * TO + p];
      }
      for (int p = 0; p < TM; ++p) {
        for (int u = 0; u < TO; ++u) {
          acc[p * TO + u] += xv[p] * wv[u];
        }
      }
    }
    $BARRIER;
  }
  for (int p = 0; p < TM; ++p) {
    const int t = t0 + ty * TM + p;
    if (t >= N) {
      continue;
    }
    for (int u = 0; u < TO; ++u) {
      const int o = o0 + tx * TO + u;
      if (o < no) {
        const int dst = MODE == 0 ? row_order[ro + o] : col_order[co + o];
        out[t * ld_out + dst] = $FROMF(acc[p * TO + u]);
      }
    }
  }
"""
)

GRAD_BODY = (
    _COMMON_PROLOGUE
    + """
  constexpr int NT = (BI / TI) * (BC / TC);
  const int totA = dims[5];
  const int totB = dims[6];
  const int c0 = $GX * BC;
  const int i0 = $GY * BI;
  $SHARED float gs[BT * BI];
  $SHARED float xs[BT * BC];
  $SHARED float hs[BI * BC];
  const int tx = tid % (BC / TC);
  const int ty = tid / (BC / TC);
  float acc[TI * TC];
  for (int e = 0; e < TI * TC; ++e) {
    acc[e] = 0.0f;
  }
  for (int t0 = 0; t0 < N; t0 += BT) {
    for (int e = tid; e < BT * BI; e += NT) {
      const int t = t0 + e / BI;
      const int i = i0 + e % BI;
      gs[e] = (t < N && i < nr) ? $TOF(cot[t * d_out + row_order[ro + i]]) : 0.0f;
    }
    for (int e = tid; e < BT * BC; e += NT) {
      const int t = t0 + e / BC;
      const int c = c0 + e % BC;
      xs[e] = (t < N && c < nc) ? $TOF(x[t * d_in + col_order[co + c]]) : 0.0f;
    }
    $BARRIER;
    for (int tt = 0; tt < BT; ++tt) {
      float gv[TI];
      float xv[TC];
      for (int p = 0; p < TI; ++p) {
        gv[p] = gs[tt * BI + ty * TI + p];
      }
      for (int p = 0; p < TC; ++p) {
        xv[p] = xs[tt * BC + tx * TC + p];
      }
      for (int p = 0; p < TI; ++p) {
        for (int u = 0; u < TC; ++u) {
          acc[p * TC + u] += gv[p] * xv[u];
        }
      }
    }
    $BARRIER;
  }
  for (int p = 0; p < TI; ++p) {
    for (int u = 0; u < TC; ++u) {
      const int i = i0 + ty * TI + p;
      const int c = c0 + tx * TC + u;
      float h = 0.0f;
      if (i < nr && c < nc) {
        const int row = row_order[ro + i];
        const int col = col_order[co + c];
        h = acc[p * TC + u] * $ANCHOR;
      }
      hs[(ty * TI + p) * BC + tx * TC + u] = h;
    }
  }
  $BARRIER;
  // This c-tile's share of dB_k[i, q] = sum_c H[i, c] A_k[q, c] (the caller scales by s).
  for (int e = tid; e < BI * rk; e += NT) {
    const int ii = e / rk;
    const int q = e % rk;
    if (i0 + ii < nr) {
      float v = 0.0f;
      for (int cc = 0; cc < BC; ++cc) {
        v += (c0 + cc < nc) ? hs[ii * BC + cc] * a[aoff + q * nc + c0 + cc] : 0.0f;
      }
      db_part[$GX * totB + boff + (i0 + ii) * rk + q] = v;
    }
  }
  // This i-tile's share of dA_k[q, c] = sum_i (s B_k)[i, q] H[i, c].
  for (int e = tid; e < rk * BC; e += NT) {
    const int q = e / BC;
    const int cc = e % BC;
    if (c0 + cc < nc) {
      float v = 0.0f;
      for (int ii = 0; ii < BI; ++ii) {
        v += (i0 + ii < nr) ? sb[boff + (i0 + ii) * rk + q] * hs[ii * BC + cc] : 0.0f;
      }
      da_part[$GY * totA + aoff + q * nc + c0 + cc] = v;
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
    body = body.replace("$FROMF(acc[p * TO + u])", _FROMF[backend].format("acc[p * TO + u]"))
    for token, spelling in _VOCAB[backend].items():
        body = body.replace(token, spelling)
    if "$" in body:
        raise AssertionError(f"unrendered token in {kernel} for {backend}: {body[body.index('$'):][:40]!r}")
    inputs = data + ("dims", "meta", "row_order", "col_order", "a", "sb") + weight_inputs(quantized)
    name = f"smoa_{kernel}_{'q' if quantized else 'd'}"
    return KernelSource(name, inputs, outs, _HEADERS[backend], body)
