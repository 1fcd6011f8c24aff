"""An independent float64 numpy rendering of the reference SMoA semantics (misonsky/SMoA cpeft/tuners/smoa.py).

Written from the spec, not from smoa_mlx, so the tests compare two implementations: full economy SVD,
per-coordinate mean singular index, argsort, tensor_split groups, per-block Hadamard update scattered into a
dense Delta W.
"""

from __future__ import annotations

import numpy as np


def ref_scores(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, dtype=np.float64)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    ids = np.arange(s.shape[0], dtype=np.float64)

    def score(vectors):
        energy = vectors**2 * (s**2)[None, :]
        denom = np.maximum(energy.sum(axis=1), np.finfo(np.float64).eps)
        return (energy * ids[None, :]).sum(axis=1) / denom

    return score(u), score(vh.T)


def ref_order(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = ref_scores(w)
    return np.argsort(rows, kind="stable"), np.argsort(cols, kind="stable")


def ref_groups(order: np.ndarray, k: int) -> list[np.ndarray]:
    # np.array_split has torch.tensor_split's sizes: the first len % k pieces are one longer.
    return np.array_split(order, k)


def ref_ranks(r: int, k: int, branch_ranks=None) -> list[int]:
    if branch_ranks is not None:
        return list(branch_ranks)
    return [r // k + (1 if i < r % k else 0) for i in range(k)]


def ref_delta(w: np.ndarray, a_list, b_list, k: int, scale: float, orders=None) -> np.ndarray:
    """Dense Delta W with blocks s (B_k A_k) * W[R_k, C_k]; ``orders`` defaults to the reference ordering."""
    w = np.asarray(w, dtype=np.float64)
    row_order, col_order = orders if orders is not None else ref_order(w)
    delta = np.zeros_like(w)
    for rows, cols, a, b in zip(ref_groups(row_order, k), ref_groups(col_order, k), a_list, b_list):
        if a.shape[0] == 0:
            continue
        anchor = w[np.ix_(rows, cols)]
        delta[np.ix_(rows, cols)] = (np.asarray(b, np.float64) @ np.asarray(a, np.float64)) * anchor
    return scale * delta


def _unpack(wq, bits: int) -> np.ndarray:
    """The codes of MLX's packed layout (uint32 words, low bits first), one per weight."""
    wq = np.asarray(wq).astype(np.uint64)
    per_word = 32 // bits
    mask = (1 << bits) - 1
    return np.stack([(wq >> (bits * i)) & mask for i in range(per_word)], axis=-1).reshape(wq.shape[0], -1)


def ref_dequantize(wq, scales, biases, group_size: int, bits: int) -> np.ndarray:
    """Affine dequantization of MLX's packed layout."""
    s = np.repeat(np.asarray(scales, np.float64), group_size, axis=1)
    z = np.repeat(np.asarray(biases, np.float64), group_size, axis=1)
    return _unpack(wq, bits).astype(np.float64) * s + z


def _minifloat(codes, exp_bits: int, man_bits: int) -> np.ndarray:
    """Sign, exponent (bias 2^(e-1) - 1), mantissa codes as float64, subnormals included (OCP FP4 E2M1, FP8 E4M3;
    E4M3's NaN code 0x7f is not produced by quantization and not handled)."""
    codes = np.asarray(codes).astype(np.int64)
    man = codes & ((1 << man_bits) - 1)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    sign = np.where(codes >> (exp_bits + man_bits) & 1, -1.0, 1.0)
    bias = (1 << (exp_bits - 1)) - 1
    frac = man / float(1 << man_bits)
    value = np.where(exp == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (exp - bias))
    return sign * value


def ref_dequantize_fp(wq, scales, group_size: int, bits: int, mode: str) -> np.ndarray:
    """Dequantization of MLX's microscaling modes, from the formats' definitions: mxfp4 = E2M1 values times E8M0
    scales (2^(s - 127)), nvfp4 = E2M1 times E4M3 scales, mxfp8 = E4M3 times E8M0; packed as the affine codes."""
    codes = _unpack(wq, bits)
    values = _minifloat(codes, 2, 1) if bits == 4 else _minifloat(codes, 4, 3)
    scales = np.asarray(scales).astype(np.int64)
    s = _minifloat(scales, 4, 3) if mode == "nvfp4" else 2.0 ** (scales - 127)
    return values * np.repeat(s, group_size, axis=1)


def ref_layer(w: np.ndarray, x: np.ndarray, cot: np.ndarray, a_list, b_list, k: int, scale: float, orders,
              with_base: bool = True):
    """float64 forward and gradients of y = x (W0 + Delta W)^T (``with_base=False``: x Delta W^T alone) for the
    cotangent ``cot``: [y, dx, dA_0..dA_K-1, dB_0..dB_K-1]. dL/d(B_k A_k) = s (cot^T x)[R_k, C_k] * W0[R_k, C_k]."""
    w = np.asarray(w, dtype=np.float64)
    x2 = np.asarray(x, np.float64).reshape(-1, w.shape[1])
    g2 = np.asarray(cot, np.float64).reshape(-1, w.shape[0])
    full = ref_delta(w, a_list, b_list, k, scale, orders) + (w if with_base else 0.0)
    gram = g2.T @ x2
    da, db = [], []
    for rows, cols, a, b in zip(ref_groups(orders[0], k), ref_groups(orders[1], k), a_list, b_list):
        h = scale * gram[np.ix_(rows, cols)] * w[np.ix_(rows, cols)]
        da.append(np.asarray(b, np.float64).T @ h)
        db.append(h @ np.asarray(a, np.float64).T)
    return [x2 @ full.T, g2 @ full, *da, *db]
